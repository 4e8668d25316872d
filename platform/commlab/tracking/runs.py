"""MLflow runs: experiments, one run per training run, params, per-epoch metrics, artifacts.

All of commlab's MLflow calls go through here (train/ and sweep/ import this module, never
mlflow). Everything uses an explicit `MlflowClient(tracking_uri)`: Ray workers change their
working directory, so a relative or implicit URI would point each process at a different store.

A training run is identified by a *run key* (the Ray Train run path). The driver opens the MLflow
run before training (`open_run`) and hands a `RunRef` to the workers; a restarted attempt, or a
later `fit()` that resumes the same Ray run, finds the run by its key and continues it. Rank 0
logs through a `RunLogger`, which writes each epoch at most once (`log_epoch` skips steps MLflow
already holds), so retried epochs never duplicate history. The driver sets the terminal status.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from commlab.rus import rus_report
from commlab.tags import (
    CHANGED_PREFIX,
    ERROR_TAG,
    EXPERIMENT_KIND_TAG,
    KIND_TAG,
    METHOD_TAG,
    PROBE_PREFIX,
    RUN_KEY_TAG,
    RUS_PREFIX,
)

if TYPE_CHECKING:
    from commlab.data.base import Task

ENV_TRACKING_URI = "MLFLOW_TRACKING_URI"
STEP_METRIC = "epoch"  # logged every epoch; its history is the set of epochs MLflow holds
_BATCH = 100  # MLflow's log_batch limit for params (and a sane chunk for metrics)
_MAX_PARAM_VALUE = 6000
_TERMINAL = ("FINISHED", "FAILED", "KILLED")


def default_tracking_uri(cwd: str | Path | None = None) -> str:
    """`$MLFLOW_TRACKING_URI` if set, else `sqlite:///<absolute cwd>/mlflow.db`.

    MLflow's own default is the same sqlite file but resolved lazily in whichever process asks,
    and Ray workers run in other directories: resolve it once, in the driver.
    """
    env = os.environ.get(ENV_TRACKING_URI)
    if env:
        return absolute_uri(env)
    root = Path(cwd) if cwd is not None else Path.cwd()
    return f"sqlite:///{(root / 'mlflow.db').resolve()}"


class TrackingUnavailableError(ValueError):
    """The tracking store cannot be used: the message names the URI, the problem and the fix."""


_DEFAULT_PORTS = {"http": 80, "https": 443, "postgresql": 5432, "mysql": 3306, "mssql": 1433}


def check_tracking_uri(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast when the store behind `uri` cannot be reached.

    MLflow's client retries an unreachable server for minutes (7 retries with exponential
    backoff) and then raises a long traceback; drivers and queries call this first. Servers and
    databases: one TCP connection (a closed port answers at once); sqlite: the directory of the
    file must exist. Outages later in a run are left to MLflow's retries.
    """
    fix = "start it, or point MLFLOW_TRACKING_URI / --tracking-uri at a running one"
    if uri.startswith("sqlite:"):
        if uri.startswith("sqlite:///") and ":memory:" not in uri:
            parent = Path(uri[len("sqlite:///") :]).parent
            if not parent.is_dir():
                raise TrackingUnavailableError(
                    f"tracking URI {uri}: directory {parent} does not exist; create it or use "
                    "another sqlite:///ABSOLUTE/PATH/mlflow.db"
                )
        return
    parts = urlsplit(uri)
    scheme = parts.scheme.split("+", 1)[0]
    if scheme == "file" or not scheme:
        if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() == "true":
            return
        raise TrackingUnavailableError(
            f"tracking URI {uri!r} is a file store, which MLflow 3 refuses; use "
            "sqlite:///ABSOLUTE/PATH/mlflow.db or an http:// server"
        )
    if scheme not in _DEFAULT_PORTS:
        if scheme in ("databricks", "azureml"):
            return
        raise TrackingUnavailableError(
            f"tracking URI {uri!r}: unknown scheme {parts.scheme!r}; use http(s)://HOST:PORT, "
            "sqlite:///ABSOLUTE/PATH/mlflow.db or postgresql://USER@HOST/DB"
        )
    try:
        host, port = parts.hostname, parts.port or _DEFAULT_PORTS[scheme]
    except ValueError:
        raise TrackingUnavailableError(f"tracking URI {uri!r}: malformed port") from None
    if not host:
        raise TrackingUnavailableError(f"tracking URI {uri!r} names no host")
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as err:
        what = "MLflow tracking server" if scheme.startswith("http") else "tracking database"
        reason = "timed out" if isinstance(err, TimeoutError) else (err.strerror or str(err))
        raise TrackingUnavailableError(
            f"{what} {uri} is not reachable ({host}:{port}: {reason}); {fix}"
        ) from None


def absolute_uri(uri: str) -> str:
    """A relative `sqlite:///rel.db` made absolute (from this process's CWD); others unchanged."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and ":memory:" not in uri:
        path = Path(uri[len(prefix) :])
        if not path.is_absolute():
            return f"{prefix}{path.resolve()}"
    return uri


def artifact_location(tracking_uri: str) -> str | None:
    """Where new experiments keep artifacts: `mlartifacts/` beside a sqlite database file
    (absolute, so no process's CWD matters); None for servers, which choose themselves."""
    prefix = "sqlite:///"
    if tracking_uri.startswith(prefix) and ":memory:" not in tracking_uri:
        db = Path(tracking_uri[len(prefix) :])
        return (db.parent / "mlartifacts").resolve().as_uri()
    return None


# MLflow 3's UI opens an experiment on its GenAI overview (traces) unless the experiment says
# it holds model training; commlab's experiments do, so they open on their runs.
EXPERIMENT_KIND = "custom_model_development"


def get_or_create_experiment(client: MlflowClient, name: str, tracking_uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        if EXPERIMENT_KIND_TAG not in (exp.tags or {}):
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return str(exp.experiment_id)
    try:
        exp_id = str(client.create_experiment(name, artifact_location(tracking_uri)))
    except MlflowException:
        # another process created it between our lookup and create
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return str(exp.experiment_id)
    client.set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return exp_id


def experiment_url(tracking_uri: str, experiment_id: str, ui: str = "http://127.0.0.1:5000") -> str:
    """The experiment's training-runs page: on the server itself for http(s) stores, else on
    `commlab ui` (default address)."""
    base = tracking_uri if tracking_uri.startswith(("http://", "https://")) else ui
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs"


@dataclass(frozen=True)
class RunRef:
    """Everything a worker needs to log into a run; small and picklable."""

    tracking_uri: str
    experiment_id: str
    run_id: str

    def client(self) -> MlflowClient:
        return MlflowClient(self.tracking_uri)


def _param_value(v: Any) -> str:
    s = "None" if v is None else str(v)
    return s if len(s) <= _MAX_PARAM_VALUE else s[: _MAX_PARAM_VALUE - 3] + "..."


def log_params(client: MlflowClient, run_id: str, params: Mapping[str, Any]) -> dict[str, str]:
    """Log params the run does not hold yet (MLflow params are immutable).

    Returns {key: new value} for keys the run already holds with a *different* value, e.g. a
    resumed run whose `train.epochs` was raised; the caller records them as tags.
    """
    have = client.get_run(run_id).data.params
    new = [Param(k, _param_value(v)) for k, v in params.items() if k not in have]
    changed = {
        k: _param_value(v) for k, v in params.items() if k in have and have[k] != _param_value(v)
    }
    for i in range(0, len(new), _BATCH):
        client.log_batch(run_id, params=new[i : i + _BATCH])
    return changed


def find_run(client: MlflowClient, experiment_id: str, run_key: str) -> str | None:
    """The newest non-deleted run of the experiment tagged with `run_key`, if any."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def open_run(
    tracking_uri: str,
    experiment: str,
    run_key: str,
    run_name: str,
    params: Mapping[str, Any],
    tags: Mapping[str, str] | None = None,
) -> tuple[RunRef, bool]:
    """Create the MLflow run for `run_key`, or reopen the existing one (status RUNNING again).

    Returns the reference and whether an existing run was reopened. Params are logged once;
    a reopened run whose params changed gets `commlab.changed.<key>` tags instead.
    """
    client = MlflowClient(tracking_uri)
    exp_id = get_or_create_experiment(client, experiment, tracking_uri)
    run_id = find_run(client, exp_id, run_key)
    # MLflow servers reject non-string tag values (sqlite stores accept them): stringify here
    all_tags = {k: _param_value(v) for k, v in {RUN_KEY_TAG: run_key, **(tags or {})}.items()}
    reopened = run_id is not None
    if run_id is None:
        run_id = client.create_run(exp_id, run_name=run_name, tags=all_tags).info.run_id
    else:
        client.update_run(run_id, status="RUNNING")
        if ERROR_TAG in client.get_run(run_id).data.tags:
            client.delete_tag(run_id, ERROR_TAG)  # the error belonged to an earlier fit()
        set_tags(client, run_id, all_tags)
    changed = log_params(client, run_id, params)
    set_tags(client, run_id, {CHANGED_PREFIX + k: v for k, v in changed.items()})
    return RunRef(tracking_uri, exp_id, run_id), reopened


def open_pretrain_run(
    tracking_uri: str | None,
    experiment: str,
    run_key: str,
    run_name: str,
    params: Mapping[str, Any],
    method: str,
    tags: Mapping[str, Any],
) -> RunRef:
    """The MLflow run of one pretraining, in-process or on Ray Train: created, or reopened when
    `run_key` (its run directory) already has one. `tracking_uri` None: the default store."""
    uri = absolute_uri(tracking_uri) if tracking_uri else default_tracking_uri()
    check_tracking_uri(uri)
    ref, _ = open_run(
        uri,
        experiment,
        run_key=run_key,
        run_name=run_name,
        params=params,
        tags={KIND_TAG: "pretrain", METHOD_TAG: method, **tags},
    )
    return ref


def set_tags(client: MlflowClient, run_id: str, tags: Mapping[str, Any]) -> None:
    items = [RunTag(k, _param_value(v)) for k, v in tags.items()]
    for i in range(0, len(items), _BATCH):
        client.log_batch(run_id, tags=items[i : i + _BATCH])


def finish_run(ref: RunRef, status: str, error: str | None = None) -> None:
    """Set the terminal status (FINISHED, FAILED or KILLED); `error` goes to a tag."""
    if status not in _TERMINAL:
        raise ValueError(f"status must be one of {_TERMINAL}, got {status!r}")
    client = ref.client()
    if error:
        set_tags(client, ref.run_id, {ERROR_TAG: error})
    client.set_terminated(ref.run_id, status=status)


def status_of_key(tracking_uri: str, experiment: str, run_key: str) -> str | None:
    """The status of the run keyed `run_key` in `experiment` (created if missing), or None
    when there is no such run yet."""
    client = MlflowClient(tracking_uri)
    run_id = find_run(client, get_or_create_experiment(client, experiment, tracking_uri), run_key)
    return str(client.get_run(run_id).info.status) if run_id else None


def run_status(ref: RunRef) -> str:
    return str(ref.client().get_run(ref.run_id).info.status)


# Hyperparameters a probe chose (`probe/<task>/C`, `probe/<task>/alpha`): settings, not
# measurements, so they are tags (`commlab.probe.<task>.C`, the latest choice), never metrics.
PROBE_HYPERPARAMS = ("C", "alpha")


def is_probe_hyperparam(key: str) -> bool:
    return key.startswith("probe/") and key.rsplit("/", 1)[-1] in PROBE_HYPERPARAMS


def probe_hyperparam_tags(metrics: Mapping[str, Any]) -> dict[str, str]:
    """`probe/<task>/C` -> {`commlab.probe.<task>.C`: value} for every probe hyperparameter."""
    return {
        PROBE_PREFIX + k.removeprefix("probe/").replace("/", "."): f"{float(v):g}"
        for k, v in metrics.items()
        if is_probe_hyperparam(k) and isinstance(v, int | float) and not isinstance(v, bool)
    }


def _numeric(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        if isinstance(v, bool) or not isinstance(v, int | float) or is_probe_hyperparam(k):
            continue
        out[k] = float(v)
    return out


class RunLogger:
    """Rank 0's handle on the run: idempotent per-epoch metrics, tags, artifacts."""

    def __init__(self, ref: RunRef) -> None:
        self.ref = ref
        self.client = ref.client()
        history = self.client.get_metric_history(ref.run_id, STEP_METRIC)
        self._logged = {int(m.step) for m in history}

    def has_epoch(self, epoch: int) -> bool:
        return epoch in self._logged

    @property
    def logged_epochs(self) -> set[int]:
        return set(self._logged)

    def log_epoch(self, epoch: int, metrics: Mapping[str, Any]) -> bool:
        """Log `metrics` at step `epoch` unless MLflow already holds that epoch; True if logged.

        Non-numeric values are skipped; NaN/inf are kept (MLflow stores them) because a
        diverging metric is information. Probe hyperparameters (`probe/<task>/C`) become tags.
        """
        if epoch in self._logged:
            return False
        hyper = probe_hyperparam_tags(metrics)
        if hyper:
            self.set_tags(hyper)
        ts = int(time.time() * 1000)
        values = {**_numeric(metrics), STEP_METRIC: float(epoch)}
        # STEP_METRIC goes last: an interrupted batch sequence must not mark the epoch as done
        items = [Metric(k, v, ts, epoch) for k, v in values.items() if k != STEP_METRIC]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self.ref.run_id, metrics=items[i : i + _BATCH])
        self.client.log_batch(
            self.ref.run_id, metrics=[Metric(STEP_METRIC, float(epoch), ts, epoch)]
        )
        self._logged.add(epoch)
        return True

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        set_tags(self.client, self.ref.run_id, tags)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.ref.run_id, str(path), artifact_path)

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.ref.run_id, str(directory), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.ref.run_id, text, artifact_file)

    def log_rus(
        self, metrics: Mapping[str, float], tasks: Mapping[str, Task], title: str = ""
    ) -> dict[str, float] | None:
        """The R/U/S report (rus.json/.md/.png under `rus/`) when the probes cover its tasks."""
        report = rus_report(metrics, tasks)
        if report is None:
            return None
        with tempfile.TemporaryDirectory() as tmp:
            report.write(tmp, title=title)
            self.log_artifacts(tmp, "rus")
        self.set_tags({RUS_PREFIX + k: f"{v:.4f}" for k, v in report.rus.items()})
        return report.rus


def metric_steps(ref: RunRef, key: str) -> list[int]:
    """Steps at which `key` was logged, in logging order (duplicates kept: tests check them)."""
    return [int(m.step) for m in ref.client().get_metric_history(ref.run_id, key)]


__all__ = [
    "ENV_TRACKING_URI",
    "TrackingUnavailableError",
    "check_tracking_uri",
    "ERROR_TAG",
    "RUN_KEY_TAG",
    "STEP_METRIC",
    "RunLogger",
    "RunRef",
    "absolute_uri",
    "artifact_location",
    "default_tracking_uri",
    "find_run",
    "finish_run",
    "get_or_create_experiment",
    "log_params",
    "metric_steps",
    "open_pretrain_run",
    "open_run",
    "run_status",
    "set_tags",
]
