"""Redundancy / uniqueness / synergy report: CoMM's controlled experiment (notes §4.4), for any
dataset whose tasks are named like Trifeatures' (`share`, `unique1`, `synergy`).

Each axis is the balanced accuracy of one linear probe: redundancy = `share`, uniqueness =
`unique1` (or `unique` where a dataset has a single unique task), synergy = `synergy`. Values are
fractions in [0, 1]. Chance levels come from the tasks (1 / classes: balanced accuracy of a constant
prediction), never from constants. Beside the three axes the report lists every classification
probe (diagnostic tasks included, e.g. Trifeatures' colours), so a miss shows its cause: a synergy
at chance next to texture₁ at chance says the features never learnt texture.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from commlab.data.base import Task

AXES = ("redundancy", "uniqueness", "synergy")
AXIS_TASKS = {
    "redundancy": ("share",),
    "uniqueness": ("unique1", "unique"),
    "synergy": ("synergy",),
}


@dataclass
class RusReport:
    """R/U/S values and their chance levels, plus every classification probe behind them.

    probes: task -> {"balanced_acc", "chance", and "roc_auc" for binary tasks}.
    """

    rus: dict[str, float]
    chance: dict[str, float]
    probes: dict[str, dict[str, float]] = field(default_factory=dict)
    axis_task: dict[str, str] = field(default_factory=dict)

    def write(self, out_dir: str | Path, title: str = "") -> dict[str, Path]:
        """Write rus.json, rus.md and rus.png into out_dir; returns {"json"|"md"|"png": path}."""
        _checked(self.rus)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"json": out / "rus.json", "md": out / "rus.md", "png": out / "rus.png"}
        doc = {
            "title": title,
            "rus": self.rus,
            "chance": self.chance,
            "tasks": self.axis_task,
            "probes": self.probes,
        }
        paths["json"].write_text(json.dumps(doc, indent=2) + "\n")
        paths["md"].write_text(self.markdown(title))
        _plot(self.rus, self.chance, title, paths["png"])
        return paths

    def markdown(self, title: str = "") -> str:
        lines = [f"# {title}", ""] if title else []
        lines += ["| axis | task | balanced acc. (%) | chance (%) |", "|---|---|---:|---:|"]
        for axis, v in self.rus.items():
            lines.append(
                f"| {axis} | {self.axis_task.get(axis, '-')} | {100 * v:.1f} "
                f"| {_pct(self.chance.get(axis))} |"
            )
        if self.probes:
            lines += [
                "",
                "Every probe on the same frozen features (diagnostic tasks explain the axes):",
                "",
                "| task | balanced acc. (%) | chance (%) | ROC AUC |",
                "|---|---:|---:|---:|",
            ]
            for task, m in self.probes.items():
                auc = f"{m['roc_auc']:.3f}" if "roc_auc" in m else "-"
                lines.append(
                    f"| {task} | {100 * m['balanced_acc']:.1f} | {_pct(m.get('chance'))} | {auc} |"
                )
        return "\n".join(lines) + "\n"


def rus_report(
    metrics: Mapping[str, float], tasks: Mapping[str, Task], prefix: str = "probe"
) -> RusReport | None:
    """The report for flat probe metrics (`probe/<task>/balanced_acc`, …) of a dataset's tasks;
    None when no axis task was probed."""
    axis_task = {}
    for axis, names in AXIS_TASKS.items():
        found = [n for n in names if n in tasks and f"{prefix}/{n}/balanced_acc" in metrics]
        if found:
            axis_task[axis] = found[0]
    if not axis_task:
        return None
    probes: dict[str, dict[str, float]] = {}
    for name, task in tasks.items():
        key = f"{prefix}/{name}/balanced_acc"
        if key not in metrics:
            continue
        entry = {"balanced_acc": float(metrics[key])}
        if task.chance is not None:
            entry["chance"] = task.chance
        if f"{prefix}/{name}/roc_auc" in metrics:
            entry["roc_auc"] = float(metrics[f"{prefix}/{name}/roc_auc"])
        probes[name] = entry
    rus = {axis: probes[t]["balanced_acc"] for axis, t in axis_task.items()}
    chance = {a: probes[t]["chance"] for a, t in axis_task.items() if "chance" in probes[t]}
    return RusReport(rus, chance, probes, axis_task)


def rus_from_metrics(
    metrics: Mapping[str, float], prefix: str = "probe"
) -> dict[str, float] | None:
    """Pick the R/U/S axes out of flat probe metrics by task name alone (for tables of runs whose
    tasks are not at hand). Only the axes whose task was probed are returned; None when none was.
    """
    rus = {}
    for axis, names in AXIS_TASKS.items():
        keys = [k for n in names if (k := f"{prefix}/{n}/balanced_acc") in metrics]
        if keys:
            rus[axis] = float(metrics[keys[0]])
    return rus or None


def format_rus_table(
    rows: Mapping[str, Mapping[str, float | Sequence[float]]],
    *,
    chance: Mapping[str, float] | None = None,
) -> str:
    """A markdown table, one row per method, one column per axis present in any row, and a
    chance row when `chance` is given.

    A value is a fraction or a list of fractions (one per seed), shown as `mean ± std` in percent
    (sample std, ddof=1; a single value shows no std). An axis a method lacks shows "-".
    """
    if not rows:
        raise ValueError("format_rus_table needs at least one row")
    for method, values in rows.items():
        _check_axes(values, f"row '{method}'")
    axes = [a for a in AXES if any(a in v for v in rows.values())]
    lines = [
        "| method | " + " | ".join(axes) + " |",
        "|---|" + "---:|" * len(axes),
    ]
    for method, values in rows.items():
        cells = [_cell(values[a]) if a in values else "-" for a in axes]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    if chance is not None:
        lines.append("| chance | " + " | ".join(_pct(chance.get(a)) for a in axes) + " |")
    return "\n".join(lines) + "\n"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _check_axes(values: Mapping[str, object], where: str) -> None:
    unknown = sorted(set(values) - set(AXES))
    if unknown:
        raise ValueError(f"{where}: unknown axes {unknown}; valid: {', '.join(AXES)}")


def _checked(rus: Mapping[str, float]) -> dict[str, float]:
    if not rus:
        raise ValueError("empty R/U/S result: nothing to report")
    _check_axes(rus, "rus")
    out = {a: float(rus[a]) for a in AXES if a in rus}
    for axis, v in out.items():
        if not 0.0 <= v <= 1.0:  # a percentage passed by mistake would plot off the chart
            raise ValueError(f"rus['{axis}'] = {v} is not a fraction in [0, 1]")
    return out


def _cell(value: float | Sequence[float]) -> str:
    v = np.atleast_1d(np.asarray(value, dtype=np.float64)) * 100
    if v.size == 0:
        raise ValueError("empty list of values")
    if v.size == 1:
        return f"{v[0]:.1f}"
    return f"{v.mean():.1f} ± {v.std(ddof=1):.1f}"


def _plot(rus: dict[str, float], chance: Mapping[str, float], title: str, path: Path) -> None:
    # Figure + Agg canvas directly: no pyplot, so no global backend or figure registry is touched.
    # lazy: matplotlib is slow to import, and only the report's plot needs it
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.5, 3.2), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs = list(range(len(rus)))
    ax.bar(xs, [100 * v for v in rus.values()], width=0.6, color="#4c72b0")
    for x, (axis, v) in zip(xs, rus.items(), strict=True):
        if axis in chance:
            ax.hlines(100 * chance[axis], x - 0.4, x + 0.4, colors="black", linestyles="--", lw=1)
        ax.text(x, 100 * v + 1.5, f"{100 * v:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(xs, list(rus))
    ax.set_ylim(0, 110)
    ax.set_ylabel("balanced accuracy (%)")
    ax.set_xlabel("dashed line: chance level", fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
