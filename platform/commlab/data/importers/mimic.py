"""MultiBench MIMIC-III pickle (`im.pk`) -> a dataset with one selected task.

Source (notes §6.2): a dict with `ep_tdata` (N, 24, 12) hourly vitals/labs, `adm_features_all`
(N, 5) static features, `y_icd9` (N, 20) binary ICD-9 groups and `adm_labels_all` (N, >= 6).
`task` k in [0, 19] is the binary ICD-9 group k (the paper uses 7); `task=-1` is the 6-class
mortality label (the first of columns 1..5 of `adm_labels_all` that is positive, else 0).

Split: the reference's, reproduced exactly without touching global state: the sample order is
shuffled by Python's `random.Random(10)`; val = the first N//10, test = the next N//5 - N//10,
train = the rest.

Pre-processing decisions (recorded in the schema params):
- NaN/inf in the features become 0 before scoring, as the reference does (`nonfinite="zero"`,
  the default, counts them); `nonfinite="error"` rejects such a file instead. Labels must be
  finite whatever the setting.
- z-scoring uses TRAIN statistics only (the reference used the whole file, leaking val/test):
  per feature for the tabular data, per channel over (samples, steps) for the time series. A
  constant train column gets std 1 instead of producing NaN. The statistics are stored.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from rich.progress import Progress

from commlab.data.base import Modality, MultimodalDataset, Task
from commlab.data.importers.common import (
    Imported,
    SourceFormatError,
    as_array,
    get_key,
    load_pickle,
    non_finite,
    require_finite,
)

MORTALITY_CLASSES = 6


def reference_split(n: int, seed: int = 10) -> dict[str, np.ndarray]:
    """The MultiBench MIMIC split of n samples (sorted ids per split)."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    ids = np.asarray(order, dtype=np.int64)
    return {
        "train": np.sort(ids[n // 5 :]),
        "val": np.sort(ids[: n // 10]),
        "test": np.sort(ids[n // 10 : n // 5]),
    }


def mortality_classes(adm_labels: np.ndarray) -> np.ndarray:
    """Class c in 1..5 for the first positive column c of 1..5, else 0."""
    positive = adm_labels[:, 1:MORTALITY_CLASSES] > 0
    return np.where(positive.any(axis=1), positive.argmax(axis=1) + 1, 0).astype(np.int64)


def _features(
    data: Any, src: Path, key: str, ndim: int, n: int | None, nonfinite: str
) -> tuple[np.ndarray, int]:
    a = as_array(get_key(data, key, src), src, key, ndim=ndim, rows=n).astype(np.float64)
    bad = non_finite(a)
    if bad.any() and nonfinite == "error":
        require_finite(a, src, key, hint=" (the default nonfinite='zero' replaces them with 0)")
    a[bad] = 0.0
    return a, int(bad.sum())


def _zscore(a: np.ndarray, train: np.ndarray, axes: tuple[int, ...]) -> tuple[np.ndarray, dict]:
    mean = a[train].mean(axis=axes)
    std = a[train].std(axis=axes)
    constant = std == 0
    std = np.where(constant, 1.0, std)
    stats = {
        "mean": mean.tolist(),
        "std": std.tolist(),
        "constant": np.flatnonzero(constant).tolist(),
    }
    return ((a - mean) / std).astype(np.float32), stats


def _labels(data: Any, src: Path, task: int, n: int) -> tuple[str, Task, np.ndarray]:
    if task == -1:
        key = "adm_labels_all"
        raw = as_array(get_key(data, key, src), src, key, ndim=2, rows=n)
        if raw.shape[1] < MORTALITY_CLASSES:
            raise SourceFormatError(
                src, f"needs >= {MORTALITY_CLASSES} columns, found shape {raw.shape}", key
            )
        require_finite(raw, src, key)
        return (
            "mortality",
            Task("mortality", "multiclass", MORTALITY_CLASSES),
            mortality_classes(raw),
        )
    key = "y_icd9"
    raw = as_array(get_key(data, key, src), src, key, ndim=2, rows=n)
    if task >= raw.shape[1]:
        raise ValueError(f"task {task} is out of range: {src} [{key}] has {raw.shape[1]} columns")
    y = raw[:, task]
    require_finite(y, src, key)
    if not np.isin(y, (0, 1)).all():
        raise SourceFormatError(src, f"column {task} must hold only 0/1 labels", key)
    name = f"icd9_{task}"
    return name, Task(name, "binary", 2), y.astype(np.int64)


def import_mimic(
    src: Path,
    bar: Progress,
    *,
    task: int = 7,
    nonfinite: Literal["zero", "error"] = "zero",
    split_seed: int = 10,
) -> Imported:
    if not isinstance(task, int) or task < -1:
        raise ValueError(f"task must be -1 (6-class mortality) or an ICD-9 group >= 0, got {task}")
    if nonfinite not in ("error", "zero"):
        raise ValueError(f"nonfinite must be 'zero' or 'error', got {nonfinite!r}")
    bar_task = bar.add_task(f"mimic: reading {src.name}", total=2)
    data = load_pickle(src)
    bar.advance(bar_task)
    series, series_bad = _features(data, src, "ep_tdata", 3, None, nonfinite)
    n = series.shape[0]
    static, static_bad = _features(data, src, "adm_features_all", 2, n, nonfinite)
    name, task_def, y = _labels(data, src, task, n)
    splits = reference_split(n, split_seed)
    for s, ids in splits.items():
        if ids.size == 0:
            raise SourceFormatError(src, f"split '{s}' would be empty: {n} samples (need >= 10)")
    static, static_stats = _zscore(static, splits["train"], (0,))
    series, series_stats = _zscore(series, splits["train"], (0, 1))
    bar.advance(bar_task)
    idx = torch.arange(n)
    ds = MultimodalDataset(
        modalities=[
            Modality("tabular", "tabular", torch.from_numpy(static), idx),
            Modality("timeseries", "sequence", torch.from_numpy(series), idx),
        ],
        labels={name: torch.from_numpy(y)},
        tasks={name: task_def},
        splits={s: torch.from_numpy(ids) for s, ids in splits.items()},
    )
    params = {
        "task": task,
        "task_name": name,
        "nonfinite": nonfinite,
        "nonfinite_zeroed": {"ep_tdata": series_bad, "adm_features_all": static_bad},
        "split_seed": split_seed,
        "zscore": {"tabular": static_stats, "timeseries": series_stats},
    }
    return Imported(ds, params)
