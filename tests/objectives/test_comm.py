"""comm_loss: naive-loop reference, loss falls on a toy problem, shapes x τ x n_mod, errors."""

import pytest
import torch

from commlab.objectives import LossOutput, comm_loss
from tests.objectives.reference import naive_nt_xent_lists, normalise


def naive_comm(views_a, views_b, t, weights=None):
    """CoMM §1.3: l_i = ½[NCE(a_i, b_full) + NCE(b_i, a_full)] for every i, mean (weighted)."""
    a = [[normalise(row) for row in z.tolist()] for z in views_a]
    b = [[normalise(row) for row in z.tolist()] for z in views_b]
    k = len(a)
    losses, accs = [], []
    for i in range(k):
        l_ab, acc_ab = naive_nt_xent_lists(a[i], b[k - 1], t)
        l_ba, acc_ba = naive_nt_xent_lists(b[i], a[k - 1], t)
        losses.append(0.5 * (l_ab + l_ba))
        accs.append(0.5 * (acc_ab + acc_ba))
    w = weights if weights is not None else [1.0] * k
    return sum(wi * li for wi, li in zip(w, losses, strict=True)) / k, losses, accs


def _views(n_mod: int, b: int, d: int, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n_mod + 1, b, d, generator=g, dtype=torch.float64)
    noise = torch.randn(n_mod + 1, b, d, generator=g, dtype=torch.float64)
    return list(base), list(base + 0.7 * noise)


@pytest.mark.parametrize("n_mod", [2, 3])
@pytest.mark.parametrize(("b", "d"), [(2, 3), (6, 8), (12, 16)])
@pytest.mark.parametrize("temperature", [0.05, 0.1, 1.0])
def test_matches_naive_reference(n_mod: int, b: int, d: int, temperature: float) -> None:
    views_a, views_b = _views(n_mod, b, d, seed=b + n_mod)
    out = comm_loss(views_a, views_b, temperature=temperature)
    ref_loss, ref_terms, ref_accs = naive_comm(views_a, views_b, temperature)
    assert out.loss.item() == pytest.approx(ref_loss, abs=1e-5)
    assert set(out.terms) == {f"ssl_loss_{i}" for i in range(n_mod + 1)}
    assert set(out.acc) == {f"ssl_acc_{i}" for i in range(n_mod + 1)} | {"ssl_acc"}
    for i in range(n_mod + 1):
        assert out.terms[f"ssl_loss_{i}"].item() == pytest.approx(ref_terms[i], abs=1e-5)
        assert out.acc[f"ssl_acc_{i}"].item() == pytest.approx(ref_accs[i], abs=1e-4)
    assert out.acc["ssl_acc"].item() == pytest.approx(sum(ref_accs) / len(ref_accs), abs=1e-4)


@pytest.mark.parametrize("n_mod", [2, 3])
def test_weights_match_naive_reference(n_mod: int) -> None:
    views_a, views_b = _views(n_mod, 5, 4, seed=7)
    weights = [0.5 + i for i in range(n_mod + 1)]
    out = comm_loss(views_a, views_b, weights=weights)
    ref_loss, _, _ = naive_comm(views_a, views_b, 0.1, weights)
    assert out.loss.item() == pytest.approx(ref_loss, abs=1e-5)
    unweighted = comm_loss(views_a, views_b, weights=torch.ones(n_mod + 1))
    assert unweighted.loss.item() == pytest.approx(comm_loss(views_a, views_b).loss.item())


def test_output_unpacks_and_is_detached_and_float32_close() -> None:
    views_a, views_b = _views(2, 8, 6, seed=3)
    out = comm_loss([z.float().requires_grad_() for z in views_a], [z.float() for z in views_b])
    assert isinstance(out, LossOutput)
    loss, terms, acc = out
    assert loss.requires_grad and loss.ndim == 0
    assert all(not t.requires_grad for t in [*terms.values(), *acc.values()])
    assert loss.item() == pytest.approx(naive_comm(views_a, views_b, 0.1)[0], abs=1e-5)


def test_gather_is_identity_without_process_group() -> None:
    views_a, views_b = _views(3, 4, 5, seed=9)
    assert torch.equal(
        comm_loss(views_a, views_b, gather=True).loss, comm_loss(views_a, views_b).loss
    )


class ToyFusion(torch.nn.Module):
    """Per-modality linear encoders; the fused vector is the sum over the kept modalities."""

    def __init__(self, n_mod: int, d_in: int, d: int) -> None:
        super().__init__()
        self.encs = torch.nn.ModuleList(torch.nn.Linear(d_in, d) for _ in range(n_mod))
        self.head = torch.nn.Linear(d, d)

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        feats = [enc(x) for enc, x in zip(self.encs, xs, strict=True)]
        return [self.head(f) for f in feats] + [self.head(sum(feats))]


@pytest.mark.parametrize("n_mod", [2, 3])
def test_loss_falls_on_toy_problem(n_mod: int) -> None:
    torch.manual_seed(0)
    latent = torch.randn(64, 6)
    mods = [latent @ torch.randn(6, 10) for _ in range(n_mod)]
    model = ToyFusion(n_mod, 10, 8)
    opt = torch.optim.Adam(model.parameters(), lr=0.03)

    def augment() -> list[torch.Tensor]:
        return [m + 0.3 * torch.randn_like(m) for m in mods]

    view_a, view_b = augment(), augment()
    losses = []
    for _ in range(30):
        loss = comm_loss(model(view_a), model(view_b)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_errors() -> None:
    a, b = _views(2, 4, 3, seed=0)
    with pytest.raises(ValueError, match="same number"):
        comm_loss(a, b[:2])
    with pytest.raises(ValueError, match=">= 2 embeddings"):
        comm_loss(a[:1], b[:1])
    with pytest.raises(ValueError, match="one shape"):
        comm_loss(a, [b[0], b[1], torch.randn(4, 5)])
    with pytest.raises(ValueError, match="one shape"):
        comm_loss(a, [b[0], b[1], torch.randn(5, 3)])
    with pytest.raises(ValueError, match="2-D"):
        comm_loss(a, [b[0], b[1], torch.randn(4, 3, 1)])
    with pytest.raises(ValueError, match="weights"):
        comm_loss(a, b, weights=[1.0, 1.0])
    with pytest.raises(ValueError, match="temperature"):
        comm_loss(a, b, temperature=0.0)
    with pytest.raises(ValueError, match="at least 2"):
        comm_loss([z[:1] for z in a], [z[:1] for z in b])
