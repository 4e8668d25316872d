"""Batched MultiBench row ops (CoMM §3.3) on (B, T, ...) tensors with a padding mask.

"Rows" are axis 1 (timesteps; features for tabular vectors). `pad` is bool (B, T), True =
padding, or None when every row is valid. Padded rows are never read into valid rows, never
moved, and come out bit-identical. Every random number is drawn on CPU from the explicit
generator, then moved to the data's device; fractions are taken of each sample's valid rows.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from commlab.config import SequenceAugmentConfig


def uniform(
    generator: torch.Generator,
    shape: tuple[int, ...],
    device: torch.device,
    lo: float = 0.0,
    hi: float = 1.0,
) -> Tensor:
    return (lo + (hi - lo) * torch.rand(shape, generator=generator)).to(device)


def chosen(generator: torch.Generator, batch: int, p: float, device: torch.device) -> Tensor:
    """(B,) bool: which samples an op with probability `p` applies to."""
    return uniform(generator, (batch,), device) < p


def rows(mask: Tensor, x: Tensor) -> Tensor:
    """Broadcast a (B,) or (B, T) mask over the trailing dims of x."""
    return mask.view(*mask.shape, *([1] * (x.dim() - mask.dim())))


def valid_rows(x: Tensor, pad: Tensor | None) -> Tensor:
    if pad is None:
        return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    if pad.shape != x.shape[:2]:
        raise ValueError(f"pad mask {tuple(pad.shape)} does not match rows {tuple(x.shape[:2])}")
    return ~pad.to(x.device)


def _position(valid: Tensor) -> tuple[Tensor, Tensor]:
    """Each row's index among its sample's valid rows (B, T), and the valid counts (B,)."""
    v = valid.long()
    return v.cumsum(1) - 1, v.sum(1)


def _shuffled_source(valid: Tensor, generator: torch.Generator) -> Tensor:
    """(B, T) gather index: valid rows receive a random permutation of the valid rows; padded
    rows map to themselves."""
    b, t = valid.shape
    arange = torch.arange(t, device=valid.device).expand(b, t)
    keys = uniform(generator, (b, t), valid.device)
    # padded rows sort after every valid row, in position order, in both index lists
    order = torch.where(valid, keys, 2.0 + arange).argsort(dim=1, stable=True)
    slots = torch.where(valid, arange, t + arange).argsort(dim=1, stable=True)
    return torch.empty_like(order).scatter_(1, slots, order)


def _block(valid: Tensor, length: Tensor, generator: torch.Generator) -> Tensor:
    """(B, T) bool: one random contiguous block of `length` valid rows per sample."""
    pos, count = _position(valid)
    start = (uniform(generator, (valid.shape[0],), valid.device) * (count - length + 1)).floor()
    return valid & (pos >= start[:, None]) & (pos < (start + length)[:, None])


def add_noise(
    x: Tensor, pad: Tensor | None, generator: torch.Generator, std: float, p: float
) -> Tensor:
    """Add N(0, std^2) to the valid rows of the chosen samples."""
    if p == 0 or std == 0:
        return x
    apply = chosen(generator, x.shape[0], p, x.device)
    noise = torch.randn(x.shape, generator=generator).to(x.device, x.dtype) * std
    touch = valid_rows(x, pad) & apply[:, None]
    return torch.where(rows(touch, x), x + noise, x)


def drop_rows(
    x: Tensor, pad: Tensor | None, generator: torch.Generator, max_fraction: float, p: float
) -> Tensor:
    """Zero floor(f * n_valid) random valid rows, f ~ U(0, max_fraction)."""
    if p == 0 or max_fraction == 0:
        return x
    valid = valid_rows(x, pad)
    b, t = valid.shape
    apply = chosen(generator, b, p, x.device)
    frac = uniform(generator, (b,), x.device, 0.0, max_fraction)
    n_drop = (frac * valid.sum(1)).floor()
    keys = torch.where(valid, uniform(generator, (b, t), x.device), 2.0)
    rank = keys.argsort(dim=1, stable=True).argsort(1)  # valid rows take ranks 0 .. n_valid-1
    drop = valid & (rank < n_drop[:, None]) & apply[:, None]
    return torch.where(rows(drop, x), torch.zeros_like(x), x)


def drop_block(
    x: Tensor, pad: Tensor | None, generator: torch.Generator, max_fraction: float, p: float
) -> Tensor:
    """Zero one contiguous block of floor(f * n_valid) valid rows, f ~ U(0, max_fraction)."""
    if p == 0 or max_fraction == 0:
        return x
    valid = valid_rows(x, pad)
    b = valid.shape[0]
    apply = chosen(generator, b, p, x.device)
    frac = uniform(generator, (b,), x.device, 0.0, max_fraction)
    drop = _block(valid, (frac * valid.sum(1)).floor(), generator) & apply[:, None]
    return torch.where(rows(drop, x), torch.zeros_like(x), x)


def crop_block(
    x: Tensor, pad: Tensor | None, generator: torch.Generator, min_keep: float, p: float
) -> Tensor:
    """Keep one contiguous block (in place) of a fraction f ~ U(min_keep, 1) of the valid rows,
    at least one row; zero the other valid rows."""
    if p == 0:
        return x
    valid = valid_rows(x, pad)
    b = valid.shape[0]
    apply = chosen(generator, b, p, x.device)
    frac = uniform(generator, (b,), x.device, min_keep, 1.0)
    count = valid.sum(1)
    keep = (frac * count).floor().clamp(min=1).minimum(count)
    drop = valid & ~_block(valid, keep, generator) & apply[:, None]
    return torch.where(rows(drop, x), torch.zeros_like(x), x)


def permute_rows(x: Tensor, pad: Tensor | None, generator: torch.Generator, p: float) -> Tensor:
    """Shuffle the valid rows among the valid positions."""
    if p == 0:
        return x
    valid = valid_rows(x, pad)
    apply = chosen(generator, x.shape[0], p, x.device)
    src = _shuffled_source(valid, generator)
    shuffled = x.gather(1, rows(src, x).expand_as(x))
    return torch.where(rows(apply, x), shuffled, x)


def beta(generator: torch.Generator, alpha: float, n: int) -> Tensor:
    """n draws from Beta(alpha, alpha). torch's Beta sampler takes no generator, so numpy draws
    them from a seed that the torch generator supplies (deterministic per generator state)."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return torch.from_numpy(np.random.default_rng(seed).beta(alpha, alpha, size=n)).float()


def mixup_rows(
    x: Tensor, pad: Tensor | None, generator: torch.Generator, alpha: float, p: float
) -> Tensor:
    """x <- lam * x + (1 - lam) * x[shuffled valid rows], lam ~ Beta(alpha, alpha) per sample."""
    if p == 0:
        return x
    valid = valid_rows(x, pad)
    b = valid.shape[0]
    apply = chosen(generator, b, p, x.device)
    lam = rows(beta(generator, alpha, b).to(x.device, x.dtype), x)
    src = _shuffled_source(valid, generator)
    mixed = lam * x + (1 - lam) * x.gather(1, rows(src, x).expand_as(x))
    return torch.where(rows(valid & apply[:, None], x), mixed, x)


class SequenceAugmenter:
    """MultiBench ops on float (B, T, p) with a (B, T) padding mask, in the config's order."""

    def __init__(self, cfg: SequenceAugmentConfig | None = None) -> None:
        self.cfg = cfg or SequenceAugmentConfig()

    def __call__(self, x: Tensor, pad: Tensor | None, generator: torch.Generator) -> Tensor:
        c = self.cfg
        x = self.prepare(x, pad)
        x = add_noise(x, pad, generator, c.noise_std, c.noise_p)
        x = drop_rows(x, pad, generator, c.drop_max, c.drop_p)
        x = drop_block(x, pad, generator, c.drop_consecutive_max, c.drop_consecutive_p)
        x = crop_block(x, pad, generator, c.crop_min, c.crop_p)
        x = permute_rows(x, pad, generator, c.permute_p)
        return mixup_rows(x, pad, generator, c.mixup_alpha, c.mixup_p)

    def prepare(self, x: Tensor, pad: Tensor | None = None) -> Tensor:
        if x.dim() < 2:
            raise ValueError(f"sequences must be (B, T, ...), got {tuple(x.shape)}")
        return x.float()
