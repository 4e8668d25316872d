"""The Ray Train worker function: a thin shell around `PretrainRun`.

Each of the N workers builds the same `PretrainRun` with its rank (DistributedSampler shard,
negatives gathered across workers by the objectives), synchronises BatchNorm over the global
batch (`train.batchnorm_sync`: all, head or none; none whenever `sync_batchnorm=False`),
averages gradients with DDP or after the backward pass (`train.grad_sync`), and after every
epoch calls `ray.train.report` with a checkpoint (a barrier every rank joins). Rank 0 writes
`checkpoint.pt` (self-describing, `commlab.checkpoint_format`); every rank adds its own RNG
state as `rng-rank<r>.pt` (Ray merges the ranks' directories). A restarted attempt resumes from
`ray.train.get_checkpoint()`: model, optimiser, epoch (which fixes the LR schedule and the
sampler's permutation) and RNG.

Rank 0 alone logs to MLflow through `commlab.tracking`, into the run the driver opened: an
epoch's metrics are logged only after its checkpoint was reported, and a resumed attempt first
logs the checkpoint's own epoch if MLflow lacks it, so every epoch appears exactly once.

A non-finite loss raises on every rank at the same step (the finite flag is all-reduced); the
worker catches it and *returns* a failure record instead of raising, because Ray would otherwise
retry a deterministic failure `max_failures` times. The last good checkpoint stays registered.

Test-only hooks (`train_loop_config["hooks"]`; the CLI never sets them):
  kill: {"epoch": e, "rank": r, "marker": "/abs/file"} -- once epoch e's checkpoint is committed,
        rank r SIGKILLs its own process, once per marker file (a lost worker).
  nan_at_step: k -- the k-th training step of an attempt (from 0) yields a NaN loss and NaN
        first term.
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from commlab import dist
from commlab.checkpoint_format import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from commlab.config import ExperimentConfig, to_yaml
from commlab.data import DataBundle, build_data
from commlab.models.norm import sync_batchnorm
from commlab.objectives import LossOutput
from commlab.tags import ATTEMPTS_TAG, RESUMED_FROM_EPOCH_TAG, WORKERS_TAG
from commlab.tracking import RunLogger
from commlab.train.checkpoint import rng_state, set_rng_state
from commlab.train.epoch_end import checkpoint_payload, format_progress
from commlab.train.loop import (
    NonFiniteLossError,
    PretrainRun,
    WorkerContext,
    resolve_grad_sync,
    say,
)

# ---------------------------------------------------------------- console
REPORT_LINES = ("Checkpoint successfully created at", "Reporting training result")


class _WithoutReportLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.INFO or not record.getMessage().startswith(REPORT_LINES)


def quiet_report_lines() -> None:
    """Keep Ray Train's per-report INFO lines (`REPORT_LINES`) off this worker's console
    handlers; its file handlers (Ray's session logs) still get them. Idempotent."""
    for handler in logging.getLogger("ray.train").handlers:
        console = isinstance(handler, logging.StreamHandler) and not isinstance(
            handler, logging.FileHandler
        )
        if console and not any(isinstance(f, _WithoutReportLines) for f in handler.filters):
            handler.addFilter(_WithoutReportLines())


# ---------------------------------------------------------------- synchronised BatchNorm
def sync_scope(method: nn.Module, device: torch.device, scope: str | bool = "all") -> None:
    """Convert `method`'s BatchNorm layers in place to global-batch statistics per `scope`
    (`train.batchnorm_sync`): "all"; "head" (only the projection heads', whose statistics
    shape the contrastive loss; encoders then normalise each worker's shard); "none".
    True / False mean "all" / "none"."""
    if not isinstance(scope, str):
        scope = "all" if scope else "none"
    if scope not in ("all", "head", "none"):
        raise ValueError(f"BatchNorm sync scope must be all, head or none, got {scope!r}")
    targets: list[nn.Module] = []
    if scope == "all":
        targets = [method]
    elif scope == "head":
        targets = list(getattr(method, "projection_heads", list)())
    for module in targets:
        converted = sync_batchnorm(module, device)
        assert converted is module  # conversion replaces children; PretrainRun keeps `method`


def wrap_for_data_parallel(
    method: nn.Module, ctx: WorkerContext, sync_bn: str | bool = "all", grad_sync: str = "ddp"
) -> nn.Module:
    """`method` ready for data parallelism over `ctx.world_size` workers: BatchNorm synced over
    `sync_bn` (see `sync_scope`), then DDP around it (`grad_sync` "ddp"), or `method` itself
    when the training loop averages the gradients (`grad_sync` "deferred", see
    `PretrainRun._backward`). One worker: `method` unchanged."""
    if ctx.world_size == 1:
        return method
    sync_scope(method, ctx.device, sync_bn)
    if grad_sync == "deferred":
        return method
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    # Buffers are synced once at init, never per step: synced BatchNorm keeps them identical
    # on every rank; unsynced layers (scope head / none) keep each rank's shard statistics and
    # rank 0's are checkpointed.
    return nn.parallel.DistributedDataParallel(
        method, device_ids=device_ids, forward_sync_buffers=False
    )


class _NanAtStep(nn.Module):
    """Test hook: the k-th call (training step) returns a NaN loss and NaN first term."""

    def __init__(self, inner: nn.Module, step: int) -> None:
        super().__init__()
        self.inner = inner
        self.step = step
        self.calls = 0

    def forward(self, *args: Any, **kwargs: Any) -> LossOutput:
        out: LossOutput = self.inner(*args, **kwargs)
        self.calls += 1
        if self.calls - 1 != self.step:
            return out
        nan = torch.tensor(float("nan"))
        terms = dict(out.terms)
        if terms:
            terms[next(iter(terms))] = nan
        return LossOutput(out.loss * nan, terms, out.acc)


# ---------------------------------------------------------------- building blocks
def worker_device(cfg: ExperimentConfig) -> torch.device:
    if cfg.train.device != "cpu" and torch.cuda.is_available():
        import ray.train.torch  # lazy: local runs (`--workers 0`, sweep trials) never load Ray

        return ray.train.torch.get_device()
    if cfg.train.device == "cuda":
        raise ValueError("train.device=cuda but this worker sees no CUDA device")
    return torch.device("cpu")


def load_data(cfg: ExperimentConfig, rank: int) -> DataBundle:
    """Rank 0 builds first (generators such as Trifeatures write the data once), then the rest."""
    d = cfg.data
    data = build_data(d.name, d.path, cfg.seed, d.params) if rank == 0 else None
    dist.barrier()
    return data if data is not None else build_data(d.name, d.path, cfg.seed, d.params)


def build_run(
    cfg: ExperimentConfig,
    ctx: WorkerContext,
    hooks: dict[str, Any] | None = None,
    sync_bn: bool = True,
) -> PretrainRun:
    """The worker's PretrainRun: data loaded rank 0 first, model in DDP with BatchNorm synced
    over `cfg.train.batchnorm_sync` (none at all when `sync_bn` is False)."""
    hooks = hooks or {}
    scope = cfg.train.batchnorm_sync if sync_bn else "none"

    def wrap(method: nn.Module) -> nn.Module:
        model = wrap_for_data_parallel(method, ctx, scope, resolve_grad_sync(cfg, ctx))
        if hooks.get("nan_at_step") is not None:
            model = _NanAtStep(model, int(hooks["nan_at_step"]))
        return model

    return PretrainRun(cfg, ctx, data=load_data(cfg, ctx.rank), wrap_model=wrap)


def resume(run: PretrainRun, checkpoint_dir: str | Path) -> dict[str, float]:
    """Load a reported checkpoint into `run` (this rank's RNG when present); its metrics."""
    root = Path(checkpoint_dir)
    state = load_checkpoint(root / CHECKPOINT_NAME)
    run.load_state_dict(state)
    own = root / f"rng-rank{run.ctx.rank}.pt"
    if own.is_file() and run.ctx.rank != 0:
        set_rng_state(torch.load(own, weights_only=True))
    return dict(state.get("metrics") or {})


def report_metrics(metrics: dict[str, float], selection: dict[str, str]) -> dict[str, float]:
    """What Ray sees: the epoch's metrics; a selection metric missing this epoch (e.g. a probe
    metric between probes) is NaN, which Ray's checkpoint ranking places last."""
    out = dict(metrics)
    out.setdefault(selection["metric"], float("nan"))
    return out


def _kill_if_planned(plan: dict[str, Any] | None, epoch: int, rank: int) -> None:
    if not plan or plan["epoch"] != epoch or plan["rank"] != rank:
        return
    marker = Path(plan["marker"])
    if marker.exists():
        return
    import ray.train  # lazy: this module also serves runs without Ray

    # Make "resumed from the last checkpoint" deterministic: wait until Ray has committed it.
    ray.train.get_all_reported_checkpoints(
        consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED
    )
    marker.write_text(f"killed rank {rank} after epoch {epoch}\n")
    os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------- the worker function
Report = Callable[[dict[str, float], str, int, Callable[[], None]], None]


def run_training(
    cfg: ExperimentConfig,
    ctx: WorkerContext,
    report: Report,
    *,
    run_ref: Any = None,
    resume_from: Callable[[PretrainRun], dict[str, float]] | None = None,
    hooks: dict[str, Any] | None = None,
    sync_bn: bool = True,
) -> dict[str, Any]:
    """One worker's pretraining with per-epoch checkpoints, wherever it runs (a Ray Train
    worker, or a sweep trial's own process). `report(metrics, checkpoint_dir, epoch)` hands each
    epoch's checkpoint directory to the runner (a barrier under Ray Train); `resume_from(run)`
    loads the checkpoint to continue from and returns its metrics; rank 0 logs to `run_ref`'s
    MLflow run. `report(metrics, checkpoint_dir, epoch, log)` calls `log()` (rank 0's progress
    line and MLflow epoch) once the checkpoint is committed; under Ray Train after the report,
    in a trial's own process before it (ASHA may end the process at that report).
    Returns {"status": "finished" | "nonfinite", "epoch", "error"}; a finished attempt adds
    "trained" (False when it resumed after the last epoch) and "metrics" (its final ones)."""
    run = build_run(cfg, ctx, hooks, sync_bn=sync_bn)
    resumed = resume_from(run) if resume_from is not None else {}

    logger = None
    if ctx.rank == 0 and run_ref is not None:
        logger = RunLogger(run_ref)
        attempt = int(logger.client.get_run(logger.ref.run_id).data.tags.get(ATTEMPTS_TAG, 0))
        logger.set_tags({ATTEMPTS_TAG: attempt + 1, WORKERS_TAG: ctx.world_size})
        if resume_from is not None:
            logger.set_tags({RESUMED_FROM_EPOCH_TAG: run.epoch})
            if run.epoch > 0 and resumed:
                logger.log_epoch(run.epoch - 1, resumed)

    def on_epoch_end(epoch: int, metrics: dict[str, float], r: PretrainRun) -> None:
        def log() -> None:
            if ctx.rank == 0:
                say(format_progress(epoch, cfg.train.epochs, metrics))
                if logger is not None:
                    logger.log_epoch(epoch, metrics)

        with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
            if ctx.rank == 0:
                save_checkpoint(Path(tmp) / CHECKPOINT_NAME, checkpoint_payload(r, metrics))
            else:
                torch.save(rng_state(), Path(tmp) / f"rng-rank{ctx.rank}.pt")
            report(metrics, tmp, epoch, log)

    try:
        trained = run.fit(on_epoch_end)
    except NonFiniteLossError as err:
        return {"status": "nonfinite", "epoch": run.epoch, "error": str(err)}
    final = trained or resumed  # an attempt that resumed after the last epoch trains nothing
    if logger is not None:
        with tempfile.TemporaryDirectory() as tmp:
            path = save_checkpoint(Path(tmp) / CHECKPOINT_NAME, checkpoint_payload(run, final))
            logger.log_artifact(path, "checkpoint")
        logger.log_text(to_yaml(cfg), "config.yaml")
        logger.log_rus(final, run.data.probe.tasks, title=f"{cfg.name} ({cfg.model.method})")
    return {
        "status": "finished",
        "epoch": run.epoch,
        "error": None,
        "trained": bool(trained),
        "metrics": final,
    }


def replays_last_epoch(outcome: dict[str, Any]) -> bool:
    """Whether an attempt resumed after its last epoch and so reported nothing: a Tune trial
    restarted there (its driver died before recording it as done) must report that epoch's
    result once more, or Tune rejects it for never reporting its metric."""
    return outcome["status"] == "finished" and not outcome["trained"]


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train entry point. `config`: cfg (ExperimentConfig as JSON), run (RunRef or None),
    selection ({"metric", "mode"}), sync_batchnorm (bool, default True), hooks (test-only, see
    the module docstring).

    Returns (rank 0's value becomes `Result.return_value`) {"status": "finished" |
    "nonfinite", "epoch": next epoch to run, "error": message or None}.
    """
    import ray.train  # lazy: this module also serves runs without Ray

    quiet_report_lines()
    cfg = ExperimentConfig.model_validate(config["cfg"])
    hooks = config.get("hooks") or {}
    selection = config.get("selection") or {"metric": "train/loss", "mode": "min"}
    tctx = ray.train.get_context()
    ctx = WorkerContext(tctx.get_world_rank(), tctx.get_world_size(), worker_device(cfg))
    start = ray.train.get_checkpoint()

    def resume_from(run: PretrainRun) -> dict[str, float]:
        assert start is not None
        with start.as_directory() as d:
            return resume(run, d)

    def report(
        metrics: dict[str, float], directory: str, epoch: int, log: Callable[[], None]
    ) -> None:
        ckpt = ray.train.Checkpoint.from_directory(directory)
        ray.train.report(report_metrics(metrics, selection), checkpoint=ckpt)
        _kill_if_planned(hooks.get("kill"), epoch, ctx.rank)
        log()

    outcome = run_training(
        cfg,
        ctx,
        report,
        run_ref=config.get("run"),
        resume_from=resume_from if start is not None else None,
        hooks=hooks,
        sync_bn=bool(config.get("sync_batchnorm", True)),
    )
    if replays_last_epoch(outcome):  # every rank alike
        ray.train.report(report_metrics(outcome["metrics"], selection))
    return outcome
