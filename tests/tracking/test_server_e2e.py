"""Against a real `mlflow server` (PostgreSQL backend when reachable, proxied artifacts):
runs table, promotion and loading the promoted encoder in a fresh process; a real tiny sweep
end to end; `commlab ui`."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from commlab.cli import app
from commlab.pretrained import load_encoder
from commlab.tracking.model_registry import model_versions, promote
from commlab.tracking.query import sweep_trials
from tests.tracking.conftest import (
    METRIC,
    free_port,
    make_sweep,
    standard_trials,
    start_server,
    stop_group,
)

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "configs" / "trifeatures" / "smoke.yaml"
RAY_ENV = {
    "RAY_AUTH_MODE": "disabled",
    # a loaded 2-core machine can take more than the default 60 s to start a Train worker
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "300",
}

pytestmark = pytest.mark.integration

# Runs in a fresh interpreter: nothing of the test process (no trial objects) is available.
_EMBED_IN_FRESH_PROCESS = """
import sys, torch, commlab
from commlab.data.parquet import read_dataset
uri, dataset, n, out, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
torch.set_num_threads(int(threads))  # the test process's: same reduction order, same bits
enc = commlab.load_encoder(uri)
assert not enc.training
torch.save(enc.embed(read_dataset(dataset).batch(torch.arange(n))), out)
"""


def embed_in_fresh_process(
    uri: str, tracking_uri: str, dataset: Path, n: int, tmp: Path
) -> torch.Tensor:
    out = tmp / f"emb-{uuid.uuid4().hex[:6]}.pt"
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    proc = subprocess.run(
        [sys.executable, "-c", _EMBED_IN_FRESH_PROCESS, uri, str(dataset), str(n), str(out),
         str(torch.get_num_threads())],
        env=env, cwd=tmp, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out, weights_only=True)


def trial_embeddings(
    client: MlflowClient, run_id: str, dataset: Path, n: int, tmp: Path
) -> torch.Tensor:
    """Features of the trial's own checkpoint artifact, loaded directly (not via the registry)."""
    dst = tmp / f"trial-{run_id}"
    dst.mkdir()
    path = client.download_artifacts(run_id, "checkpoint/checkpoint.pt", str(dst))
    from commlab.data.parquet import read_dataset

    return load_encoder(path).embed(read_dataset(dataset).batch(torch.arange(n)))


@pytest.mark.timeout(300)
def test_promote_and_load_through_the_server(mlflow_server, trained, tmp_path):
    uri = mlflow_server.url
    name = f"toy-{uuid.uuid4().hex[:6]}"
    model = f"enc-{name}"
    sweep = make_sweep(uri, name, standard_trials(trained), experiment=name, best_trial="t2")

    data = sweep_trials(name, uri)
    assert [t["trial_id"] for t in data["trials"]] == ["t2", "t0", "t1", "t3"]
    assert data["trials"][1]["rus"]["synergy"] == 0.55

    p = promote(name, model, tracking_uri=uri)
    assert (p.trial_id, p.version, p.created, p.value) == ("t0", 1, True, 0.7)
    again = promote(name, model, tracking_uri=uri)
    assert (again.version, again.created) == (1, False)
    (v,) = model_versions(model, uri)
    assert v["aliases"] == ["champion"]
    assert v["tags"]["commlab.trial_run_id"] == sweep.trials["t0"]
    assert v["tags"]["commlab.sweep_run_id"] == sweep.run_id
    assert v["tags"]["commlab.metric"] == METRIC and v["tags"]["commlab.metric_value"] == "0.7"
    assert v["tags"]["commlab.data_fingerprint"] == "toy"
    assert v["source"].startswith("mlflow-artifacts:/")  # proxied by the server
    assert any(mlflow_server.artifacts.rglob("MLmodel"))

    fresh = embed_in_fresh_process(f"models:/{model}@champion", uri, trained.dataset, 40, tmp_path)
    client = MlflowClient(uri)
    expected = trial_embeddings(client, sweep.trials["t0"], trained.dataset, 40, tmp_path)
    assert fresh.shape == (40, 16)
    assert torch.equal(fresh, expected), (fresh - expected).abs().max()


@pytest.mark.timeout(900)
def test_real_sweep_then_promote_then_load_in_a_fresh_process(mlflow_server, tmp_path, monkeypatch):
    for k, v in RAY_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(tmp_path)  # nothing of Ray's or MLflow's lands in the repository
    with local_ray():
        sweep_promote_load(mlflow_server.url, tmp_path)


@contextlib.contextmanager
def local_ray() -> Iterator[None]:
    """A local Ray with slack (4 logical CPUs: trial + worker, and room for a placement group
    still being released), unless the session already has one; run_sweep then reuses it."""
    import ray

    if ray.is_initialized():
        yield
        return
    ray.init(num_cpus=4, include_dashboard=False, runtime_env={"env_vars": dict(RAY_ENV)})
    try:
        yield
    finally:
        ray.shutdown()


def sweep_promote_load(uri: str, tmp_path: Path) -> None:
    """A tiny real sweep (2 trials x 2 epochs, Trifeatures 32 px) logged to `uri`; its runs
    table; promotion (twice); the promoted encoder embeds in a fresh process exactly like the
    best trial's own checkpoint."""
    from commlab.sweep.run import run_sweep

    name = f"e2e-{uuid.uuid4().hex[:6]}"
    space = tmp_path / "space.yaml"
    overrides = [
        f"data.path={tmp_path / 'data'}", "data.params.pairs=256", "data.params.test_pairs=128",
        "data.batch_size=64", "data.probe_max_train=200", "train.epochs=2",
        "train.probe_every=1", "train.threads=1",
    ]  # fmt: skip
    space.write_text(
        f"name: {name}\nbase: {SMOKE}\noverrides: {json.dumps(overrides)}\n"
        f"metric: {METRIC}\nmode: max\nnum_samples: 2\nmax_concurrent_trials: 1\n"
        "searcher: {name: random, seed: 0}\nscheduler: {name: none}\n"
        "resources: {workers: 1, cpus_per_worker: 1}\n"
        "params:\n  optim.lr: {dist: loguniform, low: 3.0e-4, high: 3.0e-3}\n"
    )
    result = run_sweep(space, name=name, storage=str(tmp_path / "ray"), tracking_uri=uri)
    assert result.parent_run_id and result.best_trial_id

    client = MlflowClient(uri)
    parent = client.get_run(result.parent_run_id)
    assert parent.data.tags["commlab.kind"] == "sweep"
    data = sweep_trials(name, uri)
    trials = data["trials"]
    assert len(trials) == 2 and all(t["status"] == "FINISHED" for t in trials)
    assert all(t["epochs"] == 2 and "optim.lr" in t["params"] for t in trials)
    assert trials[0]["value"] >= trials[1]["value"]
    # the table, promotion and the sweep's own best-trial tag agree
    assert trials[0]["trial_id"] == parent.data.tags["commlab.best_trial_id"]
    assert trials[0]["value"] == pytest.approx(float(parent.data.tags["commlab.best_metric"]))
    assert set(trials[0]["rus"]) == {"redundancy", "uniqueness", "synergy"}

    runner = CliRunner()
    out = runner.invoke(app, ["runs", "--sweep", name, "--json", "--tracking-uri", uri])
    assert out.exit_code == 0, out.output
    assert [t["run_id"] for t in json.loads(out.stdout)["trials"]] == [t["run_id"] for t in trials]

    model = f"comm-{name}"
    p = promote(name, model, tracking_uri=uri)
    assert (p.trial_run_id, p.created) == (trials[0]["run_id"], True)
    assert p.trial_id == parent.data.tags["commlab.best_trial_id"]
    assert promote(name, model, tracking_uri=uri).created is False
    (v,) = model_versions(model, uri)
    assert v["aliases"] == ["champion"]
    ckpt_fp = v["tags"]["commlab.data_fingerprint"]
    assert ckpt_fp and v["tags"]["commlab.code_version"]
    assert v["tags"]["commlab.sweep_run_id"] == result.parent_run_id

    dataset = next((tmp_path / "data").glob("*/unbiased"))
    fresh = embed_in_fresh_process(f"models:/{model}@champion", uri, dataset, 32, tmp_path)
    expected = trial_embeddings(client, p.trial_run_id, dataset, 32, tmp_path)
    assert fresh.shape == (32, 64)
    assert torch.equal(fresh, expected)


@pytest.mark.timeout(180)
def test_commlab_ui_serves_the_local_store(tmp_path):
    port = free_port()
    argv = [sys.executable, "-m", "commlab.cli", "ui", "--port", str(port)]
    # no MLFLOW_TRACKING_URI: the default store, sqlite:///<cwd>/mlflow.db
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = start_server(argv, f"http://127.0.0.1:{port}", tmp_path / "ui.log", 120, env=env)
    try:
        assert (tmp_path / "mlflow.db").is_file()
        assert f"http://127.0.0.1:{port}" in (tmp_path / "ui.log").read_text()
    finally:
        stop_group(proc)


@pytest.mark.timeout(300)
def test_in_process_pretrain_logs_to_the_server(mlflow_server, tmp_path, monkeypatch):
    """`commlab pretrain` with the default --workers 0 against an MLflow server: servers reject
    non-string tag values that sqlite accepts (the run's `commlab.workers` tag is 0)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    monkeypatch.chdir(tmp_path)
    name = f"inproc-{uuid.uuid4().hex[:6]}"
    args = [
        "pretrain", str(SMOKE), f"name={name}", f"data.path={tmp_path / 'data'}",
        "data.params.pairs=128", "data.params.test_pairs=64", "data.batch_size=64",
        "data.probe_max_train=100", "train.epochs=2", "train.probe_every=2",
        "--out", str(tmp_path / "run"),
    ]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, f"{res.output}\n{res.exception!r}"
    client = MlflowClient(mlflow_server.url)
    (run,) = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["commlab.workers"] == "0"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [0, 1]
    assert client.list_artifacts(run.info.run_id, "checkpoint")
