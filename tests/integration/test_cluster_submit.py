"""`commlab submit` against a real 2-node Ray cluster and a real `mlflow server` (loopback).

The smoke sweep runs as a Ray Job (jobs/sweep.py in the shipped working dir), logs a parent
run and one child per trial to the server, and is then promoted by a second job. Both "nodes"
share this filesystem, so a local absolute path serves as the sweep's shared storage.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from commlab.cluster import Auth
from tests.integration.conftest import REPO, RayCluster

pytestmark = pytest.mark.integration

TERMINAL = {"FINISHED", "FAILED", "KILLED"}
SWEEP_TIMEOUT_S = 420  # about 2 min on an idle 2-core machine; slack for a busy one


def commlab(*args: str, env: dict[str, str] | None = None, timeout: float = 60):
    """Run the `commlab` CLI in a subprocess from the repository root."""
    return subprocess.run(
        [sys.executable, "-m", "commlab.cli", *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def tiny_space(tmp: Path) -> Path:
    """The smoke sweep cut down to 2 trials of 2 epochs on 256 pairs."""
    overrides = [
        f"data.path={tmp / 'data' / 'trifeatures'}",
        "data.params.pairs=256",
        "data.params.test_pairs=128",
        "data.batch_size=64",
        "data.probe_max_train=200",
        "train.epochs=2",
        "train.probe_every=1",
    ]
    space = {
        "name": "cluster-smoke",
        "base": str(REPO / "configs" / "trifeatures" / "smoke.yaml"),
        "overrides": overrides,
        "metric": "probe/mean/balanced_acc",
        "mode": "max",
        "num_samples": 2,
        "max_concurrent_trials": 2,
        "searcher": {"name": "optuna", "seed": 0},
        "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
        "resources": {"workers": 1, "cpus_per_worker": 1},
        "params": {"optim.lr": {"dist": "loguniform", "low": 3.0e-4, "high": 3.0e-3}},
    }
    path = tmp / "cluster-smoke.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


@pytest.mark.timeout(600)
def test_sweep_on_two_node_cluster_then_promote(mlflow_server, ray_cluster, tmp_path):
    from mlflow.tracking import MlflowClient

    assert ray_cluster.alive_nodes() == 2
    mlflow_server.wait_ready()  # started before the cluster, so the two come up together
    env = {"MLFLOW_TRACKING_URI": mlflow_server.url, "RAY_AUTH_MODE": "disabled"}
    sweep_name = f"cluster-smoke-{uuid.uuid4().hex[:6]}"
    job_id = f"commlab-test-{sweep_name}"
    space = tiny_space(tmp_path)
    submit = [
        "submit",
        f"--address={ray_cluster.dashboard_url}",
        "--follow",
        f"--submission-id={job_id}",
        "sweep",
        str(space),
        "--name",
        sweep_name,
        "--storage",
        str(tmp_path / "sweeps"),
    ]
    try:
        run = commlab(*submit, env=env, timeout=SWEEP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        commlab("jobs", "stop", job_id, f"--address={ray_cluster.dashboard_url}", env=env)
        pytest.fail(f"the sweep job did not finish within {SWEEP_TIMEOUT_S} s")
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    assert job_id in run.stdout and "SUCCEEDED" in run.stdout

    client = MlflowClient(mlflow_server.url)
    exp_ids = [e.experiment_id for e in client.search_experiments()]
    parents = client.search_runs(
        exp_ids, f"tags.`commlab.kind` = 'sweep' and tags.`commlab.sweep` = '{sweep_name}'"
    )
    assert len(parents) == 1, [p.data.tags for p in parents]
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    children = client.search_runs(exp_ids, f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 2
    assert {c.info.status for c in children} <= TERMINAL
    assert any(c.info.status == "FINISHED" for c in children)
    assert all("probe/mean/balanced_acc" in c.data.metrics for c in children)

    model = f"cluster-smoke-model-{sweep_name}"
    promote = [
        "submit",
        f"--address={ray_cluster.dashboard_url}",
        "--follow",
        "promote",
        "--sweep",
        sweep_name,
        "--model",
        model,
    ]
    run = commlab(*promote, env=env, timeout=180)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    version = client.get_model_version_by_alias(model, "champion")
    assert version.run_id in {c.info.run_id for c in children}

    listed = commlab("jobs", "list", "--json", f"--address={ray_cluster.dashboard_url}", env=env)
    assert listed.returncode == 0 and job_id in listed.stdout


@pytest.mark.timeout(180)
def test_token_auth_wrong_token_is_a_clear_error_right_token_works(tmp_path):
    cluster = RayCluster(tmp_path, Auth("token", "the-cluster-token", "test"))
    try:
        cluster.start_head(num_cpus=1)
        env = {"RAY_AUTH_MODE": "token", "MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"}
        args = ["submit", f"--address={cluster.dashboard_url}", "promote", "--sweep=s", "--model=m"]
        wrong = commlab(*args, env={**env, "RAY_AUTH_TOKEN": "not-the-token"})
        assert wrong.returncode == 2
        assert "authentication failed" in " ".join(wrong.stderr.split())
        assert "not-the-token" not in wrong.stderr + wrong.stdout

        right = commlab(
            "jobs", "list", "--json", f"--address={cluster.dashboard_url}",
            env={**env, "RAY_AUTH_TOKEN": "the-cluster-token"},
        )  # fmt: skip
        assert right.returncode == 0, right.stderr
        assert right.stdout.strip() == "[]"

        # a driver given the GCS address (Ray alone would not turn token auth on here)
        code = f"import commlab.cluster as c, ray; c.connect({cluster.gcs_address!r}); print(ray.nodes()[0]['Alive'])"
        driver = subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "RAY_AUTH_TOKEN": "the-cluster-token", "RAY_AUTH_MODE": ""},
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert driver.returncode == 0 and driver.stdout.strip() == "True", driver.stderr[-2000:]
    finally:
        cluster.stop()


@pytest.mark.timeout(180)
def test_another_ray_instance_on_the_machine_is_detected(tmp_path):
    from commlab.sweep.run import _other_ray_instances

    before = set(_other_ray_instances())
    cluster = RayCluster(tmp_path, Auth("disabled"))
    try:
        cluster.start_head(num_cpus=1)
        # Ray advertises the machine's address, not 127.0.0.1: compare ports
        new = {a.rsplit(":", 1)[1] for a in set(_other_ray_instances()) - before}
        assert new == {str(cluster.gcs_port)}
    finally:
        cluster.stop()
    assert not any(a.endswith(f":{cluster.gcs_port}") for a in _other_ray_instances())
