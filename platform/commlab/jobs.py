"""Ray Jobs: run `commlab sweep | pretrain | promote` on a Ray cluster, and manage the jobs.

`submit` checks on this machine what it can before anything reaches the cluster: the command,
the MLflow tracking URI the job will use, and the files named in the arguments. It then ships
the code with the job (a Ray runtime_env `working_dir`, uploaded through the Jobs API) and runs
the thin entry point `entrypoints/<kind>.py` there, which calls the same function as the CLI.

The job runs on the cluster's head node, so every path and URI it receives must mean the same
*there*: files inside the shipped working dir are passed relative to it; anything else must be
an absolute path every node sees (a shared filesystem) or a URI.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from rich.table import Table

import commlab
from commlab.cluster import Auth, ClusterError, dashboard_url, job_client, resolve_auth
from commlab.config import load_config
from commlab.tags import KIND_TAG

KINDS = ("sweep", "pretrain", "promote")
# gitignore patterns, matched from the working dir: "/x" only at its top (platform/commlab/data is
# code and must travel), and no trailing "/" so Ray skips a directory without walking into it.
# Ray also honours the working dir's .gitignore.
EXCLUDES = [
    "/.venv",
    "/data",
    "/runs",
    "/sweeps",
    "/mlruns",
    "/mlartifacts",
    "/ray_results",
    "*.db",
    "/.git",
    "/docker/.env",
    "__pycache__",
    "*.egg-info",
    ".pytest_cache",
    ".ruff_cache",
    ".mypy_cache",
]
EXIT_CODES = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 3}
TRACKING_ENV = "MLFLOW_TRACKING_URI"
STOP_WAIT_ENV = "RAY_JOB_STOP_WAIT_TIME_S"
_DB_SCHEMES = ("postgresql", "mysql", "mssql")
_LOOPBACK = ("localhost", "127.0.0.1", "::1")


class SubmitError(ValueError):
    """The job cannot be submitted as asked (found on this machine, before submission)."""


@dataclass
class JobSpec:
    """What the cluster runs: the entry point, its runtime_env, and what to warn about."""

    entrypoint: str
    runtime_env: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


@dataclass
class Submission:
    job_id: str
    address: str  # the Jobs API URL
    spec: JobSpec


def project_root() -> Path | None:
    """The source checkout this commlab runs from (platform/commlab beside entrypoints/), or None."""
    pkg = Path(commlab.__file__).resolve().parent
    root = pkg.parent.parent
    if pkg.parent.name == "platform" and (root / "entrypoints").is_dir():
        return root
    return None


def check_tracking_uri(uri: str | None) -> tuple[str, list[str]]:
    """The MLflow tracking URI for the job, and warnings; SubmitError if it cannot work there.

    The job and its trials run on cluster nodes, so the URI must mean the same on each of them:
    an `mlflow server` over http(s) (the way to go: many concurrent writers, proxied
    artifacts), a database server, or a sqlite file at an absolute path every node sees. A
    relative path would resolve inside the job's temporary working dir and vanish with it.
    """
    if not uri:
        raise SubmitError(
            "a cluster job needs an MLflow tracking URI that the cluster can reach: pass "
            "--tracking-uri http://HOST:5000 (an `mlflow server`; docker/compose.yaml runs one) "
            f"or set ${TRACKING_ENV}. The local default (sqlite in this directory) does not "
            "exist on the cluster."
        )
    parts = urlsplit(uri)
    scheme = parts.scheme.lower().split("+")[0]
    if scheme in ("http", "https"):
        if parts.hostname in _LOOPBACK:
            return uri, [
                f"tracking URI {uri}: the job resolves {parts.hostname} on the cluster's nodes; "
                "right for a cluster on this machine, wrong in containers (compose: "
                "http://mlflow:5000)"
            ]
        return uri, []
    if scheme in _DB_SCHEMES:
        return uri, []
    if scheme == "sqlite" or (not parts.scheme and uri.endswith(".db")):
        path = uri[len("sqlite:///") :] if scheme == "sqlite" else uri
        if not Path(path).is_absolute():
            raise SubmitError(
                f"tracking URI {uri}: a relative sqlite path resolves in the job's temporary "
                "working dir on the cluster; use an http:// mlflow server, or "
                "sqlite:////ABSOLUTE/PATH/mlflow.db on a filesystem every node sees"
            )
        return f"sqlite:///{path}", [
            f"tracking URI {uri}: every node must see this file, and concurrent trials writing "
            "to sqlite can fail with 'database is locked'; an mlflow server is safer"
        ]
    if scheme == "file" or not parts.scheme:
        raise SubmitError(
            f"tracking URI {uri}: MLflow's file store is off by default since MLflow 3; use an "
            "http:// mlflow server, or sqlite:////ABSOLUTE/PATH/mlflow.db that every node sees"
        )
    return uri, []


# Options of `commlab <kind>` that take a value, so that ARGS can be told apart from option
# values before submitting (a test checks them against the CLI's own definitions).
VALUE_OPTIONS: dict[str, frozenset[str]] = {
    "sweep": frozenset({"--address", "--name", "--storage"}),
    "pretrain": frozenset(
        {
            "--address",
            "--cpus-per-worker",
            "--experiment",
            "--gpus-per-worker",
            "--max-failures",
            "--out",
            "--workers",
        }
    ),
}


def _scan(args: list[str], value_opts: frozenset[str]) -> tuple[list[int], dict[str, str]]:
    """Indices of the positional arguments, and the `--opt value` pairs."""
    positional: list[int] = []
    opts: dict[str, str] = {}
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--":
            return positional + list(range(i + 1, len(args))), opts
        if a.startswith("-") and a != "-":
            name, eq, val = a.partition("=")
            if eq:
                opts[name] = val
            elif name in value_opts and i + 1 < len(args):
                opts[name] = args[i + 1]
                i += 1
        else:
            positional.append(i)
        i += 1
    return positional, opts


def _cluster_path(arg: str, cwd: Path, working_dir: Path | None) -> tuple[str, str | None]:
    """`arg` as the job must see it: relative to the shipped working dir, else absolute."""
    path = (cwd / arg).resolve()
    if working_dir is not None:
        try:
            return path.relative_to(working_dir.resolve()).as_posix(), None
        except ValueError:
            pass
    return str(path), (
        f"{arg} is outside the shipped working dir: the job reads {path}, which must exist "
        "at that path on the cluster (a shared filesystem)"
    )


def _data_warning(data_path: str) -> str | None:
    if "://" in data_path or Path(data_path).is_absolute():
        return None
    return (
        f"data.path {data_path!r} is relative: Ray workers resolve it in their own directories "
        "on their own nodes (data/ is not shipped); use an absolute path every node sees"
    )


def prepare_args(
    kind: str, args: list[str], *, cwd: Path, working_dir: Path | None
) -> tuple[list[str], list[str]]:
    """Check the files the command names (here, before submission) and rewrite their paths
    for the cluster; returns (args, warnings)."""
    args = list(args)
    warnings: list[str] = []
    if kind not in ("sweep", "pretrain"):
        return args, warnings
    positional, opts = _scan(args, VALUE_OPTIONS[kind])
    what = "search space file" if kind == "sweep" else "config file"
    if not positional:
        raise SubmitError(f"commlab {kind} needs a {what} argument")
    first = positional[0]
    local = cwd / args[first]
    if not local.is_file():
        raise SubmitError(f"{what} not found: {local} (checked on this machine before submitting)")
    try:
        if kind == "sweep":
            # lazy: search spaces import the methods (torch), which `import commlab.cli` must
            # not load
            from commlab.sweep.space import load_space

            data_path = load_space(local).base.data.path
        else:
            overrides = [args[i] for i in positional[1:]]
            data_path = load_config(local, overrides).data.path
    except ValueError as err:  # SearchSpaceError, ConfigError
        raise SubmitError(str(err)) from None
    args[first], warn = _cluster_path(args[first], cwd, working_dir)
    warnings += [w for w in (warn, _data_warning(data_path)) if w]
    out_opt = "--storage" if kind == "sweep" else "--out"
    out = opts.get(out_opt)
    if out is None or ("://" not in out and not Path(out).is_absolute()):
        warnings.append(
            f"{out_opt} {'is not set' if out is None else repr(out) + ' is relative'}: results "
            "land in the job's temporary working dir on the head node; pass an absolute path "
            "every node sees" + (" or a URI (s3://...)" if kind == "sweep" else "")
        )
    return args, warnings


def build_job(
    kind: str,
    args: list[str],
    *,
    tracking_uri: str | None,
    working_dir: Path | None = None,
    pip: list[str] | None = None,
    auth: Auth | None = None,
    cwd: Path | None = None,
) -> JobSpec:
    """Entry point and runtime_env of a `commlab <kind> ARGS` job; checks everything local.

    `tracking_uri` (default `$MLFLOW_TRACKING_URI`) is what the job uses, on the cluster.

    The code travels as the runtime_env `working_dir`: `working_dir`, else the source checkout
    commlab runs from, else the current directory. A working dir holding platform/commlab runs
    that code (PYTHONPATH=platform); otherwise the installed commlab package travels too
    (`py_modules`). The token is not put in the runtime_env: it would be stored with the job
    (visible to anyone listing jobs) and the nodes already hold it; the mode is.
    """
    if kind not in KINDS:
        raise SubmitError(f"unknown job kind {kind!r}: expected one of {', '.join(KINDS)}")
    cwd = (cwd or Path.cwd()).resolve()
    uri, warnings = check_tracking_uri(tracking_uri or os.environ.get(TRACKING_ENV))
    wd = (working_dir or project_root() or cwd).resolve()
    if not wd.is_dir():
        raise SubmitError(f"--working-dir {wd} is not a directory")
    args, more = prepare_args(kind, args, cwd=cwd, working_dir=wd)
    # lazy: checkpoint_format imports torch, which `import commlab.cli` must not load
    from commlab.checkpoint_format import CODE_VERSION_ENV, code_version

    env_vars = {
        TRACKING_ENV: uri,
        # .git does not travel with the job: the cluster records the client's commit
        CODE_VERSION_ENV: code_version(),
        # Ray Jobs SIGKILLs a stopped job 3 s after its SIGTERM by default: too short for a
        # sweep driver to close its MLflow runs and leave Ray (which frees the trials' CPUs)
        STOP_WAIT_ENV: os.environ.get(STOP_WAIT_ENV, "30"),
    }
    if os.environ.get("COMMLAB_DEBUG"):  # tracebacks in the job's logs too
        env_vars["COMMLAB_DEBUG"] = os.environ["COMMLAB_DEBUG"]
    auth = auth if auth is not None else resolve_auth()
    if auth.mode is not None:
        env_vars["RAY_AUTH_MODE"] = auth.mode
    runtime_env: dict[str, Any] = {"working_dir": str(wd), "excludes": list(EXCLUDES)}
    if (wd / "platform" / "commlab").is_dir():
        env_vars["PYTHONPATH"] = "platform"
    else:
        runtime_env["py_modules"] = [str(Path(commlab.__file__).resolve().parent)]
    if pip:
        runtime_env["pip"] = list(pip)
    runtime_env["env_vars"] = env_vars
    script = wd / "entrypoints" / f"{kind}.py"
    head = f"python entrypoints/{kind}.py" if script.is_file() else f"python -m commlab.cli {kind}"
    entrypoint = " ".join([head, *(shlex.quote(a) for a in args)])
    return JobSpec(entrypoint, runtime_env, warnings + more)


def submit(
    kind: str,
    args: list[str],
    *,
    address: str | None = None,
    tracking_uri: str | None = None,
    working_dir: Path | None = None,
    pip: list[str] | None = None,
    token_file: str | Path | None = None,
    submission_id: str | None = None,
) -> Submission:
    """Submit `commlab <kind> ARGS` as a Ray Job; returns its id without waiting."""
    auth = resolve_auth(token_file)
    spec = build_job(
        kind, args, tracking_uri=tracking_uri, working_dir=working_dir, pip=pip, auth=auth
    )
    client = job_client(address, token_file=token_file)
    url = dashboard_url(address)
    try:
        with _quiet_ray_logs():
            job_id = client.submit_job(
                entrypoint=spec.entrypoint,
                runtime_env=spec.runtime_env,
                submission_id=submission_id,
                metadata={KIND_TAG: kind},
            )
    except (RuntimeError, ValueError, OSError) as err:
        raise ClusterError(f"the Ray Jobs API at {url} refused the job: {err}") from None
    return Submission(job_id, url, spec)


@contextlib.contextmanager
def _quiet_ray_logs() -> Iterator[None]:
    """Ray's client logs each file it skips when packaging, and each closed log stream."""
    names = (
        "ray._private.runtime_env",
        "ray.dashboard.modules.dashboard_sdk",  # these two set their own level
        "ray.dashboard.modules.job.sdk",
    )
    loggers = [logging.getLogger(n) for n in names]
    saved = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, saved, strict=True):
            lg.setLevel(level)


def exit_code(status: str) -> int:
    """0 succeeded, 1 failed, 3 stopped (and 1 for anything else that ended)."""
    return EXIT_CODES.get(str(status), 1)


def _call(url: str, job_id: str | None, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except RuntimeError as err:
        if job_id and "404" in str(err):
            raise ClusterError(f"no job {job_id!r} at {url}") from None
        raise ClusterError(f"the Ray Jobs API at {url} answered with an error: {err}") from None
    except OSError as err:  # requests' ConnectionError included
        raise ClusterError(f"lost the Ray Jobs API at {url}: {err}") from None


def wait(client: Any, job_id: str, *, timeout_s: float | None = None, poll_s: float = 1.0) -> str:
    """Block until the job ends; its final status (TimeoutError after `timeout_s`)."""
    t0 = time.monotonic()
    while True:
        status = client.get_job_status(job_id)
        if status.is_terminal():
            return str(status)
        if timeout_s is not None and time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"job {job_id} still {status} after {timeout_s:g} s")
        time.sleep(poll_s)


def follow(client: Any, job_id: str, write: Callable[[str], Any] | None = None) -> str:
    """Stream the job's logs until it ends; its final status."""
    write = write or _stdout

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            write(chunk)

    try:
        with _quiet_ray_logs():
            asyncio.run(tail())
    except Exception as err:  # stream broken (network, proxy): fall back to the stored logs
        write(f"\n[log stream interrupted ({type(err).__name__}: {err}); waiting for the job]\n")
        status = wait(client, job_id)
        write(client.get_job_logs(job_id))
        return status
    return wait(client, job_id, poll_s=0.5)


_MISSING_MODULE = re.compile(r"ModuleNotFoundError: No module named '([\w.]+)'")


def failure_hint(logs: str) -> str | None:
    """What to do about a failed job, when its logs show a cause commlab knows; else None."""
    missing = _MISSING_MODULE.findall(logs)
    if missing:
        module = missing[-1].split(".")[0]
        return (
            f"the job's Python on the cluster has no module {module!r}: the entry point runs "
            "`python` from the nodes' PATH, so start the nodes (`ray start`) from the environment "
            "commlab is installed in (docker/README.md), or add it with "
            f"`commlab submit --pip {module} ...`"
        )
    return None


def _stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def list_jobs(address: str | None = None, *, token_file: str | Path | None = None) -> list[dict]:
    """All jobs on the cluster, oldest first: id, status, entry point, times, message."""
    client = job_client(address, token_file=token_file)
    jobs = _call(dashboard_url(address), None, client.list_jobs)
    rows = [_row(j.submission_id or j.job_id, j) for j in jobs]
    return sorted(rows, key=lambda r: r["start_time"] or 0)


def job_info(
    job_id: str, address: str | None = None, *, token_file: str | Path | None = None
) -> dict[str, Any]:
    """One job: id, status, entry point, times, message."""
    client = job_client(address, token_file=token_file)
    return _row(job_id, _call(dashboard_url(address), job_id, lambda: client.get_job_info(job_id)))


def _row(job_id: str, info: Any) -> dict[str, Any]:
    return {
        "job_id": job_id,
        "status": str(info.status),
        "entrypoint": info.entrypoint,
        "start_time": info.start_time,
        "end_time": info.end_time,
        "message": info.message,
    }


def job_logs(
    job_id: str, address: str | None = None, *, token_file: str | Path | None = None
) -> str:
    """The job's logs so far."""
    client = job_client(address, token_file=token_file)
    return _call(dashboard_url(address), job_id, lambda: client.get_job_logs(job_id))


def follow_job(
    job_id: str,
    address: str | None = None,
    *,
    token_file: str | Path | None = None,
    write: Callable[[str], Any] | None = None,
) -> str:
    """Stream the job's logs until it ends; its final status."""
    client = job_client(address, token_file=token_file)
    _call(dashboard_url(address), job_id, lambda: client.get_job_status(job_id))  # unknown id
    return follow(client, job_id, write)


def stop_job(
    job_id: str, address: str | None = None, *, token_file: str | Path | None = None
) -> bool:
    """Ask the cluster to stop the job; False if it had already ended."""
    client = job_client(address, token_file=token_file)
    return bool(_call(dashboard_url(address), job_id, lambda: client.stop_job(job_id)))


def jobs_table(rows: list[dict[str, Any]]) -> Any:
    """A rich table of `list_jobs` rows."""
    table = Table("job", "status", "started", "ended", "entry point")
    for r in rows:
        table.add_row(
            r["job_id"], r["status"], _time(r["start_time"]), _time(r["end_time"]), r["entrypoint"]
        )
    return table


def _time(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"
