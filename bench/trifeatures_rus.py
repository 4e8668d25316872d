"""Redundancy / uniqueness / synergy on bimodal Trifeatures: CoMM vs Cross vs Cross+Self.

As in the paper: each method is pretrained on unbiased pairs (probed for redundancy = `share` and
uniqueness = `unique1`) and on biased pairs (probed for synergy); every probe uses unbiased pairs.
Every run also probes the diagnostic tasks (shape, texture 1/2, colour 1/2) on the same frozen
features, so a missed axis shows its cause. Prints the table (mean ± std over seeds) and writes
JSON with per-run numbers, the diagnostic table, times, the targets, the machine and its load.

Protocols (docs/rus.md says what each changes from the paper, and why):
- `cpu`: configs/trifeatures/{comm,cross,cross_self}.yaml, sized for 2 CPU cores (<= 60 min);
- `paper`: configs/trifeatures/*-paper.yaml, the paper's 224 px AlexNet protocol (a GPU's work).

    python bench/trifeatures_rus.py [--protocol cpu|paper] [--seeds 0 1] [--jobs 2] [--set k=v ...]
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

PROTOCOLS = {
    "cpu": {
        "CoMM": "configs/trifeatures/comm.yaml",
        "Cross": "configs/trifeatures/cross.yaml",
        "Cross+Self": "configs/trifeatures/cross_self.yaml",
    },
    "paper": {
        "CoMM": "configs/trifeatures/comm-paper.yaml",
        "Cross": "configs/trifeatures/cross-paper.yaml",
        "Cross+Self": "configs/trifeatures/cross_self-paper.yaml",
    },
}
# Which axes each pretraining setting measures; every run probes all tasks for the diagnostics.
SETTINGS = {"unbiased": ("share", "unique1"), "biased": ("synergy",)}
AXIS = {"share": "redundancy", "unique1": "uniqueness", "synergy": "synergy"}
DIAGNOSTIC = ("share", "unique1", "unique2", "colour1", "colour2", "synergy")
TARGETS = {
    "cpu": [
        ("CoMM", "redundancy", ">=", 0.95),
        ("CoMM", "uniqueness", ">=", 0.70),
        ("CoMM", "synergy", ">=", 0.62),
        ("Cross", "synergy", "<=", 0.53),
        ("Cross+Self", "synergy", "<=", 0.53),
    ],
    # the paper's figure: CoMM 99.9 / 87.8 / 71.9, Cross 100 / 11.6 / 50.0
    "paper": [
        ("CoMM", "redundancy", ">=", 0.95),
        ("CoMM", "uniqueness", ">=", 0.80),
        ("CoMM", "synergy", ">=", 0.68),
        ("Cross", "synergy", "<=", 0.53),
        ("Cross+Self", "synergy", "<=", 0.53),
    ],
}


def one_run(job: dict) -> dict:
    """Pretrain one (method, setting, seed) in this process and probe every task once, at the end."""
    import torch

    from commlab.config import load_config
    from commlab.train.loop import PretrainRun

    torch.set_num_threads(job["threads"])
    overrides = [
        *job["overrides"],
        f"seed={job['seed']}",
        f"data.params.biased={str(job['setting'] == 'biased').lower()}",
        "data.probe_tasks=null",
        "train.probe_every=0",
    ]
    cfg = load_config(job["config"], overrides)
    t0 = time.perf_counter()
    run = PretrainRun(cfg)
    final = run.fit()
    elapsed = time.perf_counter() - t0
    scores = {AXIS[t]: final[f"probe/{t}/balanced_acc"] for t in SETTINGS[job["setting"]]}
    probes = {
        t: final[f"probe/{t}/balanced_acc"]
        for t in DIAGNOSTIC
        if f"probe/{t}/balanced_acc" in final
    }
    print(
        f"  {job['method']:<11} {job['setting']:<9} seed {job['seed']}: "
        + "  ".join(f"{k} {v:.3f}" for k, v in scores.items())
        + "  | "
        + " ".join(f"{k} {v:.2f}" for k, v in probes.items())
        + f"  ({elapsed:.0f}s)",
        flush=True,
    )
    return {
        **job,
        "scores": scores,
        "probes": probes,
        "synergy_roc_auc": final.get("probe/synergy/roc_auc"),
        "seconds": elapsed,
        "epochs": cfg.train.epochs,
        "final_loss": final["train/loss"],
        "samples_per_s": final["perf/samples_per_s"],
    }


def oracle_controls(config: str, overrides: list[str]) -> dict[str, dict[str, float]]:
    """The synergy probe on features made from the true labels of the probe pairs, no model:
    what a linear probe reads from a perfect encoding of each attribute *without* synergy
    (one-hot texture 1 and colour 2 side by side: a linear score is then a(texture 1) +
    b(colour 2), which can still single out a few correlated (texture, colour) cells) and with
    it (one one-hot of the (texture 1, colour 2) pair). A method's synergy is evidence of
    synergistic features only where it exceeds the first row."""
    import numpy as np

    from commlab.config import load_config
    from commlab.data import build_data
    from commlab.probe import fit_probe

    cfg = load_config(config, overrides)
    bundle = build_data(cfg.data.name, cfg.data.path, 0, {**cfg.data.params, "biased": True})
    probe = bundle.probe
    labels = {
        split: {k: v[probe.splits[split]].numpy() for k, v in probe.labels.items()}
        for split in ("train", "test")
    }

    def onehot(a: np.ndarray, n: int = 10) -> np.ndarray:
        return np.eye(n)[a]

    features = {
        "texture1 + colour2 one-hot (additive, no synergy)": lambda d: np.hstack(
            [onehot(d["unique1"]), onehot(d["colour2"])]
        ),
        "every attribute one-hot (no synergy)": lambda d: np.hstack(
            [onehot(d[t]) for t in ("share", "unique1", "unique2", "colour1", "colour2")]
        ),
        "(texture1, colour2) joint one-hot (synergy)": lambda d: onehot(
            d["unique1"] * 10 + d["colour2"], 100
        ),
    }
    out = {}
    for name, make in features.items():
        tr, te = labels["train"], labels["test"]
        m = fit_probe(make(tr), tr["synergy"], make(te), te["synergy"], "binary")
        out[name] = {"balanced_acc": m["balanced_acc"], "roc_auc": m["roc_auc"]}
        print(f"  oracle {name}: synergy {m['balanced_acc']:.3f} (AUC {m['roc_auc']:.3f})")
    return out


def _stats(values: list[float]) -> dict[str, float | list[float]]:
    return {
        "mean": mean(values),
        "std": stdev(values) if len(values) > 1 else 0.0,
        "values": values,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--protocol", choices=list(PROTOCOLS), default="cpu")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--methods", nargs="+", default=list(PROTOCOLS["cpu"]))
    ap.add_argument(
        "--jobs", type=int, default=2, help="runs in parallel (each with 2/jobs threads)"
    )
    ap.add_argument(
        "--set", nargs="*", default=[], dest="overrides", help="config overrides for every run"
    )
    ap.add_argument(
        "--out", default=None, help="default bench/results/trifeatures_rus_<protocol>.json"
    )
    ap.add_argument(
        "--controls-only",
        action="store_true",
        help="compute only the label-oracle synergy controls and add them to the --out JSON",
    )
    args = ap.parse_args()
    configs = PROTOCOLS[args.protocol]
    unknown = sorted(set(args.methods) - set(configs))
    if unknown:
        ap.error(f"unknown method(s) {unknown}; valid: {', '.join(configs)}")
    out = Path(args.out or f"bench/results/trifeatures_rus_{args.protocol}.json")
    if args.controls_only:
        doc = json.loads(out.read_text())
        doc["oracle_controls"] = oracle_controls(configs[args.methods[0]], args.overrides)
        out.write_text(json.dumps(doc, indent=2))
        print(f"wrote {out}")
        return

    from commlab.config import load_config
    from commlab.data import build_data
    from commlab.perf import machine_info
    from commlab.rus import format_rus_table

    threads = max(1, (os.cpu_count() or 2) // args.jobs)
    jobs = [
        {
            "method": m,
            "config": configs[m],
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
    cfg = load_config(configs[args.methods[0]], args.overrides)
    for setting in SETTINGS:
        build_data(
            cfg.data.name, cfg.data.path, 0, {**cfg.data.params, "biased": setting == "biased"}
        )

    print(
        f"protocol {args.protocol}: {len(jobs)} runs, {args.jobs} at a time, {threads} thread(s) "
        f"each; overrides: {args.overrides}"
    )
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        runs = list(pool.map(one_run, jobs))
    wall = time.perf_counter() - t0
    load_after = os.getloadavg()

    table: dict[str, dict[str, list[float]]] = {m: {} for m in args.methods}
    diagnostics: dict[str, dict[str, dict[str, list[float]]]] = {}
    for r in runs:
        for axis, v in r["scores"].items():
            table[r["method"]].setdefault(axis, []).append(v)
        per = diagnostics.setdefault(f"{r['method']} ({r['setting']})", {})
        for task, v in r["probes"].items():
            per.setdefault(task, []).append(v)
    chance = {"redundancy": 0.1, "uniqueness": 0.1, "synergy": 0.5}  # the tasks' 1 / classes
    print()
    print(format_rus_table(table, chance=chance))
    print("diagnostic probes (balanced accuracy, mean over seeds; chance 0.1, synergy 0.5):")
    for row, tasks in diagnostics.items():
        print(f"  {row:<24} " + " ".join(f"{t} {mean(v):.3f}" for t, v in tasks.items()))
    print("synergy probe on label-oracle features (no model):")
    controls = oracle_controls(configs[args.methods[0]], args.overrides)
    checks = []
    for method, axis, op, bound in TARGETS[args.protocol]:
        if method not in table or axis not in table[method]:
            continue
        value = mean(table[method][axis])
        ok = value >= bound if op == ">=" else value <= bound
        checks.append(
            {"method": method, "axis": axis, "target": f"{op} {bound}", "mean": value, "met": ok}
        )
        print(f"target {method} {axis} {op} {bound}: {value:.3f} {'met' if ok else 'MISSED'}")
    print(f"whole bench: {wall / 60:.1f} min; load average {load_before} -> {load_after}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "protocol": args.protocol,
                "machine": machine_info() | {"torch_threads": threads, "parallel_runs": args.jobs},
                "load_average": {"before": load_before, "after": load_after},
                "configs": {m: configs[m] for m in args.methods},
                "overrides": args.overrides,
                "seeds": args.seeds,
                "wall_seconds": wall,
                "table": {m: {a: _stats(v) for a, v in axes.items()} for m, axes in table.items()},
                "chance": chance,
                "diagnostics": {
                    row: {t: _stats(v) for t, v in tasks.items()}
                    for row, tasks in diagnostics.items()
                },
                "oracle_controls": controls,
                "targets": checks,
                "runs": runs,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
