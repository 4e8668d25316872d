"""commlab.tracking.runs against a real sqlite MLflow store in tmp_path (no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from commlab.config import flatten
from commlab.data.base import Task
from commlab.tracking.runs import (
    ERROR_TAG,
    RUN_KEY_TAG,
    RunLogger,
    absolute_uri,
    artifact_location,
    default_tracking_uri,
    finish_run,
    metric_steps,
    open_run,
    run_status,
)
from tests.conftest import toy_config


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    # One database for the module: creating an MLflow schema takes seconds.
    return tmp_path_factory.mktemp("mlflow")


@pytest.fixture
def uri(store) -> str:
    return f"sqlite:///{store / 'mlflow.db'}"


def _open(uri: str, key: str = "/runs/toy", cfg=None, experiment: str | None = None):
    cfg = cfg or toy_config()
    experiment = experiment or key  # tests do not share runs
    return open_run(uri, experiment, run_key=key, run_name="toy", params=flatten(cfg))


def test_default_uri_is_absolute_sqlite_in_cwd(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert default_tracking_uri() == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert default_tracking_uri().startswith("sqlite:////")  # four slashes: absolute


def test_env_overrides_and_relative_sqlite_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert default_tracking_uri() == "http://127.0.0.1:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///sub/m.db")
    assert default_tracking_uri() == f"sqlite:///{tmp_path.resolve() / 'sub' / 'm.db'}"
    assert absolute_uri("sqlite:////abs/m.db") == "sqlite:////abs/m.db"


def test_artifacts_live_beside_the_sqlite_file(store, uri):
    assert artifact_location(uri) == (store / "mlartifacts").resolve().as_uri()
    assert artifact_location("http://mlflow:5000") is None
    ref, reopened = _open(uri, key="/runs/artifact-location")
    assert not reopened
    run = MlflowClient(uri).get_run(ref.run_id)
    assert run.info.artifact_uri.startswith((store / "mlartifacts").resolve().as_uri())


def test_open_run_logs_flattened_config_and_reopens_by_key(uri):
    cfg = toy_config()
    ref, _ = _open(uri, cfg=cfg, experiment="reopen")
    client = MlflowClient(uri)
    run = client.get_run(ref.run_id)
    assert run.info.status == "RUNNING"
    assert run.data.tags[RUN_KEY_TAG] == "/runs/toy"
    assert run.data.params["loss.temperature"] == str(cfg.loss.temperature)
    assert run.data.params["model.modalities.0.encoder.name"] == "gru"
    assert len(run.data.params) == len(flatten(cfg))

    finish_run(ref, "FAILED", "boom")
    longer = toy_config(overrides=("train.epochs=5",))
    again, reopened = _open(uri, cfg=longer, experiment="reopen")
    assert reopened and again.run_id == ref.run_id
    run = client.get_run(ref.run_id)
    assert run.info.status == "RUNNING" and ERROR_TAG not in run.data.tags
    assert run.data.params["train.epochs"] == "2"  # params are immutable ...
    assert run.data.tags["commlab.changed.train.epochs"] == "5"  # ... the change is a tag

    other, reopened = _open(uri, key="/runs/toy-1", experiment="reopen")
    assert not reopened and other.run_id != ref.run_id
    assert len(client.search_runs([ref.experiment_id])) == 2


def test_many_and_long_params_are_batched_and_truncated(uri):
    params = {f"p{i}": i for i in range(250)} | {"long": "x" * 7000}
    ref, _ = open_run(uri, "many", "/k", "k", params)
    got = MlflowClient(uri).get_run(ref.run_id).data.params
    assert len(got) == 251 and got["p249"] == "249"
    assert len(got["long"]) == 6000 and got["long"].endswith("...")


def test_log_epoch_is_idempotent_across_loggers(uri):
    ref, _ = _open(uri, key="/runs/idempotent")
    first = RunLogger(ref)
    assert first.log_epoch(0, {"train/loss": 2.0, "epoch": 0.0, "note": "text", "flag": True})
    assert first.log_epoch(1, {"train/loss": 1.5, "perf/samples_per_s": 10.0})
    assert not first.log_epoch(1, {"train/loss": 9.9})
    restarted = RunLogger(ref)  # a new attempt reads what MLflow already holds
    assert restarted.logged_epochs == {0, 1}
    assert not restarted.log_epoch(1, {"train/loss": 9.9})
    assert restarted.log_epoch(2, {"train/loss": float("nan")})
    assert metric_steps(ref, "train/loss") == [0, 1, 2]
    assert metric_steps(ref, "epoch") == [0, 1, 2]
    history = MlflowClient(uri).get_metric_history(ref.run_id, "train/loss")
    assert [m.value for m in history][:2] == [2.0, 1.5]
    assert MlflowClient(uri).get_metric_history(ref.run_id, "note") == []
    assert MlflowClient(uri).get_metric_history(ref.run_id, "flag") == []


def test_finish_run_sets_status_and_error(uri):
    ref, _ = _open(uri, key="/runs/finish")
    finish_run(ref, "FAILED", "non-finite loss at epoch 1 step 0")
    assert run_status(ref) == "FAILED"
    tags = MlflowClient(uri).get_run(ref.run_id).data.tags
    assert tags[ERROR_TAG].startswith("non-finite loss")
    with pytest.raises(ValueError, match="FINISHED"):
        finish_run(ref, "DONE")


def test_artifacts_and_rus_report(uri, tmp_path):
    ref, _ = _open(uri, key="/runs/artifacts")
    log = RunLogger(ref)
    f = tmp_path / "checkpoint.pt"
    f.write_bytes(b"weights")
    log.log_artifact(f, "checkpoint")
    log.log_text("name: toy\n", "config.yaml")
    tasks = {
        "cls": Task("cls", "multiclass", 3),
        "share": Task("share", "multiclass", 10),
        "unique1": Task("unique1", "multiclass", 4),
        "synergy": Task("synergy", "binary", 2),
    }
    assert log.log_rus({"probe/cls/balanced_acc": 0.9}, tasks) is None
    rus = log.log_rus(
        {
            "probe/share/balanced_acc": 0.8,
            "probe/unique1/balanced_acc": 0.6,
            "probe/synergy/balanced_acc": 0.55,
        },
        tasks,
        title="toy",
    )
    assert rus == {"redundancy": 0.8, "uniqueness": 0.6, "synergy": 0.55}
    client = MlflowClient(uri)
    top = {a.path for a in client.list_artifacts(ref.run_id)}
    assert top == {"checkpoint", "config.yaml", "rus"}
    assert {a.path for a in client.list_artifacts(ref.run_id, "rus")} == {
        "rus/rus.json",
        "rus/rus.md",
        "rus/rus.png",
    }
    local = Path(client.download_artifacts(ref.run_id, "checkpoint/checkpoint.pt", str(tmp_path)))
    assert local.read_bytes() == b"weights"
    assert client.get_run(ref.run_id).data.tags["commlab.rus.redundancy"] == "0.8000"
    doc = json.loads(
        Path(client.download_artifacts(ref.run_id, "rus/rus.json", str(tmp_path))).read_text()
    )
    assert doc["chance"] == {"redundancy": 0.1, "uniqueness": 0.25, "synergy": 0.5}
