"""Sweeps end to end on real local Ray and a sqlite MLflow store (tiny Trifeatures)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import yaml

from commlab.cluster import connect

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.integration, pytest.mark.slow]


def write_space(tmp: Path, **extra) -> Path:
    space = {
        "name": "tiny",
        "base": str(ROOT / "configs/trifeatures/smoke.yaml"),
        "overrides": [
            f"data.path={tmp / 'data'}",
            "data.params.pairs=256",
            "data.params.test_pairs=128",
            "data.batch_size=64",
            "data.probe_max_train=200",
            "model.modalities.0.encoder.params.width=8",
            "model.modalities.1.encoder.params.width=8",
            "train.epochs=3",
            "train.probe_every=1",
        ],
        "metric": "probe/mean/balanced_acc",
        "mode": "max",
        "num_samples": 4,
        "max_concurrent_trials": 2,
        "searcher": {"name": "optuna", "seed": 0},
        "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
        "resources": {"workers": 1, "cpus_per_worker": 1},
        "params": {
            "optim.lr": {"dist": "loguniform", "low": 1e-5, "high": 3e-3},
            "loss.temperature": {"dist": "loguniform", "low": 0.05, "high": 0.5},
        },
        **extra,
    }
    path = tmp / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


def children(uri: str, parent_id: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    parent = client.get_run(parent_id)
    return client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'"
    )


def _live_placement_groups(timeout_s: float) -> list[dict]:
    """Placement groups not yet removed, after waiting up to `timeout_s` for them to go."""
    deadline = time.monotonic() + timeout_s
    while True:
        live = [g for g in ray.util.placement_group_table().values() if g["state"] != "REMOVED"]
        if not live or time.monotonic() > deadline:
            return live
        time.sleep(1.0)


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.chdir(tmp_path)
    return {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "storage": str(tmp_path / "sweeps")}


@pytest.mark.timeout(900)
def test_smoke_sweep_end_to_end(tmp_path, env):
    from mlflow.tracking import MlflowClient

    from commlab.sweep.run import run_sweep

    path = write_space(tmp_path)
    # Ray started as run_sweep starts it (embedded), but here, so it outlives the sweep
    connect(None, num_cpus=4)
    try:
        result = run_sweep(path, storage=env["storage"], tracking_uri=env["uri"])
        # the placement groups of every trial, ASHA-stopped ones included, were removed
        live = _live_placement_groups(timeout_s=30)
        assert live == [], live
    finally:
        ray.shutdown()
    client = MlflowClient(env["uri"])
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    kids = children(env["uri"], result.parent_run_id)
    assert len(kids) == 4
    assert {k.info.status for k in kids} <= {"FINISHED", "KILLED", "FAILED"}
    trial_ids = sorted(k.data.tags["ray.trial_id"] for k in kids)
    assert trial_ids == sorted(t["trial_id"] for t in result.trials)
    # ASHA stopped at least one trial early, and its child run says so
    iterations = {t["trial_id"]: t["iterations"] for t in result.trials}
    assert min(iterations.values()) < 3 and max(iterations.values()) == 3
    # an early stop is not a failure: FINISHED, tagged (Tune's MLflow callback does the same)
    stopped = [k for k in kids if iterations[k.data.tags["ray.trial_id"]] < 3]
    assert stopped and all(k.info.status == "FINISHED" for k in stopped)
    assert all(k.data.tags.get("commlab.stopped_early") == "true" for k in stopped)
    # and they carry the checkpoint of their last report, so `commlab promote` can pick them
    for k in stopped:
        logged = {
            a.path for a in MlflowClient(env["uri"]).list_artifacts(k.info.run_id, "checkpoint")
        }
        assert logged == {"checkpoint/checkpoint.pt"}, (k.info.run_name, logged)
    assert all(k.info.run_name == f"trial-{k.data.tags['ray.trial_id']}" for k in kids)
    # in-process trials start in the process of a trial that ended (Tune's reuse_actors)
    processes = {k.data.tags["commlab.process"] for k in kids}
    assert len(processes) < len(kids), processes
    # the parent's best-trial tags are Tune's ResultGrid best
    from ray import tune

    def comm_trial_tiny(config):  # Tune checks the trainable's name on restore
        raise AssertionError("not run")

    grid = tune.Tuner.restore(result.experiment_path, trainable=comm_trial_tiny).get_results()
    best = grid.get_best_result(metric="probe/mean/balanced_acc", mode="max", scope="all")
    assert parent.data.tags["commlab.best_trial_id"] == best.metrics["trial_id"]
    best_value = best.metrics_dataframe["probe/mean/balanced_acc"].max()
    assert float(parent.data.tags["commlab.best_metric"]) == pytest.approx(best_value)
    # every trial that ran all its epochs logged its checkpoint and R/U/S report (ASHA used to
    # stop trials at their last report, racing rank 0's final logging)
    full = [k for k in kids if iterations[k.data.tags["ray.trial_id"]] == 3]
    for k in full:
        assert {"commlab.rus.redundancy", "commlab.rus.synergy"} <= set(k.data.tags), (
            k.info.run_name
        )
        assert {a.path for a in client.list_artifacts(k.info.run_id)} >= {"checkpoint", "rus"}
    # the parent carries the R/U/S report of the best trial that ran all its epochs (ASHA's
    # early stops log none): Tune's best when it finished, else the next best by the metric
    ranked = sorted(
        (t for t in result.trials if t["metric"] is not None), key=lambda t: -t["metric"]
    )
    order = [best.metrics["trial_id"]] + [t["trial_id"] for t in ranked]
    expected = next(tid for tid in order if iterations[tid] == 3)
    assert parent.data.tags["commlab.rus_trial_id"] == expected
    rus_kid = next(k for k in kids if k.data.tags["ray.trial_id"] == expected)
    kid_rus = {k: v for k, v in rus_kid.data.tags.items() if k.startswith("commlab.rus.")}
    assert kid_rus and all(parent.data.tags[k] == v for k, v in kid_rus.items())
    parent_rus = {Path(a.path).name for a in client.list_artifacts(result.parent_run_id, "rus")}
    assert parent_rus == {"rus.json", "rus.md", "rus.png"}
    # every child logged each of its epochs once, plus the sweep's artifacts and plots
    for k in kids:
        steps = [m.step for m in client.get_metric_history(k.info.run_id, "train/loss")]
        assert steps == sorted(set(steps)) and steps[0] == 0
    names = {a.path for a in client.list_artifacts(result.parent_run_id)}
    assert {"search_space.yaml", "base_config.yaml", "plots"} <= names
    plots = {Path(a.path).name for a in client.list_artifacts(result.parent_run_id, "plots")}
    assert {
        "optimisation_history.png",
        "learning_curves.png",
        "parallel_coordinates.png",
        "param_importances.png",
        "trials.json",
    } <= plots


@pytest.mark.timeout(1200)
def test_killed_driver_resumes_without_rerunning_finished_trials(tmp_path, env):
    from mlflow.tracking import MlflowClient

    path = write_space(tmp_path, num_samples=4, max_concurrent_trials=1, scheduler={"name": "none"})
    cmd = [sys.executable, "-m", "commlab.cli", "sweep", str(path), "--storage", env["storage"]]
    proc_env = {**os.environ, "MLFLOW_TRACKING_URI": env["uri"], "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen(
        cmd,
        cwd=tmp_path,
        env=proc_env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    client = MlflowClient(env["uri"])
    deadline = time.time() + 600
    finished_before: dict[str, int] = {}
    try:
        while time.time() < deadline:
            time.sleep(3)
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            exp = client.get_experiment_by_name("trifeatures-smoke")
            if exp is None:
                continue
            runs = client.search_runs(
                [exp.experiment_id], filter_string="tags.`commlab.kind` = 'trial'"
            )
            done = [r for r in runs if r.info.status == "FINISHED"]
            if done:
                finished_before = {r.data.tags["ray.trial_id"]: r.info.start_time for r in done}
                break
        assert finished_before, "no trial finished in time"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started
        proc.wait(30)

    res = subprocess.run(
        [*cmd, "--resume", "--name", "tiny"],
        cwd=tmp_path,
        env=proc_env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    # what a person sees: the driver's progress lines only (no worker output, metric dicts or
    # Tune banners), then the summary, the next commands and where the store is
    out = res.stdout
    for noise in ("RayTrainWorker", "TrainController", "Reporting training result",
                  "Configuration for experiment", "tensorboard", "core_worker"):  # fmt: skip
        assert noise not in out, f"{noise!r} in the sweep's output:\n{out[-3000:]}"
    assert "commlab runs --sweep tiny" in out and "commlab promote --sweep tiny" in out
    assert f"MLflow store: {tmp_path / 'mlflow.db'}" in out
    assert "#/experiments/" in out and "/runs" in out
    exp = client.get_experiment_by_name("trifeatures-smoke")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    parents = client.search_runs([exp.experiment_id], filter_string="tags.`commlab.kind` = 'sweep'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    kids = children(env["uri"], parents[0].info.run_id)
    # a trial that started after Tune last saved its state is lost with the driver: --resume
    # runs its slot as a new trial and closes the lost one's child run (KILLED, tagged)
    lost = [k for k in kids if k.data.tags.get("commlab.lost_trial") == "true"]
    assert all(k.info.status == "KILLED" for k in lost)
    assert not {k.data.tags["ray.trial_id"] for k in lost} & set(finished_before)
    kids = [k for k in kids if k not in lost]
    by_trial: dict[str, list] = {}
    for k in kids:
        by_trial.setdefault(k.data.tags["ray.trial_id"], []).append(k)
    assert len(by_trial) == 4 and all(len(v) == 1 for v in by_trial.values()), (
        "duplicate child runs"
    )
    assert all(k.info.status in {"FINISHED", "KILLED", "FAILED"} for k in kids)
    for trial_id, start in finished_before.items():
        run = by_trial[trial_id][0]
        assert run.info.start_time == start
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
        assert steps == [0, 1, 2], f"finished trial {trial_id} was re-run: steps {steps}"


def test_bad_spaces_fail_before_anything_starts(tmp_path, env):
    from commlab.sweep.run import run_sweep
    from commlab.sweep.space import SearchSpaceError

    path = write_space(tmp_path, metric="probe/colour/balanced_acc")
    with pytest.raises(SearchSpaceError, match="does not produce 'probe/colour/balanced_acc'"):
        run_sweep(path, storage=env["storage"], tracking_uri=env["uri"])
    path = write_space(tmp_path, resources={"workers": 64, "cpus_per_worker": 1})
    with pytest.raises(ValueError, match="64 workers"):
        run_sweep(path, storage=env["storage"], tracking_uri=env["uri"])
    assert not Path(env["storage"]).exists() or not any(Path(env["storage"]).iterdir())
