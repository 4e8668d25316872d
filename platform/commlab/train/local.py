"""Single-process pretraining: the same per-epoch loop as on Ray Train, with world size 1.

Writes into the run directory: checkpoint.pt (self-describing, every epoch, atomically),
config.yaml (resolved), metrics.jsonl (one line per epoch) and, for datasets with R/U/S tasks,
rus.{json,md,png}. With tracking on (the default) the run is also an MLflow run at
$MLFLOW_TRACKING_URI (default sqlite:///<cwd>/mlflow.db): params, per-epoch metrics, the final
checkpoint, config and R/U/S report, as a Ray Train run logs them; --resume continues that run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from commlab.checkpoint_format import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from commlab.config import ExperimentConfig, flatten, to_yaml
from commlab.rus import rus_report
from commlab.tags import RUN_DIR_TAG, WORKERS_TAG
from commlab.tracking import RunLogger
from commlab.tracking.runs import open_pretrain_run
from commlab.train.epoch_end import checkpoint_payload, format_progress
from commlab.train.loop import NonFiniteLossError, PretrainRun
from commlab.train.plumbing import finish, fresh_name


@dataclass
class PretrainResult:
    run_dir: Path
    checkpoint: Path
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    rus: dict[str, float] | None = None
    mlflow_run_id: str | None = None


def pretrain_local(
    cfg: ExperimentConfig,
    run_dir: str | Path | None = None,
    resume: bool = False,
    console: Console | None = None,
    *,
    tracking: bool = True,
    tracking_uri: str | None = None,
    experiment: str | None = None,
) -> PretrainResult:
    """Pretrain in this process. `resume=True` continues from `run_dir/checkpoint.pt` (and its
    MLflow run). `experiment` defaults to the config's name."""
    console = console or Console()
    base = Path(run_dir) if run_dir else Path(cfg.train.out_dir) / cfg.name
    if resume:
        if not (base / CHECKPOINT_NAME).is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {base / 'checkpoint.pt'}")
        out = base
    else:
        out = base.parent / fresh_name(str(base.parent), base.name)
    if resume:  # an unreadable checkpoint fails here, before the MLflow run is touched
        load_checkpoint(out / CHECKPOINT_NAME)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(cfg))

    logger = _open_tracking(cfg, out, tracking_uri, experiment) if tracking else None
    ref = logger.ref if logger is not None else None
    console.print(
        f"[bold]commlab pretrain[/] {cfg.name}: method={cfg.model.method} -> {out}"
        + (f"  (MLflow run {logger.ref.run_id})" if logger else "")
    )
    try:
        result = _fit(cfg, out, resume, console, logger)
    except NonFiniteLossError as err:
        finish(ref, "FAILED", str(err))
        raise
    except KeyboardInterrupt:
        finish(ref, "KILLED", "interrupted")
        raise
    except Exception as err:
        finish(ref, "FAILED", f"{type(err).__name__}: {err}")
        raise
    finish(ref, "FINISHED")
    return result


def _fit(
    cfg: ExperimentConfig, out: Path, resume: bool, console: Console, logger: Any
) -> PretrainResult:
    run = PretrainRun(cfg)
    if resume:
        run.load_state_dict(load_checkpoint(out / CHECKPOINT_NAME))
        console.print(f"resumed at epoch {run.epoch}/{cfg.train.epochs}")
    console.print(
        f"data: {run.data.description or cfg.data.name}; {len(run.train_ids)} train samples, "
        f"{run.steps_per_epoch} steps/epoch of {cfg.data.batch_size}"
    )
    ckpt_path = out / CHECKPOINT_NAME
    metrics_file = out / "metrics.jsonl"

    def on_epoch_end(epoch: int, metrics: dict[str, float], r: PretrainRun) -> None:
        console.print(format_progress(epoch, cfg.train.epochs, metrics))
        with metrics_file.open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        save_checkpoint(ckpt_path, checkpoint_payload(r, metrics))
        if logger is not None:
            logger.log_epoch(epoch, metrics)

    final = run.fit(on_epoch_end)
    report = rus_report(final, run.data.probe.tasks)
    rus = report.rus if report else None
    title = f"{cfg.name} ({cfg.model.method})"
    if report:
        paths = report.write(out, title=title)
        console.print(
            "R/U/S: "
            + "  ".join(f"{k} {v:.3f}" for k, v in report.rus.items())
            + f"  (report: {paths['md']})"
        )
    if logger is not None:
        logger.log_artifact(ckpt_path, "checkpoint")
        logger.log_text(to_yaml(cfg), "config.yaml")
        logger.log_rus(final, run.data.probe.tasks, title=title)
    console.print(f"checkpoint: {ckpt_path}")
    run_id = logger.ref.run_id if logger is not None else None
    return PretrainResult(out, ckpt_path, final, run.history, rus, run_id)


def _open_tracking(
    cfg: ExperimentConfig, out: Path, tracking_uri: str | None, experiment: str | None
) -> Any:
    run_dir = str(out.resolve())
    ref = open_pretrain_run(
        tracking_uri,
        experiment or cfg.name,
        run_key=run_dir,
        run_name=out.name,
        params=flatten(cfg),
        method=cfg.model.method,
        tags={RUN_DIR_TAG: run_dir, WORKERS_TAG: 0},
    )
    return RunLogger(ref)
