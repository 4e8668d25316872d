"""Pretraining as a Ray Train (V2) job: N data-parallel workers, checkpoints, retries, MLflow.

`RayTrainSettings` holds what is about *where and how* a run executes (workers, resources,
failures, checkpoint retention, storage, tracking); the experiment itself stays in
`ExperimentConfig`. `build_trainer` turns both into a `TorchTrainer`; `pretrain_ray` is the
driver: it connects to Ray (embedded local cluster unless an address is given), opens the MLflow
run before `fit()` so every attempt of the run logs into it, and sets its terminal status.

Ray Train resumes silently when `(storage_path, name)` repeat. `pretrain_ray` therefore picks a
fresh run name (`<cfg.name>`, `<cfg.name>-1`, ...) unless `resume=True`, which continues the
named run from its last checkpoint and reopens its MLflow run.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import ray
import ray.train
from pydantic import BaseModel, ConfigDict, Field
from ray.train.torch import TorchTrainer
from rich.console import Console

from commlab.checkpoint_format import CHECKPOINT_NAME, CorruptCheckpointError, is_readable
from commlab.cluster import connect, resolve_address
from commlab.config import ExperimentConfig, flatten
from commlab.tags import RAY_RUN_DIR_TAG
from commlab.tracking.runs import open_pretrain_run
from commlab.train.loop import NonFiniteLossError
from commlab.train.plumbing import absolute_data_path, finish, fresh_name, storage_root
from commlab.train.worker import train_loop_per_worker

CONTROLLER_FAILURE_LIMIT = 5
# Ray Train's controller takes each worker's reports one per poll of the workers, every
# $RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (Ray's default: 2 s), and a worker's next report waits
# until its previous one was taken: with Ray's default, every epoch shorter than 2 s took 2 s.
REPORT_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
REPORT_POLL_S = 0.25


class RayTrainSettings(BaseModel):
    """How a pretraining run executes on Ray (not what it trains)."""

    model_config = ConfigDict(extra="forbid")

    workers: Annotated[int, Field(ge=1)] = 1
    cpus_per_worker: Annotated[float, Field(gt=0)] = 1.0
    gpus_per_worker: Annotated[float, Field(ge=0)] = 0.0
    max_failures: Annotated[int, Field(ge=-1)] = 1  # worker-group restarts; -1 = unlimited
    # BatchNorm statistics of the global batch (exactly one process's numbers; a few small
    # collectives per BatchNorm call) or of each worker's shard (DDP's default, no collectives)
    sync_batchnorm: bool = True
    num_to_keep: Annotated[int, Field(ge=1)] | None = 2  # None keeps every checkpoint
    storage_path: str | None = None  # default: train.out_dir, made absolute
    run_name: str | None = None  # default: cfg.name (fresh unless resume)
    resume: bool = False
    selection_metric: str = "train/loss"
    selection_mode: Literal["min", "max"] = "min"
    address: str | None = None  # None: $RAY_ADDRESS or an embedded local cluster
    tracking: bool = True
    tracking_uri: str | None = None  # default: $MLFLOW_TRACKING_URI or sqlite:///<cwd>/mlflow.db
    experiment: str | None = None  # MLflow experiment; default: cfg.name


@dataclass
class RayPretrainResult:
    run_dir: str  # <storage_path>/<run name>
    checkpoint: str | None  # directory of the last reported checkpoint (holds checkpoint.pt)
    metrics: dict[str, Any]
    mlflow_run_id: str | None


class PretrainFailedError(RuntimeError):
    """The run failed; `checkpoint` is the last good checkpoint (or None)."""

    def __init__(self, message: str, checkpoint: str | None, mlflow_run_id: str | None) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint
        self.mlflow_run_id = mlflow_run_id


class NonFiniteRunError(PretrainFailedError, NonFiniteLossError):
    """The loss became NaN/inf; the message names epoch, step and term."""


def resolve_run_name(storage: str, base: str, settings: RayTrainSettings) -> str:
    """`settings.run_name`, or a fresh `base[-i]`; an existing run only with `resume`."""
    local = "://" not in storage
    if settings.resume:
        name = settings.run_name or base
        if local and not (Path(storage) / name).is_dir():
            raise FileNotFoundError(f"resume: no Ray Train run at {Path(storage) / name}")
        return name
    if settings.run_name is None:
        return fresh_name(storage, base)
    if local and (Path(storage) / settings.run_name).exists():
        raise FileExistsError(
            f"{Path(storage) / settings.run_name} exists; pass resume=True (--resume) to continue it"
        )
    return settings.run_name


def with_absolute_paths(cfg: ExperimentConfig) -> ExperimentConfig:
    """Ray workers run in their own directories: make data.path absolute from here."""
    path = absolute_data_path(cfg.data.path)
    if path == cfg.data.path:
        return cfg
    out = cfg.model_copy(deep=True)
    out.data.path = path
    return out


def build_trainer(
    cfg: ExperimentConfig,
    settings: RayTrainSettings,
    *,
    name: str,
    storage_path: str,
    run: Any = None,
    hooks: dict[str, Any] | None = None,
    callbacks: list[Any] | None = None,
) -> Any:
    """A `TorchTrainer` running `commlab.train.worker.train_loop_per_worker` on N workers.

    `run` is the `commlab.tracking.RunRef` rank 0 logs into (None: no tracking); `hooks` are
    test-only fault injections (see commlab.train.worker); `callbacks` are Ray Train
    `UserCallback`s (a sweep trial passes Tune's `TuneReportCallback`).

    The controller that `fit()` starts polls the workers every `REPORT_POLL_S` seconds unless
    $RAY_TRAIN_HEALTH_CHECK_INTERVAL_S says otherwise (Ray reads it in `fit()`, in this process).
    """
    os.environ.setdefault(REPORT_POLL_ENV, str(REPORT_POLL_S))
    resources = {"CPU": settings.cpus_per_worker}
    if settings.gpus_per_worker > 0:
        resources["GPU"] = settings.gpus_per_worker
    loop_config = {
        "cfg": with_absolute_paths(cfg).model_dump(mode="json"),
        "run": run,
        "selection": {"metric": settings.selection_metric, "mode": settings.selection_mode},
        "hooks": hooks or {},
        "sync_batchnorm": settings.sync_batchnorm,
    }
    return TorchTrainer(
        # Ray's annotation says -> None, but V2 hands rank 0's return value to Result.return_value
        train_loop_per_worker,  # type: ignore[arg-type]
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=settings.workers,
            use_gpu=settings.gpus_per_worker > 0,
            resources_per_worker=resources,
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            callbacks=callbacks or None,
            # Ray's default retries a worker group that cannot start (resources never free)
            # without end while the run shows RUNNING; give up after a few start timeouts
            # ($RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S each, 60 s by default) instead.
            # ray.train resolves to Train V2's FailureConfig at run time; mypy sees V1's
            failure_config=ray.train.FailureConfig(  # type: ignore[call-arg]
                max_failures=settings.max_failures,
                controller_failure_limit=CONTROLLER_FAILURE_LIMIT,
            ),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=settings.num_to_keep,
                checkpoint_score_attribute=settings.selection_metric,
                checkpoint_score_order=settings.selection_mode,
            ),
        ),
    )


def pretrain_ray(
    cfg: ExperimentConfig,
    settings: RayTrainSettings | None = None,
    console: Console | None = None,
    hooks: dict[str, Any] | None = None,
) -> RayPretrainResult:
    """Pretrain on Ray Train; raises `NonFiniteRunError` / `PretrainFailedError` on failure
    (the MLflow run is then FAILED and the last good checkpoint kept)."""
    settings = settings or RayTrainSettings()
    console = console or Console()
    storage = storage_root(settings.storage_path or cfg.train.out_dir)
    name = resolve_run_name(storage, cfg.name, settings)
    run_dir = f"{storage.rstrip('/')}/{name}"
    if settings.resume and "://" not in storage:
        fall_back_to_intact_checkpoint(run_dir, console)
    started = connect(settings.address)
    ref = None
    try:
        if settings.tracking:
            ref = open_pretrain_run(
                settings.tracking_uri,
                settings.experiment or cfg.name,
                run_key=run_dir,
                run_name=name,
                params=flatten(cfg),
                method=cfg.model.method,
                tags={RAY_RUN_DIR_TAG: run_dir},
            )
            if resolve_address(settings.address) and ref.tracking_uri.startswith("sqlite:"):
                console.print(
                    "[yellow]warning:[/] MLflow tracks into a local sqlite file; workers on "
                    "other nodes cannot reach it (set MLFLOW_TRACKING_URI=http://...)"
                )
        console.print(
            f"[bold]commlab pretrain[/] {cfg.name}: method={cfg.model.method}, "
            f"{settings.workers} Ray Train worker(s) -> {run_dir}"
            + (f"  (MLflow run {ref.run_id})" if ref else "")
        )
        trainer = build_trainer(
            cfg, settings, name=name, storage_path=storage, run=ref, hooks=hooks
        )
        try:
            result = trainer.fit()
        except ray.train.TrainingFailedError as err:
            finish(ref, "FAILED", f"{type(err).__name__}: {err}")
            raise PretrainFailedError(
                f"training failed: {err}", _last_checkpoint(run_dir), _id(ref)
            ) from err
        except KeyboardInterrupt:
            finish(ref, "KILLED", "interrupted")
            raise
        checkpoint = result.checkpoint.path if result.checkpoint is not None else None
        outcome = result.return_value or {}
        if outcome.get("status") == "nonfinite":
            msg = f"{outcome['error']}; last good checkpoint: {checkpoint}"
            finish(ref, "FAILED", msg)
            raise NonFiniteRunError(msg, checkpoint, _id(ref))
        finish(ref, "FINISHED")
        console.print(f"checkpoint: {checkpoint}")
        return RayPretrainResult(run_dir, checkpoint, dict(result.metrics or {}), _id(ref))
    finally:
        if started:
            ray.shutdown()


def fall_back_to_intact_checkpoint(run_dir: str, console: Console) -> None:
    """Before resuming a Ray Train run: when its latest checkpoint is unreadable (a truncated
    copy, a full disk), resume from the newest intact one instead.

    Ray Train always hands workers its *latest* reported checkpoint and has no notion of a
    damaged one (nor a supported way to pick another), so the intact files are copied into the
    latest checkpoint's directory and the damaged file is kept beside them as
    `checkpoint.pt.corrupt`. The state carries its own epoch: training continues from there.
    """
    dirs = sorted(p for p in Path(run_dir).glob("checkpoint_*") if p.is_dir())
    if not dirs or is_readable(dirs[-1] / CHECKPOINT_NAME):
        return
    latest = dirs[-1]
    intact = next((d for d in reversed(dirs[:-1]) if is_readable(d / CHECKPOINT_NAME)), None)
    if intact is None:
        raise CorruptCheckpointError(
            f"--resume: the latest checkpoint {latest / CHECKPOINT_NAME} is unreadable and no "
            f"earlier intact one is kept in {run_dir}; start afresh without --resume"
        )
    bad = latest / CHECKPOINT_NAME
    if bad.exists():
        bad.replace(latest / f"{CHECKPOINT_NAME}.corrupt")
    for f in intact.iterdir():
        if f.is_file() and f.suffix == ".pt":
            shutil.copy2(f, latest / f.name)
    console.print(
        f"[yellow]warning:[/] checkpoint {bad} is unreadable (kept as {bad.name}.corrupt); "
        f"resuming from the previous intact checkpoint {intact.name}"
    )


def _id(ref: Any) -> str | None:
    return ref.run_id if ref is not None else None


def _last_checkpoint(run_dir: str) -> str | None:
    try:
        ckpt = ray.train.Result.from_path(run_dir).checkpoint
    except Exception:  # nothing was ever reported, or remote storage we cannot list
        return None
    return ckpt.path if ckpt is not None else None
