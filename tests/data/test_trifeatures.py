"""Trifeatures: rendering, the held-out combination split, pairs, labels, generation, builder."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from commlab.data import build_data
from commlab.data import trifeatures as tri
from commlab.data.parquet import read_dataset, validate_dataset
from commlab.data.shapes import SHAPES
from commlab.data.textures import TEXTURES
from tests.data.permissions import assert_written_with_ordinary_permissions

SMALL = dict(size=32, pairs=600, test_pairs=300)
GREY = np.array([128, 128, 128], dtype=np.uint8)
# The colours of the reference (section 4.1), written out here rather than imported.
RGB = np.round(
    255
    * np.array(
        [
            [1, 0, 0],
            [0, 1, 0],
            [0, 0, 1],
            [1, 1, 0],
            [1, 0.4, 1],
            [0, 1, 1],
            [0.3, 0, 0.5],
            [0.1, 0.4, 0.5],
            [1, 0.6, 0],
            [1, 1, 1],
        ]
    )
).astype(np.uint8)


@pytest.fixture(scope="module")
def gen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tri.generate_trifeatures(tmp_path_factory.mktemp("tri"), seed=0, progress=False, **SMALL)


@pytest.fixture(scope="module")
def attrs(gen: Path) -> dict[str, np.ndarray]:
    return tri.read_attributes(gen)[0]


def files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


# ---------------------------------------------------------------- generation
def test_same_seed_same_bytes_different_seed_different(gen: Path, tmp_path: Path) -> None:
    again = tri.generate_trifeatures(tmp_path / "a", seed=0, progress=False, **SMALL)
    other = tri.generate_trifeatures(tmp_path / "b", seed=1, progress=False, **SMALL)
    assert again.name == gen.name and other.name != gen.name
    same, diff = files(gen), files(other)
    assert sorted(same) == [
        "attributes.parquet",
        "biased/modality-image1.parquet",
        "biased/samples.parquet",
        "unbiased/modality-image1.parquet",
        "unbiased/samples.parquet",
    ]
    assert same == files(again)
    assert sorted(diff) == sorted(same)
    assert all(same[k] != diff[k] for k in same)


def test_layout_and_validity(gen: Path) -> None:
    for name in ("unbiased", "biased"):
        assert validate_dataset(gen / name) == []
    unbiased, biased = read_dataset(gen / "unbiased"), read_dataset(gen / "biased")
    assert unbiased.names == ["image1", "image2"]
    images = unbiased.modalities[0].values
    assert images.dtype == torch.uint8 and images.shape == (2600, 3, 32, 32)
    assert torch.equal(images, biased.modalities[0].values)
    assert {k: len(v) for k, v in unbiased.splits.items()} == {"train": 600, "test": 300}
    assert set(unbiased.tasks) == {"share", "unique1", "unique2", "synergy"}
    assert unbiased.tasks["synergy"].kind == "binary" and unbiased.tasks["share"].num_classes == 10
    # both datasets score on the same unbiased test pairs
    t_u, t_b = unbiased.split("test"), biased.split("test")
    for mu, mb in zip(unbiased.modalities, biased.modalities, strict=True):
        assert torch.equal(mu.index[t_u], mb.index[t_b])
    assert unbiased.fingerprint.endswith("-unbiased") and biased.fingerprint.endswith("-biased")


def test_test_combinations_never_appear_in_train(attrs: dict[str, np.ndarray]) -> None:
    combo = attrs["shape"] * 100 + attrs["texture"] * 10 + attrs["colour"]
    train, test = combo[attrs["split"] == 0], combo[attrs["split"] == 1]
    assert train.size == 2400 and test.size == 200
    assert np.unique(train).size == 800 and np.unique(test).size == 200
    assert np.all(np.unique(train, return_counts=True)[1] == 3)
    assert not set(train) & set(test)
    assert set(train) | set(test) == set(range(1000))


def pairs_of(ds, split: str) -> tuple[np.ndarray, np.ndarray]:
    ids = ds.split(split)
    return ds.modalities[0].index[ids].numpy(), ds.modalities[1].index[ids].numpy()


@pytest.mark.parametrize("variant", ["unbiased", "biased"])
def test_pairs_share_shape_stay_in_split_and_are_distinct(gen: Path, attrs, variant: str) -> None:
    ds = read_dataset(gen / variant)
    for split, code in (("train", 0), ("test", 1)):
        i, j = pairs_of(ds, split)
        assert np.array_equal(attrs["shape"][i], attrs["shape"][j])
        assert np.all(attrs["split"][i] == code) and np.all(attrs["split"][j] == code)
        assert np.unique(i * 10_000 + j).size == i.size  # sampled without replacement


def test_biased_pairs_follow_the_texture_colour_permutation(gen: Path, attrs) -> None:
    pi = np.random.default_rng([0, 1234]).permutation(10)  # the documented stream
    assert tri.read_attributes(gen)[1]["correlation"] == pi.tolist()
    i, j = pairs_of(read_dataset(gen / "biased"), "train")
    assert np.all(attrs["colour"][j] == pi[attrs["texture"][i]])
    i, j = pairs_of(read_dataset(gen / "unbiased"), "train")
    hit = np.mean(attrs["colour"][j] == pi[attrs["texture"][i]])
    assert 0.05 < hit < 0.2  # unbiased: the relation holds by chance only (~10 %)


@pytest.mark.parametrize("variant", ["unbiased", "biased"])
def test_labels_agree_with_a_rederivation(gen: Path, attrs, variant: str) -> None:
    pi = np.random.default_rng([0, 1234]).permutation(10)
    ds = read_dataset(gen / variant)
    i, j = ds.modalities[0].index.numpy(), ds.modalities[1].index.numpy()
    synergy = np.array(
        [int(pi[t] == c) for t, c in zip(attrs["texture"][i], attrs["colour"][j], strict=True)]
    )
    assert np.array_equal(ds.labels["share"].numpy(), attrs["shape"][i])
    assert np.array_equal(ds.labels["unique1"].numpy(), attrs["texture"][i])
    assert np.array_equal(ds.labels["unique2"].numpy(), attrs["texture"][j])
    assert np.array_equal(ds.labels["synergy"].numpy(), synergy)
    assert all(y.dtype == torch.int64 for y in ds.labels.values())


def test_fewer_candidates_than_requested_uses_them_all(tmp_path: Path) -> None:
    root = tri.generate_trifeatures(tmp_path, size=32, pairs=50, test_pairs=10**6, progress=False)
    attrs = tri.read_attributes(root)[0]
    shapes = attrs["shape"][attrs["split"] == 1]
    available = int(sum(np.sum(shapes == k) ** 2 for k in range(10)))  # ordered, i == j allowed
    ds = read_dataset(root / "unbiased")
    assert len(ds.split("test")) == available and len(ds.split("train")) == 50


def test_existing_valid_output_is_reused_and_broken_output_regenerated(tmp_path: Path) -> None:
    root = tri.generate_trifeatures(tmp_path, size=32, pairs=50, test_pairs=50, progress=False)
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*.parquet")}
    assert (
        tri.generate_trifeatures(tmp_path, size=32, pairs=50, test_pairs=50, progress=False) == root
    )
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*.parquet")} == before
    good = files(root)
    (root / "biased" / "modality-image1.parquet").unlink()
    assert (
        tri.generate_trifeatures(tmp_path, size=32, pairs=50, test_pairs=50, progress=False) == root
    )
    assert files(root) == good


def test_concurrent_generators_render_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    renders = []
    real = tri.render_trifeatures

    def counting(*args, **kwargs):
        renders.append(1)
        time.sleep(0.3)  # keep the lock held while the other caller arrives
        return real(*args, **kwargs)

    monkeypatch.setattr(tri, "render_trifeatures", counting)
    results: list[Path] = []

    def work() -> None:
        results.append(
            tri.generate_trifeatures(tmp_path, size=32, pairs=40, test_pairs=40, progress=False)
        )

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and results[0] == results[1] and len(renders) == 1
    assert tri.is_complete(results[0])


def test_failure_leaves_no_half_written_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = tri.write_dataset
    calls = []

    def failing(ds, out, params=None):
        calls.append(out)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(ds, out, params)

    monkeypatch.setattr(tri, "write_dataset", failing)
    with pytest.raises(OSError, match="disk full"):
        tri.generate_trifeatures(tmp_path, size=32, pairs=40, test_pairs=40, progress=False)
    assert len(calls) == 2
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_progress_false_is_silent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tri.generate_trifeatures(tmp_path, size=32, pairs=40, test_pairs=40, progress=False)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


@pytest.mark.parametrize("size", [64, 32])
def test_generation_time_full_size(tmp_path: Path, size: int) -> None:
    start = time.perf_counter()
    root = tri.generate_trifeatures(tmp_path, size=size, progress=False)  # 2,400 + 200 images
    elapsed = time.perf_counter() - start
    print(
        f"\ntrifeatures generation, 2400+200 images at {size}px, 10000+4000 pairs: {elapsed:.2f} s"
    )
    ds = read_dataset(root / "unbiased")
    assert ds.modalities[0].values.shape == (2600, 3, size, size)
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 10000, "test": 4000}
    assert elapsed < 60


# ---------------------------------------------------------------- rendering
def render(shapes, textures, colours, size=32, seed=5) -> np.ndarray:
    return tri.render_trifeatures(
        np.asarray(shapes),
        np.asarray(textures),
        np.asarray(colours),
        size,
        np.random.default_rng(seed),
    )


def test_render_is_grey_or_the_declared_colour() -> None:
    # every (shape, texture) with colours cycling; each pixel must be grey or the image's colour
    shapes = np.repeat(np.arange(10), 10)
    textures = np.tile(np.arange(10), 10)
    colours = (shapes + 3 * textures) % 10
    images = render(shapes, textures, colours)
    assert images.dtype == np.uint8 and images.shape == (100, 3, 32, 32)
    pix = images.transpose(0, 2, 3, 1)  # (N, H, W, 3)
    is_grey = np.all(pix == GREY, axis=-1)
    is_colour = np.all(pix == RGB[colours][:, None, None, :], axis=-1)
    assert np.all(is_grey | is_colour)
    assert np.all(is_colour.mean(axis=(1, 2)) > 0.03)  # every texture leaves colour visible
    for n in range(len(images)):  # the dominant non-grey colour is the declared one
        rgb, counts = np.unique(pix[n][~is_grey[n]], axis=0, return_counts=True)
        assert np.array_equal(rgb[np.argmax(counts)], RGB[colours[n]])


def test_solid_shapes_are_large_and_grey_around() -> None:
    images = render(np.arange(10), np.zeros(10, int), np.arange(10))
    shape = np.any(images != 128, axis=1)
    assert np.all(shape.mean(axis=(1, 2)) > 0.15), shape.mean(axis=(1, 2))
    assert np.all(shape[:, 0, :].mean(axis=1) < 0.5)  # grey remains at the border
    assert len({m.tobytes() for m in shape}) == 10  # ten different silhouettes


def test_textures_are_distinguishable_at_32px() -> None:
    # same rng -> same placement and rotations, so only the texture changes between renders
    n, size = 20, 32
    shapes = np.arange(n) % 10
    solid = render(shapes, np.zeros(n, int), np.zeros(n, int), size)
    inside = np.any(solid != 128, axis=1)
    masks = []
    for t in range(len(TEXTURES)):
        img = render(shapes, np.full(n, t), np.zeros(n, int), size)
        coloured = np.any(img != 128, axis=1)
        assert not np.any(coloured & ~inside)  # texture only inside the shape
        masks.append(coloured)
    frac = [m.sum() / inside.sum() for m in masks]
    assert frac[0] == 1.0 and all(0.15 < f < 0.75 for f in frac[1:]), frac
    stripes_var = np.var(render(shapes, np.ones(n, int), np.zeros(n, int), size)[:, 0][inside])
    assert np.var(solid[:, 0][inside]) == 0 and stripes_var > 1000
    for a in range(len(TEXTURES)):  # aligned renders of two textures overlap little (Jaccard)
        for b in range(a + 1, len(TEXTURES)):
            ma, mb = masks[a][inside], masks[b][inside]
            distance = np.sum(ma != mb) / np.sum(ma | mb)
            assert distance > 0.3, (TEXTURES[a], TEXTURES[b], distance)


def test_render_is_deterministic_and_independent_of_chunking(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    args = (np.arange(10), np.arange(10), np.arange(10))
    assert np.array_equal(render(*args, seed=3), render(*args, seed=3))
    assert not np.array_equal(render(*args, seed=3), render(*args, seed=4))
    many = (np.arange(300) % 10, np.full(300, 5), np.arange(300) % 10)  # noise: random per image
    whole = render(*many, size=64, seed=1)
    assert len(np.unique(whole[:, 0], axis=0)) == 300
    monkeypatch.setattr(tri, "_PIXELS_PER_CHUNK", 7 * 64 * 64)
    assert np.array_equal(render(*many, size=64, seed=1), whole)


@pytest.mark.parametrize("size", [32, 48, 96])
def test_any_size_from_32(size: int) -> None:
    images = render(np.arange(10), np.arange(10), np.arange(10), size=size)
    assert images.shape == (10, 3, size, size)


def test_render_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="size"):
        render([0], [0], [0], size=31)
    with pytest.raises(ValueError, match="shapes"):
        render([10], [0], [0])
    with pytest.raises(ValueError, match="equal length"):
        render([0, 1], [0], [0])
    assert len(SHAPES) == len(TEXTURES) == len(tri.COLOURS) == 10


# ---------------------------------------------------------------- builder
def test_builder_pretrains_biased_and_probes_unbiased(tmp_path: Path) -> None:
    params = dict(size=32, pairs=300, test_pairs=200, biased=True, data_seed=2)
    bundle = build_data("trifeatures", str(tmp_path), 0, params)
    assert bundle.description == "trifeatures 32px, 2400+200 images, 300 pairs, biased"
    assert bundle.pretrain.labels["synergy"][bundle.pretrain.split("train")].float().mean() == 1.0
    assert bundle.probe.labels["synergy"][bundle.probe.split("train")].float().mean() < 0.3
    assert bundle.pretrain.modalities[0].values is bundle.probe.modalities[0].values
    pi = np.random.default_rng([2, 1234]).permutation(10)
    assert (
        tri.read_attributes(next(p for p in tmp_path.iterdir() if p.is_dir()))[1]["correlation"]
        == pi.tolist()
    )
    # the training seed does not change the data; unbiased pretraining probes the same dataset
    other = build_data("trifeatures", str(tmp_path), 7, {**params, "biased": False})
    assert other.pretrain is other.probe and other.probe.fingerprint == bundle.probe.fingerprint
    assert other.description.endswith("300 pairs, unbiased")


def test_builder_rejects_unknown_and_bad_params(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown param 'sizes'.*valid: biased, data_seed, pairs"):
        build_data("trifeatures", str(tmp_path), 0, {"sizes": 32})
    with pytest.raises(ValueError, match="'biased' must be a bool"):
        build_data("trifeatures", str(tmp_path), 0, {"biased": "yes", "size": 32})
    with pytest.raises(ValueError, match="'size' must be an int >= 32"):
        build_data("trifeatures", str(tmp_path), 0, {"size": 16})
    assert list(tmp_path.iterdir()) == []


def test_builder_adds_colour_diagnostics_from_the_attributes(tmp_path: Path) -> None:
    bundle = build_data("trifeatures", str(tmp_path), 0, dict(size=32, pairs=300, test_pairs=200))
    probe = bundle.probe
    attrs, _ = tri.read_attributes(next(p for p in tmp_path.iterdir() if p.is_dir()))
    for k in (1, 2):
        task = probe.tasks[f"colour{k}"]
        assert task.diagnostic and task.kind == "multiclass" and task.chance == 0.1
        images = probe.modalities[k - 1].index.numpy()
        assert (probe.labels[f"colour{k}"].numpy() == attrs["colour"][images]).all()
    # the R/U/S tasks stay what they were and are not diagnostic
    assert not any(probe.tasks[t].diagnostic for t in ("share", "unique1", "unique2", "synergy"))
    # the pixels agree: a pair's image-2 colour is drawn in image 2
    colour2 = probe.labels["colour2"][:20].numpy()
    img2 = probe.modalities[1].values[probe.modalities[1].index[:20]].numpy()
    for c, img in zip(colour2, img2, strict=True):
        pixels = img.reshape(3, -1).T
        assert (pixels == tri.COLOUR_UINT8[c]).all(1).any()


def test_generated_dataset_has_ordinary_permissions(tmp_path: Path) -> None:
    assert_written_with_ordinary_permissions(
        lambda: tri.generate_trifeatures(tmp_path, seed=0, progress=False, **SMALL)
    )
