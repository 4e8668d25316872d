"""End of a sweep: best trial on the parent MLflow run, plots, a trials table, a summary."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

import optuna
from rich.console import Console
from rich.table import Table

from commlab.cluster import _cwd
from commlab.sweep.space import LoadedSpace
from commlab.tags import (
    BEST_CHECKPOINT_TAG,
    BEST_METRIC_TAG,
    BEST_PARAM_PREFIX,
    BEST_TRIAL_ID_TAG,
    PARENT_TAG,
    RUS_PREFIX,
    RUS_TRIAL_TAG,
    TRIAL_TAG,
    TRIALS_TAG,
)
from commlab.tracking import finish_run
from commlab.tracking.runs import RunLogger, experiment_url


def plot_sweep(result: Any, metric: str, mode: str, out_dir: Path) -> list[Path]:
    """optimisation_history.png, learning_curves.png, parallel_coordinates.png and
    param_importances.png (when at least 3 trials have the metric)."""
    # lazy: matplotlib is slow to import, and only the end of a sweep plots
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out_dir.mkdir(parents=True, exist_ok=True)
    trials = [t for t in result.trials if t["history"]]
    written = []

    def save(fig: Figure, name: str) -> None:
        FigureCanvasAgg(fig)
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=110)
        written.append(path)

    best_of = max if mode == "max" else min
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    finals = [best_of(v for _, v in t["history"]) for t in trials]
    running = [best_of(finals[: i + 1]) for i in range(len(finals))]
    ax.scatter(range(1, len(finals) + 1), finals, label="trial")
    ax.plot(range(1, len(finals) + 1), running, color="C3", label="best so far")
    ax.set(xlabel="trial", ylabel=metric, title="Optimisation history")
    ax.legend()
    save(fig, "optimisation_history.png")

    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for t in trials:
        xs, ys = zip(*t["history"], strict=True)
        ax.plot(xs, ys, marker="o", ms=3, label=t["trial_id"])
    ax.set(xlabel="epoch", ylabel=metric, title="Learning curves")
    if len(trials) <= 12:
        ax.legend(fontsize=7)
    save(fig, "learning_curves.png")

    params = sorted(
        {k for t in trials for k, v in t["config"].items() if isinstance(v, int | float)}
    )
    if params:
        fig = Figure(figsize=(1.6 * (len(params) + 1) + 2, 4))
        ax = fig.add_subplot()
        cols = [*params, metric]
        values = [
            [t["config"].get(p, math.nan) for p in params] + [f]
            for t, f in zip(trials, finals, strict=True)
        ]
        lo = [min(v[i] for v in values) for i in range(len(cols))]
        hi = [max(v[i] for v in values) for i in range(len(cols))]
        span = [(h - low) or 1.0 for low, h in zip(lo, hi, strict=True)]
        fmin, fspan = min(finals), (max(finals) - min(finals)) or 1.0
        cmap = colormaps["viridis"]
        for v, f in zip(values, finals, strict=True):
            ax.plot(
                range(len(cols)),
                [(x - low) / s for x, low, s in zip(v, lo, span, strict=True)],
                color=cmap((f - fmin) / fspan),
                alpha=0.8,
            )
        ax.set_xticks(
            range(len(cols)),
            [c.replace("augment.modalities.", "aug.") for c in cols],
            rotation=20,
            fontsize=7,
        )
        ax.set(ylabel="normalised value", title="Parallel coordinates (colour = metric)")
        save(fig, "parallel_coordinates.png")

    importances = param_importances(trials, finals, mode)
    if importances:
        fig = Figure(figsize=(6, 0.5 * len(importances) + 1.5))
        ax = fig.add_subplot()
        names = list(importances)
        ax.barh(names, [importances[n] for n in names])
        ax.set(xlabel="importance (fANOVA)", title="Parameter importances")
        save(fig, "param_importances.png")
    return written


def param_importances(
    trials: list[dict[str, Any]], finals: list[float], mode: str
) -> dict[str, float]:
    """Optuna's fANOVA importances over the finished trials (needs >= 3 trials, >= 1 numeric
    parameter that varies); {} otherwise."""
    keys = sorted({k for t in trials for k, v in t["config"].items() if isinstance(v, int | float)})
    if len(trials) < 3 or not keys:
        return {}
    dists: dict[str, optuna.distributions.BaseDistribution] = {}
    for k in keys:
        vals = [float(t["config"][k]) for t in trials if k in t["config"]]
        if min(vals) < max(vals):
            dists[k] = optuna.distributions.FloatDistribution(min(vals), max(vals))
    if not dists:
        return {}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize" if mode == "max" else "minimize")
    for t, f in zip(trials, finals, strict=True):
        study.add_trial(
            optuna.trial.create_trial(
                params={k: float(t["config"][k]) for k in dists}, distributions=dists, value=f
            )
        )
    try:
        return dict(optuna.importance.get_param_importances(study))
    except (RuntimeError, ValueError):
        return {}


def finish_parent(space: LoadedSpace, parent: Any, result: Any, console: Console) -> None:
    """Best trial (id, metric, params, checkpoint) as tags/metrics on the parent run, plots and
    the trials table as artifacts, status FINISHED; print the summary."""
    spec = space.spec
    logger = RunLogger(parent)
    tags: dict[str, Any] = {TRIALS_TAG: len(result.trials)}
    if result.best_trial_id is not None:
        tags |= {
            BEST_TRIAL_ID_TAG: result.best_trial_id,
            BEST_METRIC_TAG: f"{result.best_metric!r}",
            BEST_CHECKPOINT_TAG: result.best_checkpoint or "",
            **{BEST_PARAM_PREFIX + k: v for k, v in result.best_params.items()},
        }
    logger.set_tags(tags)
    if result.best_metric is not None:
        logger.client.log_metric(parent.run_id, f"best/{spec.metric}", result.best_metric)
    ranked = [
        t["trial_id"]
        for t in sorted(
            (t for t in result.trials if _finite(t.get("metric"))),
            key=lambda t: t["metric"],
            reverse=spec.mode == "max",
        )
    ]
    if result.best_trial_id in ranked:  # Tune's best first, whatever the table's order says
        ranked.remove(result.best_trial_id)
        ranked.insert(0, result.best_trial_id)
    reported = copy_best_rus(logger, ranked)
    with tempfile.TemporaryDirectory() as tmp:
        plot_sweep(result, spec.metric, spec.mode, Path(tmp) / "plots")
        (Path(tmp) / "plots" / "trials.json").write_text(
            json.dumps(result.trials, indent=1, default=str)
        )
        logger.log_artifacts(Path(tmp) / "plots", "plots")
    finish_run(parent, "FINISHED")
    print_summary(result, spec.metric, console, space.max_epochs)
    if reported:
        trial_id, rus = reported
        whose = (
            "the best trial"
            if trial_id == result.best_trial_id
            else f"trial {trial_id}, the best that ran all its epochs"
        )
        console.print(
            f"R/U/S of {whose}: "
            + "  ".join(f"{axis} {value:.3f}" for axis, value in rus.items())
            + f"  (rus/rus.md and rus/rus.png on the parent run {parent.run_id})",
            highlight=False,
            soft_wrap=True,
        )
    print_next_steps(space, parent, result, console)


def copy_best_rus(logger: Any, ranked_trial_ids: list[str]) -> tuple[str, dict[str, float]] | None:
    """Put the R/U/S report (the `rus/` artifacts and `commlab.rus.*` tags) of the first trial in
    `ranked_trial_ids` (best first) that logged one on the sweep's parent run, so the sweep's one
    run shows the experiment's answer; a trial ASHA stopped early logged none, so the best trial
    that ran all its epochs stands in for it (`commlab.rus_trial_id` names it). Returns (trial
    id, {axis: value}), or None when no trial logged a report (a dataset without R/U/S tasks)."""
    client, parent_id = logger.client, logger.ref.run_id
    children = client.search_runs(
        [client.get_run(parent_id).info.experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'",
        max_results=10000,
    )
    by_trial = {c.data.tags.get(TRIAL_TAG): c for c in children}
    for trial_id in ranked_trial_ids:
        child = by_trial.get(trial_id)
        rus_tags = {
            k: v for k, v in (child.data.tags if child else {}).items() if k.startswith(RUS_PREFIX)
        }
        if child is None or not rus_tags:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            local = client.download_artifacts(child.info.run_id, "rus", tmp)
            logger.log_artifacts(local, "rus")
        logger.set_tags({**rus_tags, RUS_TRIAL_TAG: trial_id})
        return trial_id, {k.removeprefix(RUS_PREFIX): float(v) for k, v in rus_tags.items()}
    return None


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and math.isfinite(v)


def trial_state(t: dict[str, Any], max_epochs: int) -> str:
    if t.get("error"):
        return "failed"
    return "done" if (t.get("iterations") or 0) >= max_epochs else "stopped early"


def print_summary(result: Any, metric: str, console: Console, max_epochs: int = 0) -> None:
    """One row per trial: its state, epochs and the best value over its history (what
    `commlab runs` and `commlab promote` rank by)."""
    table = Table(
        title=f"sweep {result.name}: {len(result.trials)} trials in {result.wall_seconds:.0f}s"
    )
    table.add_column("trial", no_wrap=True)
    table.add_column("state", no_wrap=True)
    table.add_column("epochs", justify="right")
    table.add_column(f"best {metric}", justify="right")
    table.add_column("params")
    styles = {"done": "green", "stopped early": "dim", "failed": "red"}
    for t in result.trials:
        mark = " *" if t["trial_id"] == result.best_trial_id else ""
        state = trial_state(t, max_epochs)
        table.add_row(
            f"{t['trial_id']}{mark}",
            f"[{styles[state]}]{state}[/]",
            str(t["iterations"] or 0),
            _fmt(t["metric"]),
            ", ".join(f"{k}={_short(v)}" for k, v in t["config"].items()),
        )
    console.print(table)
    if result.best_trial_id:
        console.print(
            f"best: {result.best_trial_id} {metric}={_fmt(result.best_metric)}  "
            f"checkpoint {result.best_checkpoint}",
            soft_wrap=True,
        )


def print_next_steps(space: LoadedSpace, parent: Any, result: Any, console: Console) -> None:
    """What to run next, and where the results are."""
    uri = parent.tracking_uri
    model = f"{space.base.model.method}-{space.base.name}"
    where = (
        f"MLflow store: {uri[len('sqlite:///') :]} (sqlite; artifacts in mlartifacts/ beside it)"
        if uri.startswith("sqlite:///")
        else f"MLflow store: {uri}"
    )
    lines = [
        "next:",
        f"  commlab runs --sweep {result.name}        # the trials, ranked",
        f"  commlab ui                                # then open {experiment_url(uri, parent.experiment_id)}",
        f"  commlab promote --sweep {result.name} --model {model} --alias champion",
        where,
    ]
    here = _cwd()  # None when a job's working directory was deleted under it (see cluster.py)
    if uri.startswith("sqlite:///") and str(Path(uri[len("sqlite:///") :]).parent) != here:
        lines.append(f"  (from another directory add --tracking-uri {uri})")
    for line in lines:
        console.print(line, highlight=False, markup=False, soft_wrap=True)


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, int | float) else "-"


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
