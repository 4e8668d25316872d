"""What a user meets with bad inputs: each case runs the real `commlab` CLI in a subprocess.

Every case must end within 60 s with its exit code and one error line on stderr that names the
problem and the fix, and no traceback (COMMLAB_DEBUG=1 shows one). Unreachable servers and
clusters are closed loopback ports: nothing listens, so the answer is immediate.
"""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml

from commlab.data.parquet import pool_file, write_dataset
from tests.conftest import toy_config, toy_sequence_dataset

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
ANSWER_WITHIN_S = 60


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class World:
    root: Path
    config: Path  # a valid toy config on a valid Parquet dataset
    dataset: Path
    port: int  # closed
    sqlite: str


@dataclass
class Case:
    setup: Callable[[World, Path], list[str]]  # (world, case dir) -> argv after `commlab`
    code: int
    says: tuple[str, ...]  # every one of these appears in the error output
    env: dict[str, str] = field(default_factory=dict)


def toy_raw(dataset: Path) -> dict:
    raw = toy_config().model_dump(mode="json")
    raw["data"] = {"name": "parquet", "path": str(dataset), "batch_size": 16}
    return raw


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("bad-inputs")
    dataset = write_dataset(toy_sequence_dataset(), root / "toy-data")
    config = root / "toy.yaml"
    config.write_text(yaml.safe_dump(toy_raw(dataset)))
    return World(root, config, dataset, closed_port(), f"sqlite:///{root / 'mlflow.db'}")


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def space(d: Path, w: World, **over) -> Path:
    raw = {
        "name": "bad",
        "base": str(w.config),
        "metric": "probe/cls/balanced_acc",
        "mode": "max",
        "num_samples": 2,
        "max_concurrent_trials": 1,
        "scheduler": {"name": "none"},
        "params": {"optim.lr": {"dist": "loguniform", "low": 1e-4, "high": 1e-2}},
        **over,
    }
    return write(d / "space.yaml", yaml.safe_dump(raw))


def nan_dataset(d: Path) -> Path:
    ds = toy_sequence_dataset()
    ds.modalities[0].values[3, 0, 0] = float("nan")
    return write_dataset(ds, d / "nan-data")


def damage(f: Path) -> None:
    """Overwrite the middle of a Parquet file (its data pages; the footer stays intact)."""
    data = bytearray(f.read_bytes())
    a, b = len(data) // 8, len(data) // 2
    data[a:b] = b"\xff" * (b - a)
    f.write_bytes(bytes(data))


def corrupt_pool(d: Path, w: World) -> Path:
    import shutil

    copy = d / "damaged"
    shutil.copytree(w.dataset, copy)
    damage(copy / pool_file("a"))
    return copy


def corrupt_image_pool(d: Path) -> Path:
    """A dataset of uint8 images with a damaged pool: values that need no NaN check, so only
    decoding every page finds the damage."""
    from commlab.data.base import Modality, MultimodalDataset, Task

    n = 64
    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 255, (n, 3, 16, 16), generator=g, dtype=torch.uint8)
    idx = torch.arange(n)
    ds = MultimodalDataset(
        modalities=[Modality("img", "image", img, idx)],
        labels={"y": torch.randint(0, 2, (n,), generator=g)},
        tasks={"y": Task("y", "binary", 2)},
        splits={"train": idx[:48], "test": idx[48:]},
        fingerprint="img",
    )
    out = write_dataset(ds, d / "images")
    damage(out / pool_file("img"))
    return out


def config_on(d: Path, w: World, dataset: Path) -> Path:
    raw = toy_raw(w.dataset)
    raw["data"]["path"] = str(dataset)
    return write(d / "cfg.yaml", yaml.safe_dump(raw))


def truncated_checkpoint(d: Path) -> Path:
    run = d / "run"
    run.mkdir()
    buf = d / "full.pt"
    torch.save({"format": "commlab-checkpoint/1", "model": {"w": torch.zeros(1000)}}, buf)
    (run / "checkpoint.pt").write_bytes(buf.read_bytes()[:700])
    return run


def affect_pickle(d: Path, data: object) -> Path:
    return write(d / "src.pkl", pickle.dumps(data))


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _http(w: World) -> str:
    return f"http://127.0.0.1:{w.port}"


CASES: dict[str, Case] = {
    # ---------------------------------------------------------------- configs
    "config: file missing": Case(
        lambda w, d: ["pretrain", str(d / "nope.yaml")], 2, ("config file not found",)
    ),
    "config: YAML syntax error": Case(
        lambda w, d: ["pretrain", str(write(d / "c.yaml", "name: x\ntrain: {epochs: 3\n"))],
        2,
        ("not valid YAML", "fix the file"),
    ),
    "config: top level is a list": Case(
        lambda w, d: ["config", "show", str(write(d / "c.yaml", "- a\n- b\n"))],
        2,
        ("top level must be a mapping",),
    ),
    "config: not text": Case(
        lambda w, d: ["config", "show", str(write(d / "c.yaml", b"\xff\xfe\x00\x81"))],
        2,
        ("c.yaml",),
    ),
    "config: typo'd key": Case(
        lambda w, d: ["config", "show", str(w.config), "train.epoch=3"], 2, ("train.epoch",)
    ),
    "config: override without =": Case(
        lambda w, d: ["config", "show", str(w.config), "train.epochs"], 2, ("key=value",)
    ),
    "config: out-of-range value": Case(
        lambda w, d: ["pretrain", str(w.config), "train.epochs=0", "--no-tracking"],
        2,
        ("train.epochs",),
    ),
    "config: wrong type": Case(
        lambda w, d: ["config", "show", str(w.config), "optim.lr=fast"], 2, ("optim.lr",)
    ),
    "config: --address without workers": Case(
        lambda w, d: ["pretrain", str(w.config), "--address", "127.0.0.1:1"],
        2,
        ("--workers >= 1",),
    ),
    # ---------------------------------------------------------------- search spaces
    "space: file missing": Case(
        lambda w, d: ["sweep", str(d / "nope.yaml"), "--check"],
        2,
        ("search space file not found",),
    ),
    "space: YAML syntax error": Case(
        lambda w, d: ["sweep", str(write(d / "s.yaml", "name: [x\n")), "--check"],
        2,
        ("not valid YAML",),
    ),
    "space: unknown key": Case(
        lambda w, d: ["sweep", str(space(d, w, num_sample=3)), "--check"],
        2,
        ("num_sample", "did you mean"),
    ),
    "space: base missing": Case(
        lambda w, d: ["sweep", str(space(d, w, base=str(d / "gone.yaml"))), "--check"],
        2,
        ("base: config file not found",),
    ),
    "space: base YAML syntax error": Case(
        lambda w, d: [
            "sweep",
            str(space(d, w, base=str(write(d / "b.yaml", "a: [1\n")))),
            "--check",
        ],
        2,
        ("base:", "not valid YAML"),
    ),
    "space: low above high": Case(
        lambda w, d: [
            "sweep",
            str(space(d, w, params={"optim.lr": {"dist": "uniform", "low": 1, "high": 0.1}})),
            "--check",
        ],
        2,
        ("optim.lr",),
    ),
    "space: unknown distribution": Case(
        lambda w, d: [
            "sweep",
            str(space(d, w, params={"optim.lr": {"dist": "gaussian", "low": 0, "high": 1}})),
            "--check",
        ],
        2,
        ("dist",),
    ),
    "space: parameter outside the config's range": Case(
        lambda w, d: [
            "sweep",
            str(space(d, w, params={"train.epochs": {"dist": "int", "low": -2, "high": 3}})),
            "--check",
        ],
        2,
        ("train.epochs",),
    ),
    "space: zero trials": Case(
        lambda w, d: ["sweep", str(space(d, w, num_samples=0)), "--check"], 2, ("num_samples",)
    ),
    "space: unknown metric": Case(
        lambda w, d: ["sweep", str(space(d, w, metric="probe/nope/acc")), "--check"],
        2,
        ("probe/nope/acc",),
    ),
    "space: more workers than the machine": Case(
        lambda w, d: [
            "sweep",
            str(space(d, w, resources={"workers": 512, "cpus_per_worker": 1})),
            "--storage",
            str(d / "sw"),
        ],
        2,
        ("512 workers", "CPUs"),
        {"MLFLOW_TRACKING_URI": ""},
    ),
    # ---------------------------------------------------------------- datasets
    "data: validate a file, not a directory": Case(
        lambda w, d: ["data", "validate", str(w.config)], 1, ("is not a directory",)
    ),
    "data: validate a damaged pool file": Case(
        lambda w, d: ["data", "validate", str(corrupt_image_pool(d))], 1, ("unreadable",)
    ),
    "data: pretrain on a damaged pool file": Case(
        lambda w, d: [
            "pretrain",
            str(config_on(d, w, corrupt_pool(d, w))),
            "--no-tracking",
            "--out",
            str(d / "run"),
        ],
        2,
        ("damaged", "commlab data validate"),
    ),
    "data: pretrain on NaN values": Case(
        lambda w, d: [
            "pretrain",
            str(config_on(d, w, nan_dataset(d))),
            "--no-tracking",
            "--out",
            str(d / "run"),
        ],
        2,
        ("NaN", "the data", "validate"),
    ),
    "data: dataset directory missing": Case(
        lambda w, d: ["pretrain", str(config_on(d, w, d / "none")), "--no-tracking"],
        2,
        ("dataset directory not found",),
    ),
    "data: import unknown dataset": Case(
        lambda w, d: ["data", "import", "mnist", str(w.config), "--out", str(d / "o")],
        2,
        ("mnist",),
    ),
    "data: import missing source": Case(
        lambda w, d: ["data", "import", "mosi", str(d / "none.pkl"), "--out", str(d / "o")],
        2,
        ("none.pkl", "not found"),
    ),
    "data: import pickle with wrong keys": Case(
        lambda w, d: [
            "data",
            "import",
            "mosi",
            str(affect_pickle(d, {"training": {}})),
            "--out",
            str(d / "o"),
            "--no-progress",
        ],
        2,
        ("missing key", "[train]", "training"),
    ),
    "data: import a pickle that would run code": Case(
        lambda w, d: [
            "data",
            "import",
            "mosi",
            str(affect_pickle(d, {"train": _Evil()})),
            "--out",
            str(d / "o"),
            "--no-progress",
        ],
        2,
        ("refused to load", "system"),
    ),
    "data: import a truncated pickle": Case(
        lambda w, d: [
            "data",
            "import",
            "mosi",
            str(write(d / "t.pkl", pickle.dumps({"train": list(range(99))})[:20])),
            "--out",
            str(d / "o"),
            "--no-progress",
        ],
        2,
        ("truncated or corrupt",),
    ),
    "data: import over an existing directory": Case(
        lambda w, d: ["data", "import", "mosi", str(affect_pickle(d, {})), "--out", str(w.dataset)],
        2,
        ("already exists", "--overwrite"),
    ),
    # ---------------------------------------------------------------- checkpoints
    "checkpoint: --resume without one": Case(
        lambda w, d: [
            "pretrain",
            str(w.config),
            "--out",
            str(d / "run"),
            "--resume",
            "--no-tracking",
        ],
        2,
        ("no checkpoint",),
    ),
    "checkpoint: --resume from a truncated one": Case(
        lambda w, d: [
            "pretrain",
            str(w.config),
            "--out",
            str(truncated_checkpoint(d)),
            "--resume",
            "--no-tracking",
        ],
        2,
        ("unreadable", "truncated or corrupt", "without --resume"),
    ),
    "checkpoint: embed with a truncated one": Case(
        lambda w, d: [
            "embed",
            str(truncated_checkpoint(d) / "checkpoint.pt"),
            str(w.dataset),
            "--out",
            str(d / "e.parquet"),
            "--no-progress",
        ],
        2,
        ("unreadable",),
    ),
    "checkpoint: embed a path that does not exist": Case(
        lambda w, d: ["embed", str(d / "none.pt"), str(w.dataset), "--out", str(d / "e.pq")],
        2,
        ("none.pt",),
    ),
    # ---------------------------------------------------------------- the CLI itself
    "cli: unknown command": Case(lambda w, d: ["pretrian"], 2, ("No such command",)),
    "cli: unknown option": Case(
        lambda w, d: ["pretrain", str(w.config), "--epochs", "3"], 2, ("No such option",)
    ),
    "cli: negative workers": Case(
        lambda w, d: ["pretrain", str(w.config), "--workers", "-1"], 2, ("--workers",)
    ),
    "cli: runs --sort without --sweep": Case(
        lambda w, d: ["runs", "--sort", "train/loss", "--tracking-uri", w.sqlite],
        2,
        ("--sweep",),
    ),
    "cli: runs --mode not max/min": Case(
        lambda w, d: ["runs", "--sweep", "x", "--mode", "best", "--tracking-uri", w.sqlite],
        2,
        ("mode",),
    ),
    "cli: submit an unknown kind": Case(
        lambda w, d: ["submit", "--address", _http(w), "train", "x"], 2, ("unknown job kind",)
    ),
    # ---------------------------------------------------------------- tracking URIs
    "tracking: runs, server down": Case(
        lambda w, d: ["runs", "--tracking-uri", _http(w)], 2, ("not reachable", "start it")
    ),
    "tracking: runs --sweep, server down (environment)": Case(
        lambda w, d: ["runs", "--sweep", "x"],
        2,
        ("not reachable",),
        {"MLFLOW_TRACKING_URI": "http://127.0.0.1:{port}"},
    ),
    "tracking: promote, server down": Case(
        lambda w, d: ["promote", "--sweep", "x", "--model", "m", "--tracking-uri", _http(w)],
        2,
        ("not reachable",),
    ),
    "tracking: pretrain, server down": Case(
        lambda w, d: ["pretrain", str(w.config), "--out", str(d / "run")],
        2,
        ("not reachable",),
        {"MLFLOW_TRACKING_URI": "http://127.0.0.1:{port}"},
    ),
    "tracking: sweep, server down": Case(
        lambda w, d: ["sweep", str(space(d, w))],
        2,
        ("not reachable",),
        {"MLFLOW_TRACKING_URI": "http://127.0.0.1:{port}"},
    ),
    "tracking: embed a registered model, server down": Case(
        lambda w, d: [
            "embed",
            "models:/enc@champion",
            str(w.dataset),
            "--out",
            str(d / "e.pq"),
            "--tracking-uri",
            _http(w),
        ],
        2,
        ("not reachable",),
    ),
    "tracking: PostgreSQL down": Case(
        lambda w, d: ["runs", "--tracking-uri", "postgresql://u@127.0.0.1:{port}/db"],
        2,
        ("tracking database", "not reachable"),
    ),
    "tracking: file store": Case(
        lambda w, d: ["runs", "--tracking-uri", f"file://{d}"],
        2,
        ("file store", "sqlite:///"),
        {"MLFLOW_ALLOW_FILE_STORE": ""},
    ),
    "tracking: unknown scheme": Case(
        lambda w, d: ["runs", "--tracking-uri", "mlflow://x"], 2, ("unknown scheme",)
    ),
    "tracking: sqlite in a missing directory": Case(
        lambda w, d: ["runs", "--tracking-uri", f"sqlite:///{d}/no/such/dir/mlflow.db"],
        2,
        ("does not exist",),
    ),
    "tracking: a sweep that is not there": Case(
        lambda w, d: ["runs", "--sweep", "ghost", "--tracking-uri", w.sqlite],
        2,
        ("no sweep named 'ghost'",),
    ),
    # ---------------------------------------------------------------- Ray addresses
    "ray: pretrain, nothing at the address": Case(
        lambda w, d: [
            "pretrain",
            str(w.config),
            "--workers",
            "1",
            "--no-tracking",
            "--address",
            "127.0.0.1:{port}",
        ],
        2,
        ("no Ray cluster answers", "ray start --head"),
    ),
    "ray: sweep, nothing at the address": Case(
        lambda w, d: ["sweep", str(space(d, w)), "--address", "127.0.0.1:{port}"],
        2,
        ("no Ray cluster answers",),
    ),
    "ray: sweep, nothing at $RAY_ADDRESS": Case(
        lambda w, d: ["sweep", str(space(d, w))],
        2,
        ("no Ray cluster answers",),
        {"RAY_ADDRESS": "127.0.0.1:{port}"},
    ),
    "ray: sweep given the dashboard URL": Case(
        lambda w, d: ["sweep", str(space(d, w)), "--address", "http://127.0.0.1:{port}"],
        2,
        ("dashboard", "commlab submit"),
    ),
    "ray: address without a port": Case(
        lambda w, d: [
            "pretrain",
            str(w.config),
            "--workers",
            "1",
            "--no-tracking",
            "--address",
            "headnode",
        ],
        2,
        ("HOST:PORT",),
    ),
    "ray: jobs list, no dashboard": Case(
        lambda w, d: ["jobs", "list", "--address", _http(w)], 2, ("cannot reach the Ray Jobs API",)
    ),
    "ray: submit, no dashboard": Case(
        lambda w, d: ["submit", "--address", _http(w), "sweep", str(space(d, w))],
        2,
        ("cannot reach the Ray Jobs API",),
        {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"},
    ),
    "ray: bad RAY_AUTH_MODE": Case(
        lambda w, d: ["jobs", "list", "--address", _http(w)],
        2,
        ("RAY_AUTH_MODE",),
        {"RAY_AUTH_MODE": "maybe"},
    ),
    "ray: token file missing": Case(
        lambda w, d: [
            "jobs",
            "list",
            "--address",
            _http(w),
            "--auth-token-file",
            str(d / "no-token"),
        ],
        2,
        ("token file",),
        {"RAY_AUTH_MODE": ""},
    ),
}


def run_cli(argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "commlab.cli", *argv],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=ANSWER_WITHIN_S + 30,
    )  # fmt: skip


def case_env(world: World, extra: dict[str, str]) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MLFLOW_", "RAY_ADDRESS", "RAY_API_SERVER", "COMMLAB_DEBUG"))
    }
    env.update({"RAY_AUTH_MODE": "disabled", "MLFLOW_TRACKING_URI": world.sqlite})
    env.update({k: v.format(port=world.port) for k, v in extra.items()})
    return {k: v for k, v in env.items() if v != ""}


def test_the_table_is_large_enough():
    kinds = {name.split(":")[0] for name in CASES}
    assert len(CASES) >= 40
    assert kinds == {"config", "space", "data", "checkpoint", "cli", "tracking", "ray"}


@pytest.mark.timeout(2 * ANSWER_WITHIN_S + 60)
@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gives_one_clear_error(name: str, world: World, tmp_path: Path) -> None:
    case = CASES[name]
    argv = [a.format(port=world.port) for a in case.setup(world, tmp_path)]
    t0 = time.monotonic()
    res = run_cli(argv, case_env(world, case.env), tmp_path)
    took = time.monotonic() - t0
    err = res.stderr
    flat = " ".join(err.split())
    assert res.returncode == case.code, (
        f"exit {res.returncode}\n{res.stdout[-2000:]}\n{err[-3000:]}"
    )
    assert took < ANSWER_WITHIN_S, f"answered after {took:.0f} s"
    assert "Traceback" not in err + res.stdout, err[-3000:]
    missing = [s for s in case.says if s not in flat]
    assert not missing, f"{missing} not in: {flat[-2000:]}"
    errors = [line for line in err.splitlines() if line.lower().startswith("error")]
    assert len(errors) <= 1, err  # one error line (click's usage errors print a box instead)


def test_debug_shows_the_traceback(world: World, tmp_path: Path) -> None:
    """COMMLAB_DEBUG=1 is the way to the traceback of an unexpected error."""
    bad = write(tmp_path / "mlflow.db", b"this is not a sqlite database" * 100)
    env = case_env(world, {"MLFLOW_TRACKING_URI": f"sqlite:///{bad}"})
    argv = ["runs", "--tracking-uri", f"sqlite:///{bad}"]
    quiet = run_cli(argv, env, tmp_path)
    assert quiet.returncode == 1 and "Traceback" not in quiet.stderr
    assert "COMMLAB_DEBUG=1" in quiet.stderr
    loud = run_cli(argv, {**env, "COMMLAB_DEBUG": "1"}, tmp_path)
    assert loud.returncode == 1 and "Traceback" in loud.stderr
