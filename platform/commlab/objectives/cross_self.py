"""The Cross+Self baseline of CoMM (Dufumier et al., ICLR 2025), in the spirit of SLIP (Mu et al.,
"SLIP: Self-supervision meets Language-Image Pre-training", ECCV 2022).

A cross-modal NT-Xent between the two modalities plus, per modality, a SimCLR NT-Xent between two
augmentations of that modality. Each modality's head is shared by its cross and self terms.
"""

from __future__ import annotations

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
def cross_self_loss(
    z1: Tensor,
    z2: Tensor,
    z1_aug: Tensor,
    z2_aug: Tensor,
    temperature: float = 0.1,
    ssl_scale: float = 1.0,
    gather: bool = False,
) -> LossOutput:
    """Cross+Self loss.

    Args:
        z1, z2: (B, D) projected embeddings of modality 1 and 2 in view A (unnormalised).
        z1_aug, z2_aug: (B, D) the same in view B (another augmentation of the same samples).
        temperature: τ of every NT-Xent.
        ssl_scale: weight of the self terms (>= 0).
        gather: L2-normalise, then all-gather across workers with gradient.

    loss = NT-Xent(z1, z2) + ssl_scale · ½ [NT-Xent(z1, z1_aug) + NT-Xent(z2, z2_aug)].

    Returns:
        LossOutput with terms `cross_loss`, `self_loss_1`, `self_loss_2`; acc `cross_acc`,
        `self_acc_1`, `self_acc_2` and `ssl_acc` (their mean).
    """
    check_temperature(temperature)
    if ssl_scale < 0:
        raise ValueError(f"ssl_scale must be >= 0, got {ssl_scale}")
    check_embeddings([z1, z2, z1_aug, z2_aug], "z1, z2, z1_aug, z2_aug")
    z1, z2, z1_aug, z2_aug = normalize_and_gather([z1, z2, z1_aug, z2_aug], gather)

    cross, cross_acc = nt_xent(z1, z2, temperature)
    self_1, self_acc_1 = nt_xent(z1, z1_aug, temperature)
    self_2, self_acc_2 = nt_xent(z2, z2_aug, temperature)
    loss = cross + ssl_scale * 0.5 * (self_1 + self_2)
    terms = {
        "cross_loss": cross.detach(),
        "self_loss_1": self_1.detach(),
        "self_loss_2": self_2.detach(),
    }
    acc = {
        "cross_acc": cross_acc,
        "self_acc_1": self_acc_1,
        "self_acc_2": self_acc_2,
        "ssl_acc": torch.stack([cross_acc, self_acc_1, self_acc_2]).mean(),
    }
    return LossOutput(loss, terms, acc)
