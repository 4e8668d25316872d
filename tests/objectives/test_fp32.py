"""Every objective computes in float32 under bf16 mixed precision (`objectives.base.in_fp32`)."""

import pytest
import torch

from commlab.objectives import clip_loss, cmc_loss, comm_loss, cross_self_loss, siglip_loss


def _z(n: int = 6) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(16, 8, generator=g).bfloat16() for _ in range(n)]


CASES = {
    "comm": lambda z: comm_loss(z[:3], z[3:6]),
    "cmc": lambda z: cmc_loss(z[:3]),
    "cross": lambda z: clip_loss(z[0], z[1], torch.tensor(2.0)),
    "cross_self": lambda z: cross_self_loss(z[0], z[1], z[2], z[3]),
    "siglip": lambda z: siglip_loss(z[0], z[1], torch.tensor(2.3), torch.tensor(-10.0)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_objective_under_bf16_autocast_equals_its_fp32_value(name):
    zs = _z()
    leaves = [z.clone().requires_grad_(True) for z in zs]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = CASES[name](leaves)
    ref = CASES[name]([z.float() for z in zs])  # the same bf16 values, float32 throughout
    assert low.loss.dtype == torch.float32
    assert torch.equal(low.loss, ref.loss)
    low.loss.backward()
    assert all(z.grad is not None and z.grad.dtype == torch.bfloat16 for z in leaves[:2])
