"""Trifeatures: the bimodal controlled experiment of CoMM (reference notes section 4).

Images show one of 10 shapes, filled with one of 10 textures in one of 10 colours, on grey. The
1000 (shape, texture, colour) combinations are split 80/20 with the seed, so test combinations
never occur in training; each train combination is rendered `per_combination` times, each test
combination once. A sample is an ordered pair (image i, image j) from one split that shares the
shape (redundancy); the textures are unique to each image; in *biased* pairs the colour of j is
π(texture of i) for a fixed permutation π of the colours (synergy: only the pair reveals it).

Tasks: `share` = shape, `unique1` / `unique2` = texture of image 1 / 2, `synergy` = whether
(texture 1, colour 2) is a correlated pair; the diagnostic tasks `colour1` / `colour2` (colour of
image 1 / 2, derived from ``attributes.parquet`` when loading) complete the table of what frozen
features hold, so a missed uniqueness or synergy shows its cause. π is drawn from its own generator,
``np.random.default_rng([data_seed, 1234]).permutation(10)``, never from the rendering stream, so
every process agrees on it (the reference couples them; see its pitfalls). Other streams:
``[data_seed, 0]`` combination split, ``[data_seed, 1]`` rendering, ``[data_seed, 2|3|4]``
unbiased-train / biased-train / test pair sampling.

`generate_trifeatures` renders once and writes ``<out>/<fingerprint>/`` holding the datasets
``unbiased`` (train + test: unbiased pairs) and ``biased`` (train: biased pairs, test: the same
unbiased test pairs) in the format of `commlab.data.parquet`, plus ``attributes.parquet`` (one row
per image: split, shape, texture, colour; π in its metadata).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from rich.progress import Progress

from commlab.data import DATASETS
from commlab.data.base import DataBundle, Modality, MultimodalDataset, Task
from commlab.data.parquet import (
    FORMAT_VERSION,
    read_dataset,
    shareable,
    validate_dataset,
    write_dataset,
)
from commlab.data.shapes import SHAPES, shape_mask
from commlab.data.textures import TEXTURES, texture_mask, texture_period

COLOURS = ("red", "green", "blue", "yellow", "pink", "cyan", "purple", "ocean", "orange", "white")
COLOUR_RGB = (
    (1.0, 0.0, 0.0),
    (0.0, 1.0, 0.0),
    (0.0, 0.0, 1.0),
    (1.0, 1.0, 0.0),
    (1.0, 0.4, 1.0),
    (0.0, 1.0, 1.0),
    (0.3, 0.0, 0.5),
    (0.1, 0.4, 0.5),
    (1.0, 0.6, 0.0),
    (1.0, 1.0, 1.0),
)
GREY = (0.5, 0.5, 0.5)
COLOUR_UINT8 = np.round(np.array(COLOUR_RGB) * 255).astype(np.uint8)  # (10, 3)
GREY_UINT8 = np.round(np.array(GREY) * 255).astype(np.uint8)
SHAPE_BOX = 0.75  # side of the shape's template box / image side (reference: 128/224)
NUM_COMBINATIONS = 1000
TEST_FRACTION = 0.2
CORRELATION_STREAM = 1234
RENDERER_VERSION = 1  # bump when rendering changes: it is part of the fingerprint
MIN_SIZE = 32
_PIXELS_PER_CHUNK = 1 << 19


# ---------------------------------------------------------------- rendering
def render_trifeatures(
    shapes: np.ndarray,
    textures: np.ndarray,
    colours: np.ndarray,
    size: int,
    rng: np.random.Generator,
    on_progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Render one image per (shape, texture, colour) triple: uint8 (N, 3, size, size).

    Shapes get a random integer rotation in [-45, 45) and a random integer placement of their
    box (SHAPE_BOX * size); textures get their own rotation and a random phase. Every pixel is
    either the colour (inside shape and texture) or grey. Work is batched over images; Python
    loops only run over the 10 shape / texture kinds per chunk. `on_progress(k)` reports k
    finished images.
    """
    shapes, textures, colours = (np.asarray(a, dtype=np.int64) for a in (shapes, textures, colours))
    if not (shapes.shape == textures.shape == colours.shape and shapes.ndim == 1):
        raise ValueError("shapes, textures and colours must be 1-D arrays of equal length")
    for name, a, k in (
        ("shapes", shapes, SHAPES),
        ("textures", textures, TEXTURES),
        ("colours", colours, COLOURS),
    ):
        if a.size and (a.min() < 0 or a.max() >= len(k)):
            raise ValueError(f"{name} must lie in [0, {len(k)})")
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < MIN_SIZE:
        raise ValueError(f"size must be an int >= {MIN_SIZE}, got {size!r}")
    size = int(size)
    n = shapes.size
    box = round(SHAPE_BOX * size)
    angle = np.deg2rad(rng.integers(-45, 45, n)).astype(np.float32)
    centre = rng.integers(0, size - box + 1, (n, 2)).astype(np.float32) + box / 2
    tex_angle = np.deg2rad(rng.integers(-45, 45, n)).astype(np.float32)
    phase = rng.random((n, 2), dtype=np.float32)
    seeds = rng.integers(0, np.iinfo(np.uint64).max, n, dtype=np.uint64, endpoint=True)
    period = texture_period(size)
    grain = max(1.0, period / 10.0) / period  # noise/rain cells of ~1 px, in periods

    pix = np.arange(size, dtype=np.float32) + 0.5  # pixel centres
    out = np.empty((n, 3, size, size), dtype=np.uint8)
    step = max(1, _PIXELS_PER_CHUNK // (size * size))
    for lo in range(0, n, step):
        sl = slice(lo, min(n, lo + step))
        cos, sin = _col(np.cos(angle[sl])), _col(np.sin(angle[sl]))
        dx, dy = pix[None, None, :] - _col(centre[sl, 0]), pix[None, :, None] - _col(centre[sl, 1])
        u, v = (cos * dx + sin * dy) / (box / 2), (cos * dy - sin * dx) / (box / 2)
        inside = _by_kind(shapes[sl], shape_mask, u, v)

        cos, sin = _col(np.cos(tex_angle[sl])), _col(np.sin(tex_angle[sl]))
        ex, ey = pix[None, None, :] - size / 2, pix[None, :, None] - size / 2
        x = (cos * ex + sin * ey) / period + _col(phase[sl, 0])
        y = (cos * ey - sin * ex) / period + _col(phase[sl, 1])
        coloured = _by_kind(textures[sl], texture_mask, x, y, _col(seeds[sl]), grain=grain)

        rgb = COLOUR_UINT8[colours[sl]][:, :, None, None]
        out[sl] = np.where((inside & coloured)[:, None], rgb, GREY_UINT8[None, :, None, None])
        if on_progress is not None:
            on_progress(sl.stop - sl.start)
    return out


def _col(a: np.ndarray) -> np.ndarray:
    return a[:, None, None]


def _by_kind(
    kinds: np.ndarray, fn: Callable[..., np.ndarray], *arrays: np.ndarray, **kw: Any
) -> np.ndarray:
    """Call `fn(kind, *rows_of_arrays, **kw)` once per kind present; scatter the bool results."""
    out = np.zeros(arrays[0].shape, dtype=bool)
    for k in np.unique(kinds):
        rows = kinds == k
        out[rows] = fn(int(k), *(a[rows] for a in arrays), **kw)
    return out


# ---------------------------------------------------------------- splits, pairs, tasks
def combination_split(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted train and test combination ids (shape * 100 + texture * 10 + colour), 80/20."""
    perm = np.random.default_rng([seed, 0]).permutation(NUM_COMBINATIONS)
    n_test = round(TEST_FRACTION * NUM_COMBINATIONS)
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def correlation_permutation(seed: int) -> np.ndarray:
    """π: texture t is correlated with colour π[t]. Its own stream, independent of rendering."""
    return np.random.default_rng([seed, CORRELATION_STREAM]).permutation(len(COLOURS))


def image_attributes(seed: int, per_combination: int) -> dict[str, np.ndarray]:
    """One entry per image: `split` (0 train, 1 test), `shape`, `texture`, `colour` (int64)."""
    train, test = combination_split(seed)
    combo = np.concatenate([np.repeat(train, per_combination), test])
    split = np.concatenate([np.zeros(train.size * per_combination), np.ones(test.size)])
    return {
        "split": split.astype(np.int64),
        "shape": combo // 100,
        "texture": combo // 10 % 10,
        "colour": combo % 10,
    }


def candidate_pairs(attrs: dict[str, np.ndarray], split: int, pi: np.ndarray | None) -> np.ndarray:
    """Every ordered same-shape pair (i, j) of one split, i == j included, as (P, 2) int64; with
    `pi`, only pairs whose colour(j) == pi[texture(i)] (biased)."""
    ids = np.flatnonzero(attrs["split"] == split)
    parts = []
    for k in range(len(SHAPES)):
        members = ids[attrs["shape"][ids] == k]
        i, j = np.repeat(members, members.size), np.tile(members, members.size)
        if pi is not None:
            keep = attrs["colour"][j] == pi[attrs["texture"][i]]
            i, j = i[keep], j[keep]
        parts.append(np.stack([i, j], 1))
    return np.concatenate(parts).astype(np.int64)


def sample_pairs(candidates: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` pairs without replacement, in random order; all of them if fewer exist."""
    take = rng.choice(len(candidates), size=min(n, len(candidates)), replace=False)
    return candidates[take]


TASKS = {
    "share": Task("share", "multiclass", len(SHAPES)),
    "unique1": Task("unique1", "multiclass", len(TEXTURES)),
    "unique2": Task("unique2", "multiclass", len(TEXTURES)),
    "synergy": Task("synergy", "binary", 2),
}
# Probed on every run to explain R/U/S, never averaged into the selection metric.
DIAGNOSTIC_TASKS = {
    f"colour{k}": Task(f"colour{k}", "multiclass", len(COLOURS), diagnostic=True) for k in (1, 2)
}


def pair_labels(
    attrs: dict[str, np.ndarray], pairs: np.ndarray, pi: np.ndarray
) -> dict[str, torch.Tensor]:
    i, j = pairs[:, 0], pairs[:, 1]
    labels = {
        "share": attrs["shape"][i],
        "unique1": attrs["texture"][i],
        "unique2": attrs["texture"][j],
        "synergy": (pi[attrs["texture"][i]] == attrs["colour"][j]).astype(np.int64),
    }
    return {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.int64)) for k, v in labels.items()}


def pair_dataset(
    images: torch.Tensor,
    attrs: dict[str, np.ndarray],
    train: np.ndarray,
    test: np.ndarray,
    pi: np.ndarray,
    fingerprint: str,
) -> MultimodalDataset:
    """Train pairs then test pairs; both modalities index the one image pool."""
    pairs = np.concatenate([train, test])
    modalities = [
        Modality(
            f"image{k + 1}", "image", images, torch.from_numpy(np.ascontiguousarray(pairs[:, k]))
        )
        for k in range(2)
    ]
    splits = {
        "train": torch.arange(len(train)),
        "test": torch.arange(len(train), len(pairs)),
    }
    return MultimodalDataset(
        modalities, pair_labels(attrs, pairs, pi), dict(TASKS), splits, fingerprint
    )


# ---------------------------------------------------------------- generation
def trifeatures_fingerprint(
    *, size: int, seed: int, pairs: int, test_pairs: int, per_combination: int
) -> str:
    key = {
        "size": size,
        "seed": seed,
        "pairs": pairs,
        "test_pairs": test_pairs,
        "per_combination": per_combination,
        "format": FORMAT_VERSION,
        "renderer": RENDERER_VERSION,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def _check_int(name: str, value: Any, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < lo:
        raise ValueError(f"trifeatures: '{name}' must be an int >= {lo}, got {value!r}")


def is_complete(root: str | Path) -> bool:
    """Whether a generated fingerprint directory holds both valid datasets and the attributes."""
    root = Path(root)
    return (
        (root / "attributes.parquet").is_file()
        and not validate_dataset(root / "unbiased")
        and not validate_dataset(root / "biased")
    )


def generate_trifeatures(
    out_dir: str | Path,
    *,
    size: int = 64,
    seed: int = 0,
    pairs: int = 10000,
    test_pairs: int = 4000,
    per_combination: int = 3,
    progress: bool = True,
) -> Path:
    """Render and write Trifeatures under ``out_dir/<fingerprint>/``; returns that directory.

    An existing valid directory is reused. An fcntl lock on ``out_dir/.<fingerprint>.lock``
    makes concurrent callers (e.g. Ray workers sharing a disk) wait for one generator; everything
    is written to a temporary directory that is renamed into place when complete.
    """
    _check_int("size", size, MIN_SIZE)
    _check_int("seed", seed, 0)
    _check_int("pairs", pairs, 1)
    _check_int("test_pairs", test_pairs, 1)
    _check_int("per_combination", per_combination, 1)
    params = dict(
        size=size, seed=seed, pairs=pairs, test_pairs=test_pairs, per_combination=per_combination
    )
    fp = trifeatures_fingerprint(**params)
    out = Path(out_dir)
    target = out / fp
    if is_complete(target):
        return target
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f".{fp}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if is_complete(target):  # another process finished while we waited
                return target
            if target.exists():
                shutil.rmtree(target)  # incomplete or invalid: regenerate
            tmp = Path(tempfile.mkdtemp(prefix=f".{fp}.tmp-", dir=out))
            try:
                _generate_into(tmp, fp, params, progress)
                shareable(tmp)  # mkdtemp made it 0700
                tmp.rename(target)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return target


def _generate_into(tmp: Path, fp: str, params: dict[str, int], progress: bool) -> None:
    seed, size = params["seed"], params["size"]
    attrs = image_attributes(seed, params["per_combination"])
    n = attrs["split"].size
    with Progress(disable=not progress) as bar:
        task = bar.add_task(f"trifeatures {size}px: rendering {n} images", total=n)
        images = render_trifeatures(
            attrs["shape"],
            attrs["texture"],
            attrs["colour"],
            size,
            np.random.default_rng([seed, 1]),
            on_progress=lambda k: bar.advance(task, k),
        )
    pool = torch.from_numpy(images)
    pi = correlation_permutation(seed)
    train = sample_pairs(
        candidate_pairs(attrs, 0, None), params["pairs"], np.random.default_rng([seed, 2])
    )
    biased = sample_pairs(
        candidate_pairs(attrs, 0, pi), params["pairs"], np.random.default_rng([seed, 3])
    )
    test = sample_pairs(
        candidate_pairs(attrs, 1, None), params["test_pairs"], np.random.default_rng([seed, 4])
    )
    for name, train_pairs in (("unbiased", train), ("biased", biased)):
        ds = pair_dataset(pool, attrs, train_pairs, test, pi, f"trifeatures-{fp}-{name}")
        write_dataset(ds, tmp / name, params={**params, "variant": name, "fingerprint": fp})
    _write_attributes(tmp / "attributes.parquet", attrs, pi, fp, params)


def _write_attributes(
    path: Path, attrs: dict[str, np.ndarray], pi: np.ndarray, fp: str, params: dict[str, int]
) -> None:
    table = pa.table(
        {
            "image": pa.array(np.arange(attrs["split"].size, dtype=np.int64)),
            "split": pa.array(np.array(["train", "test"])[attrs["split"]], type=pa.string()),
            **{k: pa.array(attrs[k]) for k in ("shape", "texture", "colour")},
        }
    )
    meta = {
        "fingerprint": fp,
        "params": params,
        "shapes": list(SHAPES),
        "textures": list(TEXTURES),
        "colours": list(COLOURS),
        "colour_rgb": [list(c) for c in COLOUR_RGB],
        "grey": list(GREY),
        "correlation": pi.tolist(),
        "correlation_rng": f"numpy.random.default_rng([seed, {CORRELATION_STREAM}]).permutation(10)",
    }
    table = table.replace_schema_metadata({b"commlab": json.dumps(meta, sort_keys=True).encode()})
    pq.write_table(table, path, compression="zstd")


def read_attributes(root: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The per-image attribute columns (split as 0 train / 1 test) and the metadata (π etc.)."""
    table = pq.read_table(Path(root) / "attributes.parquet")
    cols = {k: table.column(k).to_numpy() for k in ("shape", "texture", "colour")}
    cols["split"] = (table.column("split").to_numpy(zero_copy_only=False) == "test").astype(
        np.int64
    )
    meta = json.loads((table.schema.metadata or {})[b"commlab"])
    return cols, meta


# ---------------------------------------------------------------- registered builder
_BUILDER_DEFAULTS: dict[str, Any] = dict(
    size=64, pairs=10000, test_pairs=4000, per_combination=3, biased=False, data_seed=0
)


@DATASETS.register("trifeatures")
def trifeatures(path: str, seed: int, **params: Any) -> DataBundle:
    """Generate (once) and load Trifeatures under `path`.

    Params: size, pairs, test_pairs, per_combination, biased, data_seed (all optional). `seed` is
    the training seed and does not affect the data; `data_seed` does. Pretraining uses the biased
    or unbiased pairs; the probe always uses unbiased pairs (train to fit, test to score).
    """
    unknown = sorted(set(params) - set(_BUILDER_DEFAULTS))
    if unknown:
        raise ValueError(
            f"trifeatures: unknown param '{unknown[0]}'; valid: {', '.join(sorted(_BUILDER_DEFAULTS))}"
        )
    opts = {**_BUILDER_DEFAULTS, **params}
    if not isinstance(opts["biased"], bool):
        raise ValueError(f"trifeatures: 'biased' must be a bool, got {opts['biased']!r}")
    root = generate_trifeatures(
        path,
        size=opts["size"],
        seed=opts["data_seed"],
        pairs=opts["pairs"],
        test_pairs=opts["test_pairs"],
        per_combination=opts["per_combination"],
        progress=False,
    )
    probe = read_dataset(root / "unbiased")
    _add_diagnostic_labels(probe, root)
    pretrain = probe
    if opts["biased"]:
        pretrain = read_dataset(root / "biased")
        # Both datasets store the same image pool; keep one copy in memory.
        if torch.equal(pretrain.modalities[0].values, probe.modalities[0].values):
            for m in pretrain.modalities:
                m.values = probe.modalities[0].values
    n_test = round(TEST_FRACTION * NUM_COMBINATIONS)
    n_train = (NUM_COMBINATIONS - n_test) * opts["per_combination"]
    variant = "biased" if opts["biased"] else "unbiased"
    description = (
        f"trifeatures {opts['size']}px, {n_train}+{n_test} images, "
        f"{len(pretrain.split('train'))} pairs, {variant}"
    )
    return DataBundle(pretrain=pretrain, probe=probe, description=description)


def _add_diagnostic_labels(ds: MultimodalDataset, root: Path) -> None:
    """Colour of each pair's image 1 / 2 as diagnostic tasks (the stored format keeps the four
    R/U/S tasks; the attributes file has every image's colour)."""
    attrs, _ = read_attributes(root)
    colour = torch.from_numpy(attrs["colour"].astype(np.int64))
    for k, m in enumerate(ds.modalities, start=1):
        ds.labels[f"colour{k}"] = colour[m.index]
    ds.tasks.update(DIAGNOSTIC_TASKS)
