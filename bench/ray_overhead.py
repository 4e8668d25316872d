"""Ray Train overhead and data-parallel scaling of CoMM pretraining, plus bf16 vs fp32 on CPU.

Workload: the Trifeatures smoke model (two conv encoders, 32 px) on generated Trifeatures pairs,
global batch 128, no probing. Every case trains the same epochs with a checkpoint per epoch:

  plain        PretrainRun in this process (the `--workers 0` path), checkpoint.pt every epoch
  plain-1t     the same with 1 torch thread
  ray-1w       Ray Train, 1 worker with every core (same torch threads as plain)
  ray-1w-1t    Ray Train, 1 worker, 1 CPU and 1 torch thread
  ray-2w-1t    Ray Train, 2 workers, 1 CPU and 1 torch thread each (gloo DDP, gathered
               negatives, every BatchNorm synced: train.batchnorm_sync=all, global batch
               split 64 + 64)
  ray-2w-1t-head  the same with only the projection head's BatchNorm synced (batchnorm_sync=head)
  ray-2w-1t-none  the same with per-worker BatchNorm statistics everywhere (batchnorm_sync=none)
  ray-2w-1t-none-deferred  ray-2w-1t-none with train.grad_sync=deferred (one gradient
               all-reduce after the backward pass, overlapped with the next batch's views)
               instead of DDP's (every other 2-worker case)
  ray-2w-1t-none-deferred-local  the same with loss.gather=false: each worker's negatives
               are its own 64 rows, not the global 128, so the step has one collective
               (the gradient all-reduce) instead of two. A different objective (half the
               negatives per anchor), measured so a user can weigh speed against it
Ray Train's own controller poll (2 s) against commlab's (`trainer.REPORT_POLL_S`) is no longer
a case: 8-epoch runs, 0.25 / 0.5 / 1 / 2 s interleaved over 3 rounds, read the 2 s poll at
0.90-0.95x of 0.25 s.

Ray runs as commlab starts it (`cluster.connect`: embedded, with the dashboard, whose State API
Ray Train's placement-group cleaner polls; without it the cleaner retries and logs all the time).
Throughput is samples per second of *wall time per epoch in steady state*: the median interval
between consecutive epoch checkpoints (`created_at` inside checkpoint.pt), first epoch excluded,
so it includes reporting and checkpointing but not Ray's one-off startup (reported apart).
`loop_samples_per_s` is the loop's own `perf/samples_per_s` (training steps only).
  ceiling-2p   2 independent in-process loops at once (batch 64 each, no communication): the
               best any 2-worker run could do on this machine at this moment; with each
               process's per-step times it also gives the synchronous ceiling: a
               synchronous run waits for the slower rank every step, so pairing the two
               processes' k-th steps, ceiling / (sum of the slower step / mean total) is the
               most a 2-worker run that communicates nothing but still waits could reach
  gloo-2w-1t-none  2 processes in a gloo process group on loopback, without Ray: the same
               worker code (build_run: DDP, gathered negatives, batchnorm_sync=none), so the
               difference to ray-2w-1t-none is what running under Ray Train costs
The 1-thread cases run interleaved over --rounds rounds (plain-1t, ceiling, 1w, 2w all, head,
none, gloo, deferred, deferred-local, then the same backwards; this machine's speed drifts by
tens of percent within minutes); their figures are medians of per-round ratios with min-max. Overhead = 1 - ray-1w / plain (once) and
1 - ray-1w-1t / plain-1t (per round); scaling = ray-2w-1t / ray-1w-1t (each worker on its own
core with torch threads = 1, so the ratio measures data parallelism, not thread contention);
ceiling = ceiling-2p / plain-1t; sync ceiling = ceiling / step_skew.
The precision section times 4-step epochs in this process, fp32 vs bf16-mixed (all cores,
then 1 thread).

    python bench/ray_overhead.py [--epochs 4] [--pairs 1024] [--rounds 2] [--out bench/results/ray_overhead.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from commlab.cluster import connect
from commlab.config import ExperimentConfig, apply_overrides, load_config, validate_config
from commlab.train.checkpoint import load_checkpoint, save_checkpoint
from commlab.train.local import checkpoint_payload
from commlab.train.loop import PretrainRun

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.gloo: the distributed tests' gloo runner


SCALING_CASES = [  # (label, workers, batchnorm_sync), interleaved per round
    ("plain-1t", 1, ""),
    ("ceiling-2p", 2, ""),
    ("ray-1w-1t", 1, "all"),
    ("ray-2w-1t", 2, "all"),
    ("ray-2w-1t-head", 2, "head"),
    ("ray-2w-1t-none", 2, "none"),
    ("gloo-2w-1t-none", 2, "none"),
    ("ray-2w-1t-none-deferred", 2, "none"),
    ("ray-2w-1t-none-deferred-local", 2, "none"),
]
SYNC_SCOPE_CASES = {"all": "ray-2w-1t", "head": "ray-2w-1t-head", "none": "ray-2w-1t-none"}
# (train.grad_sync, loss.gather) of the Ray cases that differ from ("ddp", True)
RAY_VARIANTS = {
    "ray-2w-1t-none-deferred": ("deferred", True),
    "ray-2w-1t-none-deferred-local": ("deferred", False),
}


def make_config(data_root: Path, pairs: int, epochs: int, *extra: str) -> ExperimentConfig:
    base = load_config(REPO / "configs" / "trifeatures" / "smoke.yaml")
    raw = base.model_dump(mode="json")
    overrides = [
        f"data.path={data_root}",
        f"data.params={{size: 32, pairs: {pairs}, test_pairs: 256, biased: false}}",
        "data.batch_size=128",
        "data.probe_tasks=[]",
        f"train.epochs={epochs}",
        "train.probe_every=0",
        "train.device=cpu",
        *extra,
    ]
    return validate_config(apply_overrides(raw, overrides))


def steady(intervals: list[float]) -> float:
    return statistics.median(intervals[1:] if len(intervals) > 2 else intervals)


def run_plain(cfg: ExperimentConfig, out: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    run = PretrainRun(cfg)
    setup = time.perf_counter() - t0
    ends: list[float] = []
    loop: list[float] = []

    def on_epoch_end(epoch: int, metrics: dict[str, float], r: PretrainRun) -> None:
        save_checkpoint(out / "checkpoint.pt", checkpoint_payload(r, metrics))
        ends.append(time.time())
        loop.append(metrics["perf/samples_per_s"])

    start = time.time()
    run.fit(on_epoch_end)
    intervals = [b - a for a, b in zip([start, *ends], ends, strict=False)]
    samples = run.steps_per_epoch * cfg.data.batch_size
    return {
        "samples_per_epoch": samples,
        "epoch_wall_s": steady(intervals),
        "samples_per_s": samples / steady(intervals),
        "loop_samples_per_s": statistics.median(loop[1:]),
        "startup_s": setup,
    }


def run_ray(
    cfg: ExperimentConfig,
    workers: int,
    cpus: float,
    storage: Path,
    scope: str = "all",
    grad_sync: str = "ddp",
    gather: bool = True,
) -> dict[str, Any]:
    from commlab.train.trainer import RayTrainSettings, build_trainer

    settings = RayTrainSettings(
        workers=workers,
        cpus_per_worker=cpus,
        num_to_keep=None,
        tracking=False,
        max_failures=0,
    )
    cfg = cfg.model_copy(deep=True)
    cfg.train.batchnorm_sync = scope  # type: ignore[assignment]
    cfg.train.grad_sync = grad_sync  # type: ignore[assignment]
    cfg.loss.gather = gather
    negatives = "global" if gather else "local"
    name = f"bench-{workers}w-{int(cpus)}c-{scope}bn-{grad_sync}-{negatives}"
    trainer = build_trainer(cfg, settings, name=name, storage_path=str(storage))
    start = time.time()
    trainer.fit()
    ckpts = sorted(
        (load_checkpoint(p / "checkpoint.pt") for p in (storage / name).glob("checkpoint_*/")),
        key=lambda c: c["epoch"],
    )
    ends = [c["created_at"] for c in ckpts]
    intervals = [b - a for a, b in zip(ends, ends[1:], strict=False)]
    loop = [c["metrics"]["perf/samples_per_s"] for c in ckpts]
    samples = ckpts[0]["metrics"]["perf/samples_per_s"] * ckpts[0]["metrics"]["perf/epoch_time_s"]
    epoch_wall = statistics.median(intervals)
    return {
        "samples_per_epoch": round(samples),
        "epoch_wall_s": epoch_wall,
        "samples_per_s": round(samples) / epoch_wall,
        "loop_samples_per_s": statistics.median(loop[1:]),
        # from fit() to the first checkpoint, minus one steady epoch: Ray + worker startup
        "startup_s": ends[0] - start - epoch_wall,
    }


def _independent(q: Any, cfg_json: dict[str, Any]) -> None:
    cfg = ExperimentConfig.model_validate(cfg_json)
    run = PretrainRun(cfg)
    ends: list[float] = []  # when each optimiser step returns: per-step times
    step = run.optimizer.step

    def timed_step(*args: Any, **kwargs: Any) -> Any:
        out = step(*args, **kwargs)
        ends.append(time.perf_counter())
        return out

    run.optimizer.step = timed_step  # type: ignore[method-assign]
    rates = [run.run_epoch(e)["perf/samples_per_s"] for e in range(cfg.train.epochs)]
    steady_ends = ends[run.steps_per_epoch :]  # first epoch excluded, as for the rates
    steps = [b - a for a, b in zip(steady_ends, steady_ends[1:], strict=False)]
    q.put((statistics.median(rates[1:]), steps))


def step_skew(steps: list[list[float]]) -> float:
    """sum over steps of the slowest process's step time / the mean process's total time.

    Independent processes each run at their own pace; a synchronous data-parallel run waits for
    the slowest rank at every step. Pairing the processes' k-th steps, this is the factor by which
    that waiting alone (no communication) would slow them: the ceiling divided by it is what a
    synchronous run could reach at best on this machine now."""
    n = min(len(s) for s in steps)
    slowest = sum(max(s[k] for s in steps) for k in range(n))
    return slowest / statistics.mean(sum(s[:n]) for s in steps)


def run_ceiling(cfg: ExperimentConfig, procs: int) -> dict[str, Any]:
    """`procs` independent single-process loops at once, each on batch / procs samples, no
    communication at all: the most any data-parallel run could get from this machine now, and
    (`step_skew`) the part of it a synchronous run loses to waiting for the slowest rank."""
    import multiprocessing as mp

    c = cfg.model_copy(deep=True)
    c.data.batch_size = cfg.data.batch_size // procs
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    ps = [
        ctx.Process(target=_independent, args=(q, c.model_dump(mode="json"))) for _ in range(procs)
    ]
    for p in ps:
        p.start()
    got = [q.get() for _ in ps]
    for p in ps:
        p.join()
    rates = [rate for rate, _ in got]
    return {
        "procs": procs,
        "loop_samples_per_s_each": rates,
        "loop_samples_per_s": sum(rates),
        "step_skew": step_skew([steps for _, steps in got]),
    }


def _gloo_rate(cfg_json: dict[str, Any], rank: int) -> float | None:
    """One gloo worker of `run_gloo`: the Ray workers' own training code (`build_run`)."""
    from commlab.train.loop import WorkerContext
    from commlab.train.worker import build_run

    cfg = ExperimentConfig.model_validate(cfg_json)
    world = torch.distributed.get_world_size()  # run_on_workers brought the group up
    run = build_run(cfg, WorkerContext(rank=rank, world_size=world))
    rates = [run.run_epoch(e)["perf/samples_per_s"] for e in range(cfg.train.epochs)]
    return statistics.median(rates[1:]) if rank == 0 else None


def run_gloo(cfg: ExperimentConfig, workers: int, scope: str) -> dict[str, Any]:
    """The Ray workers' training code on `workers` plain processes joined by gloo on loopback
    (no Ray; the distributed tests' runner, tests/gloo.py): rank 0's loop throughput, first
    epoch excluded."""
    from tests.gloo import run_on_workers

    c = cfg.model_copy(deep=True)
    c.train.batchnorm_sync = scope  # type: ignore[assignment]
    with tempfile.TemporaryDirectory() as out:
        rates = run_on_workers(
            functools.partial(_gloo_rate, c.model_dump(mode="json")),
            Path(out),
            world=workers,
            timeout_s=300,
        )
    return {"workers": workers, "batchnorm_sync": scope, "loop_samples_per_s": rates[0]}


def precision_case(cfg: ExperimentConfig, precision: str, threads: int) -> dict[str, Any]:
    c = cfg.model_copy(deep=True)
    c.train.precision = precision  # type: ignore[assignment]
    c.train.threads = threads
    c.train.max_steps_per_epoch = 4
    run = PretrainRun(c)
    rates = [run.run_epoch(e)["perf/samples_per_s"] for e in range(3)]
    return {
        "precision": precision,
        "threads": threads,
        "samples_per_s": statistics.median(rates[1:]),
    }


def with_load(fn: Any, *args: Any) -> dict[str, Any]:
    """`fn(*args)` plus the 1-minute load average before and after: other processes on this
    machine skew every number here, so the JSON says how busy it was."""
    before = os.getloadavg()[0]
    out = fn(*args)
    out["loadavg_1m"] = [round(before, 2), round(os.getloadavg()[0], 2)]
    return out


def spread(xs: list[float]) -> dict[str, Any]:
    """Per-round figures summarised: median, min, max and the rounds themselves."""
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "rounds": xs}


def machine() -> dict[str, Any]:
    import ray

    from commlab.perf import machine_info

    return {
        **machine_info(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "ray": ray.__version__,
        "device": "cpu",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--pairs", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the scaling cases")
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "commlab-bench")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "ray_overhead.json")
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    cores = os.cpu_count() or 1
    if os.getloadavg()[0] > 0.5:
        print(
            f"warning: load average {os.getloadavg()[0]:.2f} before starting: numbers will be skewed"
        )
    data = args.data.resolve() / "trifeatures"
    full = make_config(data, args.pairs, args.epochs, f"train.threads={cores}")
    one = make_config(data, args.pairs, args.epochs, "train.threads=1")
    results: dict[str, Any] = {"machine": machine(), "workload": {}, "cases": {}}
    per_round: dict[str, list[dict[str, Any]]] = {label: [] for label, _, _ in SCALING_CASES}
    results["workload"] = {
        "config": "configs/trifeatures/smoke.yaml (32 px, conv width 16, embed 64)",
        "pairs": args.pairs,
        "global_batch": full.data.batch_size,
        "epochs": args.epochs,
        "probe": "off",
        "mlflow": "off (tracking=False)",
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        print("plain (in-process) ...", flush=True)
        results["cases"]["plain"] = with_load(run_plain, full, root)
        connect(num_cpus=cores)  # as `commlab` starts Ray: embedded, dashboard on
        try:
            print("ray-1w ...", flush=True)
            results["cases"]["ray-1w"] = with_load(run_ray, full, 1, float(cores), root / "ray")
            for r in range(args.rounds):
                # odd rounds in reverse order: a drift within a round skews its ratios both ways
                cases = SCALING_CASES if r % 2 == 0 else SCALING_CASES[::-1]
                for label, workers, scope in cases:
                    print(f"{label} (round {r + 1}/{args.rounds}) ...", flush=True)
                    if label == "plain-1t":
                        out = with_load(run_plain, one, root)
                    elif label == "ceiling-2p":
                        out = with_load(run_ceiling, one, workers)
                    elif label.startswith("gloo"):
                        out = with_load(run_gloo, one, workers, scope)
                    else:
                        storage = root / f"ray-round{r}"  # each round's own checkpoints
                        sync, gather = RAY_VARIANTS.get(label, ("ddp", True))
                        out = with_load(run_ray, one, workers, 1.0, storage, scope, sync, gather)
                    per_round[label].append(out)
        finally:
            ray.shutdown()
        for label, runs in per_round.items():
            results["cases"][label] = {**runs[-1], "rounds": runs}
        results["ceiling_2p"] = results["cases"].pop("ceiling-2p")
        print("precision ...", flush=True)
        results["precision"] = [
            with_load(precision_case, full, p, t)
            for t in (cores, 1)
            for p in ("fp32", "bf16-mixed")
        ]

    c = results["cases"]
    results["ray_overhead"] = 1.0 - c["ray-1w"]["samples_per_s"] / c["plain"]["samples_per_s"]
    results["ray_loop_overhead"] = (
        1.0 - c["ray-1w"]["loop_samples_per_s"] / c["plain"]["loop_samples_per_s"]
    )

    def ratios(label: str, key: str, base: str = "ray-1w-1t") -> dict[str, Any]:
        """label / base per round on `key`: median, min, max, the rounds."""
        return spread(
            [a[key] / b[key] for a, b in zip(per_round[label], per_round[base], strict=True)]
        )

    results["ray_overhead_1t"] = 1.0 - ratios("ray-1w-1t", "samples_per_s", "plain-1t")["median"]

    results["ceiling_2p_vs_1"] = ratios("ceiling-2p", "loop_samples_per_s", "plain-1t")
    synced = [
        c2["loop_samples_per_s"] / c2["step_skew"] / c1["loop_samples_per_s"]
        for c2, c1 in zip(per_round["ceiling-2p"], per_round["plain-1t"], strict=True)
    ]
    skews = [c2["step_skew"] for c2 in per_round["ceiling-2p"]]
    results["sync_ceiling_2p_vs_1"] = {
        **spread(synced),
        "step_skew": skews,
        "step_skew_median": statistics.median(skews),
    }
    for suffix, key in (("", "samples_per_s"), ("_loop", "loop_samples_per_s")):
        by_scope = {scope: ratios(label, key) for scope, label in SYNC_SCOPE_CASES.items()}
        results[f"scaling_2w_vs_1w{suffix}_by_batchnorm_sync"] = by_scope
        results[f"scaling_2w_vs_1w{suffix}"] = by_scope["all"]["median"]
    results["scaling_2w_without_ray_loop"] = ratios("gloo-2w-1t-none", "loop_samples_per_s")
    results["scaling_2w_vs_1w_none_deferred_local_negatives"] = ratios(
        "ray-2w-1t-none-deferred-local", "samples_per_s"
    )
    results["scaling_2w_vs_1w_none_grad_sync_deferred"] = ratios(
        "ray-2w-1t-none-deferred", "samples_per_s"
    )
    results["grad_sync_deferred_vs_ddp_2w_none"] = ratios(
        "ray-2w-1t-none-deferred", "samples_per_s", "ray-2w-1t-none"
    )
    results["scaling_2w_vs_plain"] = c["ray-2w-1t"]["samples_per_s"] / c["plain"]["samples_per_s"]
    by = {(p["precision"], p["threads"]): p["samples_per_s"] for p in results["precision"]}
    results["bf16_speedup"] = {str(t): by[("bf16-mixed", t)] / by[("fp32", t)] for t in (cores, 1)}

    print(
        f"\n{'case':<17} {'samples/s':>10} {'loop s/s':>9} {'epoch s':>8} {'startup s':>10}"
        "  load before/after"
    )
    for label, r in c.items():
        if "samples_per_s" not in r:  # no Ray: the loop only
            print(f"{label:<17} {'':>10} {r['loop_samples_per_s']:>9.1f}")
            continue
        print(
            f"{label:<17} {r['samples_per_s']:>10.1f} {r['loop_samples_per_s']:>9.1f} "
            f"{r['epoch_wall_s']:>8.2f} {r['startup_s']:>10.1f}  {r['loadavg_1m']}"
        )
    print(
        f"Ray Train overhead, 1 worker vs plain: {100 * results['ray_overhead']:.1f} % (target <= 10 %)"
    )
    print(f"  (training steps only: {100 * results['ray_loop_overhead']:.1f} %)")
    print(
        f"  with 1 thread (plain-1t vs ray-1w-1t, interleaved): "
        f"{100 * results['ray_overhead_1t']:.1f} %"
    )
    print(
        f"2 workers vs 1 (1 thread each): {results['scaling_2w_vs_1w']:.2f}x (target >= 1.6x); "
        f"2 workers vs plain {cores} threads: {results['scaling_2w_vs_plain']:.2f}x"
    )
    loops = results["scaling_2w_vs_1w_loop_by_batchnorm_sync"]
    for scope, ratio in results["scaling_2w_vs_1w_by_batchnorm_sync"].items():
        lp = loops[scope]
        print(
            f"  train.batchnorm_sync={scope}: {ratio['median']:.2f}x "
            f"({ratio['min']:.2f}-{ratio['max']:.2f} over {args.rounds} rounds); "
            f"training steps only {lp['median']:.2f}x ({lp['min']:.2f}-{lp['max']:.2f})"
        )
    loc = results["scaling_2w_vs_1w_none_deferred_local_negatives"]
    print(
        f"  sync none, grad_sync=deferred, loss.gather=false (local negatives, a different "
        f"objective): {loc['median']:.2f}x ({loc['min']:.2f}-{loc['max']:.2f})"
    )
    d = results["scaling_2w_vs_1w_none_grad_sync_deferred"]
    e = results["grad_sync_deferred_vs_ddp_2w_none"]
    print(
        f"  sync none, train.grad_sync=deferred: {d['median']:.2f}x "
        f"({d['min']:.2f}-{d['max']:.2f}); deferred vs ddp: {e['median']:.2f}x "
        f"({e['min']:.2f}-{e['max']:.2f})"
    )
    g = results["scaling_2w_without_ray_loop"]
    print(
        f"  the same 2 workers without Ray (gloo on loopback, sync none), training steps only: "
        f"{g['median']:.2f}x ({g['min']:.2f}-{g['max']:.2f})"
    )
    ceil = results["ceiling_2p_vs_1"]
    print(
        f"  ceiling: 2 independent processes (no communication) vs 1 in-process: "
        f"{ceil['median']:.2f}x ({ceil['min']:.2f}-{ceil['max']:.2f}; training steps only)"
    )
    sc = results["sync_ceiling_2p_vs_1"]
    print(
        f"  synchronous ceiling (the same, waiting each step for the slower process): "
        f"{sc['median']:.2f}x ({sc['min']:.2f}-{sc['max']:.2f}); waiting costs "
        f"{100 * (sc['step_skew_median'] - 1):.1f} % of a step"
    )
    for p in results["precision"]:
        print(
            f"precision {p['precision']} threads={p['threads']}: {p['samples_per_s']:.1f} samples/s"
        )
    for t, s in results["bf16_speedup"].items():
        print(f"bf16 / fp32 with {t} thread(s): {s:.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
