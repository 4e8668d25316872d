"""Sweeps: Ray Tune (Optuna TPE + ASHA) over a search space; each trial is a Ray Train run.

Train V2 + Tune: every trial is a Tune *function* that builds a `TorchTrainer` with
`TuneReportCallback`, so each epoch's `ray.train.report` becomes one Tune result that Optuna and
ASHA see. The driver owns the MLflow parent run (one per sweep); each trial opens a child run
nested under it (found again by its trial id on resume) and rank 0 logs into it. A driver-side
Tune callback closes children that Tune ended (ASHA stop: KILLED, error: FAILED), so no child is
ever left RUNNING.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import ray
import torch
from ray import tune
from ray.tune.schedulers import FIFOScheduler
from ray.tune.search import BasicVariantGenerator
from ray.tune.search.optuna import OptunaSearch
from rich.console import Console

from commlab.cluster import _cwd, check_reachable, connect, resolve_address, working_dir_lost
from commlab.config import flatten, to_yaml
from commlab.sweep.callbacks import CloseChildRuns, FinishingASHA, ProgressView
from commlab.sweep.report import finish_parent
from commlab.sweep.space import LoadedSpace, Param, check_metric, dataset_tasks, load_space
from commlab.sweep.trial import make_trainable, reuses_trial_processes
from commlab.tags import (
    KIND_TAG,
    METRIC_TAG,
    MODE_TAG,
    PARENT_TAG,
    RESUME_ERROR_TAG,
    SWEEP_PATH_TAG,
    SWEEP_TAG,
)
from commlab.tracking import finish_run
from commlab.tracking.runs import (
    RunLogger,
    RunRef,
    absolute_uri,
    check_tracking_uri,
    default_tracking_uri,
    open_run,
    set_tags,
    status_of_key,
)
from commlab.train.plumbing import absolute_data_path, fresh_name, storage_root


class SweepFailedError(RuntimeError):
    """Every trial of the sweep failed."""


@dataclass
class SweepResult:
    name: str
    experiment_path: str
    parent_run_id: str | None
    best_trial_id: str | None
    best_metric: float | None
    best_params: dict[str, Any]
    best_checkpoint: str | None
    trials: list[dict[str, Any]]
    wall_seconds: float


@dataclass(frozen=True)
class _Experiment:
    """Where the sweep's Tune experiment lives: `path` is `root`/`name`."""

    root: str
    name: str
    path: str


def tune_space(space: LoadedSpace) -> dict[str, Any]:
    """Tune param_space from the validated parameters."""

    def one(p: Param) -> Any:
        if p.dist in ("uniform", "loguniform"):
            assert p.low is not None and p.high is not None  # Param's validator requires both
            sample = tune.uniform if p.dist == "uniform" else tune.loguniform
            return sample(p.low, p.high)
        if p.dist == "int":
            return tune.randint(int(p.low or 0), int(p.high or 0) + 1)  # inclusive high
        if p.dist == "choice":
            return tune.choice(list(p.values or []))
        return tune.grid_search(list(p.values or []))

    return {name: one(p) for name, p in space.spec.params.items()}


def required_cpus(space: LoadedSpace) -> float:
    r = space.spec.resources
    return space.spec.max_concurrent_trials * (1 + r.workers * r.cpus_per_worker)


def fit_concurrency(space: LoadedSpace, total: dict[str, float]) -> int:
    """How many of the space's concurrent trials a cluster with `total` resources can run.

    A running trial holds 1 CPU for its Tune driver *and* its workers' CPUs. Starting more
    trials than that deadlocks: each driver holds a CPU, no worker group fits, and Ray Train
    retries its worker-group start without end while the job shows RUNNING. Raises when not
    even one trial fits.
    """
    r = space.spec.resources
    per_trial = 1 + r.workers * r.cpus_per_worker
    have = float(total.get("CPU", 0))
    if per_trial > have + 1e-9:
        raise ValueError(
            f"{space.path}: resources: one trial needs 1 CPU for its driver + {r.workers} "
            f"workers x {r.cpus_per_worker:g} CPUs = {per_trial:g} CPUs, the cluster has "
            f"{have:g}; lower resources.workers / cpus_per_worker, or add nodes"
        )
    fits = int((have + 1e-9) // per_trial)
    if r.gpus_per_worker:
        per_gpu = r.workers * r.gpus_per_worker
        fits = min(fits, int((float(total.get("GPU", 0)) + 1e-9) // per_gpu))
    return max(1, min(space.spec.max_concurrent_trials, fits))


def check_resources(space: LoadedSpace, total: dict[str, float]) -> None:
    """More workers than the cluster can ever hold is an error before anything starts.

    `total`: the cluster's resources (for the embedded default: this machine's cores and GPUs).
    """
    r = space.spec.resources
    need_cpu = r.workers * r.cpus_per_worker
    have_cpu = float(total.get("CPU", 0))
    if need_cpu > have_cpu:
        raise ValueError(
            f"{space.path}: resources: one trial needs {r.workers} workers x "
            f"{r.cpus_per_worker:g} CPUs = {need_cpu:g} CPUs, the cluster has {have_cpu:g}"
        )
    if r.gpus_per_worker and r.workers * r.gpus_per_worker > float(total.get("GPU", 0)):
        raise ValueError(
            f"{space.path}: resources: one trial needs {r.workers * r.gpus_per_worker:g} GPUs, "
            f"the cluster has {float(total.get('GPU', 0)):g}"
        )


def _local_resources() -> dict[str, float]:
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return {"CPU": float(os.cpu_count() or 1), "GPU": float(gpus)}


def _connect(space: LoadedSpace, address: str | None, embedded: bool) -> bool:
    if embedded:
        # Embedded: one extra logical CPU per concurrent trial driver (they mostly wait), so the
        # trial drivers never hold the cores their own Train workers need.
        cpus = max(os.cpu_count() or 1, math.ceil(required_cpus(space)))
        # A loaded machine can take more than Ray's default 60 s to start a worker group.
        os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")
        return connect(None, num_cpus=cpus + space.spec.max_concurrent_trials, log_to_driver=False)
    # Worker output stays in Ray's log files: each rank's epoch lines, Train's metric dicts
    # and Ray's own warnings would bury the sweep's one-line-per-event progress view.
    return connect(address, log_to_driver=False)


def _quiet_libraries() -> None:
    """Tune's experiment banner and TensorBoard hint (its new output engine ignores
    verbose=0), its INFO lines and Optuna's study banner: the progress view says it all."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    for name in ("ray.tune", "ray.train", "ray.air"):
        logging.getLogger(name).setLevel(logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.WARNING)


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (`commlab jobs stop`, `kill`) interrupts the sweep like Ctrl-C, so the driver
    closes its MLflow runs and leaves Ray before it goes (Ray Jobs SIGKILLs a job that has
    not exited `RAY_JOB_STOP_WAIT_TIME_S` after the SIGTERM; `commlab submit` sets it to 30)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _trial_name(trial: Any) -> str:
    """Short, distinct trial (and MLflow child run) names: the default
    `comm_trial_<sweep>_<id>` truncates to the same prefix in the MLflow UI."""
    return f"trial-{trial.trial_id}"


def _other_ray_instances() -> list[str]:
    """GCS addresses of Ray instances already running on this machine (ps-based, as Ray's own
    address discovery)."""
    try:
        # lazy, inside the try: a private helper that may move or break between Ray releases
        from ray._private.services import find_gcs_addresses

        # Ray caches what it found; we want now (cache_clear is attached after definition)
        find_gcs_addresses.cache_clear()  # type: ignore[attr-defined]
        return sorted(find_gcs_addresses())
    except Exception:  # a private helper: never let it break a sweep
        return []


def run_sweep(
    path: str | Path,
    *,
    name: str | None = None,
    resume: bool = False,
    storage: str | None = None,
    address: str | None = None,
    tracking_uri: str | None = None,
    console: Console | None = None,
) -> SweepResult:
    """Run (or `resume`) the sweep defined by the search-space file at `path`."""
    console = console or Console()
    space = load_space(path)  # reads every file the sweep needs before Ray connects
    uri, target = _check_store_and_cluster(tracking_uri, address)
    _make_data_path_absolute(space)
    check_metric(space, dataset_tasks(space))
    exp = _experiment(space, storage, name, resume)
    embedded = target is None
    if embedded:
        _check_this_machine(space, console)
    _quiet_libraries()
    job_cwd = None if embedded else _leave_job_dir()
    started = _connect(space, address, embedded)
    t0 = time.perf_counter()
    try:
        with _sigterm_interrupts():
            if not embedded:
                _fit_cluster(space, console)
            return _run_under_parent(space, exp, uri, resume, job_cwd, t0, console)
    finally:
        if job_cwd is not None and os.path.isdir(job_cwd):
            os.chdir(job_cwd)
        if started:
            ray.shutdown()


def _check_store_and_cluster(
    tracking_uri: str | None, address: str | None
) -> tuple[str, str | None]:
    """The absolute tracking URI and the Ray address (None: embedded Ray), both checked
    reachable before anything slow: an unreachable store or cluster fails now."""
    uri = absolute_uri(tracking_uri) if tracking_uri else default_tracking_uri()
    check_tracking_uri(uri)
    target = resolve_address(address)
    if target is not None:
        check_reachable(target)
    return uri, target


def _make_data_path_absolute(space: LoadedSpace) -> None:
    """Tune runs each trial in its own directory: resolve a relative data path here, once."""
    data = space.base_raw.setdefault("data", {})
    data_path = absolute_data_path(space.base.data.path)
    if data_path != space.base.data.path:
        data["path"] = data_path
        space.base = space.base.model_copy(
            update={"data": space.base.data.model_copy(update={"path": data["path"]})}
        )


def _experiment(
    space: LoadedSpace, storage: str | None, name: str | None, resume: bool
) -> _Experiment:
    """Where the sweep's Tune experiment goes: a fresh name, or the one `resume` continues."""
    root = storage_root(storage or "sweeps")
    base_name = name or space.name
    sweep_name = base_name if resume else fresh_name(root, base_name)
    exp_path = f"{root.rstrip('/')}/{sweep_name}"
    if resume and "://" not in root and not Path(exp_path).is_dir():
        raise FileNotFoundError(f"--resume: no sweep at {exp_path}")
    return _Experiment(root, sweep_name, exp_path)


def _check_this_machine(space: LoadedSpace, console: Console) -> None:
    """Embedded Ray: the trial fits this machine, and no other Ray instance runs beside it."""
    check_resources(space, _local_resources())
    others = _other_ray_instances()
    if others:
        console.print(
            f"[yellow]warning:[/] another Ray instance runs on this machine ({', '.join(others)}); "
            "this sweep starts its own, and Ray Train's clean-up of stopped trials cannot "
            "tell the two apart, so stopped trials may keep their CPUs and stall the sweep. "
            "Stop the other instance, or join it with --address."
        )


def _leave_job_dir() -> str | None:
    """On a cluster, work from a directory that stays; returns the job's working directory
    (None when there is none to leave).

    Everything relative is resolved by now. A job's working directory can be deleted under the
    driver (two nodes on one machine sharing a temp dir): the sweep says so at its end.
    """
    cwd = _cwd()
    if cwd is not None:
        os.chdir(tempfile.gettempdir())
    return cwd


def _fit_cluster(space: LoadedSpace, console: Console) -> None:
    """A trial must fit the cluster; fewer concurrent trials when not all of them fit."""
    spec = space.spec
    check_resources(space, ray.cluster_resources())
    fits = fit_concurrency(space, ray.cluster_resources())
    if fits < spec.max_concurrent_trials:
        console.print(
            f"[yellow]warning:[/] the cluster has {ray.cluster_resources().get('CPU', 0):g} "
            f"CPUs; a trial needs {1 + spec.resources.workers * spec.resources.cpus_per_worker:g} "
            f"(its driver + workers): running {fits} trial(s) at a time instead of "
            f"{spec.max_concurrent_trials}"
        )
        space.spec = spec.model_copy(update={"max_concurrent_trials": fits})


def _run_under_parent(
    space: LoadedSpace,
    exp: _Experiment,
    uri: str,
    resume: bool,
    job_cwd: str | None,
    t0: float,
    console: Console,
) -> SweepResult:
    """Open the parent run, run the trials and finish the parent with the results; when
    anything fails or interrupts the sweep, no run of it stays RUNNING."""
    parent, previous_status = _open_parent(space, exp.name, exp.path, uri)
    try:
        spec = space.spec
        console.print(
            f"[bold]commlab sweep[/] {exp.name}: {spec.num_samples} trials of {space.base.model.method}, "
            f"{spec.max_concurrent_trials} at a time, metric {spec.metric} ({spec.mode}) -> {exp.path}"
            f"  (MLflow parent run {parent.run_id})"
        )
        grid = _tuner(space, parent, exp, resume).fit()
        result = _summarise(space, exp.name, exp.path, grid, parent, time.perf_counter() - t0)
        finish_parent(space, parent, result, console)
        lost = working_dir_lost(job_cwd) if job_cwd is not None else None
        if lost:
            console.print(f"[yellow]warning:[/] {lost}", soft_wrap=True)
        if result.trials and all(t["error"] for t in result.trials):
            raise SweepFailedError(
                f"every trial of sweep {exp.name} failed; first error: {result.trials[0]['error']}"
            )
        return result
    except BaseException as err:
        _close_after_failure(parent, err, previous_status if resume else None)
        raise


def _tuner(space: LoadedSpace, parent: RunRef, exp: _Experiment, resume: bool) -> tune.Tuner:
    """A new Tuner over the space, or the interrupted one restored (`resume`)."""
    storage = f"{exp.path}/trains"
    trainable = make_trainable(space, parent, storage=storage, sweep_name=exp.name)
    trainable = tune.with_resources(trainable, {"CPU": 1})
    if resume:
        return tune.Tuner.restore(
            exp.path, trainable=trainable, resume_unfinished=True, resume_errored=True
        )
    spec = space.spec
    return tune.Tuner(
        trainable,
        param_space=tune_space(space),
        tune_config=tune.TuneConfig(
            metric=spec.metric,
            mode=spec.mode,
            search_alg=_searcher(space),
            scheduler=_scheduler(space),
            num_samples=spec.num_samples,
            max_concurrent_trials=spec.max_concurrent_trials,
            time_budget_s=spec.stop.time_budget_s,
            trial_name_creator=_trial_name,
            # in-process trials: the next trial starts in the process of one that ended, where
            # torch, commlab and an MLflow client are loaded already (restored sweeps keep it)
            reuse_actors=reuses_trial_processes(space, storage),
        ),
        run_config=_run_config(space, parent, exp),
    )


def _scheduler(space: LoadedSpace) -> Any:
    spec = space.spec
    if spec.scheduler.name == "asha":
        return FinishingASHA(
            time_attr="training_iteration",
            max_t=space.max_epochs,
            grace_period=spec.scheduler.grace_period,
            reduction_factor=spec.scheduler.reduction_factor,
        )
    return FIFOScheduler()


def _searcher(space: LoadedSpace) -> Any:
    spec = space.spec
    grid = any(p.dist == "grid" for p in spec.params.values())
    if spec.searcher.name == "optuna" and not grid:
        return OptunaSearch(seed=spec.searcher.seed)
    # Optuna has no grid; the basic generator expands grids and samples the rest
    return BasicVariantGenerator(random_state=spec.searcher.seed)


def _run_config(space: LoadedSpace, parent: RunRef, exp: _Experiment) -> tune.RunConfig:
    spec = space.spec
    callbacks = [
        CloseChildRuns(parent, max_epochs=space.max_epochs),
        ProgressView(spec.metric, spec.mode, space.max_epochs),
    ]
    # Trials end by themselves after max_epochs (train.epochs is set to it); a Tune stop at
    # the last report would tear the workers down before rank 0's final logging.
    stop = None
    if spec.stop.metric_threshold is not None:
        stop = _threshold_stopper(spec.metric, spec.mode, spec.stop.metric_threshold)
    return tune.RunConfig(
        name=exp.name,
        storage_path=exp.root,
        callbacks=callbacks,
        stop=stop,
        verbose=0,
        failure_config=tune.FailureConfig(max_failures=0),
    )


def _threshold_stopper(metric: str, mode: str, threshold: float) -> Any:
    def stop(trial_id: str, result: dict[str, Any]) -> bool:
        value = result.get(metric)
        if value is None:
            return False
        return value >= threshold if mode == "max" else value <= threshold

    return stop


def _close_after_failure(parent: Any, err: BaseException, previous: str | None) -> None:
    """The sweep ended by an error or an interrupt: no run of it stays RUNNING.

    Trials still running are KILLED (their drivers go with this one; Tune's callbacks never
    see them end). A `--resume` of a sweep that had FINISHED keeps that status: the failed
    attempt is recorded in `commlab.resume_error` instead.
    """
    interrupted = isinstance(err, KeyboardInterrupt)
    message = "interrupted (Ctrl-C or SIGTERM)" if interrupted else f"{type(err).__name__}: {err}"
    client = parent.client()
    try:
        kids = client.search_runs(
            [parent.experiment_id],
            f"tags.`{PARENT_TAG}` = '{parent.run_id}' and attributes.status = 'RUNNING'",
        )
        for kid in kids:
            ref = RunRef(parent.tracking_uri, parent.experiment_id, kid.info.run_id)
            finish_run(ref, "KILLED", f"the sweep ended: {message}")
        if previous in ("FINISHED", "FAILED", "KILLED"):
            set_tags(client, parent.run_id, {RESUME_ERROR_TAG: message})
            client.set_terminated(parent.run_id, status=previous)
        else:
            finish_run(parent, "KILLED" if interrupted else "FAILED", message)
    except Exception:  # the store may be what failed: never hide the original error
        pass


def _open_parent(
    space: LoadedSpace, sweep_name: str, exp_path: str, uri: str
) -> tuple[Any, str | None]:
    """The sweep's parent run (reopened on resume) and its status before this call."""
    experiment = space.base.name
    previous = status_of_key(uri, experiment, f"sweep:{exp_path}")
    ref, _ = open_run(
        uri,
        experiment,
        run_key=f"sweep:{exp_path}",
        run_name=sweep_name,
        params={f"base.{k}": v for k, v in flatten(space.base).items()},
        tags={
            SWEEP_TAG: sweep_name,
            KIND_TAG: "sweep",
            METRIC_TAG: space.spec.metric,
            MODE_TAG: space.spec.mode,
            SWEEP_PATH_TAG: exp_path,
        },
    )
    logger = RunLogger(ref)
    logger.log_text(space.text, "search_space.yaml")
    logger.log_text(to_yaml(space.base), "base_config.yaml")
    return ref, previous


def _summarise(
    space: LoadedSpace, sweep_name: str, exp_path: str, grid: Any, parent: Any, wall: float
) -> SweepResult:
    spec = space.spec
    trials = [_trial_summary(r, spec.metric, spec.mode) for r in grid]
    best_id = best_metric = best_ckpt = None
    best_params: dict[str, Any] = {}
    try:
        best = grid.get_best_result(metric=spec.metric, mode=spec.mode, scope="all")
    except RuntimeError:
        best = None
    if best is not None and best.metrics:
        best_id = best.metrics.get("trial_id")
        best_metric = _best_value(best, spec.metric, spec.mode)
        best_params = dict(best.config or {})
        best_ckpt = best.metrics.get("checkpoint_path")
    return SweepResult(
        sweep_name,
        exp_path,
        parent.run_id,
        best_id,
        best_metric,
        best_params,
        best_ckpt,
        trials,
        wall,
    )


def _trial_summary(r: Any, metric: str, mode: str) -> dict[str, Any]:
    """One trial's row of the sweep's summary, from its Tune result."""
    df = r.metrics_dataframe
    # Epochs count from the trial's own `epoch` metric (0-based): Tune's
    # training_iteration restarts when a resumed trial continues from a checkpoint.
    steps = "epoch" if df is not None and "epoch" in df else "training_iteration"
    history = (
        []
        if df is None or metric not in df
        else [
            (int(i) + (1 if steps == "epoch" else 0), float(v))
            for i, v in zip(df[steps], df[metric], strict=True)
            if v == v
        ]
    )
    metrics = r.metrics or {}
    epochs = (
        int(metrics["epoch"]) + 1
        if isinstance(metrics.get("epoch"), int | float)
        else metrics.get("training_iteration")
    )
    values = [v for _, v in history]
    return {
        "trial_id": metrics.get("trial_id"),
        "config": {k: v for k, v in (r.config or {}).items()},
        # the best over the trial's history: the rule of `commlab runs` and promote
        "metric": (max(values) if mode == "max" else min(values))
        if values
        else metrics.get(metric),
        "last": metrics.get(metric),
        "iterations": epochs,
        "train_seconds": (r.metrics or {}).get("time_total_s"),
        "checkpoint": (r.metrics or {}).get("checkpoint_path"),
        "error": str(r.error) if r.error else None,
        "history": history,
    }


def _best_value(best: Any, metric: str, mode: str) -> float | None:
    """The best trial's best value of `metric` over its history."""
    df = best.metrics_dataframe
    series = df[metric].dropna() if df is not None and metric in df else None
    if series is not None and len(series):
        return float(series.max() if mode == "max" else series.min())
    if isinstance(best.metrics.get(metric), int | float):
        # a trial resumed after a driver crash can come back without its metric history
        return float(best.metrics[metric])
    return None
