"""cmc_loss: naive-loop reference, loss falls on a toy problem, shapes x τ x n_mod, errors."""

import pytest
import torch

from commlab.objectives import cmc_loss
from tests.objectives.reference import naive_nt_xent


def _mods(n_mod: int, b: int, d: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(b, d, generator=g, dtype=torch.float64)
    return [base + 0.8 * torch.randn(b, d, generator=g, dtype=torch.float64) for _ in range(n_mod)]


@pytest.mark.parametrize("n_mod", [2, 3, 4])
@pytest.mark.parametrize(("b", "d"), [(2, 3), (7, 8), (12, 16)])
@pytest.mark.parametrize("temperature", [0.05, 0.1, 1.0])
def test_matches_naive_reference(n_mod: int, b: int, d: int, temperature: float) -> None:
    zs = _mods(n_mod, b, d, seed=b + n_mod)
    out = cmc_loss(zs, temperature)
    pair_losses, pair_accs = {}, {}
    for i in range(n_mod):
        for j in range(i + 1, n_mod):
            pair_losses[i, j], pair_accs[i, j] = naive_nt_xent(zs[i], zs[j], temperature)
    assert out.loss.item() == pytest.approx(sum(pair_losses.values()) / len(pair_losses), abs=1e-5)
    assert set(out.terms) == {f"cmc_loss_{i}_{j}" for i, j in pair_losses}
    for (i, j), value in pair_losses.items():
        assert out.terms[f"cmc_loss_{i}_{j}"].item() == pytest.approx(value, abs=1e-5)
        assert out.acc[f"cmc_acc_{i}_{j}"].item() == pytest.approx(pair_accs[i, j], abs=1e-4)
    mean_acc = sum(pair_accs.values()) / len(pair_accs)
    assert out.acc["ssl_acc"].item() == pytest.approx(mean_acc, abs=1e-4)


def test_gather_is_identity_without_process_group() -> None:
    zs = _mods(3, 5, 4, seed=1)
    assert torch.equal(cmc_loss(zs, gather=True).loss, cmc_loss(zs).loss)


@pytest.mark.parametrize("n_mod", [2, 3])
def test_loss_falls_with_linear_encoders(n_mod: int) -> None:
    torch.manual_seed(0)
    latent = torch.randn(64, 6)
    xs = [latent @ torch.randn(6, 10) + 0.3 * torch.randn(64, 10) for _ in range(n_mod)]
    encs = torch.nn.ModuleList(torch.nn.Linear(10, 8) for _ in range(n_mod))
    opt = torch.optim.Adam(encs.parameters(), lr=0.03)
    losses = []
    for _ in range(30):
        loss = cmc_loss([enc(x) for enc, x in zip(encs, xs, strict=True)]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_errors() -> None:
    zs = _mods(3, 4, 3, seed=0)
    with pytest.raises(ValueError, match="at least 2 modalities"):
        cmc_loss(zs[:1])
    with pytest.raises(ValueError, match="one shape"):
        cmc_loss([zs[0], zs[1][:3]])
    with pytest.raises(ValueError, match="2-D"):
        cmc_loss([zs[0][0], zs[1][0]])
    with pytest.raises(ValueError, match="temperature"):
        cmc_loss(zs, temperature=0.0)
    with pytest.raises(ValueError, match="at least 2"):
        cmc_loss([z[:1] for z in zs])
