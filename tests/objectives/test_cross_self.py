"""cross_self_loss: naive-loop reference, loss falls on a toy problem, shapes x τ x scale, errors.

Cross+Self is defined for two modalities, so there is no n_modalities axis here.
"""

import pytest
import torch

from commlab.objectives import cross_self_loss
from tests.objectives.reference import naive_nt_xent


def _four(b: int, d: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(b, d, generator=g, dtype=torch.float64)
    return [base + 0.8 * torch.randn(b, d, generator=g, dtype=torch.float64) for _ in range(4)]


@pytest.mark.parametrize(("b", "d"), [(2, 3), (7, 8), (16, 16)])
@pytest.mark.parametrize("temperature", [0.05, 0.1, 1.0])
@pytest.mark.parametrize("ssl_scale", [0.0, 1.0, 2.5])
def test_matches_naive_reference(b: int, d: int, temperature: float, ssl_scale: float) -> None:
    z1, z2, z1_aug, z2_aug = _four(b, d, seed=b)
    out = cross_self_loss(z1, z2, z1_aug, z2_aug, temperature, ssl_scale)
    cross, cross_acc = naive_nt_xent(z1, z2, temperature)
    self_1, acc_1 = naive_nt_xent(z1, z1_aug, temperature)
    self_2, acc_2 = naive_nt_xent(z2, z2_aug, temperature)
    assert out.loss.item() == pytest.approx(cross + ssl_scale * 0.5 * (self_1 + self_2), abs=1e-5)
    assert out.terms["cross_loss"].item() == pytest.approx(cross, abs=1e-5)
    assert out.terms["self_loss_1"].item() == pytest.approx(self_1, abs=1e-5)
    assert out.terms["self_loss_2"].item() == pytest.approx(self_2, abs=1e-5)
    assert out.acc["cross_acc"].item() == pytest.approx(cross_acc, abs=1e-4)
    assert out.acc["self_acc_1"].item() == pytest.approx(acc_1, abs=1e-4)
    assert out.acc["self_acc_2"].item() == pytest.approx(acc_2, abs=1e-4)
    assert out.acc["ssl_acc"].item() == pytest.approx((cross_acc + acc_1 + acc_2) / 3, abs=1e-4)


def test_gather_is_identity_without_process_group() -> None:
    zs = _four(5, 4, seed=1)
    assert torch.equal(cross_self_loss(*zs, gather=True).loss, cross_self_loss(*zs).loss)


def test_loss_falls_with_linear_encoders() -> None:
    torch.manual_seed(0)
    latent = torch.randn(64, 6)
    x1, x2 = latent @ torch.randn(6, 10), latent @ torch.randn(6, 12)
    enc1, enc2 = torch.nn.Linear(10, 8), torch.nn.Linear(12, 8)
    opt = torch.optim.Adam([*enc1.parameters(), *enc2.parameters()], lr=0.03)

    def aug(x: torch.Tensor) -> torch.Tensor:
        return x + 0.3 * torch.randn_like(x)

    a1, a2, b1, b2 = aug(x1), aug(x2), aug(x1), aug(x2)
    losses = []
    for _ in range(30):
        loss = cross_self_loss(enc1(a1), enc2(a2), enc1(b1), enc2(b2)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_errors() -> None:
    z1, z2, z1_aug, z2_aug = _four(4, 3, seed=0)
    with pytest.raises(ValueError, match="one shape"):
        cross_self_loss(z1, z2, z1_aug, z2_aug[:3])
    with pytest.raises(ValueError, match="2-D"):
        cross_self_loss(z1[0], z2[0], z1_aug[0], z2_aug[0])
    with pytest.raises(ValueError, match="ssl_scale"):
        cross_self_loss(z1, z2, z1_aug, z2_aug, ssl_scale=-1.0)
    with pytest.raises(ValueError, match="temperature"):
        cross_self_loss(z1, z2, z1_aug, z2_aug, temperature=-0.1)
    with pytest.raises(ValueError, match="at least 2"):
        cross_self_loss(z1[:1], z2[:1], z1_aug[:1], z2_aug[:1])
