"""Experiment tracking (MLflow). The only package in commlab that imports mlflow."""

from commlab.tracking.runs import (
    RunLogger,
    RunRef,
    default_tracking_uri,
    finish_run,
    open_run,
)

__all__ = ["RunLogger", "RunRef", "default_tracking_uri", "finish_run", "open_run"]
