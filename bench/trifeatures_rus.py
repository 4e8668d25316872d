"""Redundancy / uniqueness / synergy on bimodal Trifeatures: CoMM vs Cross vs Cross+Self.

As in the paper: each method is pretrained on unbiased pairs (probed for redundancy = `share` and
uniqueness = `unique1`) and on biased pairs (probed for synergy); every probe uses unbiased pairs.
Prints the table (mean ± std over seeds) and writes JSON with per-run numbers, times, the targets
and the machine.

    python bench/trifeatures_rus.py [--seeds 0 1] [--jobs 2] [--set train.epochs=12 ...]
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from statistics import mean

CONFIGS = {
    "CoMM": "configs/trifeatures/comm.yaml",
    "Cross": "configs/trifeatures/cross.yaml",
    "Cross+Self": "configs/trifeatures/cross_self.yaml",
}
# (axis, setting, probe task)
SETTINGS = {"unbiased": ["share", "unique1"], "biased": ["synergy"]}
AXIS = {"share": "redundancy", "unique1": "uniqueness", "synergy": "synergy"}
TARGETS = [
    ("CoMM", "synergy", ">=", 0.68),
    ("Cross", "synergy", "<=", 0.56),
    ("Cross+Self", "synergy", "<=", 0.56),
    ("CoMM", "redundancy", ">=", 0.95),
    ("CoMM", "uniqueness", ">=", 0.80),
    ("Cross", "uniqueness", "<=", 0.40),
]


def one_run(job: dict) -> dict:
    """Pretrain one (method, setting, seed) in this process and probe its tasks."""
    import torch

    from commlab.config import load_config
    from commlab.train.loop import PretrainRun

    torch.set_num_threads(job["threads"])
    tasks = SETTINGS[job["setting"]]
    overrides = [
        *job["overrides"],
        f"seed={job['seed']}",
        f"data.params.biased={str(job['setting'] == 'biased').lower()}",
        f"data.probe_tasks=[{', '.join(tasks)}]",
        "train.probe_every=0",
    ]
    cfg = load_config(job["config"], overrides)
    t0 = time.perf_counter()
    run = PretrainRun(cfg)
    final = run.fit()
    elapsed = time.perf_counter() - t0
    scores = {AXIS[t]: final[f"probe/{t}/balanced_acc"] for t in tasks}
    print(
        f"  {job['method']:<11} {job['setting']:<9} seed {job['seed']}: "
        + "  ".join(f"{k} {v:.3f}" for k, v in scores.items())
        + f"  ({elapsed:.0f}s)",
        flush=True,
    )
    return {
        **job,
        "scores": scores,
        "seconds": elapsed,
        "final_loss": final["train/loss"],
        "samples_per_s": final["perf/samples_per_s"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--methods", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument(
        "--jobs", type=int, default=2, help="runs in parallel (each with 2/jobs threads)"
    )
    ap.add_argument(
        "--set", nargs="*", default=[], dest="overrides", help="config overrides for every run"
    )
    ap.add_argument("--out", default="bench/results/trifeatures_rus.json")
    args = ap.parse_args()

    from commlab.perf import machine_info
    from commlab.report import format_rus_table

    threads = max(1, 2 // args.jobs)
    jobs = [
        {
            "method": m,
            "config": CONFIGS[m],
            "setting": s,
            "seed": seed,
            "overrides": args.overrides,
            "threads": threads,
        }
        for seed in args.seeds
        for m in args.methods
        for s in SETTINGS
    ]
    # Generate the data once up front so parallel runs never race to render it.
    from commlab.config import load_config
    from commlab.data import build_data

    for setting in SETTINGS:
        cfg = load_config(CONFIGS[args.methods[0]], args.overrides)
        build_data(
            cfg.data.name, cfg.data.path, 0, {**cfg.data.params, "biased": setting == "biased"}
        )

    print(
        f"{len(jobs)} runs, {args.jobs} at a time, {threads} thread(s) each; overrides: {args.overrides}"
    )
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        runs = list(pool.map(one_run, jobs))
    wall = time.perf_counter() - t0

    table: dict[str, dict[str, list[float]]] = {m: {} for m in args.methods}
    for r in runs:
        for axis, v in r["scores"].items():
            table[r["method"]].setdefault(axis, []).append(v)
    print()
    print(format_rus_table(table))
    checks = []
    for method, axis, op, bound in TARGETS:
        if method not in table or axis not in table[method]:
            continue
        value = mean(table[method][axis])
        ok = value >= bound if op == ">=" else value <= bound
        checks.append(
            {"method": method, "axis": axis, "target": f"{op} {bound}", "mean": value, "met": ok}
        )
        print(f"target {method} {axis} {op} {bound}: {value:.3f} {'met' if ok else 'MISSED'}")
    print(f"whole bench: {wall / 60:.1f} min")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "machine": machine_info() | {"torch_threads": threads, "parallel_runs": args.jobs},
                "overrides": args.overrides,
                "seeds": args.seeds,
                "wall_seconds": wall,
                "table": {
                    m: {a: {"mean": mean(v), "values": v} for a, v in axes.items()}
                    for m, axes in table.items()
                },
                "targets": checks,
                "runs": runs,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
