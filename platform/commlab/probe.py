"""Linear probes on frozen features: the evaluation protocol of CoMM (notes §5), made leak-free.

Differences from the reference callback, on purpose:
- C / alpha are chosen on TRAIN only (the reference's V&T probe tuned alpha on test): for
  classification by stratified k-fold cross-validation on the task's own metric (balanced
  accuracy), as the paper's notebooks do with `LogisticRegressionCV(scoring="balanced_accuracy")`;
  for multilabel and regression on one held-out part; all splits fixed by `seed`;
- classification fits weight classes inversely to their frequency, so a weak signal in a rare
  class (Trifeatures' synergy has ~10 % positives) is not drowned by "always predict the majority",
  which scores exactly chance in balanced accuracy;
- binary tasks also report ROC AUC, which needs no decision threshold;
- features are standardised with train statistics (never test), so one C grid fits every encoder;
- labels may be any ints and classes absent from train are scored, not assumed to be 0..K-1;
- metric names say what they are (`balanced_acc`, not "acc1").

Pure numpy/scikit-learn: no Ray, no MLflow, no torch import (torch tensors are accepted by duck
typing). Same inputs give the same metrics: splits come from `numpy.random.default_rng(seed)` and
lbfgs / Cholesky are deterministic.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import f1_score, mean_squared_error, r2_score, roc_auc_score
from threadpoolctl import threadpool_limits

from commlab.registry import Registry

if TYPE_CHECKING:
    from commlab.data.base import Task

# log10 grids. C: coarse first, then one decade either side of the best (7 fits at most);
# Ridge is cheap enough to try every decade at once.
C_COARSE = (-6, -4, -2, 0, 2, 4)
# Stratified folds for the classification C search (the paper's notebooks use 5; 3 keeps a probe of
# 10k samples x 10 tasks within seconds and rarely picks another C).
CV_FOLDS = 3
ALPHA_GRID = tuple(range(-2, 7))
# lbfgs on standardised features stops after 5-20 iterations at sklearn's default tol; the cap
# only bounds the near-unregularised end of the grid on separable data.
MAX_ITER = 200
# The probe's matrices are small: multi-threaded BLAS spends its time spinning, and on a busy
# 2-core box it was ~25x slower than one thread. One thread also keeps sums in a fixed order.
BLAS_THREADS = 1

Arr = np.ndarray
Metrics = dict[str, float]
# probe(x_train, y_train, x_test, y_test, seed, val_fraction) -> metrics; x already standardised.
ProbeFn = Callable[[Arr, Arr, Arr, Arr, int, float], Metrics]
PROBES: Registry[ProbeFn] = Registry("probe kind")
CLASSIFICATION_KINDS = ("multiclass", "binary")


def fit_probe(
    x_train: Any,
    y_train: Any,
    x_test: Any,
    y_test: Any,
    kind: str,
    *,
    seed: int = 0,
    val_fraction: float = 0.2,
) -> dict[str, float]:
    """Fit a linear probe on frozen train features and score it on test.

    x_*: (N, D) numpy arrays or torch tensors. y_*: (N,) ints for multiclass/binary, (N, L) 0/1
    for multilabel, (N,) or (N, k) floats for regression. Returns
    multiclass: balanced_acc, acc, C; binary: the same plus roc_auc; multilabel: f1_macro,
    f1_weighted, C; regression: mse, r2, alpha. `val_fraction` sizes the held-out part of the
    multilabel/regression search; classification uses CV_FOLDS stratified folds instead.
    """
    probe = PROBES.get(kind)
    xtr, xte = _standardised(x_train, x_test)
    with threadpool_limits(limits=BLAS_THREADS):
        return _run(probe, xtr, y_train, xte, y_test, seed, val_fraction)


def run_probes(
    train_feats: Any,
    train_labels: Mapping[str, Any],
    test_feats: Any,
    test_labels: Mapping[str, Any],
    tasks: Mapping[str, Task],
    *,
    seed: int = 0,
    val_fraction: float = 0.2,
) -> dict[str, float]:
    """Probe every task on the same features: {"probe/<task>/<metric>": value}.

    Adds `probe/mean/balanced_acc` (the mean over multiclass/binary tasks that are not
    diagnostic) when there are two or more of them, as the reference logs a mean across
    Trifeatures' downstream sets. Diagnostic tasks are probed and reported but never averaged in,
    so adding one does not move a sweep's selection metric.
    """
    probes = {name: PROBES.get(task.kind) for name, task in tasks.items()}
    for name in tasks:
        for split, labels in (("train", train_labels), ("test", test_labels)):
            if name not in labels:
                raise ValueError(f"task '{name}' has no {split} labels")
    xtr, xte = _standardised(train_feats, test_feats)  # once for all tasks
    out: dict[str, float] = {}
    balanced = []
    for name, task in tasks.items():
        with threadpool_limits(limits=BLAS_THREADS):
            metrics = _run(
                probes[name], xtr, train_labels[name], xte, test_labels[name], seed, val_fraction
            )
        out.update({f"probe/{name}/{k}": v for k, v in metrics.items()})
        if task.kind in CLASSIFICATION_KINDS and not task.diagnostic:
            balanced.append(metrics["balanced_acc"])
    if len(balanced) >= 2:
        out["probe/mean/balanced_acc"] = float(np.mean(balanced))
    return out


def _run(
    probe: ProbeFn,
    xtr: np.ndarray,
    y_train: Any,
    xte: np.ndarray,
    y_test: Any,
    seed: int,
    val_fraction: float,
) -> dict[str, float]:
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    ytr, yte = _to_numpy(y_train), _to_numpy(y_test)
    for split, x, y in (("train", xtr, ytr), ("test", xte, yte)):
        if len(y) != len(x):
            raise ValueError(f"x_{split} has {len(x)} rows but y_{split} has {len(y)}")
    return probe(xtr, ytr, xte, yte, seed, val_fraction)


# --------------------------------------------------------------------------- inputs


def _to_numpy(a: Any) -> np.ndarray:
    if hasattr(a, "detach"):  # torch tensor; half/bfloat16 have no numpy dtype
        a = a.detach().cpu()
        if a.is_floating_point() and a.element_size() < 4:
            a = a.float()
        a = a.numpy()
    return np.asarray(a)


def _standardised(x_train: Any, x_test: Any) -> tuple[np.ndarray, np.ndarray]:
    xs = []
    for split, x in (("train", x_train), ("test", x_test)):
        x = _to_numpy(x).astype(np.float64, copy=False)
        if x.ndim != 2:
            raise ValueError(f"x_{split} must be 2-D (N, D), got shape {x.shape}")
        if x.shape[0] == 0:
            raise ValueError(f"empty {split} set: x_{split} has no rows")
        if not np.isfinite(x).all():
            raise ValueError(f"x_{split} contains NaN or inf values")
        xs.append(x)
    xtr, xte = xs
    if xtr.shape[1] != xte.shape[1]:
        raise ValueError(f"x_train has {xtr.shape[1]} features but x_test has {xte.shape[1]}")
    mean, std = xtr.mean(0), xtr.std(0)
    std[std < 1e-12] = 1.0  # constant features stay 0 instead of becoming NaN
    return (xtr - mean) / std, (xte - mean) / std


def _class_labels(y: np.ndarray, name: str) -> np.ndarray:
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise ValueError(f"{name} must be 1-D class labels, got shape {y.shape}")
    if y.dtype.kind == "f" and not (np.isfinite(y).all() and (y == np.round(y)).all()):
        raise ValueError(f"{name} must hold integer class labels")
    if y.dtype.kind not in "biuf":
        raise ValueError(f"{name} must hold integer class labels, got dtype {y.dtype}")
    return y.astype(np.int64)


def _split(
    n: int, val_fraction: float, seed: int, strata: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (fit, val) indices into train. Stratified: every class with >= 2 samples gives
    at least one to each part, so val balanced accuracy sees every class train has twice."""
    rng = np.random.default_rng(seed)
    groups = (
        [np.arange(n)]
        if strata is None
        else [np.flatnonzero(strata == c) for c in np.unique(strata)]
    )
    fit, val = [], []
    for idx in groups:
        idx = rng.permutation(idx)
        n_val = 0 if len(idx) < 2 else min(len(idx) - 1, max(1, round(val_fraction * len(idx))))
        val.append(idx[:n_val])
        fit.append(idx[n_val:])
    return np.sort(np.concatenate(fit)), np.sort(np.concatenate(val))


def _search(
    score: Callable[[float], float], coarse: tuple[int, ...], refine: bool, prefer_large: bool
) -> float:
    """Maximise score(10**e) over the coarse exponents, then (if refine) one decade either side of
    the best. Ties go to the more regularised end (small C, large alpha)."""

    def best(scores: dict[int, float]) -> int:
        return min(scores, key=lambda e: (-scores[e], -e if prefer_large else e))

    scores = {e: score(10.0**e) for e in coarse}
    if refine:
        b = best(scores)
        for e in (b - 1, b + 1):
            if min(coarse) <= e <= max(coarse) and e not in scores:
                scores[e] = score(10.0**e)
    return 10.0 ** best(scores)


# --------------------------------------------------------------------------- probes


def _logreg(c: float, balanced: bool = False) -> LogisticRegression:
    return LogisticRegression(C=c, max_iter=MAX_ITER, class_weight="balanced" if balanced else None)


def _fitted(model: LogisticRegression, x: np.ndarray, y: np.ndarray) -> LogisticRegression:
    with warnings.catch_warnings():
        # Capped lbfgs at large C on separable data; the grid search judges the result anyway.
        warnings.simplefilter("ignore", ConvergenceWarning)
        return model.fit(x, y)


def _balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean recall over the classes present in y_true (sklearn's would also count classes that
    occur only in predictions and warn)."""
    return float(np.mean([np.mean(y_pred[y_true == c] == c) for c in np.unique(y_true)]))


def _stratified_folds(y: np.ndarray, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """k (fit, val) index pairs: each class's samples are shuffled with `seed` and dealt round
    robin, so every fold holds each class in proportion. Folds whose fit part would see a single
    class are dropped (nothing to discriminate there)."""
    rng = np.random.default_rng(seed)
    fold_of = np.empty(len(y), dtype=np.int64)
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        fold_of[idx] = (np.arange(len(idx)) + int(rng.integers(k))) % k
    folds = [(np.flatnonzero(fold_of != f), np.flatnonzero(fold_of == f)) for f in range(k)]
    return [(fit, val) for fit, val in folds if len(val) and np.unique(y[fit]).size >= 2]


@PROBES.register("binary")
def _binary(xtr: Arr, ytr: Arr, xte: Arr, yte: Arr, seed: int, val_fraction: float) -> Metrics:
    ytr, yte = _class_labels(ytr, "y_train"), _class_labels(yte, "y_test")
    seen = np.union1d(ytr, yte)
    if seen.size > 2:
        raise ValueError(f"a binary task has at most 2 classes, got {seen.size}: {seen[:10]}")
    metrics, model = _fit_classifier(xtr, ytr, xte, yte, seed)
    # ROC AUC ranks the test samples by the decision score: no threshold, so a probe that has
    # learnt the signal but sits on the wrong side of 0 still shows it.
    auc = float("nan")
    if model is not None and np.unique(yte).size == 2:
        auc = float(roc_auc_score(yte == model.classes_[1], model.decision_function(xte)))
    return {**metrics, "roc_auc": auc}


@PROBES.register("multiclass")
def _classification(
    xtr: Arr, ytr: Arr, xte: Arr, yte: Arr, seed: int, val_fraction: float
) -> Metrics:
    ytr, yte = _class_labels(ytr, "y_train"), _class_labels(yte, "y_test")
    return _fit_classifier(xtr, ytr, xte, yte, seed)[0]


def _fit_classifier(
    xtr: Arr, ytr: Arr, xte: Arr, yte: Arr, seed: int
) -> tuple[Metrics, LogisticRegression | None]:
    """Class-balanced logistic regression; C by stratified k-fold CV on balanced accuracy, then
    one fit on all of train."""
    classes = np.unique(ytr)
    model: LogisticRegression | None = None
    if classes.size < 2:  # nothing to discriminate: predict the only class seen
        c, pred = float("nan"), np.full(len(yte), classes[0])
    else:
        folds = _stratified_folds(ytr, CV_FOLDS, seed)

        def score(c: float) -> float:
            return float(
                np.mean(
                    [
                        _balanced_accuracy(
                            ytr[val],
                            _fitted(_logreg(c, True), xtr[fit], ytr[fit]).predict(xtr[val]),
                        )
                        for fit, val in folds
                    ]
                )
            )

        c = _search(score, C_COARSE, refine=True, prefer_large=False) if folds else 1.0
        model = _fitted(_logreg(c, True), xtr, ytr)
        pred = model.predict(xte)
    metrics = {
        "balanced_acc": _balanced_accuracy(yte, pred),
        "acc": float(np.mean(pred == yte)),
        "C": c,
    }
    return metrics, model


def _multilabel_labels(y: np.ndarray, name: str) -> np.ndarray:
    if y.ndim != 2:
        raise ValueError(f"{name} must be (N, L) 0/1 labels for a multilabel task, got {y.shape}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"{name} must hold only 0/1 for a multilabel task")
    return y.astype(np.int64)


def _one_vs_rest(x: np.ndarray, y: np.ndarray, x_eval: np.ndarray, c: float) -> np.ndarray:
    pred = np.empty((len(x_eval), y.shape[1]), dtype=np.int64)
    for j in range(y.shape[1]):
        col = y[:, j]
        if col.min() == col.max():  # a single class in train: predict it
            pred[:, j] = col[0]
        else:
            pred[:, j] = _fitted(_logreg(c), x, col).predict(x_eval)
    return pred


def _f1(y_true: np.ndarray, y_pred: np.ndarray, average: str) -> float:
    return float(f1_score(y_true, y_pred, average=average, zero_division=0))


@PROBES.register("multilabel")
def _multilabel(xtr: Arr, ytr: Arr, xte: Arr, yte: Arr, seed: int, val_fraction: float) -> Metrics:
    ytr, yte = _multilabel_labels(ytr, "y_train"), _multilabel_labels(yte, "y_test")
    if ytr.shape[1] != yte.shape[1]:
        raise ValueError(f"y_train has {ytr.shape[1]} labels but y_test has {yte.shape[1]}")
    fit, val = _split(len(ytr), val_fraction, seed)
    xf, yf, xv, yv = xtr[fit], ytr[fit], xtr[val], ytr[val]

    def score(c: float) -> float:
        return _f1(yv, _one_vs_rest(xf, yf, xv, c), "macro")

    c = _search(score, C_COARSE, refine=True, prefer_large=False) if len(val) else 1.0
    pred = _one_vs_rest(xtr, ytr, xte, c)
    return {"f1_macro": _f1(yte, pred, "macro"), "f1_weighted": _f1(yte, pred, "weighted"), "C": c}


@PROBES.register("regression")
def _regression(xtr: Arr, ytr: Arr, xte: Arr, yte: Arr, seed: int, val_fraction: float) -> Metrics:
    ytr, yte = ytr.astype(np.float64), yte.astype(np.float64)
    for name, y in (("y_train", ytr), ("y_test", yte)):
        if y.ndim not in (1, 2):
            raise ValueError(f"{name} must be (N,) or (N, k) for regression, got {y.shape}")
        if not np.isfinite(y).all():
            raise ValueError(f"{name} contains NaN or inf values")
    fit, val = _split(len(ytr), val_fraction, seed)
    xf, yf, xv, yv = xtr[fit], ytr[fit], xtr[val], ytr[val]

    def score(alpha: float) -> float:
        return -float(mean_squared_error(yv, Ridge(alpha=alpha).fit(xf, yf).predict(xv)))

    alpha = _search(score, ALPHA_GRID, refine=False, prefer_large=True) if len(val) else 1.0
    pred = Ridge(alpha=alpha).fit(xtr, ytr).predict(xte)
    return {
        "mse": float(mean_squared_error(yte, pred)),
        "r2": float(r2_score(yte, pred)),
        "alpha": alpha,
    }
