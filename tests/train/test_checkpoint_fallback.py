"""Damaged checkpoints: a clear error, and on Ray Train a resume from the last intact one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from rich.console import Console

from commlab.train.checkpoint import (
    CorruptCheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from commlab.train.trainer import fall_back_to_intact_checkpoint


def _ray_run(root: Path, epochs: int) -> list[Path]:
    """A Ray Train run directory as Ray lays it out: one checkpoint_<time> dir per report."""
    dirs = []
    for e in range(epochs):
        d = root / f"checkpoint_2026-01-01_00-00-0{e}.000000"
        save_checkpoint(d / "checkpoint.pt", {"epoch": e + 1, "model": {"w": torch.full((64,), e)}})
        torch.save({"rank": 1, "epoch": e + 1}, d / "rng-rank1.pt")
        dirs.append(d)
    return dirs


def _truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    (d,) = _ray_run(tmp_path, 1)
    _truncate(d / "checkpoint.pt")
    with pytest.raises(CorruptCheckpointError, match="unreadable .*truncated or corrupt"):
        load_checkpoint(d)


def test_resume_falls_back_to_the_previous_intact_checkpoint(tmp_path):
    first, second = _ray_run(tmp_path, 2)
    _truncate(second / "checkpoint.pt")
    console = Console(record=True, width=200)
    fall_back_to_intact_checkpoint(str(tmp_path), console)
    # what Ray Train hands the workers (its latest checkpoint) now holds epoch 1's state
    assert load_checkpoint(second)["epoch"] == 1
    assert torch.load(second / "rng-rank1.pt")["epoch"] == 1
    assert (second / "checkpoint.pt.corrupt").is_file()
    assert "resuming from the previous intact checkpoint" in " ".join(console.export_text().split())
    assert load_checkpoint(first)["epoch"] == 1


def test_intact_latest_checkpoint_is_left_alone(tmp_path):
    _, second = _ray_run(tmp_path, 2)
    before = (second / "checkpoint.pt").read_bytes()
    fall_back_to_intact_checkpoint(str(tmp_path), Console(record=True))
    assert (second / "checkpoint.pt").read_bytes() == before


def test_no_intact_checkpoint_left_is_a_clear_error(tmp_path):
    (only,) = _ray_run(tmp_path, 1)
    _truncate(only / "checkpoint.pt")
    with pytest.raises(CorruptCheckpointError, match="without --resume"):
        fall_back_to_intact_checkpoint(str(tmp_path), Console(record=True))
