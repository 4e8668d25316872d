"""Real Ray clusters and a real `mlflow server` on loopback, owned and torn down by the tests.

Every process is started in its own session (`start_new_session`), so teardown can stop exactly
the processes this file started (and the Ray workers they spawned) and nothing else on the
machine: never `ray stop`, which stops every Ray cluster of the machine. Every port is a free
one picked here; 6379 (Ray's default GCS port) belongs to a Redis on this machine.

Note: Ray maps 127.0.0.1 to the machine's own address for node IPs, and its internal servers
listen on every interface; the addresses the tests use (dashboard, GCS, MLflow) are loopback.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from commlab.cluster import Auth, auth_env, auth_headers

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A free loopback port not handed out before in this session: the OS may offer a port it
    just gave again, and `ray start` refuses two of its components on one port."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def _session_pids(sid: int) -> list[int]:
    """Processes in session `sid` (the ones a `start_new_session` child and its children made)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # state, ppid, pgrp, session, ...
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(entry))
    return pids


def stop_sessions(procs: list[subprocess.Popen], grace_s: float = 20.0) -> None:
    """SIGTERM the session leaders we started (all at once), then SIGKILL what is left of
    their sessions: exactly the processes they and their children made."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        for proc in procs:
            proc.poll()  # reap the leader, or it lingers as a zombie
        if not any(_session_pids(p.pid) for p in procs):
            break
        time.sleep(0.2)
    for proc in procs:
        for pid in _session_pids(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)


def _get(url: str, headers: dict[str, str] | None = None, timeout: float = 2.0) -> bytes:
    req = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.read()


def _wait_for(what: str, check, timeout_s: float, procs: list[subprocess.Popen], log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{what}: process exited ({p.returncode}):\n{log.read_text()}")
        try:
            if check():
                return
        except (OSError, urllib.error.URLError, ValueError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{what} not ready after {timeout_s:g} s:\n{log.read_text()[-3000:]}")


def cluster_env(auth: Auth) -> dict[str, str]:
    """The environment of every node: the same auth everywhere (commlab.cluster.auth_env)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RAY_AUTH", "RAY_ADDRESS", "RAY_API_SERVER", "MLFLOW_"))
    }
    env.update(auth_env(auth))
    env.update({"RAY_DISABLE_USAGE_STATS": "1", "RAY_DEDUP_LOGS": "0"})
    # A job's entrypoint runs `python` from the node's PATH: on a real node that is the
    # environment commlab is installed in, here the interpreter running the tests.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


@dataclass
class RayCluster:
    """A Ray head (+ workers) started with `ray start --block`, each its own session."""

    tmp: Path
    auth: Auth
    gcs_port: int = field(default_factory=free_port)
    dashboard_port: int = field(default_factory=free_port)
    procs: list[subprocess.Popen] = field(default_factory=list)
    # Ray's unix sockets live under --temp-dir and their paths must stay under 108 bytes
    temp_dir: Path = field(
        default_factory=lambda: Path(tempfile.mkdtemp(prefix="cl-ray-", dir="/tmp"))
    )
    # every node in one temp dir: the layout of `ray start` twice on one machine without
    # --temp-dir (both in /tmp/ray), which users try first; kept out of the real /tmp/ray
    shared_temp_dir: bool = False

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _node_args(self) -> list[str]:
        # each node its own temp dir: nodes sharing one would each tail the other's logs
        node_dir = self.temp_dir / ("shared" if self.shared_temp_dir else f"n{len(self.procs)}")
        ports = {
            "--node-manager-port": free_port(),
            "--object-manager-port": free_port(),
            "--dashboard-agent-listen-port": free_port(),
            "--dashboard-agent-grpc-port": free_port(),
            "--metrics-export-port": free_port(),
            "--runtime-env-agent-port": free_port(),
        }
        return [
            "--block",
            "--node-ip-address=127.0.0.1",
            "--disable-usage-stats",
            f"--temp-dir={node_dir}",
            *(f"{k}={v}" for k, v in ports.items()),
        ]

    def _spawn(self, argv: list[str], name: str) -> subprocess.Popen:
        log = self.tmp / f"{name}.log"
        proc = subprocess.Popen(
            argv,
            env=cluster_env(self.auth),
            cwd=self.tmp,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    def start_head(self, num_cpus: int = 2, timeout_s: float = 90) -> None:
        argv = [
            RAY,
            "start",
            "--head",
            f"--port={self.gcs_port}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={free_port()}",
            f"--num-cpus={num_cpus}",
            *self._node_args(),
        ]
        proc = self._spawn(argv, "head")
        url = f"{self.dashboard_url}/api/gcs_healthz"  # public even with token auth
        _wait_for(
            "ray head", lambda: _get(url) is not None, timeout_s, [proc], self.tmp / "head.log"
        )

    def add_worker(self, num_cpus: int = 2, timeout_s: float = 90) -> None:
        n = len(self.procs)
        argv = [RAY, "start", f"--address={self.gcs_address}", f"--num-cpus={num_cpus}"]
        proc = self._spawn([*argv, *self._node_args()], f"worker{n}")
        _wait_for(
            f"ray worker {n}",
            lambda: self.alive_nodes() >= n + 1,
            timeout_s,
            [proc],
            self.tmp / f"worker{n}.log",
        )

    def alive_nodes(self) -> int:
        body = _get(f"{self.dashboard_url}/api/v0/nodes", auth_headers(self.auth))
        nodes = json.loads(body)["data"]["result"]["result"]
        return sum(1 for n in nodes if n["state"] == "ALIVE")

    def stop(self) -> None:
        stop_sessions(self.procs)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory) -> Iterator[RayCluster]:
    """Two nodes, 2 CPUs each, token authentication disabled on every node and client."""
    cluster = RayCluster(tmp_path_factory.mktemp("ray-cluster"), Auth("disabled"))
    try:
        cluster.start_head(num_cpus=2)
        cluster.add_worker(num_cpus=2)
        yield cluster
    finally:
        cluster.stop()


@dataclass
class MlflowServer:
    url: str
    root: Path
    proc: subprocess.Popen
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    backend: str = ""

    def wait_ready(self, timeout_s: float = 120) -> MlflowServer:
        log = self.root / "server.log"
        _wait_for("mlflow server", lambda: _get(f"{self.url}/health") is not None,
                  timeout_s, [self.proc], log)  # fmt: skip
        return self

    def start(self) -> MlflowServer:
        log = (self.root / "server.log").open("a")
        self.proc = subprocess.Popen(
            self.argv, env=self.env, cwd=self.root, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        return self

    def stop(self) -> None:
        stop_sessions([self.proc], grace_s=10)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory) -> Iterator[MlflowServer]:
    """`mlflow server` on 127.0.0.1 with a PostgreSQL backend (a fresh database, dropped at the
    end; sqlite when PostgreSQL is unreachable) and proxied artifacts in a tmp dir.

    Yields as soon as it is started (it takes a while to come up: request it before the Ray
    cluster, then call `wait_ready()`). `stop()` / `start()` take it down and bring it back on
    the same port and database (an outage drill).
    """
    from tests.tracking.conftest import _postgres_db

    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    pg = _postgres_db()
    backend = pg[0] if pg else f"sqlite:///{root / 'mlflow.db'}"
    argv = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        f"--backend-store-uri={backend}",
        "--serve-artifacts",
        f"--artifacts-destination={root / 'artifacts'}",
        "--host=127.0.0.1",
        f"--port={port}",
        "--workers=1",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    server = MlflowServer(f"http://127.0.0.1:{port}", root, None, argv, env, backend)  # type: ignore[arg-type]
    server.start()
    try:
        yield server
    finally:
        server.stop()
        if pg:
            pg[1]()
