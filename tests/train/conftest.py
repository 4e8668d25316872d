"""Ray fixtures: one local Ray for the session, toy data on disk, sqlite MLflow per test.

Ray workers are separate processes, so they cannot see datasets registered in the test process:
the toy dataset is written in the commlab Parquet format and read by the `parquet` builder.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from commlab.config import ExperimentConfig
from commlab.data.parquet import write_dataset
from commlab.train.trainer import RayTrainSettings
from tests.conftest import toy_config, toy_sequence_dataset

REPO = Path(__file__).resolve().parents[2]
RAY_ENV = {
    # Ray 2.60 turns token auth on for new local clusters; tests run without it (notes §0.9).
    "RAY_AUTH_MODE": "disabled",
    "RAY_DEDUP_LOGS": "0",
}


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """A local Ray with 4 logical CPUs (2 workers + slack), stopped at the end of the session.

    Ray picks free ports for a local `ray.init`; nothing binds Redis' 6379.
    """
    import ray

    saved = {k: os.environ.get(k) for k in RAY_ENV}
    os.environ.update(RAY_ENV)
    ray.init(
        num_cpus=4,
        include_dashboard=False,
        # workers import test helpers (tests.*) by reference
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO), **RAY_ENV}},
    )
    try:
        yield
    finally:
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def toy_parquet(tmp_path_factory) -> Path:
    """The toy sequence dataset with fixed-length sequences (no padding masks), on disk."""
    ds = toy_sequence_dataset()
    for m in ds.modalities:
        m.lengths = None
    return write_dataset(ds, tmp_path_factory.mktemp("data") / "toy")


def ray_config(data_dir: Path, *overrides: str) -> ExperimentConfig:
    """The tiny toy config, reading `data_dir` through the registered `parquet` builder."""
    return toy_config(
        "comm", ("data.name=parquet", f"data.path={data_dir}", "train.threads=1", *overrides)
    )


@pytest.fixture
def settings(tmp_path) -> RayTrainSettings:
    """2 workers; Ray storage and a sqlite MLflow store inside this test's tmp_path."""
    return RayTrainSettings(
        workers=2,
        storage_path=str(tmp_path / "ray"),
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        experiment="tests",
    )
