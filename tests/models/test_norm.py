"""Grouped BatchNorm: one pass over G batches equals G separate BatchNorm calls."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from commlab.models.heads import ProjectionHead
from commlab.models.norm import batch_norm_groups


def _inputs(g: int = 4, b: int = 6, d: int = 5) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    # groups with clearly different statistics, so pooled statistics would fail the test
    return torch.randn(g, b, d, generator=gen) * torch.arange(1, g + 1).view(
        g, 1, 1
    ) + torch.arange(g).view(g, 1, 1)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_head_forward_groups_equals_one_call_per_group(momentum):
    torch.manual_seed(0)
    head = ProjectionHead(5, hidden_dim=8, out_dim=3)
    for m in head.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.momentum = momentum
    ref = copy.deepcopy(head)
    x = _inputs()
    xg, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    w = torch.randn(4, 6, 3)

    got = head.forward_groups(xg)
    want = torch.stack([ref(xr[k]) for k in range(4)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    (got * w).sum().backward()
    (want * w).sum().backward()
    torch.testing.assert_close(xg.grad, xr.grad, rtol=1e-4, atol=1e-6)
    for (name, p), q in zip(head.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    for (name, a), b in zip(head.named_buffers(), ref.buffers(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_groups_are_normalised_separately_and_eval_uses_running_stats():
    bn = nn.BatchNorm1d(5, affine=False)
    x = _inputs()
    y = batch_norm_groups(bn, x)
    # every group comes out with zero mean and unit (biased) variance on its own
    torch.testing.assert_close(y.mean(1), torch.zeros(4, 5), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var(1, unbiased=False), torch.ones(4, 5), atol=1e-3, rtol=0)
    assert int(bn.num_batches_tracked) == 4
    bn.eval()
    torch.testing.assert_close(batch_norm_groups(bn, x), bn(x.flatten(0, 1)).view_as(x))
    with pytest.raises(ValueError, match="groups, batch, channels"):
        batch_norm_groups(bn, x[0])


def test_local_batchnorm_undoes_synchronisation_and_shares_parameters():
    from commlab.models.norm import GlobalBatchNorm, LocalBatchNorm, local_batchnorm, sync_batchnorm

    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Sequential(nn.BatchNorm1d(6)))
    synced = sync_batchnorm(copy.deepcopy(plain), torch.device("cpu"))
    assert sum(isinstance(m, GlobalBatchNorm) for m in synced.modules()) == 2
    local = local_batchnorm(synced)
    assert not any(isinstance(m, GlobalBatchNorm) for m in local.modules())
    assert sum(isinstance(m, LocalBatchNorm) for m in local.modules()) == 2
    assert local[1].weight is synced[1].weight and local[1].running_mean is synced[1].running_mean
    x = torch.randn(8, 4)
    assert torch.allclose(local(x), plain(x), atol=1e-6)
    assert torch.allclose(local[1].running_mean, plain[1].running_mean)


def test_projection_head_runs_in_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    head = ProjectionHead(16, 32, 8)
    x = torch.randn(3, 10, 16).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        grouped = head.forward_groups(x)
        single = head(x[0])
    assert grouped.dtype == torch.float32 and single.dtype == torch.float32
    ref = ProjectionHead(16, 32, 8)
    ref.load_state_dict(head.state_dict())
    torch.testing.assert_close(grouped, ref.forward_groups(x.float()))
