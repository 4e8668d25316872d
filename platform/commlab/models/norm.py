"""BatchNorm over groups: G batches normalised each with its own statistics, in one pass.

CoMM's projection head sees 2 x (n_mod + 1) batches per step (every mask of both views) and the
paper normalises each with its own BatchNorm statistics. Running the head once per batch costs
one statistics collective per BatchNorm layer and batch under data-parallel training;
`batch_norm_groups` computes the same numbers for a (G, B, C) stack with one collective per
layer (through the layer's `sum_over_workers`, see commlab.train.worker.GlobalBatchNorm).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from commlab import dist


def batch_norm_groups(bn: _BatchNorm, x: Tensor) -> Tensor:
    """`bn` applied to each x[g] of x (G, B, C) on its own: output, gradients and running
    statistics equal `torch.stack([bn(x[g]) for g in range(G)])`."""
    if x.dim() != 3:
        raise ValueError(f"expected (groups, batch, channels), got shape {tuple(x.shape)}")
    if not bn.training:  # running statistics: the same for every group
        return bn(x.flatten(0, 1)).view_as(x)
    reduce = getattr(bn, "sum_over_workers", None)
    if isinstance(bn, nn.SyncBatchNorm) and dist.get_world_size() > 1:
        return torch.stack([bn(xg) for xg in x])  # torch's own collective, once per group
    g, b, c = x.shape
    if reduce is None or dist.get_world_size() == 1:
        var, mean = torch.var_mean(x, dim=1, unbiased=False, keepdim=True)  # (G, 1, C)
        n = float(b)
    else:
        xd = x.double()
        count = torch.full((1,), float(b), dtype=torch.float64, device=x.device)
        total = reduce(torch.cat([xd.sum(1).flatten(), (xd * xd).sum(1).flatten(), count]))
        n_t = total[-1].detach()
        mean64 = (total[: g * c] / n_t).view(g, 1, c)
        var64 = ((total[g * c : 2 * g * c] / n_t).view(g, 1, c) - mean64 * mean64).clamp_min(0.0)
        mean, var, n = mean64.to(x.dtype), var64.to(x.dtype), float(n_t)
    if bn.track_running_stats and bn.running_mean is not None:
        for k in range(g):
            update_running_stats(bn, mean[k, 0].detach(), var[k, 0].detach(), n)
    y = (x - mean) * torch.rsqrt(var + bn.eps)
    if bn.affine:
        y = y * bn.weight + bn.bias
    return y


@torch.no_grad()
def update_running_stats(bn: _BatchNorm, mean: Tensor, var: Tensor, n: float) -> None:
    """One training step's update of `bn`'s running statistics from the batch's mean and biased
    variance over `n` values, as torch's BatchNorm does it (unbiased variance; momentum None =
    cumulative average)."""
    assert bn.running_mean is not None and bn.running_var is not None
    assert bn.num_batches_tracked is not None
    bn.num_batches_tracked.add_(1)
    m = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    unbiased = var * (n / max(n - 1.0, 1.0))
    bn.running_mean.mul_(1 - m).add_(mean.to(bn.running_mean.dtype), alpha=m)
    bn.running_var.mul_(1 - m).add_(unbiased.to(bn.running_var.dtype), alpha=m)
