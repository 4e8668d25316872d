"""Datasets: every source becomes a `MultimodalDataset`; builders are looked up by name."""

from __future__ import annotations

from typing import Any

from commlab.data.base import Batch, DataBundle, Modality, MultimodalDataset, Task
from commlab.registry import Registry

# builder(path: str, seed: int, **params) -> DataBundle
DATASETS: Registry[Any] = Registry("dataset")


def build_data(name: str, path: str, seed: int, params: dict[str, Any]) -> DataBundle:
    _register_builtin()
    return DATASETS.build(name, path, seed, **params)


def _register_builtin() -> None:
    # Imported lazily so that `import commlab.data` stays cheap; each module registers itself.
    from commlab.data import generic, synthetic, trifeatures  # noqa: F401


__all__ = ["Batch", "DataBundle", "Modality", "MultimodalDataset", "Task", "DATASETS", "build_data"]
