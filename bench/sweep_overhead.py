"""Sweep overhead: wall time of the smoke sweep vs the training time of its trials.

Runs `search_spaces/trifeatures-smoke.yaml` (by default one trial at a time, so wall time and the
sum of trial times are directly comparable) against a fresh sqlite MLflow store in a temp dir.
Training time of a trial = the sum over its epochs of the time the worker spent training and
probing (perf/epoch_time_s + perf/probe_time_s, measured where the trial trains: in the Tune
function's own process for single-worker trials, else in the Ray Train worker). Overhead share =
(wall - sum(training)) / wall (target <= 15 %); `overhead` = wall / sum(training) - 1; per-trial
overhead = (wall - sum(training)) / trials (target <= 3 s); per trial, `outside_training_s` = its
MLflow run's duration minus its training (building the model, loading data, logging).

Each round runs the sweep twice, interleaved: trials reusing the process of a trial that ended
(the default) and a fresh process per trial (`COMMLAB_REUSE_TRIAL_PROCESS=0`); medians and ranges
over the rounds are reported per mode.

    python bench/sweep_overhead.py [--space search_spaces/trifeatures-smoke.yaml] [--concurrent 1]
        [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

import yaml


def measure(space_path: Path, concurrent: int, reuse: bool) -> dict:
    """One smoke sweep in a fresh temp store; its wall time, training time and overhead."""
    from mlflow.tracking import MlflowClient

    from commlab.sweep.run import run_sweep
    from commlab.sweep.trial import REUSE_ENV

    os.environ[REUSE_ENV] = "1" if reuse else "0"
    src = space_path.resolve()
    spec = yaml.safe_load(src.read_text())
    spec["base"] = str((src.parent / spec["base"]).resolve())
    spec["max_concurrent_trials"] = concurrent
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
            run_s = (k.info.end_time - k.info.start_time) / 1000
            per_trial.append(
                {
                    "trial_id": k.data.tags.get("ray.trial_id"),
                    "process": k.data.tags.get("commlab.process"),
                    "status": k.info.status,
                    "epochs": len(hist["perf/epoch_time_s"]),
                    "training_s": train_s,
                    "run_s": run_s,
                    "outside_training_s": run_s - train_s,
                }
            )
    total_train = sum(t["training_s"] for t in per_trial)
    wall = result.wall_seconds
    parallel_train = total_train / concurrent
    return {
        "reuse_trial_processes": reuse,
        "trials": len(per_trial),
        "processes": len({t["process"] for t in per_trial}),
        "wall_s": wall,
        "sum_training_s": total_train,
        "overhead": wall / parallel_train - 1,
        "overhead_share_of_wall": (wall - parallel_train) / wall,
        "tune_overhead_per_trial_s": (wall - parallel_train) / max(1, len(per_trial)),
        "per_trial": per_trial,
    }


def _stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--space", default="search_spaces/trifeatures-smoke.yaml")
    ap.add_argument("--concurrent", type=int, default=1, help="max_concurrent_trials for the bench")
    ap.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="rounds of (reused trial processes, a fresh process per trial), interleaved",
    )
    ap.add_argument("--out", default="bench/results/sweep_overhead.json")
    args = ap.parse_args()

    from commlab.perf import machine_info

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    machine_before = machine_info()
    runs: list[dict] = []
    for r in range(args.rounds):
        order = (True, False) if r % 2 == 0 else (False, True)
        for reuse in order:
            one = measure(Path(args.space), args.concurrent, reuse)
            one["round"] = r
            runs.append(one)
            print(
                f"round {r + 1}/{args.rounds}, "
                f"{'reused processes' if reuse else 'fresh process per trial'}: "
                f"{one['trials']} trials in {one['processes']} processes, wall {one['wall_s']:.1f}s, "
                f"training {one['sum_training_s']:.1f}s -> "
                f"{one['overhead_share_of_wall'] * 100:.1f}% of wall outside training, "
                f"{one['tune_overhead_per_trial_s']:.1f}s per trial",
                flush=True,
            )
    summary = {}
    for reuse, label in ((True, "reused"), (False, "fresh")):
        mine = [x for x in runs if x["reuse_trial_processes"] is reuse]
        summary[label] = {
            "overhead_share_of_wall": _stats([x["overhead_share_of_wall"] for x in mine]),
            "tune_overhead_per_trial_s": _stats([x["tune_overhead_per_trial_s"] for x in mine]),
        }
    reused = summary["reused"]
    report = {
        "machine": machine_before,
        "machine_at_end": machine_info(),
        "space": str(Path(args.space).resolve()),
        "concurrent_trials": args.concurrent,
        "rounds": args.rounds,
        "summary": summary,
        "fresh_over_reused_per_trial_overhead": (
            summary["fresh"]["tune_overhead_per_trial_s"]["median"]
            / reused["tune_overhead_per_trial_s"]["median"]
        ),
        "targets": {"overhead_share_of_wall": 0.15, "tune_overhead_per_trial_s": 3.0},
        "runs": runs,
    }
    for label, s in summary.items():
        share, per = s["overhead_share_of_wall"], s["tune_overhead_per_trial_s"]
        print(
            f"{label}: {share['median'] * 100:.1f}% of wall outside training "
            f"({share['min'] * 100:.1f}-{share['max'] * 100:.1f}; target <= 15%), "
            f"{per['median']:.1f}s per trial ({per['min']:.1f}-{per['max']:.1f}; target <= 3 s)"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
