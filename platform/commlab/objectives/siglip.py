"""The SigLIP baseline (Zhai, Mustafa, Kolesnikov, Beyer, "Sigmoid Loss for Language Image
Pre-Training", ICCV 2023).

Every pair (i, j) of the batch is its own binary classification, positive when i == j (two
modalities of one sample) and negative otherwise, so no softmax normalises over the batch. A
learnable temperature t and bias b scale the cosine similarities; the bias starts very negative
because almost every pair is a negative.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from commlab.objectives.base import (
    LossOutput,
    check_embeddings,
    in_fp32,
    normalize_and_gather,
)


class SigmoidScaleBias(nn.Module):
    """SigLIP's learnable log-temperature t' (t = exp(t')) and bias b; `forward()` returns both
    scalar parameters. The paper initialises t = 10 and b = -10."""

    def __init__(self, scale_init: float = 10.0, bias_init: float = -10.0) -> None:
        super().__init__()
        if not scale_init > 0:
            raise ValueError(f"SigmoidScaleBias scale_init must be > 0, got {scale_init}")
        self.logit_scale = nn.Parameter(torch.tensor(math.log(scale_init)))
        self.logit_bias = nn.Parameter(torch.tensor(float(bias_init)))

    def forward(self) -> tuple[Tensor, Tensor]:
        return self.logit_scale, self.logit_bias


@in_fp32
def siglip_loss(
    x: Tensor, y: Tensor, logit_scale: Tensor, logit_bias: Tensor, gather: bool = False
) -> LossOutput:
    """Pairwise sigmoid loss between paired embeddings of two modalities.

    Args:
        x, y: (B, D) embeddings of modality 1 and 2 (L2-normalised here); row i of each is one
            sample.
        logit_scale: scalar t' (e.g. from `SigmoidScaleBias`); the logits use t = exp(t').
        logit_bias: scalar b.
        gather: all-gather the embeddings across workers with gradient first, so every rank
            computes the loss on the global batch (N = B x world size) and the negatives include
            every other worker's samples.

    With z_ij = 1 if i == j else -1 over the N samples,
        loss = -1/N Σ_i Σ_j log σ(z_ij (t x_i·y_j + b)).

    Returns:
        LossOutput with term `siglip_loss` and acc `ssl_acc` (top-1 retrieval %, x->y and y->x
        averaged).
    """
    check_embeddings([x, y], "x, y")
    for name, value in (("logit_scale", logit_scale), ("logit_bias", logit_bias)):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got shape {tuple(value.shape)}")
    x, y = normalize_and_gather([x, y], gather)
    n = x.shape[0]
    sim = x @ y.T
    # at least float32: under bf16 autocast the summed log-sigmoids would lose precision
    sim = sim.to(torch.promote_types(sim.dtype, torch.float32))
    logits = logit_scale.exp().reshape(()) * sim + logit_bias.reshape(())
    signs = 2.0 * torch.eye(n, dtype=logits.dtype, device=logits.device) - 1.0
    loss = -F.logsigmoid(signs * logits).sum() / n
    with torch.no_grad():
        target = torch.arange(n, device=logits.device)
        hit_xy = (logits.argmax(dim=1) == target).float().mean()
        hit_yx = (logits.argmax(dim=0) == target).float().mean()
        acc = 50.0 * (hit_xy + hit_yx)
    return LossOutput(loss, {"siglip_loss": loss.detach()}, {"ssl_acc": acc})
