"""MultiBench affect pickles (MOSI, MOSEI, UR-FUNNY "humor", MUsTARD "sarcasm") -> a dataset.

Source (notes §6.1): a dict with splits `train`, `valid`, `test`; each split a dict of arrays
indexed by sample: `vision` (N, T, p_v), `audio` (N, T, p_a), `text` (N, T, 300) GloVe rows
left-padded with zeros, `labels` (N, ...) one value per sample. As the reference loader does:

- samples whose text is all zeros are dropped;
- every modality is sliced from the first non-zero text row (alignment), so sample i keeps
  `T - start_i` steps; we store them right-padded with zeros plus `lengths`, which batches turn
  into padding masks (the reference pads at collate time and never masks);
- `-inf` in `audio` becomes 0 (COVAREP features hold -inf for silence). Any other NaN/inf is an
  error unless `nonfinite="zero"`.

Labels: the binary task (label > 0, the reference's classification task) and the raw label as
`score` (float, no task declared). Splits: train / val (from `valid`) / test.
"""

from __future__ import annotations

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
    parse_names,
    require_finite,
)

SPLITS = {"train": "train", "valid": "val", "test": "test"}  # source key -> our split
MODALITIES = ("vision", "audio", "text")
TASKS = {"mosi": "sentiment", "mosei": "sentiment", "humor": "humor", "sarcasm": "sarcasm"}


def align(x: np.ndarray, start: np.ndarray) -> np.ndarray:
    """Shift each sample's rows `start[i]:` to the front and zero the rest: (N, T, p)."""
    t = x.shape[1]
    src = np.arange(t)[None, :] + start[:, None]
    valid = src < t
    out = np.take_along_axis(x, np.minimum(src, t - 1)[:, :, None], axis=1)
    out[~valid] = 0
    return out


def _read_split(
    file: Path, split: dict[str, Any], key: str, names: list[str], nonfinite: str
) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, int]]:
    text = as_array(get_key(split, "text", file, key), file, f"{key}.text", ndim=3)
    n, t = text.shape[:2]
    arrays: dict[str, np.ndarray] = {}
    stats = {"audio_neg_inf_zeroed": 0, "nonfinite_zeroed": 0}
    for m in dict.fromkeys([*names, "text"]):
        k = f"{key}.{m}"
        a = as_array(get_key(split, m, file, key), file, k, ndim=3, rows=n)
        if a.shape[1] != t:
            raise SourceFormatError(
                file, f"has {a.shape[1]} steps but text has {t}; modalities must align", k
            )
        a = a.astype(np.float32)  # a copy: the zeroing below never touches the loaded pickle
        if m == "audio":
            neg = a == -np.inf
            stats["audio_neg_inf_zeroed"] += int(neg.sum())
            a[neg] = 0.0
        if nonfinite == "zero":
            bad = non_finite(a)
            stats["nonfinite_zeroed"] += int(bad.sum())
            a[bad] = 0.0
        else:
            require_finite(a, file, k, hint=" (pass nonfinite='zero' to replace them with 0)")
        arrays[m] = a
    labels = as_array(get_key(split, "labels", file, key), file, f"{key}.labels", rows=n)
    if labels.size != n:
        raise SourceFormatError(
            file, f"expected one value per sample, found shape {labels.shape}", f"{key}.labels"
        )
    labels = labels.reshape(n).astype(np.float32)
    require_finite(labels, file, f"{key}.labels")
    return arrays, labels, stats


def import_affect(
    src: Path,
    bar: Progress,
    *,
    dataset: str,
    modalities: str | list[str] = "vision,text",
    nonfinite: Literal["error", "zero"] = "error",
) -> Imported:
    """Import one affect pickle; `modalities` picks and orders the stored modalities."""
    names = parse_names(modalities, MODALITIES, "modalities")
    if nonfinite not in ("error", "zero"):
        raise ValueError(f"nonfinite must be 'error' or 'zero', got {nonfinite!r}")
    task = bar.add_task(f"{dataset}: reading {src.name}", total=len(SPLITS) + 1)
    data = load_pickle(src)
    bar.advance(task)
    parts: dict[str, list[np.ndarray]] = {m: [] for m in names}
    lengths, labels, split_of = [], [], []
    params: dict[str, Any] = {"dropped_empty_text": {}, "audio_neg_inf_zeroed": 0}
    params["nonfinite_zeroed"] = 0
    for k, (key, split_name) in enumerate(SPLITS.items()):
        arrays, y, stats = _read_split(src, get_key(data, key, src), key, names, nonfinite)
        params["audio_neg_inf_zeroed"] += stats["audio_neg_inf_zeroed"]
        params["nonfinite_zeroed"] += stats["nonfinite_zeroed"]
        rows_nonzero = (arrays["text"] != 0).any(axis=2)  # (N, T)
        keep = rows_nonzero.any(axis=1)
        params["dropped_empty_text"][split_name] = int((~keep).sum())
        if not keep.any():
            raise SourceFormatError(
                src, "split is empty (no sample with non-zero text)", f"{key}.text"
            )
        start = rows_nonzero[keep].argmax(axis=1)
        for m in names:
            parts[m].append(align(arrays[m][keep], start))
        lengths.append(arrays["text"].shape[1] - start)
        labels.append(y[keep])
        split_of.append(np.full(int(keep.sum()), k))
        bar.advance(task)
    n = sum(len(y) for y in labels)
    idx = torch.arange(n)
    length = torch.from_numpy(np.concatenate(lengths).astype(np.int64))
    mods = [
        Modality(m, "sequence", torch.from_numpy(np.concatenate(parts[m])), idx, length.clone())
        for m in names
    ]
    score = np.concatenate(labels)
    which = np.concatenate(split_of)
    task_name = TASKS[dataset]
    ds = MultimodalDataset(
        modalities=mods,
        labels={
            task_name: torch.from_numpy((score > 0).astype(np.int64)),
            "score": torch.from_numpy(score),
        },
        tasks={task_name: Task(task_name, "binary", 2)},
        splits={
            s: torch.from_numpy(np.flatnonzero(which == k)) for k, s in enumerate(SPLITS.values())
        },
    )
    params.update({"modalities": names, "nonfinite": nonfinite, "task": task_name})
    return Imported(ds, params)
