"""Run plumbing shared by the drivers (`pretrain_local`, the Ray Train driver, the sweep driver):
where a run is stored and under which fresh name, data paths every Ray process reads alike, and
closing the run's MLflow run."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def storage_root(raw: str) -> str:
    """Where runs are stored: a local path made absolute (user expanded), a URI as given."""
    return raw if "://" in raw else str(Path(raw).expanduser().resolve())


def fresh_name(storage: str, base: str) -> str:
    """`base`, else the first free `base-1`, `base-2`, ... under `storage`: the same name would
    silently resume an earlier run. Under a URI storage, `base`: the caller names runs there."""
    if "://" in storage:
        return base
    name, i = base, 0
    while (Path(storage) / name).exists():
        i += 1
        name = f"{base}-{i}"
    return name


def absolute_data_path(path: str) -> str:
    """A relative local data path resolved from here: Ray Train workers and Tune trials run in
    directories of their own. Absolute paths and URIs as given."""
    if "://" in path or Path(path).is_absolute():
        return path
    return str(Path(path).resolve())


def finish(ref: Any, status: str, error: str | None = None) -> None:
    """End the run's MLflow run (`ref`: a RunRef, or None without tracking)."""
    if ref is not None:
        from commlab.tracking import finish_run  # lazy: mlflow only for runs that track

        finish_run(ref, status, error)
