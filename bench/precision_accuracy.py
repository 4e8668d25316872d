"""Does bf16 mixed precision cost accuracy? The smoke pretraining in fp32 and in bf16-mixed.

Same config (configs/trifeatures/smoke.yaml: 32 px Trifeatures, 4 epochs), same seeds, the same
views (augmentations draw from their own generators, untouched by the precision); each run probes
every task once at the end. Prints per task the fp32 and bf16 balanced accuracy (mean over seeds)
and their difference; the target is every probe metric within 2 points. On a CPU without bf16
kernels bf16 is slower (see bench/step_throughput.py); this bench is about accuracy only.

    python bench/precision_accuracy.py [--seeds 0 1] [--jobs 2] [--set k=v ...]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from statistics import mean, stdev

CONFIG = "configs/trifeatures/smoke.yaml"
PRECISIONS = ("fp32", "bf16-mixed")
TOLERANCE = 0.02


def one_run(job: dict) -> dict:
    import torch

    from commlab.config import load_config
    from commlab.train.loop import PretrainRun

    torch.set_num_threads(job["threads"])
    cfg = load_config(
        CONFIG,
        [
            *job["overrides"],
            f"seed={job['seed']}",
            f"train.precision={job['precision']}",
            "train.probe_every=0",
        ],
    )
    t0 = time.perf_counter()
    final = PretrainRun(cfg).fit()
    probes = {
        k.split("/")[1]: v
        for k, v in final.items()
        if k.startswith("probe/") and k.endswith("/balanced_acc")
    }
    seconds = time.perf_counter() - t0
    print(
        f"  {job['precision']:<10} seed {job['seed']}: "
        + " ".join(f"{k} {v:.3f}" for k, v in probes.items())
        + f"  loss {final['train/loss']:.4f} ({seconds:.0f}s)",
        flush=True,
    )
    return {**job, "probes": probes, "final_loss": final["train/loss"], "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--set", nargs="*", default=[], dest="overrides")
    ap.add_argument("--out", default="bench/results/precision_accuracy.json")
    args = ap.parse_args()

    from commlab.config import load_config
    from commlab.data import build_data
    from commlab.perf import machine_info

    cfg = load_config(CONFIG, args.overrides)
    build_data(cfg.data.name, cfg.data.path, 0, dict(cfg.data.params))  # render once, up front
    threads = max(1, (os.cpu_count() or 2) // args.jobs)
    jobs = [
        {"precision": p, "seed": s, "threads": threads, "overrides": args.overrides}
        for s in args.seeds
        for p in PRECISIONS
    ]
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        runs = list(pool.map(one_run, jobs))
    wall = time.perf_counter() - t0

    by = {p: [r for r in runs if r["precision"] == p] for p in PRECISIONS}
    tasks = sorted(by["fp32"][0]["probes"])
    table = {}
    # seed-to-seed spread, to judge a difference by: the fp32 runs' standard deviation and the
    # standard error of the paired (same seed) bf16 - fp32 differences
    print(f"\n{'task':<10} {'fp32':>7} {'bf16':>7} {'diff':>7} {'fp32 sd':>8} {'diff se':>8}")
    for task in tasks:
        fp32 = {r["seed"]: r["probes"][task] for r in by["fp32"]}
        bf16 = {r["seed"]: r["probes"][task] for r in by["bf16-mixed"]}
        a, b = mean(fp32.values()), mean(bf16.values())
        paired = [bf16[s] - fp32[s] for s in fp32 if s in bf16]
        sd = stdev(fp32.values()) if len(fp32) > 1 else float("nan")
        se = stdev(paired) / len(paired) ** 0.5 if len(paired) > 1 else float("nan")
        table[task] = {"fp32": a, "bf16-mixed": b, "diff": b - a, "fp32_sd": sd, "diff_se": se}
        print(f"{task:<10} {a:7.3f} {b:7.3f} {b - a:+7.3f} {sd:8.3f} {se:8.3f}")
    worst = max(abs(v["diff"]) for v in table.values())
    met = worst <= TOLERANCE
    print(
        f"largest |bf16 - fp32|: {worst:.3f} (target <= {TOLERANCE}): {'met' if met else 'MISSED'}"
    )
    print(f"whole bench: {wall / 60:.1f} min; load average {load_before} -> {os.getloadavg()}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "machine": machine_info() | {"torch_threads": threads, "parallel_runs": args.jobs},
                "load_average": {"before": load_before, "after": os.getloadavg()},
                "config": CONFIG,
                "overrides": args.overrides,
                "seeds": args.seeds,
                "wall_seconds": wall,
                "table": table,
                "largest_abs_diff": worst,
                "target": f"<= {TOLERANCE}",
                "met": met,
                "runs": runs,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
