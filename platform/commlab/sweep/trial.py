"""One sweep trial: a Tune function trainable that pretrains one configuration.

Single-worker CPU trials with local storage train in the Tune function's own process
(`run_in_process`): starting a Ray Train controller and worker group per trial cost more than
the smoke sweep's trials trained. Multi-worker (or GPU, or remote-storage) trials run a Ray
Train (V2) `TorchTrainer` with `TuneReportCallback`. Either way the checkpoints of a trial live
in `<storage>/train-trial_id=<id>/checkpoint_*` and a restarted trial resumes from its last one;
each epoch is one Tune result carrying `checkpoint_path`. What the in-process runner does not
do is restart a crashed worker inside the trial (Train's `max_failures`): the trial errors, and
`commlab sweep --resume` continues it from its last checkpoint.

The trial's MLflow child run is nested under the sweep's parent run and keyed by the trial id,
so a resumed sweep (or a retried trial) logs into the same child run.
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray.train
import torch
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from commlab.checkpoint_format import CHECKPOINT_NAME
from commlab.config import ExperimentConfig, apply_overrides, flatten, validate_config
from commlab.sweep.space import LoadedSpace, to_overrides
from commlab.tags import (
    KIND_TAG,
    METHOD_TAG,
    PARAM_PREFIX,
    PARENT_TAG,
    PROCESS_TAG,
    SWEEP_TAG,
    TRIAL_TAG,
)
from commlab.tracking import finish_run
from commlab.tracking.runs import open_run
from commlab.train.loop import WorkerContext
from commlab.train.trainer import RayTrainSettings, build_trainer
from commlab.train.worker import (
    replays_last_epoch,
    report_metrics,
    resume,
    run_training,
    worker_device,
)


def trial_config(
    base_raw: dict[str, Any], overrides: list[str], max_epochs: int
) -> ExperimentConfig:
    return validate_config(apply_overrides(base_raw, [*overrides, f"train.epochs={max_epochs}"]))


CHECKPOINT_PREFIX = "checkpoint_"


def in_process(resources: dict[str, Any], storage: str) -> bool:
    """Whether a trial with these resources runs in the Tune function's own process."""
    return resources["workers"] == 1 and not resources["gpus_per_worker"] and "://" not in storage


REUSE_ENV = "COMMLAB_REUSE_TRIAL_PROCESS"


def reuses_trial_processes(space: LoadedSpace, storage: str) -> bool:
    """Whether a trial starts in the process of a trial that ended (Tune's `reuse_actors`): for
    in-process trials, unless `COMMLAB_REUSE_TRIAL_PROCESS=0` asks for a fresh process each."""
    resources = space.spec.resources.model_dump()
    return in_process(resources, storage) and os.environ.get(REUSE_ENV, "1") != "0"


def latest_checkpoint(train_dir: Path) -> Path | None:
    done = sorted(
        p for p in train_dir.glob(f"{CHECKPOINT_PREFIX}*") if (p / CHECKPOINT_NAME).is_file()
    )
    return done[-1] if done else None


def run_in_process(
    cfg: ExperimentConfig,
    ref: Any,
    train_dir: Path,
    selection: dict[str, str],
    threads: int,
    keep: int = 2,
) -> dict[str, Any]:
    """Train `cfg` here, reporting each epoch to Tune with its checkpoint copied (atomically) to
    `train_dir/checkpoint_<epoch>`; the last `keep` are kept. Resumes from the latest one."""
    if not cfg.train.threads:
        torch.set_num_threads(max(1, threads))  # Ray gives the trial's actor 1 OpenMP thread
    train_dir.mkdir(parents=True, exist_ok=True)
    start = latest_checkpoint(train_dir)

    def report(
        metrics: dict[str, float], directory: str, epoch: int, log: Callable[[], None]
    ) -> None:
        dst = train_dir / f"{CHECKPOINT_PREFIX}{epoch:06d}"
        tmp = train_dir / f".partial-{CHECKPOINT_PREFIX}{epoch:06d}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(directory, tmp)
        shutil.rmtree(dst, ignore_errors=True)
        os.replace(tmp, dst)
        done = sorted(train_dir.glob(f"{CHECKPOINT_PREFIX}*"))
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        log()  # before the report: ASHA may stop this process right at it
        tune.report({**report_metrics(metrics, selection), "checkpoint_path": str(dst)})

    outcome = run_training(
        cfg,
        WorkerContext(device=worker_device(cfg)),
        report,
        run_ref=ref,
        resume_from=(lambda run: resume(run, start)) if start is not None else None,
    )
    if replays_last_epoch(outcome):
        tune.report(
            {**report_metrics(outcome["metrics"], selection), "checkpoint_path": str(start)}
        )
    return outcome


def make_trainable(space: LoadedSpace, parent: Any, storage: str, sweep_name: str) -> Any:
    """A closure over plain data (picklable) that Tune runs once per trial."""
    spec = space.spec
    base_raw = space.base_raw
    max_epochs = space.max_epochs
    resources = spec.resources.model_dump()
    metric, mode = spec.metric, spec.mode

    def trainable(config: dict[str, Any]) -> None:
        ctx = tune.get_context()
        trial_id, trial_name = ctx.get_trial_id(), ctx.get_trial_name()
        cfg = trial_config(base_raw, to_overrides(spec, config), max_epochs)
        ref, _ = open_run(
            parent.tracking_uri,
            cfg.name,
            run_key=f"trial:{storage}/{trial_id}",
            run_name=trial_name,
            params=flatten(cfg),
            tags={
                PARENT_TAG: parent.run_id,
                TRIAL_TAG: trial_id,
                SWEEP_TAG: sweep_name,
                KIND_TAG: "trial",
                METHOD_TAG: cfg.model.method,
                PROCESS_TAG: f"{socket.gethostname()}:{os.getpid()}",
                **{PARAM_PREFIX + k: str(v) for k, v in config.items()},
            },
        )
        name = f"train-trial_id={trial_id}"
        if in_process(resources, storage):
            selection = {"metric": metric, "mode": mode}
            train_dir = Path(storage) / name
            threads = int(resources["cpus_per_worker"])
            # an exception (or ASHA stopping the trial) leaves the run to CloseChildRuns
            outcome = run_in_process(cfg, ref, train_dir, selection, threads)
            if outcome.get("status") == "nonfinite":
                finish_run(ref, "FAILED", outcome.get("error"))
                raise RuntimeError(f"trial {trial_id}: {outcome.get('error')}")
            finish_run(ref, "FINISHED")
            return

        settings = RayTrainSettings(
            workers=resources["workers"],
            cpus_per_worker=resources["cpus_per_worker"],
            gpus_per_worker=resources["gpus_per_worker"],
            max_failures=1,
            selection_metric=metric,
            selection_mode=mode,
        )
        trainer = build_trainer(
            cfg,
            settings,
            name=name,
            storage_path=storage,
            run=ref,
            callbacks=[TuneReportCallback()],
        )
        try:
            result = trainer.fit()
        except ray.train.TrainingFailedError as err:
            finish_run(ref, "FAILED", f"{type(err).__name__}: {err}")
            raise
        outcome = result.return_value or {}
        if outcome.get("status") == "nonfinite":
            finish_run(ref, "FAILED", outcome.get("error"))
            raise RuntimeError(f"trial {trial_id}: {outcome.get('error')}")
        finish_run(ref, "FINISHED")

    trainable.__name__ = f"comm_trial_{sweep_name}".replace("-", "_")
    return trainable
