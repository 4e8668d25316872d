"""The docker/ cluster kit, checked statically (this machine cannot build or run containers):
files parse, every service is health-checked, host ports stay on loopback, and ports,
versions and names agree with the code."""

from __future__ import annotations

import re
import shlex
import subprocess
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from packaging.requirements import Requirement

from commlab import cluster
from commlab.sweep.space import load_space

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
COMPOSE = yaml.safe_load((DOCKER / "compose.yaml").read_text())
SERVICES = COMPOSE["services"]
DOCKERFILE = (DOCKER / "Dockerfile").read_text()
KUBERAY = yaml.safe_load((DOCKER / "kuberay-rayjob.yaml").read_text())
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def requirement(name: str) -> Requirement:
    for dep in PYPROJECT["project"]["dependencies"]:
        req = Requirement(dep)
        if req.name == name:
            return req
    raise LookupError(name)


def arg_default(name: str) -> str:
    m = re.search(rf"^ARG {name}=(\S+)$", DOCKERFILE, re.M)
    assert m, f"ARG {name}=... missing in docker/Dockerfile"
    return m.group(1)


def command(service: str) -> list[str]:
    cmd = SERVICES[service]["command"]
    return cmd if isinstance(cmd, list) else shlex.split(cmd)


def flag(service: str, name: str) -> str | None:
    for part in command(service):
        if part.startswith(f"{name}="):
            return part.split("=", 1)[1]
    return None


def env_example() -> dict[str, str]:
    out = {}
    for line in (DOCKER / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


# --- compose --------------------------------------------------------------------------------


def test_expected_services():
    assert {"ray-head", "ray-worker", "mlflow", "postgres", "minio", "minio-init"} <= set(SERVICES)


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_every_service_has_a_health_check(name):
    check = SERVICES[name].get("healthcheck")
    assert check and check.get("test"), f"{name} has no health check"
    assert check["test"][0] in ("CMD", "CMD-SHELL")


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_host_ports_bound_to_loopback(name):
    for port in SERVICES[name].get("ports", []):
        assert str(port).startswith("127.0.0.1:"), f"{name}: {port} is not bound to 127.0.0.1"


def test_ray_head_matches_the_code_defaults():
    dashboard = cluster.DASHBOARD_PORT
    assert flag("ray-head", "--dashboard-port") == str(dashboard)
    assert flag("ray-head", "--port") == str(cluster.GCS_PORT)
    assert "--head" in command("ray-head") and "--block" in command("ray-head")
    assert f"127.0.0.1:{dashboard}:{dashboard}" in SERVICES["ray-head"]["ports"]
    assert urlsplit(cluster.DEFAULT_JOBS_ADDRESS).port == dashboard
    assert "gcs_healthz" in " ".join(SERVICES["ray-head"]["healthcheck"]["test"])


def test_workers_join_the_head_and_scale():
    worker = SERVICES["ray-worker"]
    assert flag("ray-worker", "--address") == f"ray-head:{cluster.GCS_PORT}"
    assert "container_name" not in worker and not worker.get("ports")  # --scale ray-worker=N
    agent_port = flag("ray-worker", "--dashboard-agent-listen-port")
    assert f"localhost:{agent_port}/api/local_raylet_healthz" in " ".join(
        worker["healthcheck"]["test"]
    )
    assert worker["depends_on"]["ray-head"]["condition"] == "service_healthy"


@pytest.mark.parametrize("name", ["ray-head", "ray-worker"])
def test_every_ray_node_uses_the_same_token_auth(name):
    env = SERVICES[name]["environment"]
    assert env["RAY_AUTH_MODE"] == "token"
    assert env["RAY_AUTH_TOKEN"].startswith("${RAY_AUTH_TOKEN:?")  # required, from docker/.env
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"


def test_mlflow_server():
    args = command("mlflow")
    env = SERVICES["mlflow"]["environment"]
    assert args[:2] == ["mlflow", "server"]
    assert flag("mlflow", "--host") == "0.0.0.0" and flag("mlflow", "--port") == "5000"
    assert "127.0.0.1:5000:5000" in SERVICES["mlflow"]["ports"]
    assert "--serve-artifacts" in args
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg2://")
    assert "@postgres:5432/" in env["MLFLOW_BACKEND_STORE_URI"]
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    # the service name is the Host header inside the network: without it, MLflow answers 403
    allowed = flag("mlflow", "--allowed-hosts")
    assert allowed is not None
    assert {"mlflow", "mlflow:5000", "127.0.0.1:*", "localhost:*"} <= set(allowed.split(","))


def test_artifact_bucket_is_created_before_mlflow_starts():
    destination = flag("mlflow", "--artifacts-destination")
    assert destination and destination.startswith("s3://")
    bucket = destination.removeprefix("s3://").split("/")[0]
    assert f"local/{bucket}" in " ".join(SERVICES["minio-init"]["command"])
    deps = SERVICES["mlflow"]["depends_on"]
    assert deps["minio-init"]["condition"] == "service_completed_successfully"
    assert deps["postgres"]["condition"] == "service_healthy"


def test_images_are_pinned_and_shared():
    commlab_services = [n for n, s in SERVICES.items() if "build" in s]
    assert set(commlab_services) == {"mlflow", "ray-head", "ray-worker"}
    assert len({SERVICES[n]["image"] for n in commlab_services}) == 1
    assert SERVICES["ray-head"]["build"]["dockerfile"] == "docker/Dockerfile"
    assert (DOCKER / SERVICES["ray-head"]["build"]["context"]).resolve() == REPO
    for name, svc in SERVICES.items():
        if "build" not in svc:
            assert ":" in svc["image"] and not svc["image"].endswith(":latest"), name


def test_every_required_variable_is_in_env_example():
    text = (DOCKER / "compose.yaml").read_text()
    required = set(re.findall(r"\$\{(\w+):\?", text))
    example = env_example()
    assert required <= set(example), required - set(example)
    for name in re.findall(r"\$\{(\w+):-", text):
        assert name in example, f"{name} has a default in compose.yaml but no line in .env.example"


# --- Dockerfile -----------------------------------------------------------------------------


def test_dockerfile_versions_match_pyproject():
    ray_version = arg_default("RAY_VERSION")
    assert requirement("ray").specifier.contains(ray_version)
    assert ray_version.startswith("2.60.")
    assert requirement("mlflow").specifier.contains(arg_default("MLFLOW_VERSION"))
    assert requirement("torch").specifier.contains(arg_default("TORCH_SPEC").split("==")[1])
    assert 'ray[default,tune,train]==${RAY_VERSION}"' in DOCKERFILE  # Jobs API needs [default]
    assert "psycopg2-binary" in DOCKERFILE and "boto3" in DOCKERFILE


def test_dockerfile_base_and_build_args():
    base = arg_default("BASE_IMAGE")
    assert base == "python:3.11-slim"
    assert "FROM ${BASE_IMAGE}" in DOCKERFILE
    assert arg_default("TORCH_INDEX_URL").endswith("/whl/cpu")
    args = SERVICES["ray-head"]["build"]["args"]
    assert args["BASE_IMAGE"] == f"${{BASE_IMAGE:-{base}}}"
    assert args["TORCH_SPEC"] == f"${{TORCH_SPEC:-{arg_default('TORCH_SPEC')}}}"


def test_dockerfile_copies_existing_paths():
    for line in DOCKERFILE.splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (REPO / src).exists(), f"COPY {src}: not in the repository"


# --- KubeRay --------------------------------------------------------------------------------


def test_kuberay_rayjob():
    assert KUBERAY["apiVersion"] == "ray.io/v1" and KUBERAY["kind"] == "RayJob"
    spec = KUBERAY["spec"]
    cluster_spec = spec["rayClusterSpec"]
    assert cluster_spec["rayVersion"] == arg_default("RAY_VERSION")
    assert cluster_spec["authOptions"]["mode"] == "token"
    assert cluster_spec["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    images = {c["image"] for c in cluster_spec["headGroupSpec"]["template"]["spec"]["containers"]}
    for group in cluster_spec["workerGroupSpecs"]:
        images |= {c["image"] for c in group["template"]["spec"]["containers"]}
    assert len(images) == 1
    assert yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]["MLFLOW_TRACKING_URI"]
    assert "python entrypoints/sweep.py" in spec["entrypoint"]


def test_cluster_search_space_recipe(tmp_path):
    """README §5 and the KubeRay entry point rewrite the smoke space with sed: still valid,
    with data on the shared volume."""
    entry = KUBERAY["spec"]["entrypoint"]
    sed = re.search(r"sed '([^']+)'", entry).group(1)
    assert sed in (DOCKER / "README.md").read_text().replace("\\\n  ", "")
    (tmp_path / "search_spaces").mkdir()
    (tmp_path / "configs").symlink_to(REPO / "configs")
    out = tmp_path / "search_spaces" / "trifeatures-cluster.yaml"
    smoke = REPO / "search_spaces" / "trifeatures-smoke.yaml"
    out.write_text(subprocess.run(["sed", sed, str(smoke)], capture_output=True, text=True,
                                  check=True).stdout)  # fmt: skip
    assert load_space(out).base.data.path == "/shared/data/trifeatures"


def test_readme_walks_through_submit():
    text = (DOCKER / "README.md").read_text()
    for needle in (
        "cp docker/.env.example docker/.env",
        "--scale ray-worker=",
        "commlab submit",
        "--tracking-uri http://mlflow:5000",
        "http://127.0.0.1:5000",
        "RAY_AUTH_TOKEN",
    ):
        assert needle in text, needle
