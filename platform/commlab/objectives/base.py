"""The result type every objective returns, and the shared normalise-then-gather step."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from commlab.dist import gather_with_grad


@dataclass
class LossOutput:
    """`loss`: scalar with grad. `terms`: detached per-term losses. `acc`: detached top-1
    retrieval accuracies in %. Unpacks as `loss, terms, acc = out`."""

    loss: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)
    acc: dict[str, Tensor] = field(default_factory=dict)

    def __iter__(self) -> Iterator[Any]:
        return iter((self.loss, self.terms, self.acc))


def check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def check_embeddings(zs: Sequence[Tensor], what: str) -> None:
    """All of `zs` must be 2-D (B, D) with one shape."""
    for i, z in enumerate(zs):
        if z.ndim != 2:
            raise ValueError(f"{what}[{i}] must be 2-D (B, D), got shape {tuple(z.shape)}")
        if z.shape != zs[0].shape:
            raise ValueError(
                f"{what}: all embeddings must share one shape, got {tuple(zs[0].shape)} "
                f"and {tuple(z.shape)} at index {i}"
            )


def normalize_and_gather(zs: Sequence[Tensor], gather: bool) -> list[Tensor]:
    """L2-normalise each (B, D_k) tensor, then (if `gather`) all-gather with gradient.

    All tensors travel in one collective (concatenated along the feature axis), not one each.
    Returns (B_global, D_k) tensors in the input order.
    """
    zs = [F.normalize(z, dim=-1) for z in zs]
    if not gather:
        return zs
    widths = [z.shape[1] for z in zs]
    packed = gather_with_grad(torch.cat(zs, dim=1))
    return list(packed.split(widths, dim=1))
