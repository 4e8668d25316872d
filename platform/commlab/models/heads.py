"""Projection heads (training only; evaluation uses un-projected features)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from commlab.models.norm import batch_norm_groups
from commlab.objectives.base import to_fp32


class ProjectionHead(nn.Module):
    """Linear -> BN -> ReLU -> Linear -> BN -> ReLU -> Linear (CoMM / SimCLR-style MLP head).

    BatchNorm becomes SyncBatchNorm under data-parallel training (see commlab.train), so the
    statistics are those of the global batch, as in the paper. The head always runs in fp32,
    also under bf16 autocast: its output becomes the contrastive logits (see
    `objectives.base.in_fp32`), and it is a negligible share of a step's FLOPs.
    """

    def __init__(self, in_dim: int, hidden_dim: int = 512, out_dim: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, hidden_dim),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return self.net(to_fp32(x))

    def forward_groups(self, x: Tensor) -> Tensor:
        """(G, B, in_dim) -> (G, B, out_dim): the head on each of G batches, BatchNorm
        statistics per batch, in one pass (one statistics collective per layer, not G)."""
        with torch.autocast(x.device.type, enabled=False):
            x = to_fp32(x)
            for layer in self.net:
                x = batch_norm_groups(layer, x) if isinstance(layer, _BatchNorm) else layer(x)
        return x
