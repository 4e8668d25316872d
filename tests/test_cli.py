"""The `commlab` command line, run as users run it (typer's runner in-process, plus subprocesses)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from commlab.cli import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.mark.parametrize("module", ["commlab", "commlab.config", "commlab.cli"])
def test_light_entry_points_load_no_torch_ray_or_mlflow(module):
    """The CLI starts fast: importing it (or the config) loads none of the heavy libraries;
    each command imports what it needs when it runs."""
    code = f"import sys, {module}; print(sorted({{'torch', 'ray', 'mlflow'}} & set(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]", f"import {module} loads {proc.stdout.strip()}"


def test_help_lists_commands():
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for cmd in ("pretrain", "data", "config"):
        assert cmd in res.output


def test_config_show_flat_applies_overrides():
    res = runner.invoke(
        app,
        [
            "config",
            "show",
            str(ROOT / "configs/trifeatures/comm.yaml"),
            "loss.temperature=0.25",
            "--flat",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "loss.temperature=0.25" in res.output
    assert "model.modalities.0.encoder.name=conv" in res.output


def test_config_errors_exit_2_and_name_the_key():
    res = runner.invoke(
        app, ["config", "show", str(ROOT / "configs/trifeatures/comm.yaml"), "loss.temprature=0.25"]
    )
    assert res.exit_code == 2
    assert "loss.temprature" in res.output and "temperature" in res.output
    res = runner.invoke(
        app, ["pretrain", str(ROOT / "configs/trifeatures/comm.yaml"), "model.embed_dim=30"]
    )
    assert res.exit_code == 2 and "embed_dim=30" in res.output


def test_data_trifeatures_and_validate(tmp_path):
    res = runner.invoke(
        app,
        [
            "data",
            "trifeatures",
            "--out",
            str(tmp_path),
            "--size",
            "32",
            "--pairs",
            "200",
            "--test-pairs",
            "100",
            "--biased",
        ],
    )
    assert res.exit_code == 0, res.output
    dirs = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert len(dirs) == 1 and (dirs[0] / "biased").is_dir()
    assert str(dirs[0] / "biased") in res.output.replace("\n", "")
    res = runner.invoke(app, ["data", "validate", str(dirs[0] / "unbiased")])
    assert res.exit_code == 0 and "valid" in res.output
    (dirs[0] / "unbiased" / "samples.parquet").unlink()
    res = runner.invoke(app, ["data", "validate", str(dirs[0] / "unbiased")])
    assert res.exit_code == 1


@pytest.mark.slow
def test_pretrain_on_trifeatures_writes_checkpoint_and_rus_report(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "commlab.cli",
        "pretrain",
        str(ROOT / "configs/trifeatures/smoke.yaml"),
        f"data.path={tmp_path / 'data'}",
        "data.params.pairs=256",
        "data.params.test_pairs=128",
        "data.batch_size=64",
        "train.epochs=1",
        "data.probe_max_train=200",
        "--out",
        str(tmp_path / "run"),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "epoch   1/1" in proc.stdout and "R/U/S" in proc.stdout
    run = tmp_path / "run"
    rus = json.loads((run / "rus.json").read_text())["rus"]
    assert set(rus) == {"redundancy", "uniqueness", "synergy"} and all(
        0 <= v <= 1 for v in rus.values()
    )
    assert (run / "rus.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import torch

    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["config"]["data"]["params"]["pairs"] == 256 and ckpt["epoch"] == 1
    # and an MLflow run in the default store, sqlite in the working directory
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert {f"commlab.rus.{k}" for k in rus} <= set(runs[0].data.tags)
