"""The checkpoint format: self-describing, loadable with `torch.load(weights_only=True)`.

A checkpoint is a plain dict of tensors and primitive containers:
  format, model, optimizer, scheduler, epoch, rng, config (resolved, JSON-able), metrics, seed,
  data_fingerprint, code_version, packages, created_at.
Nothing in it needs the original Python objects to load. Training writes it (`commlab.train`),
promotion and `commlab.pretrained` read it, so it lives below both; the training state that goes
into it (RNG streams) is `commlab.train.checkpoint`'s.
"""

from __future__ import annotations

import functools
import os
import platform as _platform
import subprocess
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

FORMAT = "commlab-checkpoint/1"
CHECKPOINT_NAME = "checkpoint.pt"  # the file name inside a checkpoint directory


CODE_VERSION_ENV = "COMMLAB_CODE_VERSION"


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """Git commit of the source tree (with '+dirty' when modified), else the package version.

    `$COMMLAB_CODE_VERSION` wins: `commlab submit` sets it to the client's commit, because a
    job's working directory arrives on the cluster without `.git`.
    """
    import commlab

    if os.environ.get(CODE_VERSION_ENV, "").strip():
        return os.environ[CODE_VERSION_ENV].strip()

    here = Path(commlab.__file__).resolve().parent

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", *args], cwd=here, capture_output=True, text=True, timeout=5, check=True
        )
        return done.stdout.strip()

    try:
        sha = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return f"commlab-{commlab.__version__}"


@functools.lru_cache(maxsize=1)
def package_versions() -> dict[str, str]:
    out = {"python": _platform.python_version()}
    for pkg in ("commlab", "torch", "numpy", "kornia", "ray", "mlflow", "scikit-learn", "pyarrow"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    return out


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write atomically (temp file + rename), adding the provenance fields."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    full = {
        "format": FORMAT,
        "code_version": code_version(),
        "packages": package_versions(),
        "created_at": time.time(),
        **payload,
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(full, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


class CorruptCheckpointError(ValueError):
    """A checkpoint file that cannot be read back (truncated, overwritten, not a checkpoint)."""


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a commlab checkpoint (a directory means its checkpoint.pt); an unreadable file
    raises `CorruptCheckpointError` naming the file and what to do."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises RuntimeError, EOFError, UnpicklingError, ...
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        raise CorruptCheckpointError(
            f"checkpoint {path} is unreadable (truncated or corrupt: {reason}); restore it from "
            "a copy, or start afresh without --resume"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CorruptCheckpointError(f"{path} is not a commlab checkpoint (format {FORMAT})")
    return ckpt


def is_readable(path: str | Path) -> bool:
    try:
        load_checkpoint(path)
    except (CorruptCheckpointError, FileNotFoundError):
        return False
    return True
