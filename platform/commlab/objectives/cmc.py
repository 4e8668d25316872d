"""The CMC baseline (Tian, Krishnan, Isola, "Contrastive Multiview Coding", ECCV 2020), in its
"full graph" form as used for CoMM's 3-modality comparison (Dufumier et al., ICLR 2025).

Every pair of modalities is contrasted with NT-Xent; no augmentation pairs, no fusion.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import Tensor

from commlab.objectives.base import (
    LossOutput,
    check_embeddings,
    check_temperature,
    in_fp32,
    normalize_and_gather,
)
from commlab.objectives.infonce import nt_xent


@in_fp32
def cmc_loss(zs: Sequence[Tensor], temperature: float = 0.1, gather: bool = False) -> LossOutput:
    """CMC loss over n >= 2 modalities.

    Args:
        zs: n embeddings (B, D), one per modality (unnormalised); row b of each is sample b.
        temperature: τ of every NT-Xent.
        gather: L2-normalise, then all-gather across workers with gradient.

    loss = mean over the C(n, 2) pairs i < j of NT-Xent(z_i, z_j).

    Returns:
        LossOutput with terms `cmc_loss_<i>_<j>`, acc `cmc_acc_<i>_<j>` and `ssl_acc` (mean).
    """
    check_temperature(temperature)
    if len(zs) < 2:
        raise ValueError(f"cmc_loss needs at least 2 modalities, got {len(zs)}")
    check_embeddings(zs, "zs")
    zs = normalize_and_gather(zs, gather)

    losses: list[Tensor] = []
    accs: list[Tensor] = []
    terms: dict[str, Tensor] = {}
    acc: dict[str, Tensor] = {}
    for i, j in itertools.combinations(range(len(zs)), 2):
        pair_loss, pair_acc = nt_xent(zs[i], zs[j], temperature)
        losses.append(pair_loss)
        accs.append(pair_acc)
        terms[f"cmc_loss_{i}_{j}"] = pair_loss.detach()
        acc[f"cmc_acc_{i}_{j}"] = pair_acc
    acc["ssl_acc"] = torch.stack(accs).mean()
    return LossOutput(torch.stack(losses).mean(), terms, acc)
