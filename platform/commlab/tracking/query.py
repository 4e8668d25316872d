"""What the tracking store holds: sweeps and their trials as plain dicts, and their tables.

A sweep is a parent run tagged `commlab.kind=sweep` (its name in `commlab.sweep`, its selection
metric and mode in `commlab.metric` / `commlab.mode`); its trials are the runs whose
`mlflow.parentRunId` is the parent's id (found by parent id, not by name: a sweep renamed to
`name-1` because `name` existed keeps its trials' `commlab.sweep` tag). A trial's value of a
metric is the **best value over its history** (max or min by mode), the rule the sweep uses for
its `commlab.best_trial_id` tag, so tables, promotion and the sweep's own summary agree.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Run, ViewType
from mlflow.tracking import MlflowClient
from rich.console import Group
from rich.table import Table
from rich.text import Text

from commlab.tags import (
    BEST_METRIC_TAG,
    BEST_TRIAL_ID_TAG,
    ERROR_TAG,
    KIND_TAG,
    METRIC_TAG,
    MODE_TAG,
    PARAM_PREFIX,
    PARENT_TAG,
    RUS_PREFIX,
    STOPPED_EARLY_TAG,
    SWEEP_PATH_TAG,
    SWEEP_TAG,
    TRIAL_TAG,
    TRIALS_TAG,
)
from commlab.tracking.runs import absolute_uri, check_tracking_uri, default_tracking_uri

MODES = ("max", "min")
_MIN_SUFFIXES = ("loss", "mse", "mae", "rmse", "error")


class QueryError(LookupError):
    """A sweep or experiment that is not there (or a name that is ambiguous)."""


def client_for(tracking_uri: str | None) -> tuple[MlflowClient, str]:
    """A client of the store (checked reachable first: MLflow alone retries for minutes)."""
    uri = absolute_uri(tracking_uri) if tracking_uri else default_tracking_uri()
    check_tracking_uri(uri)
    return MlflowClient(uri), uri


def infer_mode(metric: str) -> str:
    """min for losses, errors and times (`…/loss`, `…/mse`, `…time_s`), else max (accuracies,
    F1, throughput); `--mode` overrides."""
    last = metric.rsplit("/", 1)[-1]
    return "min" if last.endswith(_MIN_SUFFIXES) or "time" in last else "max"


def best_of(values: list[float], mode: str) -> float | None:
    finite = [v for v in values if isinstance(v, int | float) and math.isfinite(v)]
    if not finite:
        return None
    return max(finite) if mode == "max" else min(finite)


def experiment_ids(client: MlflowClient, experiment: str | None = None) -> list[str]:
    if experiment is not None:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            names = sorted(e.name for e in client.search_experiments())
            raise QueryError(f"no MLflow experiment named {experiment!r}; experiments: {names}")
        return [exp.experiment_id]
    return [e.experiment_id for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]


def search_all(
    client: MlflowClient, exp_ids: list[str], filter_string: str, order_by: list[str] | None = None
) -> list[Run]:
    """Every matching run (all pages)."""
    if not exp_ids:
        return []
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs(
            exp_ids, filter_string, max_results=1000, order_by=order_by, page_token=token
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _duration_s(run: Run) -> float | None:
    start, end = run.info.start_time, run.info.end_time
    if start is None:
        return None
    if end is None or run.info.status == "RUNNING":
        end = int(time.time() * 1000)
    return max(0.0, (end - start) / 1000.0)


def _float(text: str | None) -> float | None:
    try:
        value = float(text) if text not in (None, "", "None") else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


def _value(text: str) -> Any:
    """Tag text back to a number when it is one (params are stored as strings)."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            continue
    return text


def sweep_row(client: MlflowClient, run: Run) -> dict[str, Any]:
    tags = run.data.tags
    exp = client.get_experiment(run.info.experiment_id)
    trials = tags.get(TRIALS_TAG)
    return {
        "name": tags.get(SWEEP_TAG, run.info.run_name),
        "run_id": run.info.run_id,
        "experiment": exp.name,
        "experiment_id": run.info.experiment_id,
        "status": run.info.status,
        "metric": tags.get(METRIC_TAG),
        "mode": tags.get(MODE_TAG),
        "best_trial_id": tags.get(BEST_TRIAL_ID_TAG),
        "best_metric": _float(tags.get(BEST_METRIC_TAG)),
        "trials": int(trials) if trials and trials.isdigit() else None,
        "start_time": run.info.start_time,
        "duration_s": _duration_s(run),
        "path": tags.get(SWEEP_PATH_TAG),
    }


def list_sweeps(
    tracking_uri: str | None = None, experiment: str | None = None
) -> list[dict[str, Any]]:
    """All sweeps (parent runs), newest first."""
    client, _ = client_for(tracking_uri)
    runs = search_all(
        client,
        experiment_ids(client, experiment),
        f"tags.`{KIND_TAG}` = 'sweep'",
        order_by=["attributes.start_time DESC"],
    )
    rows = [sweep_row(client, r) for r in runs]
    for row in rows:  # a sweep still running has no commlab.trials tag yet: count its children
        if row["trials"] is None:
            row["trials"] = len(children(client, row))
    return rows


def find_sweep(client: MlflowClient, sweep: str, experiment: str | None = None) -> Run:
    """The parent run of sweep `sweep` (its name, or the parent run id)."""
    exp_ids = experiment_ids(client, experiment)
    runs = search_all(
        client,
        exp_ids,
        f"tags.`{KIND_TAG}` = 'sweep' and tags.`{SWEEP_TAG}` = '{_quote(sweep)}'",
        order_by=["attributes.start_time DESC"],
    )
    if not runs:
        try:
            run = client.get_run(sweep)
        except Exception:  # not a run id either
            run = None
        if run is not None and run.data.tags.get(KIND_TAG) == "sweep":
            return run
        known = sorted(
            {
                r.data.tags.get(SWEEP_TAG, "?")
                for r in search_all(client, exp_ids, f"tags.`{KIND_TAG}` = 'sweep'")
            }
        )
        where = f" in experiment {experiment!r}" if experiment else ""
        raise QueryError(f"no sweep named {sweep!r}{where}; sweeps: {known or 'none'}")
    if len(runs) > 1:
        # A parent left without trials (its driver died before any trial started) is not a
        # sweep anyone means: when exactly one of the namesakes has trials, that is the one.
        with_trials = [r for r in runs if children(client, r)]
        if len(with_trials) == 1:
            return with_trials[0]
        listing = "; ".join(
            f"{r.info.run_id} (experiment {client.get_experiment(r.info.experiment_id).name})"
            for r in runs
        )
        raise QueryError(
            f"{len(runs)} sweeps are named {sweep!r}: {listing}. Pass --experiment, or the "
            "parent run id as the sweep"
        )
    return runs[0]


def _quote(text: str) -> str:
    return text.replace("\\", "\\\\").replace("'", "\\'")


def children(client: MlflowClient, sweep: dict[str, Any] | Run) -> list[Run]:
    run_id = sweep["run_id"] if isinstance(sweep, dict) else sweep.info.run_id
    # Trials may log to another experiment than the parent (their own config's name).
    return search_all(
        client,
        experiment_ids(client),
        f"tags.`{PARENT_TAG}` = '{run_id}'",
        order_by=["attributes.start_time ASC"],
    )


def trial_row(client: MlflowClient, run: Run, metric: str, mode: str) -> dict[str, Any]:
    tags = run.data.tags
    history = [m.value for m in client.get_metric_history(run.info.run_id, metric)]
    epoch = run.data.metrics.get("epoch")
    return {
        "trial_id": tags.get(TRIAL_TAG, run.info.run_name),
        "run_id": run.info.run_id,
        "run_name": run.info.run_name,
        "status": run.info.status,
        "params": {
            k[len(PARAM_PREFIX) :]: _value(v) for k, v in tags.items() if k.startswith(PARAM_PREFIX)
        },
        "metric": metric,
        "value": best_of(history, mode),
        "last": run.data.metrics.get(metric),
        "epochs": int(epoch) + 1 if epoch is not None else 0,
        "rus": {
            k[len(RUS_PREFIX) :]: _float(v) for k, v in tags.items() if k.startswith(RUS_PREFIX)
        },
        "start_time": run.info.start_time,
        "duration_s": _duration_s(run),
        "error": tags.get(ERROR_TAG),
        "stopped_early": tags.get(STOPPED_EARLY_TAG) == "true",
    }


def rank(rows: list[dict[str, Any]], mode: str) -> list[dict[str, Any]]:
    """Best first by `value` (missing values last); ties: the earlier run first."""

    def key(r: dict[str, Any]) -> tuple[int, float, int]:
        v = r["value"]
        if v is None:
            return (1, 0.0, r["start_time"] or 0)
        return (0, -v if mode == "max" else v, r["start_time"] or 0)

    return sorted(rows, key=key)


def sweep_trials(
    sweep: str,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    sort: str | None = None,
    mode: str | None = None,
) -> dict[str, Any]:
    """One sweep and its trials, ranked by the sweep's selection metric (its parent's
    `commlab.metric` / `commlab.mode` tags) or by `sort` (mode: `mode`, else the sweep's mode
    when `sort` is its metric, else `infer_mode`).

    Returns {"sweep": sweep row, "metric", "mode", "trials": [trial rows]}; each trial row has
    `value` = best of `metric` over its history.
    """
    if mode is not None and mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    client, _ = client_for(tracking_uri)
    parent = find_sweep(client, sweep, experiment)
    row = sweep_row(client, parent)
    metric = sort or row["metric"]
    if not metric:
        raise ValueError(f"sweep {row['name']!r} has no {METRIC_TAG} tag; pass a metric to sort by")
    if mode is None:
        mode = (
            row["mode"] if metric == row["metric"] and row["mode"] in MODES else infer_mode(metric)
        )
    trials = [trial_row(client, r, metric, mode) for r in children(client, parent)]
    row["trials"] = len(trials)
    return {"sweep": row, "metric": metric, "mode": mode, "trials": rank(trials, mode)}


# ---------------------------------------------------------------- tables
def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e-3 or abs(v) >= 1e4 else f"{v:.{digits}f}"
    return str(v)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


_STATUS_STYLE = {
    "FINISHED": "green", "STOPPED": "dim", "RUNNING": "yellow", "FAILED": "red", "KILLED": "dim",
}  # fmt: skip


def _status(row: dict[str, Any]) -> str:
    """FINISHED, or STOPPED for a trial the scheduler stopped early (FINISHED in MLflow)."""
    status = "STOPPED" if row.get("stopped_early") else row["status"]
    style = _STATUS_STYLE.get(status, "")
    return f"[{style}]{status}[/]" if style else status


def sweeps_table(rows: list[dict[str, Any]], wide: bool = False) -> Any:
    """The sweeps. Narrow (default) fits 80 columns: name, status, trials, best value and
    duration; `wide` adds experiment, metric and best trial (all of it: `--json`)."""
    table = Table(title=f"{len(rows)} sweep(s)")
    table.add_column("sweep", no_wrap=True, overflow="fold")  # what --sweep takes
    if wide:
        table.add_column("experiment")
    table.add_column("status", no_wrap=True)
    table.add_column("trials", justify="right", no_wrap=True)
    if wide:
        table.add_column("metric")
    table.add_column("best", justify="right", no_wrap=True)
    if wide:
        table.add_column("best trial", no_wrap=True)
    table.add_column("time", justify="right", no_wrap=True)
    for r in rows:
        best = _fmt(r["best_metric"])
        if not wide and r["metric"]:
            best = f"{best} {_short_metric(r['metric'])}"
        cells = [r["name"]] + ([r["experiment"]] if wide else [])
        cells += [_status(r), _fmt(r["trials"])]
        cells += [f"{r['metric'] or '-'} ({r['mode'] or '-'})"] if wide else []
        cells += [best] + ([r["best_trial_id"] or "-"] if wide else [])
        cells.append(_duration(r["duration_s"]))
        table.add_row(*cells)
    return table


def _short_metric(metric: str) -> str:
    """`probe/mean/balanced_acc` -> `mean/balanced_acc` (the narrow table's unit)."""
    parts = metric.split("/")
    return "/".join(parts[1:]) if len(parts) > 2 else metric


def trials_table(data: dict[str, Any], wide: bool = False) -> Any:
    """One sweep's trials, best first. Narrow (default) fits 80 columns: trial, status,
    epochs, best value of the metric, duration; `wide` adds every swept parameter, the R/U/S
    scores and the run id (`--json` has everything)."""
    sweep, trials = data["sweep"], data["trials"]
    params = sorted({k for t in trials for k in t["params"]}) if wide else []
    axes = sorted({k for t in trials for k in t["rus"]}) if wide else []
    header = (
        f"sweep {sweep['name']} ({sweep['status']}, {len(trials)} trials), sorted by the best "
        f"{data['metric']} ({data['mode']}) over each trial's epochs"
    )
    table = Table()
    table.add_column("trial", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("epochs", justify="right", no_wrap=True)
    table.add_column("best" if not wide else data["metric"], justify="right", no_wrap=True)
    for p in params:
        table.add_column(p.replace("augment.modalities.", "aug."), justify="right")
    for a in axes:
        table.add_column(a[:3].upper() if a else a, justify="right")
    table.add_column("time", justify="right", no_wrap=True)
    if wide:
        table.add_column("run id", no_wrap=True, min_width=32)  # whole: load_encoder takes it
    best = sweep.get("best_trial_id")
    for t in trials:
        cells = [
            f"{t['trial_id']}{' *' if t['trial_id'] == best else ''}",
            _status(t),
            str(t["epochs"]),
            _fmt(t["value"]),
            *[_fmt(t["params"].get(p)) for p in params],
            *[_fmt(t["rus"].get(a), 3) for a in axes],
            _duration(t["duration_s"]),
        ]
        table.add_row(*cells, *([t["run_id"]] if wide else []))
    parts: list[Any] = [Text(header), table]
    if not wide:
        parts.append(Text("--wide: parameters, R/U/S and run ids; --json: everything"))
    return Group(*parts)


# ---------------------------------------------------------------- the MLflow UI
def ui_command(
    tracking_uri: str | None = None, host: str = "127.0.0.1", port: int = 5000
) -> list[str] | None:
    """argv of `mlflow server` on the project's store, or None when the store is already a
    server (http/https URI: nothing to start, open it). Runs are read from the database;
    their artifacts from each experiment's own location (absolute: `mlartifacts/` beside a
    sqlite file), so the UI shows them whatever the CWD."""
    uri = tracking_uri or default_tracking_uri()
    if uri.startswith(("http://", "https://")):
        return None
    if uri.startswith("file:") or "://" not in uri:
        raise ValueError(
            f"tracking URI {uri!r} is not a database URI (sqlite:///…, postgresql://…) or a "
            "server; MLflow 3 no longer serves the file store"
        )
    argv = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri]
    argv += ["--host", host, "--port", str(port), "--workers", "1"]
    if uri.startswith("sqlite:///"):
        root = Path(uri[len("sqlite:///") :]).parent
        argv += ["--artifacts-destination", str(root / "mlartifacts")]
    return argv


__all__ = [
    "MODES",
    "QueryError",
    "best_of",
    "children",
    "find_sweep",
    "infer_mode",
    "list_sweeps",
    "rank",
    "sweep_trials",
    "sweeps_table",
    "trials_table",
    "ui_command",
]
