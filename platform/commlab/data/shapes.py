"""The ten Trifeatures shapes as analytic masks (Hermann & Lampinen, NeurIPS 2020).

A shape lives in a template box with coordinates u (right) and v (down) in [-1, 1]; the renderer
maps every output pixel into that box (rotation, placement) and asks `shape_mask` whether it is
inside. Evaluating the shape at the sampled points, instead of resampling a raster template, keeps
edges exact at every resolution and needs no per-pixel Python.
"""

from __future__ import annotations

import math

import numpy as np

SHAPES = (
    "triangle",
    "square",
    "plus",
    "circle",
    "tee",
    "rhombus",
    "pentagon",
    "star",
    "fivesquare",
    "trapezoid",
)


def _regular(n: int, radius: float, inner: float | None = None) -> np.ndarray:
    """Vertices of a regular n-gon (or an n-pointed star with `inner` radius), apex up."""
    if inner is None:
        angles = -math.pi / 2 + 2 * math.pi * np.arange(n) / n
        return np.stack([radius * np.cos(angles), radius * np.sin(angles)], 1)
    angles = -math.pi / 2 + math.pi * np.arange(2 * n) / n
    r = np.where(np.arange(2 * n) % 2 == 0, radius, inner)
    return np.stack([r * np.cos(angles), r * np.sin(angles)], 1)


def _boxes_polygon(w: float, h: float) -> np.ndarray:
    return np.array([[-w, -h], [w, -h], [w, h], [-w, h]])


# Polygons in template coordinates (v points down, so the triangle's apex is at negative v).
_POLYGONS: dict[str, np.ndarray] = {
    "triangle": np.array([[0.0, -0.9], [0.9, 0.75], [-0.9, 0.75]]),
    "square": _boxes_polygon(0.7, 0.7),
    "plus": np.array(
        [[-0.3, -0.9], [0.3, -0.9], [0.3, -0.3], [0.9, -0.3], [0.9, 0.3], [0.3, 0.3]]
        + [[0.3, 0.9], [-0.3, 0.9], [-0.3, 0.3], [-0.9, 0.3], [-0.9, -0.3], [-0.3, -0.3]]
    ),
    "tee": np.array(
        [[-0.85, -0.85], [0.85, -0.85], [0.85, -0.3], [0.27, -0.3]]
        + [[0.27, 0.9], [-0.27, 0.9], [-0.27, -0.3], [-0.85, -0.3]]
    ),
    "rhombus": np.array([[0.0, -0.95], [0.62, 0.0], [0.0, 0.95], [-0.62, 0.0]]),
    "pentagon": _regular(5, 0.92),
    "star": _regular(5, 0.98, inner=0.42),
    "trapezoid": np.array([[-0.5, -0.6], [0.5, -0.6], [0.92, 0.6], [-0.92, 0.6]]),
}
_CIRCLE_RADIUS = 0.85
_FIVESQUARE_CENTRES = ((0.0, 0.0), (-0.56, -0.56), (0.56, -0.56), (-0.56, 0.56), (0.56, 0.56))
_FIVESQUARE_HALF = 0.3


def _inside_polygon(poly: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Even-odd rule: count crossings of a ray towards +u with each edge (one pass per edge)."""
    inside = np.zeros(u.shape, dtype=bool)
    for (u0, v0), (u1, v1) in zip(poly, np.roll(poly, -1, axis=0), strict=True):
        if v0 == v1:
            continue  # a horizontal edge is never crossed by a horizontal ray
        straddles = (v0 > v) != (v1 > v)
        u_cross = u0 + (v - v0) * ((u1 - u0) / (v1 - v0))
        inside ^= straddles & (u < u_cross)
    return inside


def shape_mask(shape: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """bool array like `u`: True where (u, v) lies inside shape number `shape` (index in SHAPES)."""
    name = SHAPES[shape]
    if name == "circle":
        return u * u + v * v < _CIRCLE_RADIUS**2
    if name == "fivesquare":
        out = np.zeros(u.shape, dtype=bool)
        for cu, cv in _FIVESQUARE_CENTRES:
            out |= (np.abs(u - cu) < _FIVESQUARE_HALF) & (np.abs(v - cv) < _FIVESQUARE_HALF)
        return out
    return _inside_polygon(_POLYGONS[name], u, v)
