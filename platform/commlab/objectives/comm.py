"""The CoMM objective (Dufumier, Castillo-Navarro, Tuia, Thiran, "What to align in multimodal
contrastive learning?", ICLR 2025).

A fused encoder embeds each of two augmented views n_mod+1 times: once per single modality (the
others masked out) and once with all modalities. Every embedding of one view is aligned with the
*all-modality* embedding of the other view, so the positive pair is always multimodal.
"""

from __future__ import annotations

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
def comm_loss(
    views_a: Sequence[Tensor],
    views_b: Sequence[Tensor],
    temperature: float = 0.1,
    weights: Sequence[float] | Tensor | None = None,
    gather: bool = False,
) -> LossOutput:
    """CoMM loss between two augmented views.

    Args:
        views_a, views_b: n_mod+1 embeddings (B, D) each, the all-modality embedding LAST.
            Unnormalised; they are L2-normalised here.
        temperature: τ of the NT-Xent (fixed, 0.1 in the paper).
        weights: optional n_mod+1 term weights; the loss stays a mean, mean_i(w_i ℓ_i).
        gather: all-gather the embeddings across workers with gradient first, so every rank
            computes the loss on the global batch.

    For each i (the full embedding included),
        ℓ_i = ½ [NT-Xent(a_i, b_full) + NT-Xent(b_i, a_full)],   loss = mean_i ℓ_i.
    For i = full both calls are the same symmetric NT-Xent, so it is computed once.

    Returns:
        LossOutput with terms `ssl_loss_<i>` and acc `ssl_acc_<i>` (u->v / v->u retrieval
        averaged over both calls) plus `ssl_acc` (mean over terms).
    """
    check_temperature(temperature)
    if len(views_a) != len(views_b):
        raise ValueError(
            f"views_a and views_b must hold the same number of embeddings, "
            f"got {len(views_a)} and {len(views_b)}"
        )
    k = len(views_a)
    if k < 2:
        raise ValueError(
            f"each view needs n_mod+1 >= 2 embeddings (single-modality ones + the full one "
            f"last), got {k}"
        )
    check_embeddings([*views_a, *views_b], "views_a + views_b")
    w: Tensor | None = None
    if weights is not None:
        w = torch.as_tensor(weights, dtype=views_a[0].dtype, device=views_a[0].device)
        if w.shape != (k,):
            raise ValueError(f"weights must have n_mod+1 = {k} entries, got {tuple(w.shape)}")

    embs = normalize_and_gather([*views_a, *views_b], gather)
    a, b = embs[:k], embs[k:]

    losses: list[Tensor] = []
    terms: dict[str, Tensor] = {}
    acc: dict[str, Tensor] = {}
    for i in range(k):
        if i == k - 1:
            term, term_acc = nt_xent(a[i], b[-1], temperature)
        else:
            loss_ab, acc_ab = nt_xent(a[i], b[-1], temperature)
            loss_ba, acc_ba = nt_xent(b[i], a[-1], temperature)
            term, term_acc = 0.5 * (loss_ab + loss_ba), 0.5 * (acc_ab + acc_ba)
        losses.append(term)
        terms[f"ssl_loss_{i}"] = term.detach()
        acc[f"ssl_acc_{i}"] = term_acc
    stacked = torch.stack(losses)
    loss = (stacked * w).mean() if w is not None else stacked.mean()
    acc["ssl_acc"] = torch.stack([acc[f"ssl_acc_{i}"] for i in range(k)]).mean()
    return LossOutput(loss, terms, acc)
