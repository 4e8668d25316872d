"""Redundancy / uniqueness / synergy report for the Trifeatures controlled experiment (notes §4.4).

Each axis is the balanced accuracy of one linear probe: redundancy = `share` (shape, 10 classes),
uniqueness = `unique1` (texture of image 1, 10 classes), synergy = `synergy` (binary). Values are
fractions in [0, 1]; tables and plots show percentages beside the chance levels 10 / 10 / 50 %.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

AXES = ("redundancy", "uniqueness", "synergy")
AXIS_TASK = {"redundancy": "share", "uniqueness": "unique1", "synergy": "synergy"}
CHANCE = {"redundancy": 0.1, "uniqueness": 0.1, "synergy": 0.5}


def rus_from_metrics(
    metrics: Mapping[str, float], prefix: str = "probe"
) -> dict[str, float] | None:
    """Pick the R/U/S axes out of flat probe metrics (`probe/<task>/balanced_acc`).

    Only the axes whose task was probed are returned; None when none was.
    """
    rus = {
        axis: float(metrics[key])
        for axis, task in AXIS_TASK.items()
        if (key := f"{prefix}/{task}/balanced_acc") in metrics
    }
    return rus or None


def write_rus_report(
    rus: Mapping[str, float], out_dir: str | Path, title: str = ""
) -> dict[str, Path]:
    """Write rus.json, rus.md and rus.png into out_dir; returns {"json"|"md"|"png": path}."""
    rus = _checked(rus)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "rus.json", "md": out / "rus.md", "png": out / "rus.png"}
    doc = {"title": title, "rus": rus, "chance": {a: CHANCE[a] for a in rus}}
    paths["json"].write_text(json.dumps(doc, indent=2) + "\n")
    paths["md"].write_text(_markdown(rus, title))
    _plot(rus, title, paths["png"])
    return paths


def format_rus_table(
    rows: Mapping[str, Mapping[str, float | Sequence[float]]], *, chance_row: bool = True
) -> str:
    """A markdown table, one row per method, one column per axis present in any row.

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
    if chance_row:
        lines.append("| chance | " + " | ".join(f"{100 * CHANCE[a]:.1f}" for a in axes) + " |")
    return "\n".join(lines) + "\n"


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


def _markdown(rus: dict[str, float], title: str) -> str:
    lines = [f"# {title}", ""] if title else []
    lines += ["| axis | task | balanced acc. (%) | chance (%) |", "|---|---|---:|---:|"]
    for axis, v in rus.items():
        lines.append(f"| {axis} | {AXIS_TASK[axis]} | {100 * v:.1f} | {100 * CHANCE[axis]:.0f} |")
    return "\n".join(lines) + "\n"


def _plot(rus: dict[str, float], title: str, path: Path) -> None:
    # Figure + Agg canvas directly: no pyplot, so no global backend or figure registry is touched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.5, 3.2), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs = list(range(len(rus)))
    ax.bar(xs, [100 * v for v in rus.values()], width=0.6, color="#4c72b0")
    for x, (axis, v) in zip(xs, rus.items(), strict=True):
        ax.hlines(100 * CHANCE[axis], x - 0.4, x + 0.4, colors="black", linestyles="--", lw=1)
        ax.text(x, 100 * v + 1.5, f"{100 * v:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(xs, list(rus))
    ax.set_ylim(0, 110)
    ax.set_ylabel("balanced accuracy (%)")
    ax.set_xlabel("dashed line: chance level", fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
