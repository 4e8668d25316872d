import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from commlab.data.base import Task
from commlab.probe import fit_probe, run_probes


def blobs(n, d=16, k=4, sep=4.0, seed=0, labels=None):
    """Gaussian blobs; sep large enough makes them linearly separable."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d)) * sep
    y = rng.integers(0, k, n)
    x = centers[y] + rng.normal(size=(n, d))
    if labels is not None:
        y = np.asarray(labels)[y]
    return x.astype(np.float32), y


def split(x, y, n_train):
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def test_separable_classes_are_probed_perfectly():
    m = fit_probe(*split(*blobs(500), 400), "multiclass")
    assert set(m) == {"balanced_acc", "acc", "C"}
    assert m["balanced_acc"] > 0.99 and m["acc"] > 0.99
    assert 1e-6 <= m["C"] <= 1e4  # the grid; ties go to the more regularised end


def test_noise_features_are_near_chance():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(1500, 32)), rng.integers(0, 10, 1500)
    m = fit_probe(*split(x, y, 1000), "multiclass")
    assert abs(m["balanced_acc"] - 0.1) < 0.06


def test_same_inputs_same_metrics_and_torch_inputs_match_numpy():
    data = split(*blobs(400, sep=0.4, seed=3), 300)
    a = fit_probe(*data, "multiclass", seed=5)
    b = fit_probe(*data, "multiclass", seed=5)
    c = fit_probe(*(torch.from_numpy(np.asarray(v)) for v in data), "multiclass", seed=5)
    assert a == b == c
    assert 0.3 < a["balanced_acc"] < 1.0  # a non-trivial problem, so equality means something


def test_test_set_never_influences_model_selection():
    xtr, ytr, xte, yte = split(*blobs(600, sep=0.3, seed=4), 400)
    ref = fit_probe(xtr, ytr, xte, yte, "multiclass")
    rng = np.random.default_rng(0)
    corrupted = fit_probe(xtr, ytr, xte, rng.permutation(yte), "multiclass")
    rescaled = fit_probe(
        xtr, ytr, xte * 1000 + 5, yte, "multiclass"
    )  # standardised with train stats?
    assert corrupted["C"] == ref["C"] == rescaled["C"]
    assert (
        corrupted["balanced_acc"] < ref["balanced_acc"]
    )  # the test labels were really used to score
    assert rescaled["balanced_acc"] != ref["balanced_acc"]  # test features are not re-standardised


def weak_rare_signal(n=10000, d=64, pos=0.1, shift=0.5, seed=3):
    """A 10 %-positive binary label with a weak linear signal in one of d noise features: the shape
    of Trifeatures' synergy probe on features that learnt a little synergy."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < pos).astype(int)
    x = rng.normal(size=(n, d))
    x[:, 0] += shift * y
    return x, y


def test_weak_rare_signal_is_found_where_an_unweighted_probe_reads_exactly_chance():
    x, y = weak_rare_signal()
    xtr, ytr, xte, yte = split(x, y, 8000)
    m = fit_probe(xtr, ytr, xte, yte, "binary")
    # The previous probe: unweighted logistic regression on a 3000-sample cap. It predicts the
    # majority class everywhere, i.e. balanced accuracy exactly 0.5 whatever the features hold.
    old = LogisticRegression(max_iter=200).fit(xtr[:3000], ytr[:3000]).predict(xte)
    assert (old == 0).all()
    assert np.mean([np.mean(old[yte == c] == c) for c in (0, 1)]) == 0.5
    assert m["balanced_acc"] > 0.55
    assert m["roc_auc"] > 0.58
    assert set(m) == {"balanced_acc", "acc", "C", "roc_auc"}


def test_binary_probe_on_noise_stays_at_chance():
    rng = np.random.default_rng(11)
    x, y = rng.normal(size=(4000, 32)), (rng.random(4000) < 0.1).astype(int)
    m = fit_probe(*split(x, y, 3000), "binary")
    assert abs(m["balanced_acc"] - 0.5) < 0.05
    assert abs(m["roc_auc"] - 0.5) < 0.07


def test_roc_auc_is_nan_when_test_has_one_class():
    x, y = weak_rare_signal(n=2000)
    m = fit_probe(x[:1500], y[:1500], x[1500:], np.zeros(500, dtype=int), "binary")
    assert np.isnan(m["roc_auc"])


def test_arbitrary_labels_and_class_missing_from_train():
    x, y = blobs(600, k=4, labels=[-5, 7, 100, 3])
    xtr, ytr, xte, yte = split(x, y, 400)
    keep = ytr != 3  # class 3 occurs only in test
    m = fit_probe(xtr[keep], ytr[keep], xte, yte, "multiclass")
    # three classes perfect, the unseen one all wrong -> 3/4 over the classes present in test
    assert m["balanced_acc"] == pytest.approx(0.75, abs=0.01)


def test_single_class_train_predicts_it():
    x, _ = blobs(100)
    m = fit_probe(x[:60], np.full(60, 2), x[60:], np.r_[np.full(20, 2), np.full(20, 1)], "binary")
    assert m["acc"] == 0.5 and m["balanced_acc"] == 0.5
    assert np.isnan(m["C"])


def test_singleton_class_in_train_does_not_crash():
    x, y = blobs(300, k=3)
    y = y.copy()
    y[0] = 9  # one sample of a class: cannot be stratified into val
    m = fit_probe(*split(x, y, 200), "multiclass")
    assert m["balanced_acc"] > 0.95


def test_regression_linear_target():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(600, 20))
    w = rng.normal(size=(20, 3))
    y = x @ w + 0.01 * rng.normal(size=(600, 3))
    m = fit_probe(*split(x, y, 400), "regression")
    assert set(m) == {"mse", "r2", "alpha"}
    assert m["mse"] < 0.01 * y.var() and m["r2"] > 0.99
    m1 = fit_probe(*split(x, y[:, 0], 400), "regression")  # 1-D target
    assert m1["r2"] > 0.99


def test_regression_noise_target_prefers_strong_ridge():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(300, 100)), rng.normal(size=300)
    m = fit_probe(*split(x, y, 200), "regression")
    assert m["alpha"] >= 1e3 and m["r2"] < 0.1


def test_multilabel_separable_and_constant_label():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(600, 12))
    y = (x[:, :4] > 0).astype(int)
    y[:, 3] = 0  # a label that never fires in train (or test)
    m = fit_probe(*split(x, y, 400), "multilabel")
    assert set(m) == {"f1_macro", "f1_weighted", "C"}
    # three separable labels near 1, the constant one scores 0 by convention
    assert m["f1_macro"] > 0.7 and m["f1_weighted"] > 0.95


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        (
            (np.zeros((10, 3)), np.zeros(9), np.zeros((5, 3)), np.zeros(5)),
            {},
            "10 rows but y_train has 9",
        ),
        (
            (np.zeros((10, 3)), np.zeros(10), np.zeros((5, 3)), np.zeros(4)),
            {},
            "5 rows but y_test has 4",
        ),
        (
            (np.zeros((10, 3)), np.zeros(10), np.zeros((5, 4)), np.zeros(5)),
            {},
            "3 features but x_test has 4",
        ),
        (
            (np.full((10, 3), np.nan), np.zeros(10), np.zeros((5, 3)), np.zeros(5)),
            {},
            "x_train contains NaN or inf",
        ),
        (
            (np.zeros((10, 3)), np.zeros(10), np.full((5, 3), np.inf), np.zeros(5)),
            {},
            "x_test contains NaN or inf",
        ),
        ((np.zeros((0, 3)), np.zeros(0), np.zeros((5, 3)), np.zeros(5)), {}, "empty train set"),
        ((np.zeros((10, 3)), np.zeros(10), np.zeros((0, 3)), np.zeros(0)), {}, "empty test set"),
        ((np.zeros(10), np.zeros(10), np.zeros((5, 3)), np.zeros(5)), {}, "must be 2-D"),
        (
            (np.zeros((10, 3)), np.zeros(10), np.zeros((5, 3)), np.zeros(5)),
            {"val_fraction": 1.0},
            "val_fraction",
        ),
    ],
)
def test_input_errors(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fit_probe(*args, "multiclass", **kwargs)


def test_unknown_kind_lists_valid_kinds():
    x = np.zeros((4, 2))
    with pytest.raises(
        ValueError, match="unknown probe kind 'ranking'.*binary, multiclass, multilabel, regression"
    ):
        fit_probe(x, np.zeros(4), x, np.zeros(4), "ranking")


@pytest.mark.parametrize(
    ("kind", "y", "match"),
    [
        ("binary", np.arange(10) % 3, "at most 2 classes"),
        ("multiclass", np.linspace(0, 1, 10), "integer class labels"),
        ("multilabel", np.zeros(10), r"\(N, L\) 0/1"),
        ("multilabel", np.full((10, 2), 2), "only 0/1"),
        ("regression", np.r_[np.zeros(9), np.nan], "y_train contains NaN or inf"),
    ],
)
def test_label_errors(kind, y, match):
    x = np.random.default_rng(0).normal(size=(10, 3))
    with pytest.raises(ValueError, match=match):
        fit_probe(x, y, x, y, kind)


def test_run_probes_names_and_mean():
    x, shape = blobs(500, k=4, seed=7)
    labels = {
        "share": shape,
        "synergy": (shape % 2),
        "reg": x[:, :2].astype(np.float64) @ np.array([1.0, -2.0]),
    }
    tasks = {
        "share": Task("share", "multiclass", 4),
        "synergy": Task("synergy", "binary", 2),
        "reg": Task("reg", "regression"),
    }
    tr = {k: v[:400] for k, v in labels.items()}
    te = {k: v[400:] for k, v in labels.items()}
    out = run_probes(torch.from_numpy(x[:400]), tr, x[400:], te, tasks, seed=0)
    assert set(out) == {
        "probe/share/balanced_acc",
        "probe/share/acc",
        "probe/share/C",
        "probe/synergy/balanced_acc",
        "probe/synergy/acc",
        "probe/synergy/C",
        "probe/synergy/roc_auc",
        "probe/reg/mse",
        "probe/reg/r2",
        "probe/reg/alpha",
        "probe/mean/balanced_acc",
    }
    assert out["probe/mean/balanced_acc"] == pytest.approx(
        (out["probe/share/balanced_acc"] + out["probe/synergy/balanced_acc"]) / 2
    )
    # one call per task gives the same numbers
    single = fit_probe(x[:400], tr["share"], x[400:], te["share"], "multiclass")
    assert out["probe/share/balanced_acc"] == single["balanced_acc"]

    # a diagnostic task is probed but stays out of the mean
    tasks_diag = {**tasks, "colour": Task("colour", "multiclass", 4, diagnostic=True)}
    tr["colour"], te["colour"] = labels["share"][:400][::-1].copy(), labels["share"][400:]
    with_diag = run_probes(x[:400], tr, x[400:], te, tasks_diag, seed=0)
    assert "probe/colour/balanced_acc" in with_diag
    assert with_diag["probe/mean/balanced_acc"] == out["probe/mean/balanced_acc"]

    only_one = run_probes(x[:400], tr, x[400:], te, {"share": tasks["share"]})
    assert "probe/mean/balanced_acc" not in only_one
    with pytest.raises(ValueError, match="task 'missing' has no train labels"):
        run_probes(x[:400], tr, x[400:], te, {"missing": Task("missing", "binary", 2)})
