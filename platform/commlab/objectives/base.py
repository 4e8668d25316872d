"""The result type every objective returns, the shared normalise-then-gather step, and
`in_fp32`, which every objective wears."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

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
    The caller's loss must be the same on every rank (the loss over the global batch): the
    backward then needs no collective (`dist.gather_with_grad(identical_loss=True)`).
    Returns (B_global, D_k) tensors in the input order.
    """
    zs = [F.normalize(z, dim=-1) for z in zs]
    if not gather:
        return zs
    widths = [z.shape[1] for z in zs]
    packed = gather_with_grad(torch.cat(zs, dim=1), identical_loss=True)
    return list(packed.split(widths, dim=1))


F_ = TypeVar("F_", bound=Callable[..., Any])
_LOW = (torch.bfloat16, torch.float16)


def to_fp32(x: Any) -> Any:
    """`x` with its bf16 / fp16 tensors (also inside lists and tuples) as float32."""
    if isinstance(x, Tensor):
        return x.float() if x.dtype in _LOW else x
    if isinstance(x, list | tuple):
        return type(x)(to_fp32(v) for v in x)
    return x


def _first_tensor(xs: Sequence[Any]) -> Tensor | None:
    for x in xs:
        if isinstance(x, Tensor):
            return x
        if isinstance(x, list | tuple) and (t := _first_tensor(x)) is not None:
            return t
    return None


def in_fp32(fn: F_) -> F_:
    """Run an objective in float32 under mixed precision: low-precision tensor arguments (also
    inside lists and tuples) are cast to float32 and autocast is off for the objective's body.
    Similarity logits reach 1/τ (10 at τ = 0.1), which bf16 resolves only to 0.06; the
    objectives' matmuls are a negligible share of a step's FLOPs."""

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        first = _first_tensor([*args, *kwargs.values()])
        device = first.device.type if first is not None else "cpu"
        with torch.autocast(device, enabled=False):
            return fn(*to_fp32(args), **{k: to_fp32(v) for k, v in kwargs.items()})

    return wrapped  # type: ignore[return-value]
