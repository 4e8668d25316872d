"""Synthetic interaction benchmark: two vector modalities with known redundancy, uniqueness and
synergy, so what a method learns can be read against ground truth in a CPU minute.

Each sample draws, independently:

- ``c`` (``share_classes`` classes): redundant, present in *both* modalities as the prototype
  ``S[c]`` (``share_dim`` coordinates);
- ``u1``, ``u2`` (``unique_classes`` each): unique, modality m alone holds ``U_m[u_m]``
  (``unique_dim`` coordinates);
- the synergy part: a direction ``a``, uniform on the sphere of ``synergy_dim`` coordinates and
  scaled to norm ``synergy_scale``, *shared* by both modalities, and one sign bit per modality,
  ``b1`` and ``b2``: modality m holds ``(-1)^b_m * a``. The label is ``y = b1 XOR b2`` (do the two
  modalities hold the same vector or opposite ones?). ``y`` is drawn balanced and ``b1``
  uniform, then ``b2 = b1 XOR y``.

Why each bit alone says nothing about ``y``, and not even about itself: ``a`` is uniform on the
sphere and symmetric, so ``(-1)^b_m * a`` has the same distribution for both values of ``b_m``;
modality m alone is therefore independent of ``b_m`` and of ``y`` (a probe on one modality,
linear or not, is at chance). The bits exist only relative to each other: ``y`` is the sign of
the inner product of the two modalities' synergy parts, a product of coordinates from both. A
linear score on the concatenated raw inputs is a sum of one term per modality and cannot
express that product, so a linear probe on the raw inputs is at chance too. The axis ``a``
itself (up to sign) is redundant information, as in any cross-modal relation.

Modality m is ``[S[c], U_m[u_m], (-1)^b_m a, N(0, 1) nuisance]`` (``nuisance_dim``
coordinates) plus Gaussian noise of std ``noise``, mapped to ``dim`` coordinates by a random
matrix with orthonormal rows of its own per modality (``mix``; without it the parts are
zero-padded). Prototypes are N(0, 1) coordinates scaled to norm ``sqrt(dim of the part)``.

Tasks: ``share`` = c, ``unique1`` = u1, ``unique2`` = u2 (multiclass), ``synergy`` = y (binary,
balanced). Streams: ``default_rng([seed, k])`` with k = 0 prototypes and mixing, 1 train, 2 test.
`generate_synthetic` writes ``<out>/<fingerprint>/`` in the format of `commlab.data.parquet`;
same parameters, same bytes.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from commlab.data import DATASETS
from commlab.data.base import DataBundle, Modality, MultimodalDataset, Task
from commlab.data.parquet import (
    FORMAT_VERSION,
    read_dataset,
    shareable,
    validate_dataset,
    write_dataset,
)

GENERATOR_VERSION = 1  # bump when generation changes: it is part of the fingerprint

DEFAULTS: dict[str, Any] = dict(
    train=10000,
    test=4000,
    share_dim=8,
    unique_dim=8,
    synergy_dim=4,
    nuisance_dim=0,
    dim=32,
    share_classes=10,
    unique_classes=10,
    synergy_scale=2.0,
    noise=0.1,
    mix=True,
    seed=0,
)
_INT_MIN = dict(
    train=2,
    test=2,
    share_dim=1,
    unique_dim=1,
    synergy_dim=2,
    nuisance_dim=0,
    dim=1,
    share_classes=2,
    unique_classes=2,
    seed=0,
)


def synergy_tasks(share_classes: int, unique_classes: int) -> dict[str, Task]:
    return {
        "share": Task("share", "multiclass", share_classes),
        "unique1": Task("unique1", "multiclass", unique_classes),
        "unique2": Task("unique2", "multiclass", unique_classes),
        "synergy": Task("synergy", "binary", 2),
    }


def check_params(params: dict[str, Any]) -> dict[str, Any]:
    """Defaults filled in and every knob validated; errors name the knob."""
    unknown = sorted(set(params) - set(DEFAULTS))
    if unknown:
        raise ValueError(
            f"synthetic: unknown param '{unknown[0]}'; valid: {', '.join(sorted(DEFAULTS))}"
        )
    p = {**DEFAULTS, **params}
    for name, lo in _INT_MIN.items():
        v = p[name]
        if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < lo:
            raise ValueError(f"synthetic: '{name}' must be an int >= {lo}, got {v!r}")
        p[name] = int(v)
    if not _is_num(p["synergy_scale"]) or p["synergy_scale"] <= 0:
        raise ValueError(
            f"synthetic: 'synergy_scale' must be a number > 0, got {p['synergy_scale']!r}"
        )
    p["synergy_scale"] = float(p["synergy_scale"])
    if not _is_num(p["noise"]) or p["noise"] < 0:
        raise ValueError(f"synthetic: 'noise' must be a number >= 0, got {p['noise']!r}")
    p["noise"] = float(p["noise"])
    if not isinstance(p["mix"], bool):
        raise ValueError(f"synthetic: 'mix' must be a bool, got {p['mix']!r}")
    parts = p["share_dim"] + p["unique_dim"] + p["synergy_dim"] + p["nuisance_dim"]
    if p["dim"] < parts:
        raise ValueError(
            f"synthetic: 'dim'={p['dim']} is smaller than the parts' total {parts} "
            "(share_dim + unique_dim + synergy_dim + nuisance_dim)"
        )
    return p


def _is_num(x: Any) -> bool:
    return isinstance(x, int | float | np.integer | np.floating) and not isinstance(x, bool)


def _prototypes(rng: np.random.Generator, k: int, d: int) -> np.ndarray:
    proto = rng.standard_normal((k, d))
    return proto / np.linalg.norm(proto, axis=1, keepdims=True) * np.sqrt(d)


def _mixing(rng: np.random.Generator, parts: int, dim: int, mix: bool) -> np.ndarray:
    """(parts, dim): orthonormal rows (a random rotation into `dim` coordinates), or padding."""
    if not mix:
        return np.eye(parts, dim)
    q, r = np.linalg.qr(rng.standard_normal((dim, parts)))
    return (q * np.sign(np.diag(r))).T  # sign fix: a unique, seed-determined factor


def synergy_latents(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(y, b1, b2) int64: y balanced (exactly, up to one for odd n), b1 uniform, b2 = b1 XOR y."""
    y = rng.permutation(np.arange(n) % 2)
    b1 = rng.integers(0, 2, n)
    return y.astype(np.int64), b1.astype(np.int64), (b1 ^ y).astype(np.int64)


def shared_axis(n: int, d: int, scale: float, rng: np.random.Generator) -> np.ndarray:
    """(n, d): a uniform random direction per sample, at norm `scale`."""
    a = rng.standard_normal((n, d))
    return a * (scale / np.linalg.norm(a, axis=1, keepdims=True))


def sample_split(
    n: int, p: dict[str, Any], model: dict[str, np.ndarray], rng: np.random.Generator
) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
    """Inputs of both modalities (float32 (n, dim) each) and the labels of n samples, with the
    hidden bits under ``b1`` / ``b2``."""
    c = rng.integers(0, p["share_classes"], n)
    u = [rng.integers(0, p["unique_classes"], n) for _ in range(2)]
    y, *bits = synergy_latents(n, rng)
    axis = shared_axis(n, p["synergy_dim"], p["synergy_scale"], rng)
    xs = []
    for m in range(2):
        parts = [
            model["share"][c],
            model[f"unique{m + 1}"][u[m]],
            np.where(bits[m] == 1, -1.0, 1.0)[:, None] * axis,
            rng.standard_normal((n, p["nuisance_dim"])),
        ]
        z = np.concatenate(parts, axis=1)
        z = z + p["noise"] * rng.standard_normal(z.shape)
        xs.append((z @ model[f"mix{m + 1}"]).astype(np.float32))
    labels = {
        "share": c,
        "unique1": u[0],
        "unique2": u[1],
        "synergy": y,
        "b1": bits[0],
        "b2": bits[1],
    }
    return xs, {k: v.astype(np.int64) for k, v in labels.items()}


def make_synergy_dataset(**params: Any) -> tuple[MultimodalDataset, dict[str, np.ndarray]]:
    """The dataset in memory (train then test) and its hidden bits (``b1``, ``b2``, per sample),
    for tests and diagnostics; the bits are not stored on disk."""
    p = check_params(params)
    rng = np.random.default_rng([p["seed"], 0])
    parts = p["share_dim"] + p["unique_dim"] + p["synergy_dim"] + p["nuisance_dim"]
    model = {
        "share": _prototypes(rng, p["share_classes"], p["share_dim"]),
        "unique1": _prototypes(rng, p["unique_classes"], p["unique_dim"]),
        "unique2": _prototypes(rng, p["unique_classes"], p["unique_dim"]),
        "mix1": _mixing(rng, parts, p["dim"], p["mix"]),
        "mix2": _mixing(rng, parts, p["dim"], p["mix"]),
    }
    xs: list[list[np.ndarray]] = [[], []]
    labels: dict[str, list[np.ndarray]] = {}
    hidden: dict[str, list[np.ndarray]] = {"b1": [], "b2": []}
    for k, n in ((1, p["train"]), (2, p["test"])):
        x, y = sample_split(n, p, model, np.random.default_rng([p["seed"], k]))
        for m in range(2):
            xs[m].append(x[m])
        for name, v in y.items():
            (hidden[name] if name in hidden else labels.setdefault(name, [])).append(v)
    n = p["train"] + p["test"]
    modalities = [
        Modality(f"x{m + 1}", "tabular", torch.from_numpy(np.concatenate(xs[m])), torch.arange(n))
        for m in range(2)
    ]
    ys = {k: torch.from_numpy(np.concatenate(v)) for k, v in labels.items()}
    splits = {"train": torch.arange(p["train"]), "test": torch.arange(p["train"], n)}
    fp = synthetic_fingerprint(p)
    ds = MultimodalDataset(
        modalities,
        ys,
        synergy_tasks(p["share_classes"], p["unique_classes"]),
        splits,
        f"synthetic-{fp}",
    )
    return ds, {k: np.concatenate(v) for k, v in hidden.items()}


def synthetic_fingerprint(p: dict[str, Any]) -> str:
    key = {**check_params(p), "format": FORMAT_VERSION, "generator": GENERATOR_VERSION}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def generate_synthetic(out_dir: str | Path, **params: Any) -> Path:
    """Write the dataset under ``out_dir/<fingerprint>/`` (reused when already valid) and return
    that directory. An fcntl lock makes concurrent callers wait for one writer."""
    p = check_params(params)
    fp = synthetic_fingerprint(p)
    out = Path(out_dir)
    target = out / fp
    if not validate_dataset(target):
        return target
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f".{fp}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not validate_dataset(target):
                return target
            if target.exists():
                shutil.rmtree(target)
            ds, _ = make_synergy_dataset(**p)
            tmp = Path(tempfile.mkdtemp(prefix=f".{fp}.tmp-", dir=out))
            try:
                write_dataset(ds, tmp / "data", params={**p, "fingerprint": fp})
                shareable(tmp / "data")
                (tmp / "data").rename(target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return target


def describe(p: dict[str, Any]) -> str:
    return (
        f"synthetic {p['train']}+{p['test']} samples, 2 x {p['dim']}-d "
        f"(share {p['share_dim']}d/{p['share_classes']} classes, unique {p['unique_dim']}d/"
        f"{p['unique_classes']}, synergy: XOR of signs on a shared {p['synergy_dim']}d axis, "
        f"nuisance {p['nuisance_dim']}d, noise {p['noise']})"
    )


@DATASETS.register("synthetic")
def synthetic(path: str, seed: int, **params: Any) -> DataBundle:
    """Generate (once) under `path` and load the synthetic interaction dataset.

    Params: the knobs of `DEFAULTS`, with the data seed named ``data_seed``; the training
    `seed` argument does not affect the data.
    """
    params = dict(params)
    if "seed" in params:
        raise ValueError("synthetic: name the data seed 'data_seed' (the run's seed is separate)")
    if "data_seed" in params:
        params["seed"] = params.pop("data_seed")
    p = check_params(params)
    ds = read_dataset(generate_synthetic(path, **p))
    return DataBundle(pretrain=ds, probe=ds, description=describe(p))


def generate_with_summary(out_dir: str | Path, **knobs: Any) -> tuple[Path, str]:
    """`generate_synthetic` with the knobs that are not None; returns the directory and a
    one-line summary (the CLI's output)."""
    p = check_params({k: v for k, v in knobs.items() if v is not None})
    t0 = time.perf_counter()
    path = generate_synthetic(out_dir, **p)
    return path, f"{describe(p)}; ready in {time.perf_counter() - t0:.1f}s"
