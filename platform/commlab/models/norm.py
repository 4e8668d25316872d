"""BatchNorm over groups: G batches normalised each with its own statistics, in one pass.

CoMM's projection head sees 2 x (n_mod + 1) batches per step (every mask of both views) and the
paper normalises each with its own BatchNorm statistics. Running the head once per batch costs
one statistics collective per BatchNorm layer and batch under data-parallel training;
`batch_norm_groups` computes the same numbers for a (G, B, C) stack with one collective per
layer (through the layer's `sum_over_workers`, see `GlobalBatchNorm`).

`GlobalBatchNorm` normalises with the statistics of the global batch across data-parallel
workers on any device; `sync_batchnorm` converts a module's BatchNorm layers to it.
"""

from __future__ import annotations

from typing import Any

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
        # two passes, not torch.var_mean: at the head's (6, 64, 256) that took 0.4-0.5 ms on
        # 2 CPU cores, these 0.04 ms
        mean = x.mean(1, keepdim=True)  # (G, 1, C)
        var = (x - mean).square().mean(1, keepdim=True)
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


class _SumOverWorkers(torch.autograd.Function):
    """Sum of `x` over workers, differentiable: every rank uses the sum, so the gradient of
    each rank's contribution is the sum of the incoming gradients (one collective each way,
    where `dist.gather_with_grad` would need three)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return dist.all_reduce_mean(x) * dist.get_world_size()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return dist.all_reduce_mean(grad.contiguous()) * dist.get_world_size()


class GlobalBatchNorm(_BatchNorm):
    """BatchNorm whose training statistics are those of the global batch across workers.

    torch's SyncBatchNorm only runs on GPUs; this one runs on any device (gloo included). The
    per-channel sums of x and x**2 and the sample count are summed over workers with gradient
    in float64, so forward and backward equal BatchNorm on the concatenated batch, at the cost
    of one small collective per call each way. Evaluation mode, or one worker, is plain
    BatchNorm. Parameter and buffer names are BatchNorm's, so checkpoints load into
    unconverted models.
    """

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (N, C, ...), got {x.dim()}D")

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or dist.get_world_size() == 1:
            return super().forward(x)
        self._check_input_dim(x)
        c = x.shape[1]
        dims = [0, *range(2, x.dim())]
        xd = x.double()
        count = torch.full((1,), x.numel() / c, dtype=torch.float64, device=x.device)
        local = torch.cat([xd.sum(dims), (xd * xd).sum(dims), count])
        total = self.sum_over_workers(local)
        n = total[-1].detach()
        mean = total[:c] / n
        var = (total[c : 2 * c] / n - mean * mean).clamp_min(0.0)
        if self.track_running_stats and self.running_mean is not None:
            update_running_stats(self, mean.detach(), var.detach(), float(n))
        shape = [1, c] + [1] * (x.dim() - 2)
        work = torch.promote_types(x.dtype, torch.float32)
        inv = torch.rsqrt(var + self.eps).to(work)
        y = (x.to(work) - mean.to(work).view(shape)) * inv.view(shape)
        if self.affine:
            y = y * self.weight.to(work).view(shape) + self.bias.to(work).view(shape)
        return y.to(x.dtype)

    @torch.compiler.disable  # the collective always runs eagerly, also inside compiled code
    def sum_over_workers(self, local: Tensor) -> Tensor:
        """`local` (float64 statistics) summed over workers, with gradient: the hook through
        which `commlab.models.norm.batch_norm_groups` makes one collective for many batches."""
        return _SumOverWorkers.apply(local) if dist.get_world_size() > 1 else local


def sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm in `module` synchronised across workers (in place for children):
    torch's SyncBatchNorm on CUDA, `GlobalBatchNorm` elsewhere."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _to_global_bn(module)


def _to_global_bn(module: nn.Module) -> nn.Module:
    out = module
    if isinstance(module, _BatchNorm) and not isinstance(
        module, GlobalBatchNorm | nn.SyncBatchNorm
    ):
        out = _rebuild(module, GlobalBatchNorm)
    for name, child in module.named_children():
        out.add_module(name, _to_global_bn(child))
    return out


class LocalBatchNorm(_BatchNorm):
    """Plain BatchNorm over this worker's batch, for any input rank (N, C, ...)."""

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (N, C, ...), got {x.dim()}D")


def local_batchnorm(module: nn.Module) -> nn.Module:
    """`module` with every synchronised BatchNorm made local (in place for children; they share
    the parameters and buffers): for work one worker does alone, such as timing a step on a copy,
    where a collective would wait for workers that never join."""
    out = module
    if isinstance(module, GlobalBatchNorm | nn.SyncBatchNorm):
        out = _rebuild(module, LocalBatchNorm)
    for name, child in module.named_children():
        out.add_module(name, local_batchnorm(child))
    return out


def _rebuild(bn: _BatchNorm, cls: type[_BatchNorm]) -> _BatchNorm:
    """A `cls` layer with `bn`'s settings, sharing its parameters and buffers."""
    out = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    if bn.affine:
        out.weight = bn.weight
        out.bias = bn.bias
    out.running_mean = bn.running_mean
    out.running_var = bn.running_var
    out.num_batches_tracked = bn.num_batches_tracked
    out.train(bn.training)
    return out
