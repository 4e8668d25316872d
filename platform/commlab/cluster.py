"""Where Ray runs and how to authenticate to it: the one place that decides.

- `connect()`: an embedded Ray on this machine (default), or an existing cluster given by
  `address` / `$RAY_ADDRESS` (inside a Ray Job, the job supervisor sets `$RAY_ADDRESS`).
- Ray 2.60 token authentication, resolved once (`resolve_auth`) and applied the same way to
  `ray start` (`auth_env`), to drivers (`connect`) and to the Jobs API (`job_client`). Ray's own
  defaults differ per entry point: a new `ray.init()` cluster turns token auth on and writes
  ~/.ray/auth_token; `ray start --head` turns it on when that file exists; `ray start --address`
  and `ray.init(address=...)` never do, which fails with InvalidAuthToken. Here the mode is
  `$RAY_AUTH_MODE` when set, else `token` whenever a token is found, else left to Ray.
- `dashboard_url()`: any form of cluster address -> the Jobs API URL (the dashboard, port 8265).
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

ENV_ADDRESS = "RAY_ADDRESS"
ENV_API_ADDRESS = "RAY_API_SERVER_ADDRESS"
ENV_AUTH_MODE = "RAY_AUTH_MODE"
ENV_TOKEN = "RAY_AUTH_TOKEN"
ENV_TOKEN_PATH = "RAY_AUTH_TOKEN_PATH"  # Ray's own token-file variable
ENV_TOKEN_FILE = "COMMLAB_RAY_TOKEN_FILE"
DASHBOARD_PORT = 8265
GCS_PORT = 6379
DEFAULT_JOBS_ADDRESS = f"http://127.0.0.1:{DASHBOARD_PORT}"
AUTH_MODES = ("token", "disabled")

AuthMode = Literal["token", "disabled"]


class ClusterError(RuntimeError):
    """A Ray cluster cannot be used as asked; the message says why and what to do."""


@dataclass(frozen=True)
class Auth:
    """Resolved Ray authentication: `mode` None leaves Ray's own default in place."""

    mode: AuthMode | None
    token: str | None = field(default=None, repr=False)  # never printed
    source: str | None = None  # where the token came from (for error messages)


def default_token_file() -> Path:
    return Path.home() / ".ray" / "auth_token"


def _read_token(path: str | Path, source: str) -> str:
    p = Path(path).expanduser()
    try:
        token = p.read_text().strip()
    except OSError as err:
        raise ClusterError(f"Ray auth token file {p} ({source}): {err.strerror}") from None
    if not token:
        raise ClusterError(f"Ray auth token file {p} ({source}) is empty")
    return token


def resolve_auth(
    token_file: str | Path | None = None, env: Mapping[str, str] | None = None
) -> Auth:
    """The authentication every Ray entry point of this process should use.

    Token, first found: `token_file` (--auth-token-file), `$RAY_AUTH_TOKEN`,
    `$COMMLAB_RAY_TOKEN_FILE`, `$RAY_AUTH_TOKEN_PATH`, ~/.ray/auth_token.
    Mode: `$RAY_AUTH_MODE` (token | disabled) when set, else `token` when a token was found,
    else None (Ray's default). `token` without any token is an error.
    """
    env = os.environ if env is None else env
    raw = env.get(ENV_AUTH_MODE, "").strip().lower()
    if raw and raw not in AUTH_MODES:
        raise ClusterError(f"{ENV_AUTH_MODE}={raw!r}: expected one of {', '.join(AUTH_MODES)}")
    if raw == "disabled":
        return Auth("disabled")
    token = source = None
    if token_file is not None:
        source = "--auth-token-file"
        token = _read_token(token_file, source)
    elif env.get(ENV_TOKEN, "").strip():
        token, source = env[ENV_TOKEN].strip(), f"${ENV_TOKEN}"
    elif env.get(ENV_TOKEN_FILE):
        source = f"${ENV_TOKEN_FILE}"
        token = _read_token(env[ENV_TOKEN_FILE], source)
    elif env.get(ENV_TOKEN_PATH):
        source = f"${ENV_TOKEN_PATH}"
        token = _read_token(env[ENV_TOKEN_PATH], source)
    elif default_token_file().is_file():
        source = str(default_token_file())
        token = _read_token(default_token_file(), source)
    if token is None:
        if raw == "token":
            raise ClusterError(
                f"{ENV_AUTH_MODE}=token but no token: set ${ENV_TOKEN}, or point "
                f"--auth-token-file / ${ENV_TOKEN_FILE} at a file holding it"
            )
        return Auth(None)
    return Auth("token", token, source)


def auth_env(
    auth: Auth | None = None, *, token_file: str | Path | None = None, include_token: bool = True
) -> dict[str, str]:
    """Environment variables that give `ray start`, a driver or a job this authentication.

    Use it for every node of a cluster: `subprocess.run(["ray", "start", ...],
    env={**os.environ, **auth_env()})`. `include_token=False` leaves the secret out.
    """
    auth = auth if auth is not None else resolve_auth(token_file)
    if auth.mode is None:
        return {}
    env: dict[str, str] = {ENV_AUTH_MODE: auth.mode}
    if auth.mode == "token" and include_token and auth.token:
        env[ENV_TOKEN] = auth.token
    return env


def auth_headers(auth: Auth) -> dict[str, str]:
    """HTTP headers for the dashboard / Jobs API."""
    if auth.mode == "token" and auth.token:
        return {"Authorization": f"Bearer {auth.token}"}
    return {}


def apply_auth(auth: Auth) -> None:
    """Make this process's Ray use `auth` (Ray reads it from the environment)."""
    env = auth_env(auth)
    if not env or all(os.environ.get(k) == v for k, v in env.items()):
        return
    os.environ.update(env)
    try:  # Ray caches its config and token; refresh them when it was already loaded
        # lazy, inside the try: ray's private module, and ray takes a second to import
        from ray._raylet import AuthenticationTokenLoader, Config  # type: ignore[attr-defined]

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
    except (ImportError, AttributeError):
        pass


def resolve_address(address: str | None = None) -> str | None:
    """The cluster a driver connects to: `address`, else `$RAY_ADDRESS`, else None (embedded)."""
    address = (address or os.environ.get(ENV_ADDRESS) or "").strip() or None
    if address and urlsplit(address).scheme in ("http", "https"):
        raise ClusterError(
            f"{address} is a Ray dashboard (Jobs API) address; a driver needs the cluster's "
            f"GCS address (HOST:{GCS_PORT}) or ray://HOST:10001. To run on the cluster from "
            f"here, use `commlab submit --address {address} ...`"
        )
    return address


def connect(
    address: str | None = None,
    num_cpus: int | None = None,
    *,
    token_file: str | Path | None = None,
    **init_kwargs: Any,
) -> bool:
    """Connect this process to Ray unless it already is; True if this call connected.

    No address (and no `$RAY_ADDRESS`): an embedded cluster on this machine with `num_cpus`
    logical CPUs (default: the machine's) and its dashboard on 127.0.0.1 (8265, or the next
    free port). The dashboard is not optional: Ray Train's placement-group cleaner asks the
    State API it serves whether a training controller died; without it the worker CPUs of
    every trial ASHA stops stay reserved and a sweep stalls. With an address: that cluster,
    with the resolved authentication (`num_cpus` is the cluster's business and is ignored).
    """
    # lazy: ray takes a second to import; the CLI and `commlab submit` import this module
    import ray
    from ray.exceptions import AuthenticationError

    if ray.is_initialized():
        return False
    target = resolve_address(address)
    auth = resolve_auth(token_file)
    if auth.mode is not None:
        apply_auth(auth)
    if target is None:
        init_kwargs.setdefault("include_dashboard", True)
        init_kwargs.setdefault("dashboard_host", "127.0.0.1")
        ray.init(num_cpus=num_cpus, **init_kwargs)
        return True
    check_reachable(target)
    cwd = _cwd()
    try:
        ray.init(address=target, **init_kwargs)
    except AuthenticationError as err:
        raise ClusterError(
            f"authentication failed connecting to Ray at {target}: {_auth_hint(auth)} ({err})"
        ) from None
    except ConnectionError as err:
        # A rejected token looks the same as an unreachable GCS to ray.init.
        token = (
            f"this client's token (from {auth.source}) is the cluster's"
            if auth.mode == "token"
            else f"${ENV_TOKEN} or ${ENV_TOKEN_FILE} gives this client the cluster's token"
        )
        raise ClusterError(
            f"cannot connect to the Ray cluster at {target} ({err}); check that it is up and, "
            f"if it uses token authentication, that {token}"
        ) from None
    check_working_dir(cwd)
    return True


def _cwd() -> str | None:
    try:
        return os.getcwd()
    except FileNotFoundError:
        return None


def working_dir_lost(before: str | None) -> str | None:
    """When the working directory `before` is gone: what happened and what to do (else None).

    Raised by `check_working_dir` right after connecting; a sweep also checks at its end,
    because the deletion can come later, when a trial's runtime env is set up on the other
    node (files read before then, like the search space, are unaffected).
    """
    if before is None or os.path.isdir(before):
        return None
    return (
        f"this job's working directory {before} was deleted while it ran: two Ray nodes on "
        "one machine share a temp dir (the default /tmp/ray), and one node's runtime-env agent "
        "removed the job's files as unused. Start each node on this machine with its own "
        "--temp-dir (ray start ... --temp-dir /tmp/ray-<node>), or run one node per machine"
    )


def check_working_dir(before: str | None) -> None:
    """Raise when this process's working directory vanished while it connected to Ray.

    Seen with two `ray start` nodes on one machine sharing a temp dir (the default /tmp/ray):
    a Ray Job's working directory lives under it (runtime_resources), and one node's runtime-env
    agent deletes what it considers unused when a driver connects; the job then fails on the
    first file it opens ("No such file or directory: 'search_spaces/...yaml'").
    """
    if before is None or os.path.isdir(before):
        return
    # lazy: ray takes a second to import; the CLI and `commlab submit` import this module
    import ray

    ray.shutdown()
    raise ClusterError(
        f"this job's working directory {before} was deleted while it connected to Ray: two Ray "
        "nodes on one machine share a temp dir (the default /tmp/ray). Start each node on this "
        "machine with its own --temp-dir (ray start ... --temp-dir /tmp/ray-<node>), or run one "
        "node per machine"
    )


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast when nothing answers at a `HOST:PORT` or `ray://HOST:PORT` address.

    `ray.init(address=...)` keeps retrying an address where no GCS listens (minutes, with no
    output); one TCP connection tells at once. `auto` / `local` are left to Ray.
    """
    if address in ("auto", "local"):
        return
    parts = urlsplit(address if "://" in address else f"//{address}")
    if parts.scheme not in ("", "ray"):
        raise ClusterError(
            f"Ray address {address!r}: expected HOST:{GCS_PORT} (the head's GCS port) or "
            "ray://HOST:10001"
        )
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host = port = None
    if not host or not port:
        raise ClusterError(
            f"Ray address {address!r}: expected HOST:PORT, e.g. 127.0.0.1:{GCS_PORT} (the port "
            "`ray start --head --port` was given)"
        )
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as err:
        reason = "timed out" if isinstance(err, TimeoutError) else (err.strerror or str(err))
        raise ClusterError(
            f"no Ray cluster answers at {address} ({reason}): start one there (ray start --head "
            f"--port {port}), or fix --address / ${ENV_ADDRESS}; without either commlab starts "
            "an embedded local Ray"
        ) from None


def dashboard_url(address: str | None = None) -> str:
    """The Jobs API URL for any form of cluster address.

    `http(s)://HOST:PORT` as given; `ray://HOST:PORT`, `HOST:PORT` (GCS) or `HOST` ->
    `http://HOST:8265` (the Jobs API lives on the dashboard port). No address:
    `$RAY_API_SERVER_ADDRESS`, `$RAY_ADDRESS`, else http://127.0.0.1:8265 (docker/compose.yaml).
    """
    raw = address or os.environ.get(ENV_API_ADDRESS) or os.environ.get(ENV_ADDRESS) or ""
    raw = raw.strip()
    if raw in ("", "auto", "local"):
        return DEFAULT_JOBS_ADDRESS
    parts = urlsplit(raw if "://" in raw else f"//{raw}")
    if parts.scheme in ("http", "https"):
        return raw.rstrip("/")
    if parts.scheme not in ("", "ray") or not parts.hostname:
        raise ClusterError(
            f"cannot make a Jobs API address of {raw!r}: use http://HOST:{DASHBOARD_PORT}"
        )
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"http://{host}:{DASHBOARD_PORT}"


@contextlib.contextmanager
def _without_env(*names: str) -> Iterator[None]:
    saved = {n: os.environ.pop(n) for n in names if n in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def job_client(address: str | None = None, *, token_file: str | Path | None = None) -> Any:
    """A `ray.job_submission.JobSubmissionClient` for the cluster at `address` (see
    `dashboard_url`), sending the resolved token; unreachable or refused -> ClusterError."""
    # lazy: ray takes a second to import; the CLI and `commlab submit` import this module
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    url = dashboard_url(address)
    auth = resolve_auth(token_file)
    # The SDK lets these variables override an explicit address; the URL is decided here.
    with _without_env(ENV_ADDRESS, ENV_API_ADDRESS):
        try:
            return JobSubmissionClient(url, headers=auth_headers(auth))
        except AuthenticationError:
            raise ClusterError(
                f"authentication failed at the Ray Jobs API {url}: {_auth_hint(auth)}"
            ) from None
        except ConnectionError:
            raise ClusterError(
                f"cannot reach the Ray Jobs API at {url}: is the head node up, with its "
                f"dashboard on that port (ray start --head --dashboard-host ... "
                f"--dashboard-port {DASHBOARD_PORT}; needs ray[default])?"
            ) from None
        except RuntimeError as err:
            raise ClusterError(f"the Ray Jobs API at {url} answered with an error: {err}") from None


def _auth_hint(auth: Auth) -> str:
    if auth.mode == "token":
        return (
            f"the cluster rejected the token from {auth.source}; use the cluster's token "
            f"(${ENV_TOKEN}, --auth-token-file or ${ENV_TOKEN_FILE})"
        )
    return (
        "the cluster requires a token and none was sent; set "
        f"${ENV_TOKEN} or pass --auth-token-file / ${ENV_TOKEN_FILE}"
    )
