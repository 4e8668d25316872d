"""What `train.batchnorm_sync` costs in R/U/S: 2-worker Ray Train runs per scope, probed.

The smoke pretraining (configs/trifeatures/smoke.yaml: 32 px Trifeatures, 3000 unbiased pairs,
4 epochs, global batch 128) on Ray Train with 1 worker (the reference) and with 2 workers for each
BatchNorm sync scope (all / head / none), 1 CPU and 1 torch thread per worker, plus `none` with
per-worker negatives and deferred gradient averaging (`2w-none-deferred-local`, the fastest
2-worker setting, a different objective). Every run probes all
tasks after its last epoch (the numbers come from its last checkpoint). Prints redundancy
(`share`), uniqueness (`unique1`), the other probes and the steady epoch throughput, so a user can
pick a scope with numbers. Synergy needs biased pretraining and is not part of this workload.
The throughput column is one run per case and seed, run one after another, not interleaved:
for speed, `bench/ray_overhead.py`'s interleaved rounds are the figures to use.

    python bench/batchnorm_sync_rus.py [--epochs 4] [--seeds 0] [--out ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# (workers, batchnorm_sync, variant); the variant `deferred-local` adds train.grad_sync=deferred
# and loss.gather=false: per-worker negatives (64 per anchor, not the global 128), a different
# objective that leaves each step one collective, measured so its cost in R/U/S is known
CASES = [
    (1, "all", ""),
    (2, "all", ""),
    (2, "head", ""),
    (2, "none", ""),
    (2, "none", "deferred-local"),
]
VARIANTS = {"": [], "deferred-local": ["train.grad_sync=deferred", "loss.gather=false"]}


def case_key(workers: int, scope: str, variant: str) -> str:
    return f"{workers}w-{scope}" + (f"-{variant}" if variant else "")


def run_case(
    workers: int, scope: str, variant: str, seed: int, epochs: int, storage: Path
) -> dict[str, Any]:
    from commlab.checkpoint_format import load_checkpoint
    from commlab.config import load_config
    from commlab.train.trainer import RayTrainSettings, build_trainer

    cfg = load_config(
        REPO / "configs" / "trifeatures" / "smoke.yaml",
        [
            f"seed={seed}",
            f"train.epochs={epochs}",
            "train.probe_every=0",
            "train.device=cpu",
            "train.threads=1",
            f"train.batchnorm_sync={scope}",
            f"data.path={REPO / 'data' / 'trifeatures'}",
            *VARIANTS[variant],
        ],
    )
    settings = RayTrainSettings(
        workers=workers, cpus_per_worker=1, num_to_keep=None, tracking=False, max_failures=0
    )
    name = f"bnsync-{case_key(workers, scope, variant)}-s{seed}"
    t0 = time.time()
    build_trainer(cfg, settings, name=name, storage_path=str(storage)).fit()
    wall = time.time() - t0
    ckpts = sorted(
        (load_checkpoint(p / "checkpoint.pt") for p in (storage / name).glob("checkpoint_*/")),
        key=lambda c: c["epoch"],
    )
    final = ckpts[-1]["metrics"]
    ends = [c["created_at"] for c in ckpts]
    intervals = [b - a for a, b in zip(ends, ends[1:], strict=False)]
    samples = final["perf/samples_per_s"] * final["perf/epoch_time_s"]
    probes = {
        k.split("/")[1]: v
        for k, v in final.items()
        if k.startswith("probe/") and k.endswith("/balanced_acc") and "/mean/" not in k
    }
    row = {
        "workers": workers,
        "batchnorm_sync": scope,
        "variant": variant,
        "seed": seed,
        "redundancy": probes.get("share"),
        "uniqueness": probes.get("unique1"),
        "probes": probes,
        "final_loss": final["train/loss"],
        # the last epoch includes the probe: the median over the earlier intervals
        "samples_per_s": round(samples) / statistics.median(intervals[:-1] or intervals),
        "wall_s": wall,
        "loadavg_1m": os.getloadavg()[0],
    }
    print(
        f"  {case_key(workers, scope, variant):<20} seed {seed}: redundancy {row['redundancy']:.3f} "
        f"uniqueness {row['uniqueness']:.3f}  {row['samples_per_s']:.0f} samples/s "
        f"({wall:.0f}s, load {row['loadavg_1m']:.1f})",
        flush=True,
    )
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--out", default="bench/results/batchnorm_sync_rus.json")
    args = ap.parse_args()

    import ray

    from commlab.cluster import connect
    from commlab.config import load_config
    from commlab.data import build_data
    from commlab.perf import machine_info

    cfg = load_config(REPO / "configs" / "trifeatures" / "smoke.yaml")
    build_data(cfg.data.name, str(REPO / "data" / "trifeatures"), 0, dict(cfg.data.params))
    load_before = os.getloadavg()
    rows = []
    connect(None, num_cpus=os.cpu_count() or 2)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for seed in args.seeds:
                for workers, scope, variant in CASES:
                    rows.append(run_case(workers, scope, variant, seed, args.epochs, Path(tmp)))
    finally:
        ray.shutdown()
    table: dict[str, dict[str, float]] = {}
    for workers, scope, variant in CASES:
        key = case_key(workers, scope, variant)
        mine = [r for r in rows if case_key(r["workers"], r["batchnorm_sync"], r["variant"]) == key]
        table[key] = {
            m: statistics.mean(r[m] for r in mine)
            for m in ("redundancy", "uniqueness", "samples_per_s")
        }
    base = table["1w-all"]["samples_per_s"]
    print(f"\n{'case':<20} {'redundancy':>10} {'uniqueness':>10} {'samples/s':>10} {'vs 1w':>6}")
    for key, v in table.items():
        v["scaling_vs_1w"] = v["samples_per_s"] / base
        print(
            f"{key:<20} {v['redundancy']:10.3f} {v['uniqueness']:10.3f} "
            f"{v['samples_per_s']:10.0f} {v['scaling_vs_1w']:6.2f}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "machine": machine_info(),
                "load_average": {"before": load_before, "after": os.getloadavg()},
                "workload": "configs/trifeatures/smoke.yaml, unbiased, global batch 128, "
                f"{args.epochs} epochs, 1 CPU + 1 thread per worker, probe after the last epoch",
                "seeds": args.seeds,
                "table": table,
                "runs": rows,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
