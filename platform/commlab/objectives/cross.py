"""The Cross / CLIP baseline (Radford et al., "Learning Transferable Visual Models From Natural
Language Supervision", ICML 2021), as used by CoMM (Dufumier et al., ICLR 2025) for "Cross".

Symmetric cross entropy between modality-1 and modality-2 embeddings of the same samples, with a
learnable logit scale. No intra-modality negatives, no augmentation pairs, no fusion.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from commlab.dist import gather_no_grad, gather_sizes, get_rank, get_world_size
from commlab.objectives.base import LossOutput, check_embeddings, in_fp32

MAX_LOGIT_SCALE = 100.0


class LogitScale(nn.Module):
    """A learnable log-scale, initialised to log(init); `forward()` returns the scalar parameter."""

    def __init__(self, init: float = 1 / 0.07) -> None:
        super().__init__()
        if not init > 0:
            raise ValueError(f"LogitScale init must be > 0, got {init}")
        self.logit_scale = nn.Parameter(torch.tensor(math.log(init)))

    def forward(self) -> Tensor:
        return self.logit_scale


def _global_keys(z1: Tensor, z2: Tensor) -> tuple[Tensor, Tensor, int]:
    """All ranks' rows of z1 and z2 without gradient, except this rank's rows, which keep theirs.

    Keeping the local rows differentiable makes a 1-process run the exact CLIP gradient and adds
    the local key path in multi-process runs (remote keys carry no gradient, as in the
    reference). Both tensors travel in one collective. Returns the keys and this rank's row
    offset in the global batch.
    """
    if get_world_size() == 1:
        return z1, z2, 0
    n, width = z1.shape
    start = sum(gather_sizes(n, z1.device)[: get_rank()])
    keys1, keys2 = gather_no_grad(torch.cat([z1, z2], dim=1)).split(width, dim=1)
    keys1 = torch.cat([keys1[:start], z1, keys1[start + n :]])
    keys2 = torch.cat([keys2[:start], z2, keys2[start + n :]])
    return keys1, keys2, start


@in_fp32
def clip_loss(z1: Tensor, z2: Tensor, logit_scale: Tensor, gather: bool = False) -> LossOutput:
    """CLIP loss between paired embeddings of two modalities.

    Args:
        z1, z2: (B, D) embeddings of modality 1 and 2 (L2-normalised here); row i is a pair.
        logit_scale: scalar log-scale (e.g. `LogitScale()()`); the logits use
            s = exp(logit_scale) clamped to <= 100.
        gather: local queries vs keys gathered from all workers (no gradient through remote keys),
            labels offset by this rank's position in the global batch.

    loss = ½ [CE(s z1 K2ᵀ, y) + CE(s z2 K1ᵀ, y)] with K_m the (global) keys and y the positive
    indices.

    Returns:
        LossOutput with term `clip_loss` and acc `ssl_acc` (top-1 retrieval %, 1->2 and 2->1
        averaged, local queries vs the keys).
    """
    check_embeddings([z1, z2], "z1, z2")
    if logit_scale.numel() != 1:
        raise ValueError(f"logit_scale must be a scalar, got shape {tuple(logit_scale.shape)}")
    z1, z2 = F.normalize(z1, dim=-1), F.normalize(z2, dim=-1)
    if gather:
        keys1, keys2, start = _global_keys(z1, z2)
    else:
        keys1, keys2, start = z1, z2, 0
    if keys1.shape[0] < 2:
        raise ValueError("clip_loss needs at least 2 samples in the (global) batch")
    scale = logit_scale.exp().clamp(max=MAX_LOGIT_SCALE).reshape(())
    logits_12 = scale * z1 @ keys2.T
    logits_21 = scale * z2 @ keys1.T
    labels = torch.arange(start, start + z1.shape[0], device=z1.device)
    loss = 0.5 * (F.cross_entropy(logits_12, labels) + F.cross_entropy(logits_21, labels))
    with torch.no_grad():
        hit_12 = (logits_12.argmax(dim=1) == labels).float().mean()
        hit_21 = (logits_21.argmax(dim=1) == labels).float().mean()
        acc = 50.0 * (hit_12 + hit_21)
    return LossOutput(loss, {"clip_loss": loss.detach()}, {"ssl_acc": acc})
