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
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from commlab.config import flatten
from commlab.sweep.space import LoadedSpace, Param, check_metric, load_space
from commlab.tags import (
    KIND_TAG,
    METRIC_TAG,
    MODE_TAG,
    PARENT_TAG,
    RESUME_ERROR_TAG,
    SWEEP_PATH_TAG,
    SWEEP_TAG,
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


def tune_space(space: LoadedSpace) -> dict[str, Any]:
    """Tune param_space from the validated parameters."""
    from ray import tune

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


def dataset_tasks(space: LoadedSpace) -> dict[str, str]:
    """Task kinds of the sweep's dataset (built once here; cached on disk for the trials)."""
    from commlab.data import build_data

    d = space.base.data
    bundle = build_data(d.name, str(Path(d.path).resolve()), space.base.seed, d.params)
    return {k: t.kind for k, t in bundle.probe.tasks.items()}


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
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return {"CPU": float(os.cpu_count() or 1), "GPU": float(gpus)}


def _connect(space: LoadedSpace, address: str | None, embedded: bool) -> bool:
    from commlab.cluster import connect

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
    import logging

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    for name in ("ray.tune", "ray.train", "ray.air"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
    except ImportError:
        pass


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (`commlab jobs stop`, `kill`) interrupts the sweep like Ctrl-C, so the driver
    closes its MLflow runs and leaves Ray before it goes (Ray Jobs SIGKILLs a job that has
    not exited `RAY_JOB_STOP_WAIT_TIME_S` after the SIGTERM; `commlab submit` sets it to 30)."""
    import signal
    import threading

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
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler
    from ray.tune.search import BasicVariantGenerator
    from ray.tune.search.optuna import OptunaSearch

    from commlab.sweep.callbacks import CloseChildRuns, FinishingASHA, ProgressView
    from commlab.sweep.trial import make_trainable
    from commlab.tracking.runs import absolute_uri, check_tracking_uri, default_tracking_uri

    console = console or Console()
    space = load_space(path)  # reads every file the sweep needs before Ray connects
    from commlab.cluster import check_reachable, resolve_address

    uri = absolute_uri(tracking_uri) if tracking_uri else default_tracking_uri()
    check_tracking_uri(uri)  # before anything slow: an unreachable store or cluster fails now
    target = resolve_address(address)
    if target is not None:
        check_reachable(target)
    # Tune runs each trial in its own directory: resolve a relative data path here, once.
    data = space.base_raw.setdefault("data", {})
    data_path = absolute_data_path(space.base.data.path)
    if data_path != space.base.data.path:
        data["path"] = data_path
        space.base = space.base.model_copy(
            update={"data": space.base.data.model_copy(update={"path": data["path"]})}
        )
    check_metric(space, dataset_tasks(space))
    root = storage_root(storage or "sweeps")
    base_name = name or space.name
    sweep_name = base_name if resume else fresh_name(root, base_name)
    exp_path = f"{root.rstrip('/')}/{sweep_name}"
    if resume and "://" not in root and not Path(exp_path).is_dir():
        raise FileNotFoundError(f"--resume: no sweep at {exp_path}")
    spec = space.spec
    embedded = target is None
    if embedded:
        check_resources(space, _local_resources())
        others = _other_ray_instances()
        if others:
            console.print(
                f"[yellow]warning:[/] another Ray instance runs on this machine ({', '.join(others)}); "
                "this sweep starts its own, and Ray Train's clean-up of stopped trials cannot "
                "tell the two apart, so stopped trials may keep their CPUs and stall the sweep. "
                "Stop the other instance, or join it with --address."
            )
    _quiet_libraries()
    from commlab.cluster import _cwd

    cwd = _cwd()
    if not embedded and cwd is not None:
        # Everything relative is resolved by now. A job's working directory can be deleted
        # under the driver (two nodes on one machine sharing a temp dir): work from a
        # directory that stays, and say what happened at the end.
        import tempfile

        os.chdir(tempfile.gettempdir())
        job_cwd: str | None = cwd
    else:
        job_cwd = None
    started = _connect(space, address, embedded)
    t0 = time.perf_counter()
    parent = None
    previous_status = None
    stack = contextlib.ExitStack()
    try:
        stack.enter_context(_sigterm_interrupts())
        if not embedded:
            import ray

            check_resources(space, ray.cluster_resources())
            fits = fit_concurrency(space, ray.cluster_resources())
            if fits < spec.max_concurrent_trials:
                console.print(
                    f"[yellow]warning:[/] the cluster has {ray.cluster_resources().get('CPU', 0):g} "
                    f"CPUs; a trial needs {1 + spec.resources.workers * spec.resources.cpus_per_worker:g} "
                    f"(its driver + workers): running {fits} trial(s) at a time instead of "
                    f"{spec.max_concurrent_trials}"
                )
                spec = space.spec = spec.model_copy(update={"max_concurrent_trials": fits})
        parent, previous_status = _open_parent(space, sweep_name, exp_path, uri)
        console.print(
            f"[bold]commlab sweep[/] {sweep_name}: {spec.num_samples} trials of {space.base.model.method}, "
            f"{spec.max_concurrent_trials} at a time, metric {spec.metric} ({spec.mode}) -> {exp_path}"
            f"  (MLflow parent run {parent.run_id})"
        )
        trainable = make_trainable(
            space, parent, storage=f"{exp_path}/trains", sweep_name=sweep_name
        )
        if spec.scheduler.name == "asha":
            scheduler: Any = FinishingASHA(
                time_attr="training_iteration",
                max_t=space.max_epochs,
                grace_period=spec.scheduler.grace_period,
                reduction_factor=spec.scheduler.reduction_factor,
            )
        else:
            scheduler = FIFOScheduler()
        grid = any(p.dist == "grid" for p in spec.params.values())
        if spec.searcher.name == "optuna" and not grid:
            searcher: Any = OptunaSearch(seed=spec.searcher.seed)
        else:  # Optuna has no grid; the basic generator expands grids and samples the rest
            searcher = BasicVariantGenerator(random_state=spec.searcher.seed)
        callbacks = [
            CloseChildRuns(parent, max_epochs=space.max_epochs),
            ProgressView(spec.metric, spec.mode, space.max_epochs),
        ]
        # Trials end by themselves after max_epochs (train.epochs is set to it); a Tune stop at
        # the last report would tear the workers down before rank 0's final logging.
        stop = None
        if spec.stop.metric_threshold is not None:
            stop = _threshold_stopper(spec.metric, spec.mode, spec.stop.metric_threshold)
        run_config = tune.RunConfig(
            name=sweep_name,
            storage_path=root,
            callbacks=callbacks,
            stop=stop,
            verbose=0,
            failure_config=tune.FailureConfig(max_failures=0),
        )
        trainable = tune.with_resources(trainable, {"CPU": 1})
        if resume:
            tuner = tune.Tuner.restore(
                exp_path, trainable=trainable, resume_unfinished=True, resume_errored=True
            )
        else:
            tuner = tune.Tuner(
                trainable,
                param_space=tune_space(space),
                tune_config=tune.TuneConfig(
                    metric=spec.metric,
                    mode=spec.mode,
                    search_alg=searcher,
                    scheduler=scheduler,
                    num_samples=spec.num_samples,
                    max_concurrent_trials=spec.max_concurrent_trials,
                    time_budget_s=spec.stop.time_budget_s,
                    trial_name_creator=_trial_name,
                ),
                run_config=run_config,
            )
        grid_result = tuner.fit()
        wall = time.perf_counter() - t0
        result = _summarise(space, sweep_name, exp_path, grid_result, parent, wall)
        from commlab.sweep.report import finish_parent

        finish_parent(space, parent, result, console)
        if job_cwd is not None:
            from commlab.cluster import working_dir_lost

            lost = working_dir_lost(job_cwd)
            if lost:
                console.print(f"[yellow]warning:[/] {lost}", soft_wrap=True)
        if result.trials and all(t["error"] for t in result.trials):
            raise SweepFailedError(
                f"every trial of sweep {sweep_name} failed; first error: {result.trials[0]['error']}"
            )
        return result
    except BaseException as err:
        if parent is not None:
            _close_after_failure(parent, err, previous_status if resume else None)
        raise
    finally:
        stack.close()
        if job_cwd is not None and os.path.isdir(job_cwd):
            os.chdir(job_cwd)
        if started:
            import ray

            ray.shutdown()


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
    from commlab.tracking import finish_run
    from commlab.tracking.runs import RunRef, set_tags

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
    from mlflow.tracking import MlflowClient

    from commlab.tracking.runs import find_run, get_or_create_experiment, open_run

    experiment = space.base.name
    client = MlflowClient(uri)
    before = find_run(
        client, get_or_create_experiment(client, experiment, uri), f"sweep:{exp_path}"
    )
    previous = client.get_run(before).info.status if before else None
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
    from commlab.config import to_yaml
    from commlab.tracking.runs import RunLogger

    logger = RunLogger(ref)
    logger.log_text(space.text, "search_space.yaml")
    logger.log_text(to_yaml(space.base), "base_config.yaml")
    return ref, previous


def _summarise(
    space: LoadedSpace, sweep_name: str, exp_path: str, grid: Any, parent: Any, wall: float
) -> SweepResult:
    spec = space.spec
    trials = []
    for r in grid:
        df = r.metrics_dataframe
        # Epochs count from the trial's own `epoch` metric (0-based): Tune's
        # training_iteration restarts when a resumed trial continues from a checkpoint.
        steps = "epoch" if df is not None and "epoch" in df else "training_iteration"
        history = (
            []
            if df is None or spec.metric not in df
            else [
                (int(i) + (1 if steps == "epoch" else 0), float(v))
                for i, v in zip(df[steps], df[spec.metric], strict=True)
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
        trials.append(
            {
                "trial_id": metrics.get("trial_id"),
                "config": {k: v for k, v in (r.config or {}).items()},
                # the best over the trial's history: the rule of `commlab runs` and promote
                "metric": (max(values) if spec.mode == "max" else min(values))
                if values
                else metrics.get(spec.metric),
                "last": metrics.get(spec.metric),
                "iterations": epochs,
                "train_seconds": (r.metrics or {}).get("time_total_s"),
                "checkpoint": (r.metrics or {}).get("checkpoint_path"),
                "error": str(r.error) if r.error else None,
                "history": history,
            }
        )
    best_id = best_metric = best_ckpt = None
    best_params: dict[str, Any] = {}
    try:
        best = grid.get_best_result(metric=spec.metric, mode=spec.mode, scope="all")
    except RuntimeError:
        best = None
    if best is not None and best.metrics:
        best_id = best.metrics.get("trial_id")
        df = best.metrics_dataframe
        series = df[spec.metric].dropna() if df is not None and spec.metric in df else None
        if series is not None and len(series):
            best_metric = float(series.max() if spec.mode == "max" else series.min())
        elif isinstance(best.metrics.get(spec.metric), int | float):
            # a trial resumed after a driver crash can come back without its metric history
            best_metric = float(best.metrics[spec.metric])
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


def sweep_plan(path: str | Path) -> LoadedSpace:
    """Validate a search space without running it (used by `commlab sweep --check`)."""
    space = load_space(path)
    check_metric(space, dataset_tasks(space))
    return space
