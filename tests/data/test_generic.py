"""The registered `parquet` dataset builder: any dataset in the commlab format, by path."""

from __future__ import annotations

import pytest
import torch

from commlab.data import DATASETS, build_data
from commlab.data.parquet import write_dataset
from tests.conftest import toy_sequence_dataset


@pytest.fixture
def toy_dir(tmp_path):
    return write_dataset(toy_sequence_dataset(n=40), tmp_path / "toy")


def test_builds_by_name_from_a_directory(toy_dir):
    bundle = build_data("parquet", str(toy_dir), seed=0, params={})
    assert "parquet" in DATASETS
    ref = toy_sequence_dataset(n=40)
    ds = bundle.pretrain
    assert bundle.probe is ds
    assert len(ds) == 40 and ds.names == ["a", "b"]
    assert torch.equal(ds.modalities[0].values, ref.modalities[0].values)
    assert torch.equal(ds.split("train"), ref.split("train"))
    assert ds.tasks["cls"].num_classes == 4
    assert "40 samples" in bundle.description


def test_probe_path_probes_another_dataset(tmp_path, toy_dir):
    other = write_dataset(toy_sequence_dataset(n=24, seed=1), tmp_path / "other")
    bundle = build_data("parquet", str(toy_dir), 0, {"probe_path": str(other)})
    assert len(bundle.pretrain) == 40 and len(bundle.probe) == 24


def test_missing_directory_and_unknown_param_are_errors(tmp_path, toy_dir):
    with pytest.raises(FileNotFoundError, match="not found"):
        build_data("parquet", str(tmp_path / "nope"), 0, {})
    with pytest.raises(ValueError, match="unknown param 'size'.*probe_path"):
        build_data("parquet", str(toy_dir), 0, {"size": 32})
