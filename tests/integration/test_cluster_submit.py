"""`commlab submit` against a real 2-node Ray cluster and a real `mlflow server` (loopback).

The smoke sweep runs as a Ray Job (entrypoints/sweep.py in the shipped working dir), logs a parent
run and one child per trial to the server, and is then promoted by a second job. Both "nodes"
share this filesystem, so a local absolute path serves as the sweep's shared storage.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
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


def commlab_bg(*args: str, env: dict[str, str]) -> subprocess.Popen:
    """The `commlab` CLI in the background (stdout and stderr together, as text)."""
    return subprocess.Popen(
        [sys.executable, "-m", "commlab.cli", *args],
        cwd=REPO, env={**os.environ, **env}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def tiny_space(
    tmp: Path, epochs: int = 2, num_samples: int = 2, max_concurrent_trials: int = 2
) -> Path:
    """The smoke sweep cut down to a few trials of a few epochs on 256 pairs."""
    overrides = [
        f"data.path={tmp / 'data' / 'trifeatures'}",
        "data.params.pairs=256",
        "data.params.test_pairs=128",
        "data.batch_size=64",
        "data.probe_max_train=200",
        f"train.epochs={epochs}",
        "train.probe_every=1",
    ]
    space = {
        "name": "cluster-smoke",
        "base": str(REPO / "configs" / "trifeatures" / "smoke.yaml"),
        "overrides": overrides,
        "metric": "probe/mean/balanced_acc",
        "mode": "max",
        "num_samples": num_samples,
        "max_concurrent_trials": max_concurrent_trials,
        "searcher": {"name": "optuna", "seed": 0},
        "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
        "resources": {"workers": 1, "cpus_per_worker": 1},
        "params": {"optim.lr": {"dist": "loguniform", "low": 3.0e-4, "high": 3.0e-3}},
    }
    path = tmp / "cluster-smoke.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


def wait_until(what: str, check, timeout_s: float, every_s: float = 2.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every_s)
    pytest.fail(f"{what}: not within {timeout_s:g} s")


def sweep_runs(client, sweep_name: str) -> tuple[list, list]:
    """(parents, children) of the sweep named `sweep_name` in any experiment."""
    exp_ids = [e.experiment_id for e in client.search_experiments()]
    parents = client.search_runs(
        exp_ids, f"tags.`commlab.kind` = 'sweep' and tags.`commlab.sweep` = '{sweep_name}'"
    )
    kids = []
    for p in parents:
        kids += client.search_runs(exp_ids, f"tags.`mlflow.parentRunId` = '{p.info.run_id}'")
    return parents, kids


def first_epoch_logged(client, sweep_name: str) -> bool:
    try:
        _, kids = sweep_runs(client, sweep_name)
    except Exception:  # the server may still be starting
        return False
    return any("train/loss" in k.data.metrics for k in kids)


def available_cpus(cluster: RayCluster) -> float:
    """The cluster's unreserved CPUs, as a fresh driver sees them (a driver holds none)."""
    code = "import ray; ray.init(address=%r); print(ray.available_resources().get('CPU', 0))"
    out = subprocess.run(
        [sys.executable, "-c", code % cluster.gcs_address],
        env={**os.environ, "RAY_AUTH_MODE": "disabled"},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(900)
def test_sweep_on_two_node_cluster_survives_an_mlflow_outage_then_promote(
    mlflow_server, ray_cluster, tmp_path
):
    """The smoke sweep asks for more CPUs than the 2 x 2-CPU cluster has (3 trials at a time,
    each a driver + a worker): it is scaled down up front instead of deadlocking. The MLflow
    server is then stopped for 30 s mid-sweep: no metric is lost. Then promotion, as a job."""
    from mlflow.tracking import MlflowClient

    assert ray_cluster.alive_nodes() == 2
    mlflow_server.wait_ready()  # started before the cluster, so the two come up together
    env = {"MLFLOW_TRACKING_URI": mlflow_server.url, "RAY_AUTH_MODE": "disabled"}
    sweep_name = f"cluster-smoke-{uuid.uuid4().hex[:6]}"
    job_id = f"commlab-test-{sweep_name}"
    space = tiny_space(tmp_path, epochs=3, num_samples=3, max_concurrent_trials=3)
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
    proc = commlab_bg(*submit, env=env)
    client = MlflowClient(mlflow_server.url)
    try:
        wait_until("a first epoch in MLflow", lambda: first_epoch_logged(client, sweep_name), 400)
        assert proc.poll() is None, "the sweep ended before the outage drill"
        mlflow_server.stop()
        time.sleep(30)
        mlflow_server.start().wait_ready()
        out, _ = proc.communicate(timeout=SWEEP_TIMEOUT_S)
    except BaseException:
        commlab("jobs", "stop", job_id, f"--address={ray_cluster.dashboard_url}", env=env)
        proc.kill()
        raise
    assert proc.returncode == 0, out[-6000:]
    assert job_id in out and "SUCCEEDED" in out
    assert "running 2 trial(s) at a time instead of 3" in " ".join(out.split())

    parents, children = sweep_runs(client, sweep_name)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 3 and {c.info.status for c in children} == {"FINISHED"}
    for c in children:  # every epoch a trial ran is in MLflow, once
        steps = [m.step for m in client.get_metric_history(c.info.run_id, "epoch")]
        full = c.data.tags.get("commlab.stopped_early") != "true"
        assert steps == list(range(3 if full else len(steps))) and steps, (c.info.run_name, steps)
    assert any(c.data.tags.get("commlab.stopped_early") != "true" for c in children)
    assert all(c.info.run_name == f"trial-{c.data.tags['ray.trial_id']}" for c in children)

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
    # lineage: the client's commit, although .git does not travel with the job
    assert len(version.tags["commlab.code_version"]) >= 40

    listed = commlab("jobs", "list", "--json", f"--address={ray_cluster.dashboard_url}", env=env)
    assert listed.returncode == 0 and job_id in listed.stdout


@pytest.mark.timeout(600)
def test_jobs_stop_mid_sweep_leaves_no_running_run_and_no_reserved_cpu(
    mlflow_server, ray_cluster, tmp_path
):
    from mlflow.tracking import MlflowClient

    mlflow_server.wait_ready()
    env = {"MLFLOW_TRACKING_URI": mlflow_server.url, "RAY_AUTH_MODE": "disabled"}
    address = f"--address={ray_cluster.dashboard_url}"
    sweep_name = f"stop-me-{uuid.uuid4().hex[:6]}"
    job_id = f"commlab-test-{sweep_name}"
    space = tiny_space(tmp_path, epochs=30, num_samples=2, max_concurrent_trials=2)
    run = commlab("submit", address, f"--submission-id={job_id}", "sweep", str(space),
                  "--name", sweep_name, "--storage", str(tmp_path / "sweeps"), env=env)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    client = MlflowClient(mlflow_server.url)
    try:
        wait_until("a first epoch in MLflow", lambda: first_epoch_logged(client, sweep_name), 400)
    finally:
        stop = commlab("jobs", "stop", job_id, address, env=env)
    assert stop.returncode == 0, stop.stderr
    status = lambda: commlab("jobs", "status", job_id, address, env=env).stdout  # noqa: E731
    wait_until("the job STOPPED", lambda: "STOPPED" in status(), 120)

    parents, children = sweep_runs(client, sweep_name)
    assert len(parents) == 1 and parents[0].info.status == "KILLED"
    assert children and all(c.info.status != "RUNNING" for c in children), [
        (c.info.run_name, c.info.status) for c in children
    ]
    # every CPU free again: no trial actor or placement group outlives the job
    wait_until("all 4 CPUs free", lambda: available_cpus(ray_cluster) == 4.0, 90, every_s=5)


@pytest.mark.timeout(900)
def test_nodes_sharing_one_temp_dir_work_or_say_why(mlflow_server, tmp_path):
    """Two nodes on one machine in one temp dir (what `ray start` twice gives by default). Ray
    may then delete a job's working directory when its driver connects; the sweep either runs,
    or fails naming that cause and the fix, never with a bare "No such file or directory"."""
    from mlflow.tracking import MlflowClient

    cluster = RayCluster(tmp_path / "c", Auth("disabled"), shared_temp_dir=True)
    (tmp_path / "c").mkdir()
    try:
        cluster.start_head(num_cpus=2)
        cluster.add_worker(num_cpus=2)
        mlflow_server.wait_ready()
        env = {"MLFLOW_TRACKING_URI": mlflow_server.url, "RAY_AUTH_MODE": "disabled",
               "COMMLAB_DEBUG": "1"}  # fmt: skip
        name = f"shared-tmp-{uuid.uuid4().hex[:6]}"
        space = tiny_space(tmp_path, epochs=1, num_samples=1, max_concurrent_trials=1)
        run = commlab(
            "submit", f"--address={cluster.dashboard_url}", "--follow", "sweep", str(space),
            "--name", name, "--storage", str(tmp_path / "sweeps"), env=env, timeout=SWEEP_TIMEOUT_S,
        )  # fmt: skip
    finally:
        cluster.stop()
    out = " ".join((run.stdout + run.stderr).split())
    if run.returncode == 0:
        parents, children = sweep_runs(MlflowClient(mlflow_server.url), name)
        assert [p.info.status for p in parents] == ["FINISHED"] and len(children) == 1
    else:
        assert "share a temp dir" in out and "--temp-dir" in out, out[-4000:]


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
        # Ray advertises the machine's address, not 127.0.0.1: compare ports. `ray start` may
        # return before its raylet shows its flags to ps on a loaded machine: look for a while.
        deadline, new = time.monotonic() + 60, set()
        while time.monotonic() < deadline:
            new = {a.rsplit(":", 1)[1] for a in set(_other_ray_instances()) - before}
            if new:
                break
            time.sleep(1)
        assert new == {str(cluster.gcs_port)}
    finally:
        cluster.stop()
    assert not any(a.endswith(f":{cluster.gcs_port}") for a in _other_ray_instances())
