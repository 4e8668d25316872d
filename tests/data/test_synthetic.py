"""The synthetic interaction dataset: reproducible bytes, honest synergy, loading, CLI, pretraining."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from commlab.config import load_config
from commlab.data import build_data
from commlab.data.parquet import validate_dataset
from commlab.data.synthetic import (
    DEFAULTS,
    check_params,
    generate_synthetic,
    make_synergy_dataset,
)
from commlab.probe import fit_probe
from tests.data.permissions import assert_written_with_ordinary_permissions

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "synthetic"
SMALL = dict(train=3000, test=2000)


# Small parts so that the degree-2 probes below stay cheap (16 coordinates per modality).
PROBED = dict(train=3000, test=2000, dim=16, share_dim=4, unique_dim=4, synergy_dim=4)


@pytest.fixture(scope="module")
def small() -> tuple:
    return make_synergy_dataset(**PROBED)


def _split(ds, hidden, name):
    ids = ds.split(name).numpy()
    x1, x2 = (m.values[m.index[ids]].numpy().astype(np.float64) for m in ds.modalities)
    labels = {k: v[ids].numpy() for k, v in ds.labels.items()}
    return x1, x2, labels, {k: v[ids] for k, v in hidden.items()}


def _quadratic(x: np.ndarray) -> np.ndarray:
    """x and its degree-2 monomials (a non-linear probe's features)."""
    i, j = np.triu_indices(x.shape[1])
    return np.concatenate([x, x[:, i] * x[:, j]], axis=1)


def _cross(x1: np.ndarray, x2: np.ndarray) -> np.ndarray:
    """Every product of a coordinate of modality 1 with one of modality 2."""
    return (x1[:, :, None] * x2[:, None, :]).reshape(len(x1), -1)


def _files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    a = generate_synthetic(tmp_path / "a", **SMALL)
    b = generate_synthetic(tmp_path / "b", **SMALL)
    c = generate_synthetic(tmp_path / "c", **SMALL, seed=1)
    assert a.name == b.name != c.name  # the fingerprint names the directory
    assert _files(a) == _files(b)
    assert _files(a)["modality-x1.parquet"] != _files(c)["modality-x1.parquet"]
    assert validate_dataset(a) == []


def test_generation_is_reused(tmp_path: Path) -> None:
    a = generate_synthetic(tmp_path, **SMALL)
    stamp = (a / "samples.parquet").stat().st_mtime_ns
    assert generate_synthetic(tmp_path, **SMALL) == a
    assert (a / "samples.parquet").stat().st_mtime_ns == stamp


def test_labels_are_the_xor_of_hidden_bits_and_balanced(small) -> None:
    ds, hidden = small
    y = ds.labels["synergy"].numpy()
    assert np.array_equal(y, hidden["b1"] ^ hidden["b2"])
    n = len(y)
    assert abs(y.mean() - 0.5) <= 1 / n
    # Each bit alone: the 2x2 table with y is flat (independence up to sampling noise).
    for b in (hidden["b1"], hidden["b2"]):
        for v in (0, 1):
            assert abs(y[b == v].mean() - 0.5) < 0.03


def test_each_modality_alone_carries_no_synergy(small) -> None:
    """Not even a degree-2 probe finds the label, or the modality's own bit, in one modality:
    a sign on a uniformly random shared axis leaves that modality's distribution unchanged."""
    ds, hidden = small
    tr, te = _split(ds, hidden, "train"), _split(ds, hidden, "test")
    for m, bit in ((0, "b1"), (1, "b2")):
        q_tr, q_te = _quadratic(tr[m]), _quadratic(te[m])
        for y_tr, y_te in ((tr[2]["synergy"], te[2]["synergy"]), (tr[3][bit], te[3][bit])):
            assert abs(fit_probe(q_tr, y_tr, q_te, y_te, "binary")["balanced_acc"] - 0.5) < 0.04


def test_linear_probe_on_raw_inputs_is_at_chance_on_synergy_only(small) -> None:
    ds, hidden = small
    (a1, a2, ytr, _), (b1, b2, yte, _) = _split(ds, hidden, "train"), _split(ds, hidden, "test")
    x_tr, x_te = np.concatenate([a1, a2], 1), np.concatenate([b1, b2], 1)
    syn = fit_probe(x_tr, ytr["synergy"], x_te, yte["synergy"], "binary")
    assert abs(syn["balanced_acc"] - 0.5) < 0.04
    for task in ("share", "unique1", "unique2"):
        assert fit_probe(x_tr, ytr[task], x_te, yte[task], "multiclass")["balanced_acc"] > 0.9
    # The label is in the pair: products across the two modalities give it away.
    pair = fit_probe(_cross(a1, a2), ytr["synergy"], _cross(b1, b2), yte["synergy"], "binary")
    assert pair["balanced_acc"] > 0.9


def test_check_params_names_bad_knobs() -> None:
    with pytest.raises(ValueError, match="unknown param 'dims'"):
        check_params({"dims": 3})
    with pytest.raises(ValueError, match="'noise'"):
        check_params({"noise": -1.0})
    with pytest.raises(ValueError, match="'dim'"):
        check_params({"dim": 4})
    assert check_params({}) == DEFAULTS


def test_loads_through_build_data(tmp_path: Path) -> None:
    bundle = build_data("synthetic", str(tmp_path), 0, {**SMALL, "data_seed": 3})
    ds = bundle.probe
    assert set(ds.tasks) == {"share", "unique1", "unique2", "synergy"}
    assert ds.tasks["synergy"].kind == "binary" and ds.tasks["share"].num_classes == 10
    assert [m.kind for m in ds.modalities] == ["tabular", "tabular"]
    assert tuple(ds.modalities[0].values.shape) == (5000, 32)
    assert len(ds.split("train")) == 3000 and len(ds.split("test")) == 2000
    again, _ = make_synergy_dataset(**SMALL, seed=3)
    assert torch.equal(ds.modalities[1].values, again.modalities[1].values)
    with pytest.raises(ValueError, match="unknown param"):
        build_data("synthetic", str(tmp_path), 0, {"nope": 1})


def test_cli_writes_the_dataset(tmp_path: Path) -> None:
    from commlab.cli import app

    result = CliRunner().invoke(
        app, ["data", "synthetic", "--out", str(tmp_path), "--train", "200", "--test", "100"]
    )
    assert result.exit_code == 0, result.output
    assert "synthetic 200+100 samples" in result.output
    (path,) = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    assert validate_dataset(path) == []
    bad = CliRunner().invoke(app, ["data", "synthetic", "--out", str(tmp_path), "--dim", "3"])
    assert bad.exit_code != 0


@pytest.mark.slow
@pytest.mark.parametrize("method", ["comm", "cross", "cross_self", "cmc"])
def test_pretrain_smoke_through_config(method: str, tmp_path: Path) -> None:
    from commlab.train.local import pretrain_local

    cfg = load_config(
        CONFIGS / f"{method}.yaml",
        [
            f"data.path={tmp_path / 'data'}",
            "data.params.train=512",
            "data.params.test=256",
            "train.epochs=1",
            "train.max_steps_per_epoch=2",
        ],
    )
    result = pretrain_local(cfg, tmp_path / "run", tracking=False)
    assert math.isfinite(result.metrics["train/loss"])
    for task in ("share", "unique1", "unique2", "synergy"):
        assert 0.0 <= result.metrics[f"probe/{task}/balanced_acc"] <= 1.0
    assert result.rus is not None and "synergy" in result.rus


def test_generated_dataset_has_ordinary_permissions(tmp_path: Path) -> None:
    assert_written_with_ordinary_permissions(lambda: generate_synthetic(tmp_path, **SMALL))
