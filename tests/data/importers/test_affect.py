"""Affect pickles (MOSI, UR-FUNNY, MUsTARD): alignment, labels, malformed sources, pretraining."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from commlab.data.importers import import_dataset
from commlab.data.importers.affect import align
from commlab.data.parquet import read_dataset, read_schema, validate_dataset

from .fixtures import pretrain_one_epoch, write_affect_pickle, write_pickle
from .helpers import assert_import_fails, assert_trained, same_files

TINY = [
    f"model.modalities.{i}.encoder.params.{k}={v}"
    for i in (0, 1)
    for k, v in (("n_layers", 1), ("ff_dim", 32))
]


def first_nonzero_row(text: np.ndarray) -> int:
    for t, row in enumerate(text):
        if np.any(row != 0):
            return t
    raise AssertionError("all-zero text")


@pytest.fixture
def mosi(tmp_path: Path) -> Path:
    return write_affect_pickle(tmp_path / "mosi_data.pkl")


def test_mosi_import_aligns_right_pads_and_labels(mosi: Path, tmp_path: Path) -> None:
    out = import_dataset("mosi", mosi, tmp_path / "mosi", progress=False)
    assert validate_dataset(out) == []
    ds = read_dataset(out)
    raw = pickle.loads(mosi.read_bytes())
    assert [len(ds.split(s)) for s in ("train", "val", "test")] == [23, 8, 8]  # one empty dropped
    assert ds.names == ["vision", "text"]
    kept = [i for i in range(24) if i != 1]
    for row, i in enumerate(kept[:5]):
        start = first_nonzero_row(raw["train"]["text"][i])
        n = 50 - start
        for m, key in zip(ds.modalities, ("vision", "text"), strict=True):
            assert int(m.lengths[row]) == n
            assert torch.equal(m.values[row, :n], torch.from_numpy(raw["train"][key][i, start:]))
            assert not m.values[row, n:].any()
    score = np.concatenate([raw[s]["labels"].reshape(-1) for s in ("train", "valid", "test")])
    score = np.delete(score, 1)
    assert torch.equal(ds.labels["score"], torch.from_numpy(score))
    assert torch.equal(ds.labels["sentiment"], torch.from_numpy((score > 0).astype(np.int64)))
    assert ds.tasks["sentiment"].kind == "binary"
    params = read_schema(out)["params"]
    assert params["dropped_empty_text"] == {"train": 1, "val": 0, "test": 0}
    assert params["importer"] == "mosi" and params["source"] == "mosi_data.pkl"


def test_align_matches_a_per_sample_loop() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 7, 3))
    start = np.array([0, 1, 3, 6, 2, 5])
    expected = np.zeros_like(x)
    for i, s in enumerate(start):
        expected[i, : 7 - s] = x[i, s:]
    assert np.array_equal(align(x, start), expected)


def test_audio_neg_inf_becomes_zero_as_the_reference(mosi: Path, tmp_path: Path) -> None:
    out = import_dataset(
        "mosi", mosi, tmp_path / "tri", modalities="vision,audio,text", progress=False
    )
    assert validate_dataset(out) == []
    ds = read_dataset(out)
    assert ds.names == ["vision", "audio", "text"]
    assert torch.isfinite(ds.modalities[1].values).all()
    assert read_schema(out)["params"]["audio_neg_inf_zeroed"] == 3


@pytest.mark.parametrize("dataset", ["humor", "sarcasm"])
def test_humor_and_sarcasm_dims(dataset: str, tmp_path: Path) -> None:
    src = write_affect_pickle(tmp_path / f"{dataset}.pkl", dataset)
    out = import_dataset(dataset, src, tmp_path / dataset, progress=False)
    assert validate_dataset(out) == []
    ds = read_dataset(out)
    assert [tuple(m.values.shape[1:]) for m in ds.modalities] == [(50, 371), (50, 300)]
    assert dataset in ds.tasks


def test_converting_twice_gives_identical_files(mosi: Path, tmp_path: Path) -> None:
    a = import_dataset("mosi", mosi, tmp_path / "a", progress=False)
    b = import_dataset("mosi", mosi, tmp_path / "b", progress=False)
    assert same_files(a, b)


def test_existing_output_is_refused_unless_overwrite(mosi: Path, tmp_path: Path) -> None:
    out = import_dataset("mosi", mosi, tmp_path / "d", progress=False)
    with pytest.raises(FileExistsError):
        import_dataset("mosi", mosi, out, progress=False)
    assert import_dataset("mosi", mosi, out, overwrite=True, progress=False) == out


def test_unknown_option_and_modality_are_clear_errors(mosi: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no option.*colour.*valid: modalities, nonfinite"):
        import_dataset("mosi", mosi, tmp_path / "x", colour=1, progress=False)
    with pytest.raises(ValueError, match="modalities must be distinct names from"):
        import_dataset("mosi", mosi, tmp_path / "x", modalities="vision,smell", progress=False)


def _mutate(data: dict, case: str) -> tuple[str, ...]:
    """Break `data` in one way; returns the words the error must contain."""
    if case == "missing key":
        del data["valid"]["text"]
        return ("valid.text", "missing key")
    if case == "missing split":
        del data["test"]
        return ("[test]", "missing key")
    if case == "wrong shape":
        data["train"]["vision"] = data["train"]["vision"][:, :, 0]
        return ("train.vision", "expected 3 dimensions")
    if case == "misaligned steps":
        data["train"]["vision"] = data["train"]["vision"][:, :40]
        return ("train.vision", "modalities must align")
    if case == "label rows":
        data["test"]["labels"] = data["test"]["labels"][:-1]
        return ("test.labels", "rows")
    if case == "nan":
        data["test"]["vision"][2, 49, 0] = np.nan
        return ("test.vision", "NaN/inf", "nonfinite='zero'")
    if case == "empty split":
        data["valid"] = {k: v[:0] for k, v in data["valid"].items()}
        return ("valid.text", "split is empty")
    raise AssertionError(case)


CASES = [
    "missing key",
    "missing split",
    "wrong shape",
    "misaligned steps",
    "label rows",
    "nan",
    "empty split",
]


@pytest.mark.parametrize("case", CASES)
def test_malformed_pickle_gives_one_clear_error(case: str, mosi: Path, tmp_path: Path) -> None:
    data = pickle.loads(mosi.read_bytes())
    words = _mutate(data, case)
    bad = write_pickle(tmp_path / "bad.pkl", data)
    assert_import_fails("mosi", bad, tmp_path / "out", str(bad), *words)


def test_nan_can_be_zeroed_on_request(mosi: Path, tmp_path: Path) -> None:
    data = pickle.loads(mosi.read_bytes())
    data["test"]["vision"][2, 49, 0] = np.nan
    bad = write_pickle(tmp_path / "nan.pkl", data)
    out = import_dataset("mosi", bad, tmp_path / "out", nonfinite="zero", progress=False)
    assert validate_dataset(out) == []
    assert read_schema(out)["params"]["nonfinite_zeroed"] == 1


def test_truncated_pickle(mosi: Path, tmp_path: Path) -> None:
    bad = tmp_path / "truncated.pkl"
    bad.write_bytes(mosi.read_bytes()[:5000])
    assert_import_fails("mosi", bad, tmp_path / "out", str(bad), "not a readable pickle")


def test_missing_source(tmp_path: Path) -> None:
    assert_import_fails("mosi", tmp_path / "nope.pkl", tmp_path / "out", "nope.pkl", "not found")


@pytest.mark.parametrize("dataset", ["mosi", "humor", "sarcasm"])
def test_pretrain_one_epoch_on_imported_affect(dataset: str, tmp_path: Path) -> None:
    src = write_affect_pickle(tmp_path / "src.pkl", dataset)
    out = import_dataset(dataset, src, tmp_path / dataset, progress=False)
    task = {"mosi": "sentiment"}.get(dataset, dataset)
    metrics = pretrain_one_epoch(out, dataset, TINY)
    assert_trained(metrics, f"probe/{task}/balanced_acc")
