"""commlab.cluster and commlab.jobs without a cluster: addresses, auth, runtime envs, errors."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from typer.testing import CliRunner

from commlab import cluster, jobs
from commlab.cli import app
from commlab.cluster import Auth, ClusterError
from commlab.jobs import SubmitError

REPO = Path(__file__).resolve().parents[1]
SMOKE = "search_spaces/trifeatures-smoke.yaml"
_ENV = (
    "RAY_ADDRESS",
    "RAY_API_SERVER_ADDRESS",
    "RAY_AUTH_MODE",
    "RAY_AUTH_TOKEN",
    "RAY_AUTH_TOKEN_PATH",
    "COMMLAB_RAY_TOKEN_FILE",
    "MLFLOW_TRACKING_URI",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for name in _ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.ray/auth_token


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flat(text: str) -> str:
    """CLI output without the console's line wrapping."""
    return " ".join(text.split())


# --- authentication ---------------------------------------------------------------------------


def test_auth_unset_leaves_ray_default():
    assert cluster.resolve_auth() == Auth(None)
    assert cluster.auth_env() == {}
    assert cluster.auth_headers(Auth(None)) == {}


def test_auth_disabled_ignores_tokens(monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "Disabled")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "t")
    assert cluster.resolve_auth() == Auth("disabled")
    assert cluster.auth_env() == {"RAY_AUTH_MODE": "disabled"}


def test_token_from_env_turns_token_mode_on(monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", " secret \n")
    auth = cluster.resolve_auth()
    assert (auth.mode, auth.token, auth.source) == ("token", "secret", "$RAY_AUTH_TOKEN")
    assert cluster.auth_env(auth) == {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "secret"}
    assert cluster.auth_env(auth, include_token=False) == {"RAY_AUTH_MODE": "token"}
    assert cluster.auth_headers(auth) == {"Authorization": "Bearer secret"}
    assert "secret" not in repr(auth)


def test_token_sources_in_order(monkeypatch, tmp_path):
    files = {}
    for name in ("flag", "commlab", "ray", "default"):
        files[name] = tmp_path / name
        files[name].write_text(f"tok-{name}\n")
    home = tmp_path / "home" / ".ray"
    home.mkdir(parents=True)
    (home / "auth_token").write_text("tok-default")
    assert cluster.resolve_auth().token == "tok-default"
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(files["ray"]))
    assert cluster.resolve_auth().token == "tok-ray"
    monkeypatch.setenv("COMMLAB_RAY_TOKEN_FILE", str(files["commlab"]))
    assert cluster.resolve_auth().token == "tok-commlab"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "tok-env")
    assert cluster.resolve_auth().token == "tok-env"
    auth = cluster.resolve_auth(files["flag"])
    assert (auth.token, auth.source) == ("tok-flag", "--auth-token-file")


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"RAY_AUTH_MODE": "token"}, "no token"),
        ({"RAY_AUTH_MODE": "tokens"}, "expected one of token, disabled"),
        ({"COMMLAB_RAY_TOKEN_FILE": "/nonexistent/token"}, "/nonexistent/token"),
    ],
)
def test_auth_errors(monkeypatch, env, match):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ClusterError, match=match):
        cluster.resolve_auth()


def test_empty_token_file_is_an_error(tmp_path):
    (tmp_path / "t").write_text("\n")
    with pytest.raises(ClusterError, match="is empty"):
        cluster.resolve_auth(tmp_path / "t")


# --- addresses --------------------------------------------------------------------------------


def test_driver_address_resolution(monkeypatch):
    assert cluster.resolve_address() is None
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert cluster.resolve_address() == "10.0.0.1:6379"
    assert cluster.resolve_address("ray://h:10001") == "ray://h:10001"
    with pytest.raises(ClusterError, match="commlab submit --address http://h:8265"):
        cluster.resolve_address("http://h:8265")


@pytest.mark.parametrize(
    ("address", "url"),
    [
        ("http://h:8265/", "http://h:8265"),
        ("https://ray.example.org", "https://ray.example.org"),
        ("ray://h:10001", "http://h:8265"),
        ("h:6379", "http://h:8265"),
        ("h", "http://h:8265"),
        ("[::1]:6379", "http://[::1]:8265"),
        ("auto", "http://127.0.0.1:8265"),
    ],
)
def test_dashboard_url(address, url):
    assert cluster.dashboard_url(address) == url


def test_dashboard_url_defaults(monkeypatch):
    assert cluster.dashboard_url() == cluster.DEFAULT_JOBS_ADDRESS
    monkeypatch.setenv("RAY_ADDRESS", "gcs-host:6379")
    assert cluster.dashboard_url() == "http://gcs-host:8265"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://api:9999")
    assert cluster.dashboard_url() == "http://api:9999"
    assert cluster.dashboard_url("http://given:8265") == "http://given:8265"
    with pytest.raises(ClusterError, match="http://HOST:8265"):
        cluster.dashboard_url("s3://bucket")


def test_unreachable_jobs_api_is_one_clear_error(monkeypatch):
    url = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("RAY_ADDRESS", "elsewhere:6379")  # must not override the given URL
    with pytest.raises(ClusterError, match=f"cannot reach the Ray Jobs API at {url}"):
        cluster.job_client(url)
    assert cluster.os.environ["RAY_ADDRESS"] == "elsewhere:6379"


# --- tracking URI -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "expected", "warns"),
    [
        ("http://mlflow:5000", "http://mlflow:5000", False),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000", True),
        ("postgresql+psycopg2://u:p@db/mlflow", "postgresql+psycopg2://u:p@db/mlflow", False),
        ("sqlite:////shared/mlflow.db", "sqlite:////shared/mlflow.db", True),
        ("/shared/mlflow.db", "sqlite:////shared/mlflow.db", True),
    ],
)
def test_tracking_uri_accepted(uri, expected, warns):
    got, warnings = jobs.check_tracking_uri(uri)
    assert got == expected
    assert bool(warnings) == warns


@pytest.mark.parametrize(
    ("uri", "match"),
    [
        (None, "--tracking-uri http://HOST:5000"),
        ("sqlite:///mlflow.db", "relative sqlite path"),
        ("mlflow.db", "relative sqlite path"),
        ("file:///tmp/mlruns", "file store"),
        ("./mlruns", "file store"),
    ],
)
def test_tracking_uri_rejected(uri, match):
    with pytest.raises(SubmitError, match=match):
        jobs.check_tracking_uri(uri)


# --- the job: entry point and runtime_env -----------------------------------------------------


def test_sweep_job_ships_the_checkout(monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "secret")
    spec = jobs.build_job(
        "sweep",
        [SMOKE, "--storage", "/shared/sweeps", "--name", "a b"],
        tracking_uri="http://mlflow:5000",
        cwd=REPO,
    )
    assert spec.entrypoint == (
        f"python entrypoints/sweep.py {SMOKE} --storage /shared/sweeps --name 'a b'"
    )
    env = spec.runtime_env
    assert env["working_dir"] == str(REPO)
    from commlab.train.checkpoint import code_version

    assert env["env_vars"] == {
        "MLFLOW_TRACKING_URI": "http://mlflow:5000",
        "RAY_AUTH_MODE": "token",
        "PYTHONPATH": "platform",
        # the client's commit: .git does not travel with the job
        "COMMLAB_CODE_VERSION": code_version(),
        # time for the driver to close its runs and free its CPUs when the job is stopped
        "RAY_JOB_STOP_WAIT_TIME_S": "30",
    }  # the token itself stays out of the job's stored metadata
    assert code_version() != "commlab-0.1.0" and len(code_version()) >= 40
    assert "py_modules" not in env and "pip" not in env
    assert any("data.path" in w for w in spec.warnings)  # the smoke config's path is relative
    assert not any("--storage" in w for w in spec.warnings)


def test_excludes_keep_code_and_drop_data():
    from ray._private.runtime_env.packaging import _get_excludes

    excluded = _get_excludes(REPO, jobs.EXCLUDES)
    for path in ("data", "data/trifeatures/x.parquet", ".venv", "mlflow.db", "docker/.env"):
        assert excluded(REPO / path), path
    for path in (
        "platform/commlab/data",
        "platform/commlab/data/parquet.py",
        "entrypoints/sweep.py",
    ):
        assert not excluded(REPO / path), path


def test_paths_outside_the_working_dir_stay_absolute(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text((REPO / SMOKE).read_text().replace("../configs", str(REPO / "configs")))
    spec = jobs.build_job(
        "sweep", ["space.yaml"], tracking_uri="http://m:5000", cwd=tmp_path, pip=["rich"]
    )
    assert spec.entrypoint == f"python entrypoints/sweep.py {space}"
    assert spec.runtime_env["pip"] == ["rich"]
    assert any("outside the shipped working dir" in w for w in spec.warnings)
    assert any("--storage is not set" in w for w in spec.warnings)


def test_pretrain_paths_and_overrides(tmp_path):
    spec = jobs.build_job(
        "pretrain",
        ["configs/trifeatures/smoke.yaml", "data.path=/shared/data", "--out", "/shared/runs/a"],
        tracking_uri="http://m:5000",
        cwd=REPO,
        auth=Auth("disabled"),
    )
    assert spec.entrypoint.startswith(
        "python entrypoints/pretrain.py configs/trifeatures/smoke.yaml "
    )
    assert spec.runtime_env["env_vars"]["RAY_AUTH_MODE"] == "disabled"
    assert spec.warnings == []


def test_working_dir_without_the_code_ships_the_package(tmp_path):
    spec = jobs.build_job(
        "promote", ["--sweep", "s", "--model", "m"], tracking_uri="http://m:5000",
        working_dir=tmp_path,
    )  # fmt: skip
    assert spec.entrypoint == "python -m commlab.cli promote --sweep s --model m"
    assert spec.runtime_env["py_modules"] == [str(REPO / "platform" / "commlab")]
    assert "PYTHONPATH" not in spec.runtime_env["env_vars"]


@pytest.mark.parametrize(
    ("kind", "args", "match"),
    [
        ("train", [], "unknown job kind 'train'"),
        ("sweep", ["missing.yaml"], "search space file not found"),
        ("sweep", [], "needs a search space file"),
        ("pretrain", ["nope.yaml"], "config file not found"),
        ("pretrain", ["configs/trifeatures/smoke.yaml", "train.nope=1"], "nope"),
    ],
)
def test_job_errors_before_submission(kind, args, match):
    with pytest.raises(SubmitError, match=match):
        jobs.build_job(kind, args, tracking_uri="http://m:5000", cwd=REPO)


def test_exit_codes():
    assert [jobs.exit_code(s) for s in ("SUCCEEDED", "FAILED", "STOPPED")] == [0, 1, 3]


@pytest.mark.parametrize("kind", sorted(jobs.VALUE_OPTIONS))
def test_value_options_match_the_cli(kind):
    import typer.main

    cmd = typer.main.get_command(app).commands[kind]
    takes_value = {
        opt
        for p in cmd.params
        if p.param_type_name == "option" and not (p.is_flag or p.count)
        for opt in p.opts
    }
    assert jobs.VALUE_OPTIONS[kind] == takes_value


# --- CLI ----------------------------------------------------------------------------------------


def test_submit_passes_everything_after_kind_to_the_command(monkeypatch):
    seen = {}

    def fake_submit(kind, args, **kw):
        seen.update(kind=kind, args=args, **kw)
        return jobs.Submission("raysubmit_1", "http://h:8265", jobs.JobSpec("python x", {}))

    monkeypatch.setattr(jobs, "submit", fake_submit)
    argv = ["submit", "--address", "http://h:8265", "sweep", SMOKE, "--address", "x", "--resume"]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    assert seen["kind"] == "sweep" and seen["address"] == "http://h:8265"
    assert seen["args"] == [SMOKE, "--address", "x", "--resume"]
    assert "raysubmit_1" in result.output


def test_submit_missing_space_fails_before_contacting_the_cluster(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens: the file check must come first
    result = CliRunner().invoke(app, ["submit", "--address", url, "sweep", "missing.yaml"])
    assert result.exit_code == 2
    assert "search space file not found" in flat(result.output)


def test_submit_unreachable_cluster_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    url = f"http://127.0.0.1:{free_port()}"
    result = CliRunner().invoke(
        app, ["submit", "--address", url, "promote", "--sweep", "s", "--model", "m"]
    )
    assert result.exit_code == 2
    assert f"cannot reach the Ray Jobs API at {url}" in flat(result.output)
    assert "ray[default]" in flat(result.output)  # printed as text, not eaten as markup


def test_jobs_commands_report_unreachable_cluster():
    url = f"http://127.0.0.1:{free_port()}"
    for argv in (["list"], ["status", "j"], ["logs", "j"], ["stop", "j"]):
        result = CliRunner().invoke(app, ["jobs", *argv, "--address", url])
        assert result.exit_code == 2, argv
        assert "cannot reach" in flat(result.output)


def test_failure_hint_names_the_missing_module():
    logs = (
        "Traceback (most recent call last):\n"
        '  File "entrypoints/sweep.py", line 15, in <module>\n'
        "ModuleNotFoundError: No module named 'typer.core'\n"
    )
    hint = jobs.failure_hint(logs)
    assert hint is not None
    assert "'typer'" in hint and "--pip typer" in hint and "ray start" in hint
    assert jobs.failure_hint("ValueError: bad learning rate\n") is None


def test_drivers_given_a_dashboard_address_fail_clearly_before_starting_ray(tmp_path):
    url = "http://127.0.0.1:8265"
    space = REPO / "search_spaces" / "trifeatures-smoke.yaml"
    config = REPO / "configs" / "trifeatures" / "smoke.yaml"
    for argv in (
        ["sweep", str(space), "--address", url, "--storage", str(tmp_path / "sweeps")],
        ["pretrain", str(config), "--workers", "1", "--address", url, "--no-tracking",
         "--out", str(tmp_path / "run")],
    ):  # fmt: skip
        result = CliRunner().invoke(app, argv)
        assert result.exit_code == 2, (argv, result.output)
        assert "commlab submit --address" in flat(result.output)


def test_code_version_on_the_cluster_is_the_clients_commit(monkeypatch):
    """A job's working dir has no .git: checkpoints and model lineage read the commit that
    `commlab submit` put in the job's environment."""
    from commlab.train.checkpoint import code_version

    monkeypatch.setenv("COMMLAB_CODE_VERSION", "0123abcd+dirty")
    code_version.cache_clear()
    try:
        assert code_version() == "0123abcd+dirty"
    finally:
        code_version.cache_clear()


def test_a_working_directory_deleted_while_connecting_is_named_with_the_fix(tmp_path, monkeypatch):
    """Two nodes on one machine sharing a temp dir delete a job's working directory when its
    driver connects; the driver says so instead of failing on the next file it opens."""
    from commlab.cluster import ClusterError, check_working_dir

    wd = tmp_path / "working_dir_files" / "_ray_pkg_x"
    wd.mkdir(parents=True)
    monkeypatch.chdir(wd)
    check_working_dir(str(wd))  # still there: nothing to say
    wd.rmdir()
    with pytest.raises(ClusterError, match="share a temp dir .* own --temp-dir"):
        check_working_dir(str(wd))
