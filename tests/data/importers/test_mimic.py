"""MIMIC pickle: the reference split, train-only z-scoring, tasks, malformed sources, pretraining."""

from __future__ import annotations

import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from commlab.data.importers import import_dataset
from commlab.data.parquet import read_dataset, read_schema, validate_dataset

from .fixtures import mimic_data, pretrain_one_epoch, write_mimic_pickle, write_pickle
from .helpers import assert_import_fails, assert_trained, same_files

N = 60


@pytest.fixture
def im(tmp_path: Path) -> Path:
    return write_mimic_pickle(tmp_path / "im.pk", n=N)


def reference_split(n: int) -> dict[str, list[int]]:
    """The reference loader's split, with its global `random.seed(10)` (state restored)."""
    state = random.getstate()
    try:
        random.seed(10)
        datasets = [(i, "x") for i in range(n)]
        random.shuffle(datasets)
    finally:
        random.setstate(state)
    ids = [i for i, _ in datasets]
    return {
        "val": sorted(ids[: n // 10]),
        "test": sorted(ids[n // 10 : n // 5]),
        "train": sorted(ids[n // 5 :]),
    }


def test_import_matches_reference_split_and_scores_with_train_stats(im: Path, tmp_path: Path):
    out = import_dataset("mimic", im, tmp_path / "mimic", progress=False)
    assert validate_dataset(out) == []
    ds = read_dataset(out)
    ref = reference_split(N)
    for s in ("train", "val", "test"):
        assert ds.split(s).tolist() == ref[s]
    raw = mimic_data(N)
    train = np.array(ref["train"])
    static = np.nan_to_num(raw["adm_features_all"], nan=0.0, posinf=0.0, neginf=0.0)
    series = np.nan_to_num(raw["ep_tdata"], nan=0.0, posinf=0.0, neginf=0.0)
    mean, std = static[train].mean(0), static[train].std(0)
    expected = torch.from_numpy(((static - mean) / std).astype(np.float32))
    assert torch.allclose(ds.modalities[0].values, expected, atol=1e-5)
    mean, std = series[train].mean((0, 1)), series[train].std((0, 1))
    expected = torch.from_numpy(((series - mean) / std).astype(np.float32))
    assert torch.allclose(ds.modalities[1].values, expected, atol=1e-5)
    assert ds.names == ["tabular", "timeseries"]
    assert torch.equal(ds.labels["icd9_7"], torch.from_numpy(raw["y_icd9"][:, 7]))
    params = read_schema(out)["params"]
    assert params["nonfinite_zeroed"] == {"ep_tdata": 1, "adm_features_all": 1}
    assert len(params["zscore"]["timeseries"]["mean"]) == 12


def test_mortality_task_follows_the_reference_rule(im: Path, tmp_path: Path) -> None:
    out = import_dataset("mimic", im, tmp_path / "m", task=-1, progress=False)
    ds = read_dataset(out)
    adm = mimic_data(N)["adm_labels_all"]
    expected = []
    for row in adm:  # the reference's if/elif chain over columns 1..5
        label = 0
        for c in range(1, 6):
            if row[c] > 0:
                label = c
                break
        expected.append(label)
    assert ds.labels["mortality"].tolist() == expected
    assert ds.tasks["mortality"].kind == "multiclass" and ds.tasks["mortality"].num_classes == 6


def test_task_selection_and_range(im: Path, tmp_path: Path) -> None:
    ds = read_dataset(import_dataset("mimic", im, tmp_path / "t3", task=3, progress=False))
    assert list(ds.tasks) == ["icd9_3"]
    for bad in (20, -2):
        with pytest.raises(ValueError, match="task"):
            import_dataset("mimic", im, tmp_path / "bad", task=bad, progress=False)


def test_nonfinite_error_mode(im: Path, tmp_path: Path) -> None:
    assert_import_fails(
        "mimic", im, tmp_path / "out", str(im), "[ep_tdata]", "NaN/inf", nonfinite="error"
    )


def test_converting_twice_gives_identical_files(im: Path, tmp_path: Path) -> None:
    a = import_dataset("mimic", im, tmp_path / "a", progress=False)
    b = import_dataset("mimic", im, tmp_path / "b", progress=False)
    assert same_files(a, b)


def _mutate(data: dict, case: str) -> tuple[str, ...]:
    if case == "missing key":
        del data["y_icd9"]
        return ("[y_icd9]", "missing key")
    if case == "wrong shape":
        data["ep_tdata"] = data["ep_tdata"].reshape(N, -1)
        return ("[ep_tdata]", "expected 3 dimensions")
    if case == "row mismatch":
        data["adm_features_all"] = data["adm_features_all"][:-1]
        return ("[adm_features_all]", "rows")
    if case == "nan label":
        data["y_icd9"] = data["y_icd9"].astype(float)
        data["y_icd9"][4, 7] = np.nan
        return ("[y_icd9]", "NaN/inf")
    if case == "non-binary label":
        data["y_icd9"][4, 7] = 3
        return ("[y_icd9]", "0/1")
    if case == "empty split":
        for k in data:
            data[k] = data[k][:5]
        return ("split 'val' would be empty",)
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    ["missing key", "wrong shape", "row mismatch", "nan label", "non-binary label", "empty split"],
)
def test_malformed_pickle_gives_one_clear_error(case: str, tmp_path: Path) -> None:
    data = mimic_data(N)
    words = _mutate(data, case)
    bad = write_pickle(tmp_path / "bad.pk", data)
    assert_import_fails("mimic", bad, tmp_path / "out", str(bad), *words)


def test_not_a_dict(tmp_path: Path) -> None:
    bad = write_pickle(tmp_path / "list.pk", [1, 2, 3])
    assert_import_fails("mimic", bad, tmp_path / "out", str(bad), "expected a dict")


def test_truncated_pickle(im: Path, tmp_path: Path) -> None:
    bad = tmp_path / "cut.pk"
    bad.write_bytes(im.read_bytes()[:-100])
    assert_import_fails("mimic", bad, tmp_path / "out", str(bad), "not a readable pickle")
    assert pickle.loads(im.read_bytes())  # the source itself is untouched


def test_pretrain_one_epoch_on_imported_mimic(im: Path, tmp_path: Path) -> None:
    out = import_dataset("mimic", im, tmp_path / "mimic", progress=False)
    metrics = pretrain_one_epoch(
        out, "mimic", ["model.embed_dim=16", "model.modalities.1.encoder.params.hidden=16"]
    )
    assert_trained(metrics, "probe/icd9_7/balanced_acc")
