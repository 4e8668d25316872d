"""One augmentation pipeline per modality, applied to a whole `Batch` at once.

`AUGMENTERS` maps a data kind ("image", "sequence", ...) to its augmenter class; each class
takes its own config (or None for the paper's defaults). An `IdentityAugmentConfig` (kind
"none") on any modality means "no random views": both views get the kind's deterministic
`prepare` path, so images are still converted to float and normalised.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor

from commlab.augment.image import ImageAugmenter
from commlab.augment.sequence import SequenceAugmenter
from commlab.augment.tabular import TabularAugmenter
from commlab.augment.text import TextAugmenter
from commlab.config import AugmentConfig, IdentityAugmentConfig
from commlab.data.base import Batch
from commlab.registry import Registry


class ModalityAugmenter(Protocol):
    def __call__(self, x: Tensor, pad: Tensor | None, generator: torch.Generator) -> Tensor: ...

    def prepare(self, x: Tensor, pad: Tensor | None = None) -> Tensor: ...


AUGMENTERS: Registry[type[ModalityAugmenter]] = Registry("augmenter kind")
AUGMENTERS.register("image")(ImageAugmenter)
AUGMENTERS.register("sequence")(SequenceAugmenter)
AUGMENTERS.register("tabular")(TabularAugmenter)
AUGMENTERS.register("text")(TextAugmenter)


class Deterministic:
    """Wraps an augmenter so that its random path is its `prepare` path."""

    def __init__(self, inner: ModalityAugmenter) -> None:
        self.inner = inner

    def __call__(self, x: Tensor, pad: Tensor | None, generator: torch.Generator) -> Tensor:
        return self.inner.prepare(x, pad)

    def prepare(self, x: Tensor, pad: Tensor | None = None) -> Tensor:
        return self.inner.prepare(x, pad)


class MultimodalAugmenter:
    """Applies augmenter m to `batch.xs[m]`; pad masks and labels are carried over unchanged."""

    def __init__(self, augmenters: list[ModalityAugmenter]) -> None:
        self.augmenters = augmenters

    def __call__(self, batch: Batch, generator: torch.Generator) -> Batch:
        """A new random view. Draws come from `generator` (a CPU generator) whatever the device."""
        if generator.device.type != "cpu":
            raise ValueError(f"augmentations draw on CPU; got a {generator.device} generator")
        self._check(batch)
        xs = [
            aug(x, pad, generator)
            for aug, x, pad in zip(self.augmenters, batch.xs, batch.pad, strict=True)
        ]
        return Batch(xs=xs, pad=list(batch.pad), labels=dict(batch.labels))

    def prepare(self, batch: Batch) -> Batch:
        """The deterministic evaluation view (dtype conversion, image normalisation)."""
        self._check(batch)
        xs = [
            aug.prepare(x, pad)
            for aug, x, pad in zip(self.augmenters, batch.xs, batch.pad, strict=True)
        ]
        return Batch(xs=xs, pad=list(batch.pad), labels=dict(batch.labels))

    def _check(self, batch: Batch) -> None:
        if len(batch.xs) != len(self.augmenters):
            raise ValueError(
                f"batch has {len(batch.xs)} modalities, augmenter expects {len(self.augmenters)}"
            )


def build_augmenter(cfg: AugmentConfig, kinds: Sequence[str]) -> MultimodalAugmenter:
    """One augmenter per data modality kind; an empty `cfg.modalities` means each kind's defaults."""
    if not cfg.modalities:
        return MultimodalAugmenter([AUGMENTERS.build(kind, None) for kind in kinds])
    if len(cfg.modalities) != len(kinds):
        raise ValueError(
            f"augment.modalities has {len(cfg.modalities)} entries but the dataset has "
            f"{len(kinds)} modalities ({', '.join(kinds)})"
        )
    augmenters: list[ModalityAugmenter] = []
    for i, (mcfg, kind) in enumerate(zip(cfg.modalities, kinds, strict=True)):
        if isinstance(mcfg, IdentityAugmentConfig):
            augmenters.append(Deterministic(AUGMENTERS.build(kind, None)))
        elif mcfg.kind != kind:
            raise ValueError(
                f"augment.modalities.{i}.kind is '{mcfg.kind}' but modality {i} is '{kind}' "
                f"(use '{kind}' or 'none')"
            )
        else:
            augmenters.append(AUGMENTERS.build(kind, mcfg))
    return MultimodalAugmenter(augmenters)
