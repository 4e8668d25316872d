"""Vision&Touch (Stanford `triangle_real_data`) HDF5 episodes -> a dataset.

Source (notes §6.3): a directory of `*.h5` files, one episode of S steps (50) each. Per step
idx in [0, S-2], as the reference reads it:
- `image` (S, H, W, 3) uint8 (or (S, 3, H, W)) at idx -> image (3, H, W) uint8;
- `ee_forces_continuous` (S, F, 6) at idx -> its last 32 rows, tanh -> force (32, 6);
- `proprio` (S, >= 8) at idx -> its first 8 values -> proprio (8,);
- targets from step idx+1: `contact` (S, K) -> `contact` = any contact (binary);
  `proprio[idx+1][:4]` -> `ee_yaw` (4-d regression, the reference's `ee_yaw_next`).

`depth_data`, `optical_flow` and `action` are not read. Differences from the reference, on
purpose: every step 0..S-2 is one fixed sample (the reference swaps the last one for a random
step on every access), and the file-level split has a validation part distinct from test (the
reference used test as val): files are sorted, permuted by `numpy.random.default_rng(split_seed)`,
the first `test_ratio` go to test, the next `val_ratio` to val, the rest to train.

Files are checked (keys, shapes, dtypes) in a first pass that reads no data, so a broken file
fails before the long read; the second pass fills preallocated arrays.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import Progress

from commlab.data.base import Modality, MultimodalDataset, Task
from commlab.data.importers.common import Imported, SourceFormatError, parse_names, require_finite

MODALITIES = ("image", "force", "proprio")
KEYS = ("image", "ee_forces_continuous", "proprio", "contact")
FORCE_CHANNELS = 6
PROPRIO_DIM = 8
YAW_DIM = 4


@dataclass
class Episode:
    path: Path
    steps: int
    channels_last: bool
    height: int
    width: int
    force_len: int


def _h5py() -> Any:
    # lazy: only this importer reads HDF5, and the error says what to install
    try:
        import h5py
    except ImportError:  # pragma: no cover - h5py is a declared dependency
        raise ImportError("the Vision&Touch importer needs h5py: pip install h5py") from None
    return h5py


def file_split(n: int, val_ratio: float, test_ratio: float, seed: int) -> dict[str, np.ndarray]:
    """Disjoint file ids per split; val and test get at least one file each."""
    if not (0 < val_ratio < 1 and 0 < test_ratio < 1 and val_ratio + test_ratio < 1):
        raise ValueError("val_ratio and test_ratio must be in (0, 1) and sum to less than 1")
    perm = np.random.default_rng(seed).permutation(n)
    n_test = max(1, round(test_ratio * n))
    n_val = max(1, round(val_ratio * n))
    return {
        "train": np.sort(perm[n_test + n_val :]),
        "val": np.sort(perm[n_test : n_test + n_val]),
        "test": np.sort(perm[:n_test]),
    }


def _dataset(f: Any, path: Path, key: str) -> Any:
    if key not in f:
        present = ", ".join(sorted(f.keys())) or "none"
        raise SourceFormatError(path, f"missing dataset (datasets present: {present})", key)
    return f[key]


def _inspect(path: Path, force_steps: int) -> Episode:
    h5py = _h5py()
    try:
        with h5py.File(path, "r") as f:
            shapes = {k: tuple(_dataset(f, path, k).shape) for k in KEYS}
            image_dtype = f["image"].dtype
    except OSError as err:
        raise SourceFormatError(path, f"unreadable or truncated HDF5 file ({err})") from None
    steps = shapes["image"][0] if shapes["image"] else 0
    if steps < 2:
        raise SourceFormatError(path, f"an episode needs >= 2 steps, found {steps}", "image")
    img = shapes["image"]
    if len(img) != 4 or 3 not in (img[1], img[3]) or image_dtype != np.uint8:
        raise SourceFormatError(
            path, f"expected uint8 (S, H, W, 3) or (S, 3, H, W), found {image_dtype} {img}", "image"
        )
    expect = {
        "ee_forces_continuous": (3, lambda s: s[1] >= force_steps and s[2] == FORCE_CHANNELS),
        "proprio": (2, lambda s: s[1] >= PROPRIO_DIM),
        "contact": (None, lambda s: True),
    }
    for key, (ndim, ok) in expect.items():
        s = shapes[key]
        if not s or s[0] != steps or (ndim is not None and len(s) != ndim) or not ok(s):
            raise SourceFormatError(
                path, f"unexpected shape {s} for an episode of {steps} steps", key
            )
    channels_last = img[3] == 3
    h, w = (img[1], img[2]) if channels_last else (img[2], img[3])
    return Episode(path, steps, channels_last, h, w, shapes["ee_forces_continuous"][1])


def _resize(images: np.ndarray, size: int | None) -> np.ndarray:
    """(B, 3, H, W) uint8 -> (B, 3, size, size) uint8 (antialiased bilinear); None keeps H, W."""
    if size is None or images.shape[-2:] == (size, size):
        return images
    x = F.interpolate(
        torch.from_numpy(images).float(), (size, size), mode="bilinear", antialias=True
    )
    return x.round().clamp(0, 255).to(torch.uint8).numpy()


def _read(ep: Episode, force_steps: int, size: int | None) -> dict[str, np.ndarray]:
    h5py = _h5py()
    key = "image"
    try:
        with h5py.File(ep.path, "r") as f:
            key = "image"
            image = f[key][: ep.steps - 1]
            key = "ee_forces_continuous"
            force = f[key][: ep.steps - 1, ep.force_len - force_steps :, :]
            key = "proprio"
            proprio = f[key][()]
            key = "contact"
            contact = f[key][1:]
    except OSError as err:
        raise SourceFormatError(ep.path, f"unreadable or truncated data ({err})", key) from None
    if ep.channels_last:
        image = image.transpose(0, 3, 1, 2)
    force = np.tanh(force.astype(np.float32))
    proprio = proprio.astype(np.float32)
    require_finite(force, ep.path, "ee_forces_continuous")
    require_finite(proprio, ep.path, "proprio")
    require_finite(np.asarray(contact, dtype=np.float64), ep.path, "contact")
    return {
        "image": _resize(np.ascontiguousarray(image), size),
        "force": force,
        "proprio": proprio[:-1, :PROPRIO_DIM],
        "contact": (contact.reshape(len(contact), -1).sum(axis=1) > 0).astype(np.int64),
        "ee_yaw": proprio[1:, :YAW_DIM],
    }


def import_visionandtouch(
    src: Path,
    bar: Progress,
    *,
    modalities: str | list[str] = "image,force,proprio",
    image_size: int | None = None,
    force_steps: int = 32,
    val_ratio: float = 0.1,
    test_ratio: float = 0.2,
    split_seed: int = 42,
) -> Imported:
    """Import every `*.h5` episode in the directory `src`; `image_size` resizes (None keeps)."""
    names = parse_names(modalities, MODALITIES, "modalities")
    if image_size is not None and image_size < 8:
        raise ValueError(f"image_size must be >= 8 pixels, got {image_size}")
    if not src.is_dir():
        raise SourceFormatError(src, "expected a directory of .h5 episode files")
    files = sorted(src.glob("*.h5"))
    if len(files) < 3:
        raise SourceFormatError(
            src, f"found {len(files)} .h5 files; train, val and test need at least 3"
        )
    check = bar.add_task("visionandtouch: checking episodes", total=len(files))
    episodes = []
    for path in files:
        episodes.append(_inspect(path, force_steps))
        bar.advance(check)
    h, w = (image_size, image_size) if image_size else (episodes[0].height, episodes[0].width)
    for ep in episodes:
        if image_size is None and (ep.height, ep.width) != (h, w):
            raise SourceFormatError(
                ep.path,
                f"image size {ep.height}x{ep.width} differs from {h}x{w} "
                "(pass image_size to resize all episodes)",
                "image",
            )
    counts = np.array([ep.steps - 1 for ep in episodes])
    n = int(counts.sum())
    out: dict[str, np.ndarray] = {
        "image": np.empty((n, 3, h, w), np.uint8),
        "force": np.empty((n, force_steps, FORCE_CHANNELS), np.float32),
        "proprio": np.empty((n, PROPRIO_DIM), np.float32),
        "contact": np.empty(n, np.int64),
        "ee_yaw": np.empty((n, YAW_DIM), np.float32),
    }
    offsets = np.concatenate([[0], np.cumsum(counts)])
    read = bar.add_task("visionandtouch: reading episodes", total=len(files))
    for ep, lo, hi in zip(episodes, offsets[:-1], offsets[1:], strict=True):
        for k, v in _read(ep, force_steps, image_size).items():
            out[k][lo:hi] = v
        bar.advance(read)
    file_of = np.repeat(np.arange(len(files)), counts)
    split_files = file_split(len(files), val_ratio, test_ratio, split_seed)
    splits = {
        s: torch.from_numpy(np.flatnonzero(np.isin(file_of, ids))) for s, ids in split_files.items()
    }
    idx = torch.arange(n)
    kinds = {"image": "image", "force": "sequence", "proprio": "tabular"}
    ds = MultimodalDataset(
        modalities=[Modality(m, kinds[m], torch.from_numpy(out[m]), idx) for m in names],  # type: ignore[arg-type]
        labels={
            "contact": torch.from_numpy(out["contact"]),
            "ee_yaw": torch.from_numpy(out["ee_yaw"]),
        },
        tasks={"contact": Task("contact", "binary", 2), "ee_yaw": Task("ee_yaw", "regression")},
        splits=splits,
    )
    params = {
        "modalities": names,
        "image_size": [h, w],
        "force_steps": force_steps,
        "split_seed": split_seed,
        "val_ratio": val_ratio,
        "test_ratio": test_ratio,
        "episodes": {s: [files[i].name for i in ids] for s, ids in split_files.items()},
    }
    return Imported(ds, params)
