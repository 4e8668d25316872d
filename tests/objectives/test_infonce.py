"""nt_xent: naive-loop reference, loss falls on a toy problem, parametrised shapes, errors."""

import math

import pytest
import torch
import torch.nn.functional as F

from commlab.objectives import nt_xent


def _dot(x: list[float], y: list[float]) -> float:
    return sum(a * b for a, b in zip(x, y, strict=True))


def naive_nt_xent(u: torch.Tensor, v: torch.Tensor, t: float) -> tuple[float, float]:
    """The 2N x 2N block layout of SimCLR's NT-Xent, one anchor (row) at a time."""
    us, vs = u.tolist(), v.tolist()
    n = len(us)
    total = 0.0
    for row in range(2 * n):
        logits: dict[int, float] = {}
        for col in range(2 * n):
            if row < n:  # [S_uv | S_uu]
                i = row
                if col < n:
                    logits[col] = _dot(us[i], vs[col]) / t
                elif col - n != i:
                    logits[col] = _dot(us[i], us[col - n]) / t
            else:  # [S_vv | S_uv^T]
                i = row - n
                if col < n:
                    if col != i:
                        logits[col] = _dot(vs[i], vs[col]) / t
                else:
                    logits[col] = _dot(vs[i], us[col - n]) / t
        denom = sum(math.exp(x) for x in logits.values())
        total += -(logits[row] - math.log(denom))
    hits = 0
    for i in range(n):
        best_v = max(range(n), key=lambda j, i=i: _dot(us[i], vs[j]))
        best_u = max(range(n), key=lambda j, i=i: _dot(vs[i], us[j]))
        hits += (best_v == i) + (best_u == i)
    return total / (2 * n), 100.0 * hits / (2 * n)


def _unit(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)


@pytest.mark.parametrize("n", [2, 5, 16])
@pytest.mark.parametrize("d", [3, 32])
@pytest.mark.parametrize("temperature", [0.05, 0.1, 1.0])
def test_matches_naive_reference(n: int, d: int, temperature: float) -> None:
    u = _unit(n, d, 0)
    # correlated positives so the accuracy is neither always 0 nor always 100
    v = F.normalize(u + 0.8 * _unit(n, d, 1), dim=1)
    loss, acc = nt_xent(u, v, temperature)
    ref_loss, ref_acc = naive_nt_xent(u, v, temperature)
    assert loss.item() == pytest.approx(ref_loss, abs=1e-5)
    assert acc.item() == pytest.approx(ref_acc, abs=1e-4)
    assert loss.ndim == 0 and acc.ndim == 0 and not acc.requires_grad


def test_float32_matches_reference() -> None:
    u, v = _unit(12, 16, 2), _unit(12, 16, 3)
    loss, _ = nt_xent(u.float(), v.float(), 0.1)
    assert loss.item() == pytest.approx(naive_nt_xent(u, v, 0.1)[0], abs=1e-5)


def test_symmetric_in_u_v() -> None:
    u, v = _unit(8, 6, 4), _unit(8, 6, 5)
    assert torch.allclose(nt_xent(u, v, 0.2)[0], nt_xent(v, u, 0.2)[0], atol=1e-12)
    assert torch.allclose(nt_xent(u, v, 0.2)[1], nt_xent(v, u, 0.2)[1])


def test_perfect_pairs_give_full_accuracy_and_finite_grads() -> None:
    u = torch.eye(4, dtype=torch.float64).requires_grad_()
    loss, acc = nt_xent(u, u.detach().clone(), 0.1)
    loss.backward()
    assert acc.item() == 100.0
    assert torch.isfinite(u.grad).all()


def test_loss_falls_with_a_linear_encoder() -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 10)
    view_1, view_2 = x + 0.3 * torch.randn_like(x), x + 0.3 * torch.randn_like(x)
    enc = torch.nn.Linear(10, 8)
    opt = torch.optim.Adam(enc.parameters(), lr=0.05)

    def step() -> float:
        loss, _ = nt_xent(F.normalize(enc(view_1), dim=1), F.normalize(enc(view_2), dim=1), 0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    first = step()
    for _ in range(29):
        last = step()
    assert last < 0.7 * first


@pytest.mark.parametrize(
    ("u", "v", "temperature", "match"),
    [
        (torch.randn(4, 3), torch.randn(4, 3), 0.0, "temperature"),
        (torch.randn(4, 3), torch.randn(4, 3), -0.1, "temperature"),
        (torch.randn(4, 3), torch.randn(5, 3), 0.1, "one shape"),
        (torch.randn(4, 3), torch.randn(4, 2), 0.1, "one shape"),
        (torch.randn(4), torch.randn(4), 0.1, "2-D"),
        (torch.randn(1, 3), torch.randn(1, 3), 0.1, "at least 2"),
    ],
)
def test_errors(u: torch.Tensor, v: torch.Tensor, temperature: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        nt_xent(u, v, temperature)
