"""NT-Xent (normalised-temperature cross entropy) with intra-view negatives.

SimCLR's loss (Chen et al., "A Simple Framework for Contrastive Learning of Visual
Representations", ICML 2020), which CoMM (Dufumier et al., ICLR 2025) and its Cross / Cross+Self /
CMC baselines all build on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from commlab.objectives.base import check_temperature


def nt_xent(u: Tensor, v: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Symmetric NT-Xent between two L2-normalised batches.

    Args:
        u, v: (N, D), already L2-normalised; row i of `u` and row i of `v` are a positive pair.
        temperature: τ > 0.

    With S_uv = u vᵀ/τ, S_uu = u uᵀ/τ and S_vv = v vᵀ/τ (self-similarities excluded), the
    2N x 2N logits are rows [S_uv | S_uu] for the N u-anchors and [S_vv | S_uvᵀ] for the N
    v-anchors; the positive of anchor k is column k. Each anchor thus has one positive, N-1
    cross-view and N-1 intra-view negatives. The loss is the cross entropy averaged over the 2N
    anchors, so it is symmetric in (u, v).

    Returns:
        (loss, acc): scalar loss with grad; detached top-1 retrieval accuracy in %, u->v and v->u
        averaged, taken on the cross block S_uv only.
    """
    check_temperature(temperature)
    if u.ndim != 2 or u.shape != v.shape:
        raise ValueError(
            f"u and v must be 2-D with one shape (N, D), got {tuple(u.shape)} and {tuple(v.shape)}"
        )
    n = u.shape[0]
    if n < 2:
        raise ValueError(f"nt_xent needs at least 2 samples (negatives), got N={n}")

    s_uv = u @ v.T / temperature
    self_mask = torch.eye(n, dtype=torch.bool, device=u.device)
    s_uu = (u @ u.T / temperature).masked_fill(self_mask, float("-inf"))
    s_vv = (v @ v.T / temperature).masked_fill(self_mask, float("-inf"))
    logits = torch.cat(
        [torch.cat([s_uv, s_uu], dim=1), torch.cat([s_vv, s_uv.T], dim=1)],
        dim=0,
    )
    labels = torch.arange(2 * n, device=u.device)
    loss = F.cross_entropy(logits, labels)

    with torch.no_grad():
        target = labels[:n]
        hit_uv = (s_uv.argmax(dim=1) == target).float().mean()
        hit_vu = (s_uv.argmax(dim=0) == target).float().mean()
        acc = 50.0 * (hit_uv + hit_vu)
    return loss, acc
