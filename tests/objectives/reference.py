"""Naive, loop-only references shared by the objective tests (no vectorised tricks)."""

from __future__ import annotations

import math

import torch


def normalise(x: list[float]) -> list[float]:
    norm = math.sqrt(sum(a * a for a in x))
    return [a / norm for a in x]


def dot(x: list[float], y: list[float]) -> float:
    return sum(a * b for a, b in zip(x, y, strict=True))


def naive_nt_xent_lists(
    us: list[list[float]], vs: list[list[float]], t: float
) -> tuple[float, float]:
    """SimCLR NT-Xent on normalised rows: each of the 2N anchors vs its positive and the 2N-2
    other embeddings; plus top-1 retrieval accuracy (%) in both directions."""
    n = len(us)
    zs = us + vs
    total = 0.0
    for a in range(2 * n):
        pos = (a + n) % (2 * n)
        denom = sum(math.exp(dot(zs[a], zs[b]) / t) for b in range(2 * n) if b != a)
        total += -(dot(zs[a], zs[pos]) / t - math.log(denom))
    hits = 0
    for i in range(n):
        hits += max(range(n), key=lambda j, i=i: dot(us[i], vs[j])) == i
        hits += max(range(n), key=lambda j, i=i: dot(vs[i], us[j])) == i
    return total / (2 * n), 100.0 * hits / (2 * n)


def naive_nt_xent(u: torch.Tensor, v: torch.Tensor, t: float) -> tuple[float, float]:
    """The same on raw tensors (normalised here, row by row)."""
    return naive_nt_xent_lists(
        [normalise(r) for r in u.tolist()], [normalise(r) for r in v.tolist()], t
    )
