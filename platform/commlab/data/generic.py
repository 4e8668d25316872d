"""`parquet`: any dataset already in the commlab Parquet format, loaded by path.

The generic builder for data that exists on disk (imported with `commlab data ...`, or written
with `commlab.data.parquet.write_dataset`): Ray Train workers are separate processes, so a
dataset must be reachable by name and path rather than passed in memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from commlab.data import DATASETS
from commlab.data.base import DataBundle
from commlab.data.parquet import read_dataset

_PARAMS = ("probe_path",)


@DATASETS.register("parquet")
def parquet_dataset(path: str, seed: int, **params: Any) -> DataBundle:
    """Load the dataset directory `path`; pretrain and probe on it.

    Params: `probe_path` (optional) probes on another dataset directory instead, e.g. an
    unbiased variant of a biased pretraining set. `seed` does not affect the data.
    """
    unknown = sorted(set(params) - set(_PARAMS))
    if unknown:
        raise ValueError(f"parquet: unknown param '{unknown[0]}'; valid: {', '.join(_PARAMS)}")
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"parquet: dataset directory not found: {root.resolve()}")
    pretrain = read_dataset(root)
    probe = pretrain
    if params.get("probe_path") is not None:
        probe = read_dataset(params["probe_path"])
    description = f"{root.name}: {len(pretrain)} samples, modalities {', '.join(pretrain.names)}"
    return DataBundle(pretrain=pretrain, probe=probe, description=description)
