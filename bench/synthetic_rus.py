"""Redundancy / uniqueness / synergy on the synthetic interaction benchmark (commlab.data.synthetic).

CoMM vs Cross vs Cross+Self (and CMC), each pretrained per seed with its config in
configs/synthetic/ and probed on frozen features, plus two controls: "CoMM at init" (the same
CoMM model, untrained, probed: what training adds) and "raw inputs" (the probe on the
concatenated raw modalities: what the data give away). Redundancy = `share`, uniqueness =
`unique1` (`unique2` is kept in the JSON), synergy = `synergy`, all balanced accuracy of the
platform's linear probe. Prints the table (mean ± std over seeds), checks the targets and writes
JSON with per-run numbers, times, the machine and its load.

    python bench/synthetic_rus.py [--seeds 0 1 2] [--jobs 2] [--set train.epochs=10 ...]
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

CONFIGS = {
    "CoMM": "configs/synthetic/comm.yaml",
    "Cross": "configs/synthetic/cross.yaml",
    "Cross+Self": "configs/synthetic/cross_self.yaml",
    "CMC": "configs/synthetic/cmc.yaml",
}
INIT_ROW = "CoMM at init"
RAW_ROW = "raw inputs"
AXIS = {
    "share": "redundancy",
    "unique1": "uniqueness",
    "unique2": "uniqueness2",
    "synergy": "synergy",
}
TARGETS = [
    ("CoMM", "synergy", ">=", 0.80),
    ("Cross", "synergy", "<=", 0.55),
    ("Cross+Self", "synergy", "<=", 0.55),
    ("CoMM", "uniqueness", ">=", 0.95),
]
MIN_GAIN = 0.15  # CoMM synergy must exceed its own init control by this much


def _scores(metrics: dict[str, float]) -> dict[str, float]:
    out = {AXIS[t]: metrics[f"probe/{t}/balanced_acc"] for t in AXIS}
    if "probe/synergy/roc_auc" in metrics:
        out["synergy_auc"] = metrics["probe/synergy/roc_auc"]
    return out


def one_run(job: dict) -> list[dict]:
    """Pretrain one (method, seed) in this process; CoMM also probes its untrained model."""
    import torch

    from commlab.config import load_config
    from commlab.train.loop import PretrainRun

    torch.set_num_threads(job["threads"])
    cfg = load_config(
        job["config"], [*job["overrides"], f"seed={job['seed']}", "train.probe_every=0"]
    )
    t0 = time.perf_counter()
    run = PretrainRun(cfg)
    rows = []
    if job["init_control"]:
        rows.append({"method": INIT_ROW, "seed": job["seed"], "scores": _scores(run.probe())})
    final = run.fit()
    elapsed = time.perf_counter() - t0
    rows.append(
        {
            "method": job["method"],
            "seed": job["seed"],
            "scores": _scores(final),
            "seconds": elapsed,
            "final_loss": final["train/loss"],
            "samples_per_s": final["perf/samples_per_s"],
        }
    )
    print(
        "  "
        + "\n  ".join(
            f"{r['method']:<13} seed {r['seed']}: "
            + "  ".join(f"{k} {v:.3f}" for k, v in r["scores"].items())
            for r in rows
        )
        + f"  ({elapsed:.0f}s)",
        flush=True,
    )
    return rows


def raw_rows(config: str, overrides: list[str]) -> list[dict]:
    """The probe on the concatenated raw inputs: no model and no training, so one measurement
    (the data do not depend on the training seed)."""
    import torch

    from commlab.config import load_config
    from commlab.data import build_data
    from commlab.probe import run_probes

    cfg = load_config(config, overrides)
    ds = build_data(cfg.data.name, cfg.data.path, 0, cfg.data.params).probe
    tr, te = ds.split("train")[: cfg.data.probe_max_train], ds.split("test")
    x_tr, x_te = (torch.cat(ds.batch(ids).xs, dim=1).numpy() for ids in (tr, te))
    tasks = {k: ds.tasks[k] for k in AXIS}
    y_tr = {k: ds.labels[k][tr].numpy() for k in tasks}
    y_te = {k: ds.labels[k][te].numpy() for k in tasks}
    metrics = run_probes(x_tr, y_tr, x_te, y_te, tasks, seed=cfg.seed)
    return [{"method": RAW_ROW, "seed": cfg.seed, "scores": _scores(metrics)}]


def summary(values: list[float]) -> dict[str, float | list[float]]:
    return {
        "mean": mean(values),
        "std": stdev(values) if len(values) > 1 else 0.0,
        "values": values,
    }


def format_table(table: dict[str, dict[str, dict]]) -> str:
    axes = ["redundancy", "uniqueness", "uniqueness2", "synergy", "synergy_auc"]
    lines = ["| method | " + " | ".join(axes) + " |", "|---|" + "---:|" * len(axes)]
    for method, row in table.items():
        cells = [f"{row[a]['mean']:.3f} ± {row[a]['std']:.3f}" if a in row else "-" for a in axes]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--jobs", type=int, default=2, help="runs in parallel (each 2/jobs threads)")
    ap.add_argument("--set", nargs="*", default=[], dest="overrides", help="overrides, every run")
    ap.add_argument("--out", default="bench/results/synthetic_rus.json")
    args = ap.parse_args()

    from commlab.perf import machine_info

    threads = max(1, 2 // args.jobs)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    # Generate the data once up front so parallel runs never race to write it.
    rows = raw_rows(CONFIGS[args.methods[0]], args.overrides)
    jobs = [
        {
            "method": m,
            "config": CONFIGS[m],
            "seed": seed,
            "overrides": args.overrides,
            "threads": threads,
            "init_control": m == "CoMM",
        }
        for seed in args.seeds
        for m in args.methods
    ]
    print(
        f"{len(jobs)} runs, {args.jobs} at a time, {threads} thread(s) each; overrides: {args.overrides}"
    )
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        for out in pool.map(one_run, jobs):
            rows.extend(out)
    wall = time.perf_counter() - t0
    load_after = os.getloadavg()

    order = [*args.methods, INIT_ROW, RAW_ROW]
    table: dict[str, dict[str, dict]] = {}
    for method in order:
        runs = [r for r in rows if r["method"] == method]
        if runs:
            table[method] = {a: summary([r["scores"][a] for r in runs]) for a in runs[0]["scores"]}
    print()
    print(format_table(table))
    checks = []
    for method, axis, op, bound in TARGETS:
        if method in table:
            value = table[method][axis]["mean"]
            ok = value >= bound if op == ">=" else value <= bound
            checks.append(
                {
                    "method": method,
                    "axis": axis,
                    "target": f"{op} {bound}",
                    "mean": value,
                    "met": ok,
                }
            )
    if "CoMM" in table and INIT_ROW in table:
        gain = table["CoMM"]["synergy"]["mean"] - table[INIT_ROW]["synergy"]["mean"]
        checks.append(
            {
                "method": "CoMM",
                "axis": "synergy gain over init",
                "target": f">= {MIN_GAIN}",
                "mean": gain,
                "met": gain >= MIN_GAIN,
            }
        )
    for c in checks:
        print(
            f"target {c['method']} {c['axis']} {c['target']}: {c['mean']:.3f} {'met' if c['met'] else 'MISSED'}"
        )
    print(
        f"whole bench: {wall / 60:.1f} min; load average before {load_before[0]:.2f}, after {load_after[0]:.2f}"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "machine": machine_info() | {"torch_threads": threads, "parallel_runs": args.jobs},
                "load_average_before_1_5_15": list(load_before),
                "load_average_after_1_5_15": list(load_after),
                "overrides": args.overrides,
                "seeds": args.seeds,
                "wall_seconds": wall,
                "table": table,
                "targets": checks,
                "runs": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
