"""Training state in checkpoints (RNG streams), and the checkpoint format re-exported from
`commlab.checkpoint_format` for the training code and its callers."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from commlab.checkpoint_format import (
    CHECKPOINT_NAME,
    CODE_VERSION_ENV,
    FORMAT,
    CorruptCheckpointError,
    code_version,
    is_readable,
    load_checkpoint,
    package_versions,
    save_checkpoint,
)

__all__ = [
    "CHECKPOINT_NAME",
    "CODE_VERSION_ENV",
    "FORMAT",
    "CorruptCheckpointError",
    "code_version",
    "is_readable",
    "load_checkpoint",
    "package_versions",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    np_state = np.random.get_state(legacy=True)
    assert isinstance(np_state, tuple)  # legacy=True: the MT19937 tuple
    state["numpy"] = {
        "keys": torch.from_numpy(np_state[1].astype("int64")),
        "pos": int(np_state[2]),
        "has_gauss": int(np_state[3]),
        "cached_gaussian": float(np_state[4]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    s = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            s["keys"].numpy().astype("uint32"),
            s["pos"],
            s["has_gauss"],
            s["cached_gaussian"],
        )
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
