"""Shared fixtures: small in-memory datasets and configs that run in seconds on CPU."""

from __future__ import annotations

import pytest
import torch

from commlab.config import ExperimentConfig, apply_overrides, validate_config
from commlab.data.base import DataBundle, Modality, MultimodalDataset, Task


def toy_sequence_dataset(n: int = 96, seed: int = 0) -> MultimodalDataset:
    """Two variable-length sequence modalities whose shared latent class is learnable."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    proto = torch.randn(4, 6, generator=g)
    lengths = torch.randint(3, 9, (n,), generator=g)
    x1 = proto[y].unsqueeze(1).repeat(1, 8, 1) + 0.3 * torch.randn(n, 8, 6, generator=g)
    x2 = torch.randn(n, 8, 5, generator=g)
    x2[..., :4] += 2 * torch.nn.functional.one_hot(y, 4).unsqueeze(1)
    steps = torch.arange(8).unsqueeze(0)
    x1[steps >= lengths.unsqueeze(1)] = 0.0
    x2[steps >= lengths.unsqueeze(1)] = 0.0
    idx = torch.arange(n)
    return MultimodalDataset(
        modalities=[
            Modality("a", "sequence", x1, idx, lengths.clone()),
            Modality("b", "sequence", x2, idx, lengths.clone()),
        ],
        labels={"cls": y},
        tasks={"cls": Task("cls", "multiclass", 4)},
        splits={"train": idx[: n * 3 // 4], "test": idx[n * 3 // 4 :]},
        fingerprint="toy",
    )


def toy_config(method: str = "comm", overrides: tuple[str, ...] = ()) -> ExperimentConfig:
    raw = {
        "name": "toy",
        "data": {"name": "toy", "batch_size": 16},
        "model": {
            "method": method,
            "embed_dim": 16,
            "n_heads": 2,
            "head": {"hidden_dim": 32, "out_dim": 16},
            "modalities": [
                {"encoder": {"name": "gru", "params": {"hidden": 16}}} for _ in range(2)
            ],
        },
        "augment": {"modalities": [{"kind": "sequence"}, {"kind": "sequence"}]},
        "optim": {"lr": 3e-3},
        "train": {"epochs": 2, "probe_every": 1, "deterministic": True},
    }
    return validate_config(apply_overrides(raw, list(overrides)))


@pytest.fixture
def toy_bundle() -> DataBundle:
    ds = toy_sequence_dataset()
    return DataBundle(pretrain=ds, probe=ds, description="toy sequences")
