"""The per-worker pretraining loop, written for world size N (1 locally, N on Ray Train).

`PretrainRun` owns data, model, augmentations, optimiser and schedule for one worker.
`run_epoch` trains one epoch and returns globally averaged metrics; `probe` extracts frozen
features on rank 0 and broadcasts the metrics so no rank waits on a collective the others skip.
`fit` drives epochs and calls `on_epoch_end(epoch, metrics, run)` where the caller reports,
checkpoints and logs. It imports neither Ray nor MLflow.

Speed settings are resolved once per run, on its first batch (`train.precision`, `train.fusion`
`auto`: a cached measurement of this model's own step on this device, see commlab.perf; rank 0
decides and broadcasts so every worker computes the same way) and change the numbers only within
floating-point rounding. `perf/mfu` follows commlab.perf's one definition: the step time here
includes batching and augmentation, and the peak is the compute dtype's dense compute peak,
re-measured between epochs for at most 2 % of the run's time (`perf.PeakBudget`).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DistributedSampler

from commlab import dist
from commlab.augment import build_augmenter
from commlab.config import ExperimentConfig
from commlab.data import DataBundle, MultimodalDataset, build_data
from commlab.models import Method, build_method
from commlab.models.norm import local_batchnorm
from commlab.perf import (
    COMPUTE_DTYPE,
    NO_NATIVE_BF16,
    PeakBudget,
    autocast,
    bf16_is_emulated,
    choose_step_precision,
    dense_peak_flops,
    device_key,
    mfu,
    step_flops,
    timed_choice,
)
from commlab.probe import run_probes
from commlab.train.checkpoint import rng_state, set_rng_state


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss; the message names the step and the term."""


def say(line: str) -> None:
    """Write one progress line to stdout and flush.

    Not through `print`: Ray Train V2 replaces `print` in its workers with one that writes to
    the worker's stdout (which Ray already forwards to the driver) and also to Train's logger
    (forwarded again), so every line reached the user's terminal twice.
    """
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


@dataclass
class WorkerContext:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device=cuda but no CUDA device is available")
    return torch.device(name)


def resolve_grad_sync(cfg: ExperimentConfig, ctx: WorkerContext) -> str:
    """How this run averages gradients: "none" with one worker, else `train.grad_sync`
    ("ddp" or "deferred", see `PretrainRun._backward`)."""
    return "none" if ctx.world_size == 1 else cfg.train.grad_sync


def rank_seed(seed: int, rank: int) -> int:
    """The global torch seed of worker `rank` after model construction (rank 0 keeps `seed`)."""
    return seed + 1_000_033 * rank


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def model_signature(cfg: ExperimentConfig, batch: Any) -> str:
    """What a training step's speed depends on besides the device: the model's architecture
    (its config section), the memory format and the batch's shapes."""
    digest = hashlib.sha1(cfg.model.model_dump_json().encode()).hexdigest()[:12]
    shapes = ",".join(str(tuple(x.shape)) for x in batch.xs)
    return f"{cfg.model.method}|model={digest}|channels_last={cfg.train.channels_last}|{shapes}"


def resolve_precision(
    method: nn.Module, cfg: ExperimentConfig, device: torch.device, view_a: Any, view_b: Any
) -> tuple[str, str]:
    """(`fp32` | `bf16-mixed`, why): as configured, or (`auto`) whichever runs this model's
    step faster on this device, measured once and cached (`commlab.perf`)."""
    if cfg.train.precision != "auto":
        if cfg.train.precision == "bf16-mixed" and bf16_is_emulated(device):
            return cfg.train.precision, f"configured, but {NO_NATIVE_BF16}"
        return cfg.train.precision, "configured"
    signature = model_signature(cfg, view_a)
    choice, entry = choose_step_precision(
        method, view_a, view_b, device, signature, local_copy=_local_copy
    )
    secs = entry.get("seconds") or {}
    if not secs:
        return choice, f"auto: {entry.get('reason', '')}"
    timing = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in sorted(secs.items()))
    return choice, f"auto: this model's step on this device ({timing})"


def _local_copy(method: nn.Module) -> nn.Module:
    return local_batchnorm(copy.deepcopy(method))


def has_conv(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in module.modules())


def make_optimizer(params: list[dict[str, Any]], cfg: ExperimentConfig) -> torch.optim.Optimizer:
    """AdamW, one fused kernel over all parameters where torch has one for the device (CPU and
    CUDA): the same update as the per-parameter loop, a fraction of its time."""
    kwargs: dict[str, Any] = {"lr": cfg.optim.lr, "betas": cfg.optim.betas}
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, **kwargs)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on biases, norm parameters and other 1-D parameters."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_norm = any(k in name.lower() for k in ("norm", ".ln", "ln_", "bn")) or ".bias" in name
        (no_decay if p.ndim < 2 or is_norm else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def lr_factor(cfg: ExperimentConfig, epoch: int) -> float:
    """Per-epoch multiplier of optim.lr: linear warmup, then cosine to min_lr (or constant)."""
    o, total = cfg.optim, cfg.train.epochs
    if o.scheduler == "none":
        return 1.0
    if epoch < o.warmup_epochs:
        start = o.warmup_start_lr / o.lr
        return start + (1.0 - start) * epoch / o.warmup_epochs
    span = max(1, total - o.warmup_epochs)
    progress = (epoch - o.warmup_epochs) / span
    floor = o.min_lr / o.lr
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class PretrainRun:
    def __init__(
        self,
        cfg: ExperimentConfig,
        ctx: WorkerContext | None = None,
        data: DataBundle | None = None,
        wrap_model: Callable[[nn.Module], nn.Module] | None = None,
    ) -> None:
        self.cfg = cfg
        self.ctx = ctx or WorkerContext(device=resolve_device(cfg.train.device))
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        seed_everything(cfg.seed)
        d = cfg.data
        self.data = data or build_data(d.name, d.path, cfg.seed, d.params)
        ds = self.data.pretrain
        self.kinds = [m.kind for m in ds.modalities]
        shapes = [tuple(m.values.shape[1:]) for m in ds.modalities]
        self.method: Method = build_method(cfg, shapes).to(self.ctx.device)
        if cfg.train.channels_last and has_conv(self.method):
            # Module.to takes memory_format at run time; torch's overloads leave it out
            self.method.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.grad_sync = resolve_grad_sync(cfg, self.ctx)
        self.model: nn.Module = wrap_model(self.method) if wrap_model else self.method
        if self.grad_sync == "deferred":  # DDP would have made rank 0's weights everyone's
            dist.broadcast_module(self.method, src=0)
        if self.ctx.world_size > 1:
            # Same initial weights everywhere (seeded above), but each rank its own dropout
            # masks from here on: identical masks on every worker would correlate their gradients.
            torch.manual_seed(rank_seed(cfg.seed, self.ctx.rank))
        self.augment = build_augmenter(cfg.augment, self.kinds)
        self.optimizer = make_optimizer(param_groups(self.method, cfg.optim.weight_decay), cfg)
        # `auto` is decided on the first batch (`_first_step`); nothing runs before it
        self.precision: str = "fp32" if cfg.train.precision == "auto" else cfg.train.precision
        self.settings_note = ""  # precision, fusion, compile: set on the first batch
        self.compiled = False
        self.train_ids = ds.split("train")
        per_rank = d.batch_size // self.ctx.world_size
        if per_rank < 2:
            raise ValueError(
                f"data.batch_size={d.batch_size} gives {per_rank} sample(s) per worker with "
                f"{self.ctx.world_size} workers; need at least 2"
            )
        self.per_rank_batch = per_rank
        self.sampler: DistributedSampler[int] = DistributedSampler(
            range(len(self.train_ids)),  # type: ignore[arg-type]
            num_replicas=self.ctx.world_size,
            rank=self.ctx.rank,
            shuffle=True,
            seed=cfg.seed,
            drop_last=True,
        )
        self.steps_per_epoch = len(self.sampler) // per_rank
        if cfg.train.max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, cfg.train.max_steps_per_epoch)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the train split has {len(self.train_ids)} samples: too few for one batch of "
                f"{d.batch_size} on {self.ctx.world_size} worker(s)"
            )
        self.epoch = 0  # next epoch to run
        self.global_step = 0
        self.flops_per_step: float | None = None
        self.peaks = PeakBudget(lambda dtype: dense_peak_flops(self.ctx.device, dtype))
        self.history: list[dict[str, float]] = []

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch,
            "global_step": self.global_step,
            "rng": rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.method.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch = int(state["epoch"])
        self.global_step = int(state["global_step"])
        set_rng_state(state["rng"])

    # ---------------------------------------------------------------- training
    def _agreed(self, decide: Callable[[], Any]) -> Any:
        """`decide()` on rank 0, the same answer on every rank. Whether it measures (nothing
        cached yet) or not, the random streams training draws from are left as they were."""
        devices = [self.ctx.device] if self.ctx.device.type == "cuda" else []

        def isolated() -> Any:
            with torch.random.fork_rng(devices=devices):
                return decide()

        if not dist.is_dist():
            return isolated()
        return dist.broadcast_object(isolated() if self.ctx.rank == 0 else None, src=0)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        return autocast(self.ctx.device, self.precision)

    def _first_step(self, va: Any, vb: Any) -> None:
        """Once per run, on the first batch: count the step's FLOPs (eager, on a copy), pick the
        precision and the fusion path, then compile if asked (after the FLOP count, which
        copies the model)."""
        self.flops_per_step = step_flops(self.method, va, vb)
        resolve = functools.partial(resolve_precision, self.method, self.cfg, self.ctx.device)
        if self.cfg.train.precision == "auto":  # measured: every rank follows rank 0
            self.precision, why = self._agreed(lambda: resolve(va, vb))
        else:
            self.precision, why = resolve(va, vb)
        self.settings_note = f"precision {self.precision} ({why})"
        options = self.method.fusion_options(va, vb)
        if options:
            path = self.cfg.train.fusion
            if path == "auto":
                path = self._agreed(lambda: self._time_fusion(options, va))
            self.method.fusion_path = path
            self.optimizer.zero_grad(set_to_none=True)  # the timing's gradients
            self.settings_note += f", fusion {path}"
        scope = self.cfg.train.compile
        if scope != "off" and not self.compiled:
            what = self.method.compile_step(scope)
            self.compiled = True
            self.settings_note += f", compiled ({scope}: {what})"
        if self.ctx.rank == 0:
            say(f"[commlab] {self.settings_note}")

    def _time_fusion(self, options: dict[str, Callable[[], Any]], va: Any) -> str:
        def under_precision(fn: Callable[[], Any]) -> Callable[[], None]:
            def run() -> None:
                with self._autocast():
                    out = fn()
                out.backward()

            return run

        shapes = ",".join(str(tuple(x.shape)) for x in va.xs)
        key = f"fusion|{device_key(self.ctx.device)}|{self.precision}|{self.method.fusion_signature()}|{shapes}"
        candidates = {k: under_precision(fn) for k, fn in options.items()}
        choice, _ = timed_choice(key, candidates, default="packed", rounds=5)
        return choice

    def _views(self, ids: Tensor, gen: torch.Generator) -> tuple[Any, Any]:
        batch = self.data.pretrain.batch(self.train_ids[ids]).to(self.ctx.device)
        return self.augment(batch, gen), self.augment(batch, gen)

    def _set_lr(self, epoch: int) -> float:
        lr = self.cfg.optim.lr * lr_factor(self.cfg, epoch)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        return lr

    def run_epoch(self, epoch: int) -> dict[str, float]:
        cfg, ctx = self.cfg, self.ctx
        self.model.train()
        lr = self._set_lr(epoch)
        self.sampler.set_epoch(epoch)
        order = torch.tensor(list(iter(self.sampler)), dtype=torch.long)
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch * 1009 + ctx.rank)
        gather = cfg.loss.gather and ctx.world_size > 1
        sums: dict[str, float] = {}
        per_rank = self.per_rank_batch

        def views(step: int) -> tuple[Any, Any]:
            return self._views(order[step * per_rank : (step + 1) * per_rank], gen)

        t0 = time.perf_counter()
        upcoming = views(0)
        for step in range(self.steps_per_epoch):
            va, vb = upcoming
            if self.flops_per_step is None:  # every rank: synced BatchNorm communicates
                self._first_step(va, vb)
            with dist.equal_batch_sizes(), self._autocast():  # every rank: per_rank_batch rows
                out = self.model(va, vb, gather=gather)
            bad_anywhere = self._backward(out)
            if step + 1 < self.steps_per_epoch:  # meanwhile the gradients may be in transit
                upcoming = views(step + 1)
            self._check_finite(out, step, bad_anywhere())
            if cfg.optim.grad_clip > 0:
                nn.utils.clip_grad_norm_(self.method.parameters(), cfg.optim.grad_clip)
            self.optimizer.step()
            self.global_step += 1
            for k, v in {"loss": out.loss.detach(), **out.terms, **out.acc}.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        elapsed = time.perf_counter() - t0
        n = self.steps_per_epoch
        local = torch.tensor([sums[k] / n for k in sorted(sums)], dtype=torch.float64)
        averaged = dist.all_reduce_mean(local)
        metrics = {
            f"train/{k}": float(v) for k, v in zip(sorted(sums), averaged.tolist(), strict=True)
        }
        samples_per_s = n * self.per_rank_batch * ctx.world_size / elapsed
        metrics["perf/samples_per_s"] = samples_per_s
        metrics["perf/epoch_time_s"] = elapsed
        metrics["train/lr"] = lr
        if self.flops_per_step is not None:
            peak = self.peaks.peak(COMPUTE_DTYPE[self.precision])
            metrics["perf/mfu"] = mfu(self.flops_per_step, elapsed / n, peak)
        return metrics

    def _backward(self, out: Any) -> Callable[[], bool]:
        """The backward pass of `out.loss`; returns a call that completes the gradient
        averaging and says whether any rank's loss was non-finite.

        Every rank learns about a non-finite loss without waiting for it in the middle of the
        step: with DDP (or one worker) the flag's all-reduce starts before the backward pass;
        with `deferred` gradient sync it rides in the gradients' own all-reduce, which the
        caller overlaps with the next batch's augmentation before calling the result."""
        # on the loss's device: NCCL all-reduces only CUDA tensors
        bad = torch.isfinite(out.loss.detach()).logical_not().float().reshape(1)
        self.optimizer.zero_grad(set_to_none=True)
        if self.grad_sync != "deferred":
            bad_sum = dist.all_reduce_sum_later(bad)
            out.loss.backward()
            return lambda: float(bad_sum()) > 0
        out.loss.backward()
        params = [p for p in self.method.parameters() if p.requires_grad]
        finish = dist.average_gradients_later(params, bad)

        def done() -> bool:
            summed = finish()
            return summed is not None and float(summed) > 0

        return done

    def _check_finite(self, out: Any, step: int, bad_anywhere: bool) -> None:
        """Raise on every rank together when any rank's loss was non-finite (before the
        optimiser step: the weights stay those of the last finite step)."""
        if not bad_anywhere:
            return
        terms = [k for k, v in out.terms.items() if not math.isfinite(float(v))]
        which = ", ".join(terms) if terms else "loss"
        raise NonFiniteLossError(
            f"non-finite loss at epoch {self.epoch} step {step} (global step {self.global_step}); "
            f"non-finite term(s): {which}"
        )

    # ---------------------------------------------------------------- probing
    @torch.no_grad()
    def extract(self, ds: MultimodalDataset, ids: Tensor, batch_size: int = 256) -> Tensor:
        self.method.eval()
        feats = []
        for i in range(0, len(ids), batch_size):
            batch = self.augment.prepare(ds.batch(ids[i : i + batch_size]).to(self.ctx.device))
            with self._autocast():
                feats.append(self.method.features(batch).float().cpu())
        self.method.train()
        return torch.cat(feats)

    def probe(self) -> dict[str, float]:
        metrics: dict[str, float] | None = None
        if self.ctx.rank == 0:
            metrics = self._probe_local()
        metrics = dist.broadcast_object(metrics, src=0)
        assert metrics is not None
        return metrics

    def _probe_local(self) -> dict[str, float]:
        t0 = time.perf_counter()
        ds = self.data.probe
        tasks = {
            k: t
            for k, t in ds.tasks.items()
            if self.cfg.data.probe_tasks is None or k in self.cfg.data.probe_tasks
        }
        if not tasks:
            return {}
        train_ids = ds.split("train")
        cap = self.cfg.data.probe_max_train
        if cap is not None and len(train_ids) > cap:
            g = torch.Generator().manual_seed(12345)
            train_ids = train_ids[torch.randperm(len(train_ids), generator=g)[:cap]]
        test_ids = ds.split("test")
        x_tr, x_te = self.extract(ds, train_ids), self.extract(ds, test_ids)
        y_tr = {k: ds.labels[k][train_ids].numpy() for k in tasks}
        y_te = {k: ds.labels[k][test_ids].numpy() for k in tasks}
        out = run_probes(x_tr.numpy(), y_tr, x_te.numpy(), y_te, tasks, seed=self.cfg.seed)
        out["perf/probe_time_s"] = time.perf_counter() - t0
        return out

    def should_probe(self, epoch: int) -> bool:
        k = self.cfg.train.probe_every
        last = epoch == self.cfg.train.epochs - 1
        return last or (k > 0 and (epoch + 1) % k == 0)

    # ---------------------------------------------------------------- driver
    def fit(
        self, on_epoch_end: Callable[[int, dict[str, float], PretrainRun], None] | None = None
    ) -> dict[str, float]:
        metrics: dict[str, float] = {}
        while self.epoch < self.cfg.train.epochs:
            epoch = self.epoch
            metrics = {"epoch": float(epoch), **self.run_epoch(epoch)}
            if self.should_probe(epoch):
                metrics.update(self.probe())
            self.epoch = epoch + 1
            self.history.append(metrics)
            if on_epoch_end is not None:
                on_epoch_end(epoch, metrics, self)
        return metrics
