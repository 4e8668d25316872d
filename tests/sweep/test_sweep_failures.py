"""How a sweep ends when it cannot finish: resources, signals, failed resumes (real sqlite
MLflow store, real search-space files; no Ray cluster needed)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from commlab.data.parquet import write_dataset
from commlab.sweep.run import (
    _close_after_failure,
    _open_parent,
    _sigterm_interrupts,
    fit_concurrency,
)
from commlab.sweep.space import load_space
from commlab.tracking.runs import RunRef, finish_run, open_run
from tests.conftest import toy_config, toy_sequence_dataset


@pytest.fixture
def sqlite_uri(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture
def space(tmp_path):
    data = write_dataset(toy_sequence_dataset(), tmp_path / "data")
    raw = toy_config().model_dump(mode="json")
    raw["data"] = {"name": "parquet", "path": str(data), "batch_size": 16}
    (tmp_path / "toy.yaml").write_text(yaml.safe_dump(raw))
    spec = {
        "name": "fail",
        "base": str(tmp_path / "toy.yaml"),
        "metric": "probe/cls/balanced_acc",
        "mode": "max",
        "num_samples": 4,
        "max_concurrent_trials": 3,
        "scheduler": {"name": "none"},
        "resources": {"workers": 1, "cpus_per_worker": 1},
        "params": {"optim.lr": {"dist": "loguniform", "low": 1e-4, "high": 1e-2}},
    }
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(spec))
    return load_space(tmp_path / "space.yaml")


def test_concurrency_fits_the_cluster_counting_each_trials_driver(space):
    # 3 trials x (1 driver CPU + 1 worker CPU) = 6 CPUs: a 2 x 2-CPU cluster runs 2 at a time
    assert fit_concurrency(space, {"CPU": 4.0}) == 2
    assert fit_concurrency(space, {"CPU": 2.0}) == 1  # the case that deadlocked
    assert fit_concurrency(space, {"CPU": 64.0}) == 3
    with pytest.raises(ValueError, match="1 CPU for its driver .* = 2 CPUs, the cluster has 1"):
        fit_concurrency(space, {"CPU": 1.0})


def test_sigterm_interrupts_the_sweep_like_ctrl_c():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), _sigterm_interrupts():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)  # interrupted by the handler at once
    assert signal.getsignal(signal.SIGTERM) == before


def _child(parent: RunRef, trial: str, status: str) -> str:
    ref, _ = open_run(
        parent.tracking_uri, "toy", f"trial:{trial}", f"trial-{trial}", {},
        tags={"mlflow.parentRunId": parent.run_id, "ray.trial_id": trial},
    )  # fmt: skip
    if status != "RUNNING":
        finish_run(ref, status)
    return ref.run_id


def test_an_interrupted_sweep_leaves_no_run_running(space, sqlite_uri):
    parent, previous = _open_parent(space, "fail", "/sweeps/fail", sqlite_uri)
    assert previous is None
    running = _child(parent, "a", "RUNNING")
    done = _child(parent, "b", "FINISHED")
    _close_after_failure(parent, KeyboardInterrupt("signal 15"), None)
    client = MlflowClient(sqlite_uri)
    assert client.get_run(parent.run_id).info.status == "KILLED"
    assert client.get_run(running).info.status == "KILLED"
    assert client.get_run(done).info.status == "FINISHED"


def test_a_failed_resume_keeps_a_finished_sweep_finished(space, sqlite_uri):
    parent, _ = _open_parent(space, "fail", "/sweeps/fail", sqlite_uri)
    finish_run(parent, "FINISHED")
    again, previous = _open_parent(space, "fail", "/sweeps/fail", sqlite_uri)  # --resume
    assert again.run_id == parent.run_id and previous == "FINISHED"
    _close_after_failure(again, RuntimeError("no tuner state"), previous)
    run = MlflowClient(sqlite_uri).get_run(parent.run_id)
    assert run.info.status == "FINISHED"
    assert "no tuner state" in run.data.tags["commlab.resume_error"]


def test_search_space_is_read_before_ray_connects(space, tmp_path):
    """The file is kept as read: on a cluster whose nodes share a temp dir the job's working
    directory (and the file in it) can vanish once the driver connects."""
    text = Path(space.path).read_text()
    Path(space.path).unlink()
    assert space.text == text


def test_a_worker_group_that_never_starts_ends_the_run(space, tmp_path):
    """Ray Train's default retries a worker group that cannot get its resources forever (the
    trial shows RUNNING); commlab caps it at a few start timeouts."""
    from commlab.train.trainer import CONTROLLER_FAILURE_LIMIT, RayTrainSettings, build_trainer

    t = build_trainer(space.base, RayTrainSettings(), name="n", storage_path=str(tmp_path))
    assert t.run_config.failure_config.controller_failure_limit == CONTROLLER_FAILURE_LIMIT > 0


def test_asha_lets_a_trial_finish_its_last_epoch_by_itself():
    """Ray's ASHA says STOP at every trial's last report, and Tune then kills the trial while
    rank 0 logs its checkpoint and R/U/S report: those went missing from FINISHED runs."""
    from ray.tune.schedulers import ASHAScheduler

    from commlab.sweep.callbacks import FinishingASHA

    class Trial:
        trial_id, status = "t", "RUNNING"

    kw = dict(time_attr="training_iteration", max_t=4, grace_period=1, reduction_factor=2)
    plain, ours = (
        ASHAScheduler(metric="m", mode="max", **kw),
        FinishingASHA(metric="m", mode="max", **kw),
    )
    for s in (plain, ours):
        s.on_trial_add(None, Trial())
    last = {"training_iteration": 4, "m": 0.5}
    assert plain.on_trial_result(None, Trial(), last) == "STOP"
    assert ours.on_trial_result(None, Trial(), last) == "CONTINUE"
    # early stopping at the rungs is ASHA's own
    losers = FinishingASHA(metric="m", mode="max", **kw)
    for i, v in enumerate([0.9, 0.8, 0.1]):
        t = type("T", (), {"trial_id": f"t{i}", "status": "RUNNING"})()
        losers.on_trial_add(None, t)
        action = losers.on_trial_result(None, t, {"training_iteration": 1, "m": v})
    assert action == "STOP"


def test_summary_counts_epochs_and_takes_the_best_value_like_commlab_runs(space, sqlite_uri):
    """After a resume Tune's training_iteration restarts (1, 2 for epochs 3, 4): the summary
    counts the trials' own epochs, and shows the best value over history, as `commlab runs`."""
    import pandas as pd

    from commlab.sweep.run import _summarise

    class Result:
        def __init__(self, trial_id, epochs, iters, values):
            self.metrics_dataframe = pd.DataFrame(
                {"epoch": epochs, "training_iteration": iters, "probe/cls/balanced_acc": values}
            )
            self.metrics = {
                "trial_id": trial_id, "epoch": epochs[-1], "training_iteration": iters[-1],
                "probe/cls/balanced_acc": values[-1], "checkpoint_path": f"/ck/{trial_id}",
            }  # fmt: skip
            self.config, self.error = {"optim.lr": 0.001}, None

    class Grid(list):
        def get_best_result(self, metric, mode, scope):
            return max(self, key=lambda r: r.metrics_dataframe[metric].max())

    resumed = Result("a", [2.0, 3.0], [1, 2], [0.7, 0.6])  # epochs 3 and 4 after a resume
    plain = Result("b", [0.0, 1.0, 2.0, 3.0], [1, 2, 3, 4], [0.5, 0.55, 0.6, 0.65])
    parent, _ = _open_parent(space, "fail", "/sweeps/fail", sqlite_uri)
    res = _summarise(space, "fail", "/sweeps/fail", Grid([resumed, plain]), parent, 1.0)
    by_id = {t["trial_id"]: t for t in res.trials}
    assert by_id["a"]["iterations"] == 4 and by_id["b"]["iterations"] == 4
    assert by_id["a"]["metric"] == 0.7 and by_id["a"]["last"] == 0.6  # best, not last
    assert [e for e, _ in by_id["a"]["history"]] == [3, 4]
    assert res.best_trial_id == "a" and res.best_metric == 0.7


def test_a_stopped_trials_reported_epochs_all_reach_mlflow(space, sqlite_uri):
    """ASHA tears a stopped trial down right after its report; its rank 0 logs that epoch only
    after the report. The driver logs what Tune saw and the run lacks, once."""
    from commlab.sweep.callbacks import CloseChildRuns
    from commlab.tracking.runs import RunLogger

    parent, _ = _open_parent(space, "fail", "/sweeps/fail", sqlite_uri)
    child = _child(parent, "t0", "RUNNING")
    RunLogger(RunRef(sqlite_uri, parent.experiment_id, child)).log_epoch(0, {"train/loss": 2.0})

    class Trial:
        trial_id = "t0"
        last_result = {"epoch": 1.0, "training_iteration": 2}

    close = CloseChildRuns(parent, max_epochs=4)
    close.SETTLE_S = 0.0
    for epoch, loss in [(0, 2.0), (1, 1.5)]:
        result = {"epoch": float(epoch), "train/loss": loss, "probe/cls/C": 1.0, "pid": 7}
        close.on_trial_result(epoch, [], Trial(), result)
    close.on_trial_complete(2, [], Trial())
    client = MlflowClient(sqlite_uri)
    run = client.get_run(child)
    assert run.info.status == "FINISHED" and run.data.tags["commlab.stopped_early"] == "true"
    assert [m.step for m in client.get_metric_history(child, "train/loss")] == [0, 1]
    assert "pid" not in run.data.metrics and "probe/cls/C" not in run.data.metrics


def test_a_trial_lost_with_its_driver_is_closed_at_the_end_of_the_resumed_sweep(space, sqlite_uri):
    """A driver that dies right after a trial started, before Tune saved its state, leaves that
    trial's child run RUNNING and unknown to the resumed sweep: it ends KILLED and tagged."""
    from commlab.sweep.callbacks import CloseChildRuns

    parent, _ = _open_parent(space, "fail", "/sweeps/fail", sqlite_uri)
    known = _child(parent, "t0", "RUNNING")
    lost = _child(parent, "t1", "RUNNING")
    done = _child(parent, "t2", "FINISHED")

    class Trial:
        def __init__(self, trial_id: str) -> None:
            self.trial_id = trial_id

    CloseChildRuns(parent, max_epochs=4).on_experiment_end([Trial("t0"), Trial("t2")])
    client = MlflowClient(sqlite_uri)
    assert client.get_run(known).info.status == "RUNNING"  # Tune's own callbacks close it
    assert client.get_run(done).info.status == "FINISHED"
    run = client.get_run(lost)
    assert run.info.status == "KILLED"
    assert run.data.tags["commlab.lost_trial"] == "true"
    assert "--resume ran its slot as a new trial" in run.data.tags["commlab.error"]


def test_a_stopped_trial_gets_the_checkpoint_of_its_last_report(space, sqlite_uri, tmp_path):
    """ASHA's stop ends a trial before its final logging (which logs its checkpoint): the
    driver logs the last reported checkpoint, so the trial can be promoted."""
    from commlab.sweep.callbacks import CloseChildRuns

    parent, _ = _open_parent(space, "fail", "/sweeps/fail", sqlite_uri)
    child = _child(parent, "t0", "RUNNING")
    ckpt = tmp_path / "train-trial_id=t0" / "checkpoint_000001"
    ckpt.mkdir(parents=True)
    (ckpt / "checkpoint.pt").write_bytes(b"epoch 2 state")

    class Trial:
        trial_id = "t0"
        last_result = {"epoch": 1.0, "training_iteration": 2, "checkpoint_path": str(ckpt)}

    close = CloseChildRuns(parent, max_epochs=4)
    close.SETTLE_S = 0.0
    close.on_trial_complete(2, [], Trial())
    client = MlflowClient(sqlite_uri)
    assert [a.path for a in client.list_artifacts(child, "checkpoint")] == [
        "checkpoint/checkpoint.pt"
    ]
    local = client.download_artifacts(child, "checkpoint/checkpoint.pt", str(tmp_path / "dl"))
    assert Path(local).read_bytes() == b"epoch 2 state"
    # a trial that ran all its epochs logs its own final checkpoint: the driver adds none
    full = _child(parent, "t1", "RUNNING")

    class Done:
        trial_id = "t1"
        last_result = {"epoch": 3.0, "training_iteration": 4, "checkpoint_path": str(ckpt)}

    close.on_trial_complete(4, [], Done())
    assert client.list_artifacts(full, "checkpoint") == []
