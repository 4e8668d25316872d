"""Vision&Touch h5 episodes: samples and targets, file-level split, malformed files, pretraining."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from commlab.data.importers import import_dataset
from commlab.data.importers.visionandtouch import file_split
from commlab.data.parquet import read_dataset, read_schema, validate_dataset

from .fixtures import pretrain_one_epoch, write_vt_dir
from .helpers import assert_import_fails, assert_trained, same_files


@pytest.fixture(scope="module")
def vt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_vt_dir(tmp_path_factory.mktemp("vt") / "triangle_real_data", files=5, size=128)


@pytest.fixture
def small_vt(tmp_path: Path) -> Path:
    return write_vt_dir(tmp_path / "small", files=5, size=16)


def test_import_samples_targets_and_split(small_vt: Path, tmp_path: Path) -> None:
    out = import_dataset("visionandtouch", small_vt, tmp_path / "vt", progress=False)
    assert validate_dataset(out) == []
    ds = read_dataset(out)
    assert len(ds) == 5 * 49
    assert ds.names == ["image", "force", "proprio"]
    assert [m.kind for m in ds.modalities] == ["image", "sequence", "tabular"]
    first = sorted(small_vt.glob("*.h5"))[0]
    with h5py.File(first, "r") as f:
        image, force = f["image"][()], f["ee_forces_continuous"][()]
        proprio, contact = f["proprio"][()], f["contact"][()]
    for k in (0, 17, 48):  # file 0 holds samples 0..48
        img, frc, prp = (m.values[k] for m in ds.modalities)
        assert torch.equal(img, torch.from_numpy(image[k].transpose(2, 0, 1)))
        assert torch.allclose(frc, torch.from_numpy(np.tanh(force[k][-32:])).float())
        assert torch.allclose(prp, torch.from_numpy(proprio[k][:8]).float())
        assert int(ds.labels["contact"][k]) == int(contact[k + 1].sum() > 0)
        assert torch.allclose(ds.labels["ee_yaw"][k], torch.from_numpy(proprio[k + 1][:4]).float())
    assert ds.tasks["contact"].kind == "binary" and ds.tasks["ee_yaw"].kind == "regression"
    episodes = read_schema(out)["params"]["episodes"]
    assert [len(episodes[s]) for s in ("train", "val", "test")] == [3, 1, 1]
    assert not set(episodes["val"]) & set(episodes["test"])
    ids = {s: set(ds.split(s).tolist()) for s in ("train", "val", "test")}
    assert sum(map(len, ids.values())) == len(ds)
    assert [len(v) for v in ids.values()] == [147, 49, 49]


def test_file_split_is_disjoint_and_deterministic() -> None:
    for n in (3, 5, 40, 3000):
        split = file_split(n, 0.1, 0.2, 42)
        together = np.concatenate(list(split.values()))
        assert np.array_equal(np.sort(together), np.arange(n))
        assert len(split["val"]) >= 1 and len(split["test"]) >= 1 and len(split["train"]) >= 1
        assert all(
            np.array_equal(a, b)
            for a, b in zip(split.values(), file_split(n, 0.1, 0.2, 42).values(), strict=True)
        )
    assert len(file_split(3000, 0.1, 0.2, 42)["test"]) == 600


def test_resize_and_byte_identical_reimport(vt: Path, tmp_path: Path) -> None:
    a = import_dataset("visionandtouch", vt, tmp_path / "a", image_size=32, progress=False)
    b = import_dataset("visionandtouch", vt, tmp_path / "b", image_size=32, progress=False)
    assert same_files(a, b)
    ds = read_dataset(a)
    assert tuple(ds.modalities[0].values.shape[1:]) == (3, 32, 32)
    assert ds.modalities[0].values.dtype == torch.uint8


def test_channels_first_images_and_modality_choice(tmp_path: Path) -> None:
    src = write_vt_dir(tmp_path / "chw", files=3, size=8)
    for path in src.glob("*.h5"):
        with h5py.File(path, "r+") as f:
            image = f["image"][()]
            del f["image"]
            f.create_dataset("image", data=image.transpose(0, 3, 1, 2))
    out = import_dataset(
        "visionandtouch", src, tmp_path / "o", modalities="image,proprio", progress=False
    )
    ds = read_dataset(out)
    assert ds.names == ["image", "proprio"]
    with h5py.File(sorted(src.glob("*.h5"))[0], "r") as f:
        assert torch.equal(ds.modalities[0].values[3], torch.from_numpy(f["image"][3]))


def _copy_dir(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.glob("*.h5"):
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def _edit(path: Path, key: str, value: np.ndarray | None) -> None:
    with h5py.File(path, "r+") as f:
        del f[key]
        if value is not None:
            f.create_dataset(key, data=value)


def test_missing_dataset(small_vt: Path, tmp_path: Path) -> None:
    bad = sorted(small_vt.glob("*.h5"))[2]
    _edit(bad, "contact", None)
    assert_import_fails(
        "visionandtouch", small_vt, tmp_path / "out", str(bad), "[contact]", "missing dataset"
    )


def test_truncated_h5(small_vt: Path, tmp_path: Path) -> None:
    bad = sorted(small_vt.glob("*.h5"))[1]
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    assert_import_fails("visionandtouch", small_vt, tmp_path / "out", str(bad), "truncated")


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("proprio", np.zeros((50, 3)), ("[proprio]", "unexpected shape")),
        ("ee_forces_continuous", np.zeros((49, 50, 6)), ("[ee_forces_continuous]", "49")),
        ("image", np.zeros((50, 16, 16, 3), np.float32), ("[image]", "uint8")),
    ],
)
def test_wrong_shape_or_dtype(small_vt, tmp_path, key, value, words) -> None:
    bad = sorted(small_vt.glob("*.h5"))[4]
    _edit(bad, key, value)
    assert_import_fails("visionandtouch", small_vt, tmp_path / "out", str(bad), *words)


def test_nan_force(small_vt: Path, tmp_path: Path) -> None:
    bad = sorted(small_vt.glob("*.h5"))[0]
    with h5py.File(bad, "r+") as f:
        force = f["ee_forces_continuous"][()]
        force[3, 40, 2] = np.nan
        f["ee_forces_continuous"][...] = force
    assert_import_fails(
        "visionandtouch", small_vt, tmp_path / "out", str(bad), "[ee_forces_continuous]", "NaN"
    )


def test_too_few_episodes(tmp_path: Path) -> None:
    src = write_vt_dir(tmp_path / "two", files=2, size=8)
    assert_import_fails("visionandtouch", src, tmp_path / "out", str(src), "at least 3")


def test_pretrain_one_epoch_on_imported_visionandtouch(vt: Path, tmp_path: Path) -> None:
    out = import_dataset("visionandtouch", vt, tmp_path / "vt", image_size=32, progress=False)
    tiny = [
        "model.embed_dim=16",
        "model.modalities.0.encoder.params.width=8",
        "model.modalities.0.encoder.params.out_channels=16",
        "model.modalities.1.encoder.params.out_dim=16",
        "model.modalities.2.encoder.params.out_dim=16",
    ]
    metrics = pretrain_one_epoch(out, "visionandtouch", tiny)
    assert_trained(metrics, "probe/contact/balanced_acc", "probe/ee_yaw/mse")
