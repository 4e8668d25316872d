"""The ten Trifeatures textures as analytic binary patterns (1 = colour, 0 = background).

Patterns are evaluated at texture coordinates (x right, y down) measured in *periods*: the renderer
rotates, shifts and scales every output pixel into these coordinates, so one formula serves every
resolution. `noise` and `rain` are random per image; they are a counter-based hash of (image seed,
grain cell), so a pixel's value depends only on its image and position, never on batch order.
"""

from __future__ import annotations

import math

import numpy as np

TEXTURES = (
    "solid",
    "stripes",
    "grid",
    "hexgrid",
    "dots",
    "noise",
    "triangles",
    "zigzags",
    "rain",
    "pluses",
)
NOISE_P = 0.5  # Bernoulli probability of a coloured grain
RAIN_P = 0.05  # probability that a grain starts a streak
_SQRT3 = math.sqrt(3.0)


def texture_period(size: int) -> float:
    """Texture period in output pixels: 10 px at 224 px as in the reference, scaled with the image,
    but never below 6 px so that the patterns stay distinguishable at 32-64 px."""
    return max(6.0, 10.0 * size / 224.0)


def _hash_uniform(seed: np.ndarray, gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    """Uniform [0, 1) floats from (seed, gx, gy) via the splitmix64 finaliser (integer arrays wrap)."""
    z = seed.astype(np.uint64) ^ (
        gx.astype(np.int64).view(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    )
    z = z ^ (gy.astype(np.int64).view(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F))
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _hexgrid(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    # Cell centres form a triangular lattice (spacing 1) = two offset rectangular lattices; the
    # offset to the nearest centre, measured along the three neighbour directions, is 0.5 on a
    # cell border.
    ax, ay = x - np.round(x), y - _SQRT3 * np.round(y / _SQRT3)
    bx = x - 0.5 - np.round(x - 0.5)
    by = y - _SQRT3 / 2 - _SQRT3 * np.round((y - _SQRT3 / 2) / _SQRT3)
    use_a = ax * ax + ay * ay <= bx * bx + by * by
    dx, dy = np.where(use_a, ax, bx), np.where(use_a, ay, by)
    s = dy * (_SQRT3 / 2)
    hexnorm = np.maximum(np.abs(dx), np.maximum(np.abs(0.5 * dx + s), np.abs(0.5 * dx - s)))
    return hexnorm > 0.38


def texture_mask(
    texture: int, x: np.ndarray, y: np.ndarray, seed: np.ndarray, grain: float
) -> np.ndarray:
    """bool array like `x`: where texture number `texture` (index in TEXTURES) is coloured.

    x, y: texture coordinates in periods, (n, H, W); seed: uint64 (n, 1, 1), one per image, for
    the random textures; grain: size of a noise/rain cell in periods.
    """
    name = TEXTURES[texture]
    fx, fy = x - np.floor(x), y - np.floor(y)
    if name == "solid":
        return np.ones(x.shape, dtype=bool)
    if name == "stripes":
        return fx < 0.5
    if name == "grid":
        return (fx < 0.3) | (fy < 0.3)
    if name == "hexgrid":
        return _hexgrid(x, y)
    if name == "dots":
        return (fx - 0.5) ** 2 + (fy - 0.5) ** 2 < 0.32**2
    if name == "triangles":  # one apex-up triangle per cell
        return (fy < 0.85) & (np.abs(fx - 0.5) < (fy - 0.12) * (0.4 / 0.73))
    if name == "zigzags":
        return np.mod(y - 0.5 * np.abs(2.0 * fx - 1.0), 1.0) < 0.4
    if name == "pluses":
        dx, dy = np.abs(fx - 0.5), np.abs(fy - 0.5)
        return ((dx < 0.1) & (dy < 0.42)) | ((dy < 0.1) & (dx < 0.42))
    gx, gy = np.floor(x / grain), np.floor(y / grain)
    if name == "noise":
        return _hash_uniform(seed, gx, gy) < NOISE_P
    if name == "rain":  # a streak of one period falls from each seeded grain
        out = np.zeros(x.shape, dtype=bool)
        for k in range(max(2, round(1.0 / grain))):
            out |= _hash_uniform(seed, gx, gy - k) < RAIN_P
        return out
    raise ValueError(f"unknown texture {texture}; valid: 0..{len(TEXTURES) - 1}")
