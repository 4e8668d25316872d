"""Sweep overhead: wall time of the smoke sweep vs the training time of its trials.

Runs `search_spaces/trifeatures-smoke.yaml` (by default one trial at a time, so wall time and the
sum of trial times are directly comparable) against a fresh sqlite MLflow store in a temp dir.
Training time of a trial = the sum over its epochs of the time the worker spent training and
probing (perf/epoch_time_s + perf/probe_time_s, measured where the trial trains: in the Tune
function's own process for single-worker trials, else in the Ray Train worker). Overhead share =
(wall - sum(training)) / wall (target <= 15 %); `overhead` = wall / sum(training) - 1; per-trial
overhead = (wall - sum(training)) / trials (target <= 3 s); per trial, `outside_training_s` = its
MLflow run's duration minus its training (building the model, loading data, logging).

    python bench/sweep_overhead.py [--space search_spaces/trifeatures-smoke.yaml] [--concurrent 1]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import yaml


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--space", default="search_spaces/trifeatures-smoke.yaml")
    ap.add_argument("--concurrent", type=int, default=1, help="max_concurrent_trials for the bench")
    ap.add_argument("--out", default="bench/results/sweep_overhead.json")
    args = ap.parse_args()

    from mlflow.tracking import MlflowClient

    from commlab.perf import machine_info
    from commlab.sweep.run import run_sweep

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    machine_before = machine_info()
    src = Path(args.space).resolve()
    spec = yaml.safe_load(src.read_text())
    spec["base"] = str((src.parent / spec["base"]).resolve())
    spec["max_concurrent_trials"] = args.concurrent
    data_dir = Path("data/trifeatures").resolve()
    spec["overrides"] = [*spec.get("overrides", []), f"data.path={data_dir}"]
    with tempfile.TemporaryDirectory() as tmp:
        space = Path(tmp) / "space.yaml"
        space.write_text(yaml.safe_dump(spec))
        uri = f"sqlite:///{tmp}/mlflow.db"
        result = run_sweep(space, storage=f"{tmp}/sweeps", tracking_uri=uri)
        client = MlflowClient(uri)
        exp = client.get_run(result.parent_run_id).info.experiment_id
        kids = client.search_runs(
            [exp], filter_string=f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'"
        )
        per_trial = []
        for k in kids:
            hist = {
                m: client.get_metric_history(k.info.run_id, m)
                for m in ("perf/epoch_time_s", "perf/probe_time_s")
            }
            train_s = sum(x.value for xs in hist.values() for x in xs)
            per_trial.append(
                {
                    "trial_id": k.data.tags.get("ray.trial_id"),
                    "status": k.info.status,
                    "epochs": len(hist["perf/epoch_time_s"]),
                    "training_s": train_s,
                    "run_s": (k.info.end_time - k.info.start_time) / 1000,
                    "outside_training_s": (k.info.end_time - k.info.start_time) / 1000 - train_s,
                }
            )
    total_train = sum(t["training_s"] for t in per_trial)
    wall = result.wall_seconds
    parallel_train = total_train / args.concurrent
    report = {
        "machine": machine_before,
        "machine_at_end": machine_info(),
        "space": str(src),
        "concurrent_trials": args.concurrent,
        "trials": len(per_trial),
        "wall_s": wall,
        "sum_training_s": total_train,
        "overhead": wall / parallel_train - 1,
        "overhead_share_of_wall": (wall - parallel_train) / wall,
        "tune_overhead_per_trial_s": (wall - parallel_train) / max(1, len(per_trial)),
        "per_trial": per_trial,
    }
    print(
        f"{len(per_trial)} trials, {args.concurrent} at a time: wall {wall:.1f}s, "
        f"training {total_train:.1f}s -> {report['overhead_share_of_wall'] * 100:.1f}% of wall "
        f"outside training (target <= 15%), {report['tune_overhead_per_trial_s']:.1f}s per trial "
        f"(target <= 3 s); wall / training - 1 = {report['overhead'] * 100:.1f}%"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
