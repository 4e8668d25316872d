"""In-memory multimodal datasets and batches.

Every dataset, whatever its source, becomes a `MultimodalDataset`: per modality a *pool* of
values plus an index from samples into the pool (Trifeatures pairs reuse the same images many
times; table-like datasets use the identity index), labels per task, and named splits. Batches
are built by tensor indexing, so there is no per-sample Python collate on the hot path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

ModalityKind = Literal["image", "sequence", "tabular", "text"]
TaskKind = Literal["multiclass", "binary", "multilabel", "regression"]


@dataclass
class Modality:
    """One modality: `values[index[i]]` is sample i's input.

    images: uint8 (M, C, H, W); sequences: float (M, T, p) right-padded, with `lengths` (M,);
    tabular: float (M, n); text: int64 token ids (M, L) right-padded with `lengths` (M,).
    """

    name: str
    kind: ModalityKind
    values: Tensor
    index: Tensor
    lengths: Tensor | None = None

    def __post_init__(self) -> None:
        if self.index.dtype != torch.long:
            raise ValueError(f"modality '{self.name}': index must be int64")
        if self.lengths is not None and self.lengths.shape[0] != self.values.shape[0]:
            raise ValueError(f"modality '{self.name}': lengths and values differ in length")


@dataclass
class Task:
    """A downstream task probed on frozen features. `diagnostic` tasks explain a result (e.g.
    which attributes the features hold) and stay out of averaged selection metrics."""

    name: str
    kind: TaskKind
    num_classes: int | None = None  # multiclass/binary: classes; multilabel: labels
    diagnostic: bool = False

    @property
    def chance(self) -> float | None:
        """Balanced accuracy of a constant prediction: 1 / classes (None where not defined)."""
        if self.kind in ("multiclass", "binary") and self.num_classes:
            return 1.0 / self.num_classes
        return None


@dataclass
class Batch:
    """A batch on some device. `pad[m]` is bool (B, L_m) with True = padding, or None."""

    xs: list[Tensor]
    pad: list[Tensor | None]
    labels: dict[str, Tensor] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return int(self.xs[0].shape[0])

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            xs=[x.to(device, non_blocking=True) for x in self.xs],
            pad=[p.to(device, non_blocking=True) if p is not None else None for p in self.pad],
            labels={k: v.to(device, non_blocking=True) for k, v in self.labels.items()},
        )


@dataclass
class MultimodalDataset:
    modalities: list[Modality]
    labels: dict[str, Tensor]
    tasks: dict[str, Task]
    splits: dict[str, Tensor]  # split name -> int64 sample ids
    fingerprint: str = ""

    def __post_init__(self) -> None:
        n = len(self)
        for m in self.modalities:
            if m.index.shape[0] != n:
                raise ValueError(
                    f"modality '{m.name}' has {m.index.shape[0]} samples, expected {n}"
                )
        for name, y in self.labels.items():
            if y.shape[0] != n:
                raise ValueError(f"label '{name}' has {y.shape[0]} rows, expected {n}")

    def __len__(self) -> int:
        return int(self.modalities[0].index.shape[0])

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.modalities]

    def split(self, name: str) -> Tensor:
        if name not in self.splits:
            raise ValueError(f"dataset has no split '{name}'; splits: {sorted(self.splits)}")
        return self.splits[name]

    def batch(self, ids: Tensor) -> Batch:
        """Gather samples `ids` (int64) into a Batch on CPU; sequences are trimmed to the
        longest sample in the batch and carry a padding mask."""
        xs: list[Tensor] = []
        pads: list[Tensor | None] = []
        for m in self.modalities:
            rows = m.index[ids]
            x = m.values[rows]
            pad = None
            if m.lengths is not None:
                lengths = m.lengths[rows]
                t = int(lengths.max().item()) if len(lengths) else 0
                t = max(t, 1)
                x = x[:, :t]
                pad = torch.arange(t).unsqueeze(0) >= lengths.unsqueeze(1)
            xs.append(x)
            pads.append(pad)
        labels = {k: v[ids] for k, v in self.labels.items()}
        return Batch(xs=xs, pad=pads, labels=labels)


@dataclass
class DataBundle:
    """What a dataset builder returns: data to pretrain on and data to probe on.

    `pretrain` uses its 'train' split (and 'val' when present for SSL validation); `probe` uses
    'train' to fit (a validation part is carved from it) and 'test' to score. They are the same
    object for most datasets; Trifeatures pretrains on biased pairs but probes unbiased ones.
    """

    pretrain: MultimodalDataset
    probe: MultimodalDataset
    description: str = ""
