"""Tracking fixtures: real MLflow stores (sqlite in tmp; a real `mlflow server` for integration
tests), sweeps made the way `commlab sweep` tags them, and checkpoints from a tiny real training.

`make_sweep` writes a parent run and its trial runs with the tags, per-epoch metrics and
`checkpoint/checkpoint.pt` artifacts of `commlab.sweep.run.run_sweep`, through
`commlab.tracking.runs`, so the registry and the runs table are tested without Ray.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import toy_config, toy_sequence_dataset

METRIC = "probe/mean/balanced_acc"
SERVER_START_TIMEOUT_S = 120
PG_DSN = {"host": "127.0.0.1", "port": 5432, "dbname": "test", "connect_timeout": 3}


# ---------------------------------------------------------------- checkpoints and data
@dataclass
class Trained:
    """Two real checkpoints (after epoch 0 and 1) of one tiny CoMM run, and its data on disk."""

    checkpoints: list[Path]
    dataset: Path


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Trained:
    from commlab.data.base import DataBundle
    from commlab.data.parquet import write_dataset
    from commlab.train.checkpoint import save_checkpoint
    from commlab.train.epoch_end import checkpoint_payload
    from commlab.train.loop import PretrainRun

    root = tmp_path_factory.mktemp("trained")
    ds = toy_sequence_dataset()
    cfg = toy_config(overrides=("train.epochs=2", "train.probe_every=1", "train.threads=1"))
    run = PretrainRun(cfg, data=DataBundle(pretrain=ds, probe=ds, description="toy"))
    paths: list[Path] = []

    def on_epoch_end(epoch: int, metrics: dict[str, float], r: PretrainRun) -> None:
        paths.append(
            save_checkpoint(
                root / f"epoch{epoch}" / "checkpoint.pt", checkpoint_payload(r, metrics)
            )
        )

    run.fit(on_epoch_end)
    return Trained(paths, write_dataset(ds, root / "toy-data"))


# ---------------------------------------------------------------- MLflow stores
@pytest.fixture(scope="session")
def _empty_sqlite_store(tmp_path_factory) -> Path:
    """An MLflow sqlite database with the schema created once (that takes seconds); each test
    gets a copy."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def sqlite_uri(_empty_sqlite_store, tmp_path) -> str:
    db = tmp_path / "store" / "mlflow.db"
    db.parent.mkdir()
    shutil.copy(_empty_sqlite_store, db)
    return f"sqlite:///{db}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"{url}: server exited ({proc.returncode}):\n{log.read_text()[-3000:]}"
            )
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url}/health not OK after {timeout_s}s:\n{log.read_text()[-3000:]}")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_group(proc: subprocess.Popen, grace_s: float = 10) -> None:
    """SIGTERM the whole process group the server leads (uvicorn, the job runner and its huey
    consumers outlive their leader otherwise), SIGKILL whatever is left after `grace_s`."""
    pgid = proc.pid  # start_new_session=True: the leader's pid is the group id
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if proc.poll() is not None and not _group_alive(pgid):
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    proc.wait(timeout=grace_s)


def start_server(
    argv: list[str], url: str, log: Path, timeout_s: float, env: dict[str, str] | None = None
) -> subprocess.Popen:
    """Start `argv` in its own process group (cwd: the log's directory); wait for /health."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=log.parent,
            env=env,
        )
    try:
        wait_healthy(url, proc, timeout_s, log)
    except BaseException:
        stop_group(proc)
        raise
    return proc


def _postgres_db() -> tuple[str, Any] | None:
    """A fresh PostgreSQL database (URI, drop function), or None when Postgres is unreachable."""
    try:
        import psycopg2
    except ImportError:
        return None
    name = f"mlflow_{uuid.uuid4().hex[:12]}"
    for user in ("postgres", "root"):
        try:
            conn = psycopg2.connect(user=user, **PG_DSN)
        except psycopg2.Error:
            continue
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        conn.close()

        def drop(user: str = user) -> None:
            conn = psycopg2.connect(user=user, **PG_DSN)
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.close()

        return f"postgresql+psycopg2://{user}@127.0.0.1:5432/{name}", drop
    return None


@dataclass
class Server:
    url: str
    backend: str  # "postgresql" or "sqlite"
    artifacts: Path
    log: Path
    extra: dict[str, Any] = field(default_factory=dict)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> Iterator[Server]:
    """A real `mlflow server` on 127.0.0.1:<free port> (PostgreSQL backend when reachable,
    else sqlite), proxying artifacts to a tmp directory; stopped (process group) and its
    database dropped at the end of the session."""
    root = tmp_path_factory.mktemp("mlflow-server")
    pg = _postgres_db()
    backend = pg[0] if pg else f"sqlite:///{root / 'mlflow.db'}"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", backend,
        "--serve-artifacts", "--artifacts-destination", str(root / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    proc = None
    try:
        # MLFLOW_* settings of the test environment are the client's, not the server's
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        proc = start_server(argv, url, root / "server.log", SERVER_START_TIMEOUT_S, env=env)
        yield Server(url, "postgresql" if pg else "sqlite", root / "artifacts", root / "server.log")
    finally:
        if proc is not None:
            stop_group(proc)
        if pg:
            pg[1]()


# ---------------------------------------------------------------- sweeps as run_sweep logs them
@dataclass
class TrialSpec:
    trial_id: str
    status: str = "FINISHED"
    history: list[float] = field(default_factory=list)  # the selection metric, epoch by epoch
    checkpoint: Path | None = None
    params: dict[str, Any] = field(default_factory=dict)
    rus: dict[str, float] | None = None
    metric: str = METRIC


@dataclass
class MadeSweep:
    name: str
    run_id: str
    experiment: str
    trials: dict[str, str]  # trial id -> run id


def make_sweep(
    uri: str,
    name: str,
    trials: list[TrialSpec],
    *,
    experiment: str = "toy",
    metric: str = METRIC,
    mode: str = "max",
    best_trial: str | None = None,
) -> MadeSweep:
    from commlab.config import flatten, to_yaml
    from commlab.tracking.runs import RunLogger, finish_run, open_run

    parent, _ = open_run(
        uri,
        experiment,
        run_key=f"sweep:/sweeps/{name}",
        run_name=name,
        params={},
        tags={
            "commlab.sweep": name,
            "commlab.kind": "sweep",
            "commlab.metric": metric,
            "commlab.mode": mode,
            "commlab.sweep_path": f"/sweeps/{name}",
        },
    )
    cfg = toy_config()
    ids = {}
    for t in trials:
        ref, _ = open_run(
            uri,
            experiment,
            run_key=f"trial:/sweeps/{name}/trains/{t.trial_id}",
            run_name=f"trial_{t.trial_id}",
            params=flatten(cfg),
            tags={
                "mlflow.parentRunId": parent.run_id,
                "ray.trial_id": t.trial_id,
                "commlab.sweep": name,
                "commlab.kind": "trial",
                "commlab.method": "comm",
                **{f"commlab.param.{k}": str(v) for k, v in t.params.items()},
            },
        )
        logger = RunLogger(ref)
        for epoch, value in enumerate(t.history):
            logger.log_epoch(epoch, {t.metric: value, "train/loss": 5.0 - epoch})
        if t.checkpoint is not None:
            logger.log_artifact(t.checkpoint, "checkpoint")
            logger.log_text(to_yaml(cfg), "config.yaml")
        if t.rus:
            logger.set_tags({f"commlab.rus.{k}": f"{v:.4f}" for k, v in t.rus.items()})
        if t.status != "RUNNING":
            finish_run(ref, t.status)
        ids[t.trial_id] = ref.run_id
    tags: dict[str, Any] = {"commlab.trials": len(trials)}
    if best_trial is not None:
        spec = next(t for t in trials if t.trial_id == best_trial)
        best = max(spec.history) if mode == "max" else min(spec.history)
        tags |= {"commlab.best_trial_id": best_trial, "commlab.best_metric": repr(best)}
    RunLogger(parent).set_tags(tags)
    finish_run(parent, "FINISHED")
    return MadeSweep(name, parent.run_id, experiment, ids)


def standard_trials(trained: Trained | None = None) -> list[TrialSpec]:
    """t0 wins by its best value (0.7) although t1's last value is higher (0.68 > 0.6); t2 is
    better still but was stopped early (KILLED); t3 failed before any probe. Without `trained`
    no checkpoints are logged (enough for the runs table)."""
    e0, e1 = trained.checkpoints if trained is not None else (None, None)
    return [
        TrialSpec("t0", history=[0.5, 0.7, 0.6], checkpoint=e1, params={"optim.lr": 0.001, "loss.temperature": 0.1}, rus={"redundancy": 0.9, "uniqueness": 0.4, "synergy": 0.55}),
        TrialSpec("t1", history=[0.65, 0.68], checkpoint=e0, params={"optim.lr": 0.003, "loss.temperature": 0.2}),
        TrialSpec("t2", status="KILLED", history=[0.9], checkpoint=e0, params={"optim.lr": 0.0005, "loss.temperature": 0.3}),
        TrialSpec("t3", status="FAILED", history=[], params={"optim.lr": 0.002, "loss.temperature": 0.05}),
    ]  # fmt: skip
