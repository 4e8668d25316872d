"""siglip_loss / SigmoidScaleBias: naive double-loop reference (values and gradients), loss falls,
shapes x scales x biases, gathering across two gloo workers, errors.

SigLIP contrasts exactly two modalities, so there is no n_modalities axis here.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from commlab.objectives import SigmoidScaleBias, siglip_loss
from tests.gloo import run_on_workers
from tests.objectives.reference import dot, normalise


def naive_siglip(
    x: torch.Tensor, y: torch.Tensor, log_t: torch.Tensor, b: torch.Tensor
) -> torch.Tensor:
    """-1/N Σ_i Σ_j log σ(z_ij (t x̂_i·ŷ_j + b)), one pair at a time; torch scalars, so autograd
    gives the reference gradients."""
    n = x.shape[0]
    total = torch.zeros((), dtype=x.dtype)
    for i in range(n):
        xi = x[i] / x[i].norm()
        for j in range(n):
            yj = y[j] / y[j].norm()
            z = 1.0 if i == j else -1.0
            logit = log_t.exp() * (xi * yj).sum() + b
            total = total - torch.log(torch.sigmoid(z * logit))
    return total / n


def naive_acc(x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 retrieval (%) x->y and y->x; t > 0 and b shift no ranking."""
    qx = [normalise(r) for r in x.tolist()]
    qy = [normalise(r) for r in y.tolist()]
    n, hits = len(qx), 0
    for queries, keys in ((qx, qy), (qy, qx)):
        for i in range(n):
            hits += max(range(n), key=lambda j, i=i: dot(queries[i], keys[j])) == i
    return 100.0 * hits / (2 * n)


def _pair(b: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g, dtype=torch.float64)
    return x, x + 0.8 * torch.randn(b, d, generator=g, dtype=torch.float64)


def _leaf(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float64, requires_grad=True)


@pytest.mark.parametrize(("b", "d"), [(1, 3), (2, 3), (7, 8), (16, 32)])
@pytest.mark.parametrize("log_t", [0.0, math.log(10.0), 3.0])
@pytest.mark.parametrize("bias", [-10.0, 0.0, 2.5])
def test_matches_naive_reference_values_and_gradients(
    b: int, d: int, log_t: float, bias: float
) -> None:
    x, y = _pair(b, d, seed=b + d)
    inputs = [x.clone().requires_grad_(), y.clone().requires_grad_(), _leaf(log_t), _leaf(bias)]
    out = siglip_loss(*inputs)
    out.loss.backward()
    grads = [t.grad for t in inputs]

    ref_inputs = [x.clone().requires_grad_(), y.clone().requires_grad_(), _leaf(log_t), _leaf(bias)]
    ref = naive_siglip(*ref_inputs)
    ref.backward()

    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-9, abs=1e-9)
    assert out.terms["siglip_loss"].item() == pytest.approx(ref.item(), rel=1e-9, abs=1e-9)
    assert out.acc["ssl_acc"].item() == pytest.approx(naive_acc(x, y), abs=1e-4)
    assert set(out.terms) == {"siglip_loss"} and set(out.acc) == {"ssl_acc"}
    for got, ref_input in zip(grads, ref_inputs, strict=True):
        torch.testing.assert_close(got, ref_input.grad, rtol=1e-9, atol=1e-12)


def test_scale_bias_module_starts_as_the_paper_and_learns() -> None:
    module = SigmoidScaleBias()
    scale, bias = module()
    assert scale.item() == pytest.approx(math.log(10.0)) and bias.item() == -10.0
    assert [n for n, _ in module.named_parameters()] == ["logit_scale", "logit_bias"]
    x, y = _pair(4, 3, seed=0)
    siglip_loss(x.float(), y.float(), *module()).loss.backward()
    assert module.logit_scale.grad.item() != 0.0 and module.logit_bias.grad.item() != 0.0


def test_gather_is_identity_without_process_group() -> None:
    x, y = _pair(5, 4, seed=1)
    s, b = _leaf(1.0), _leaf(-2.0)
    assert torch.equal(siglip_loss(x, y, s, b, gather=True).loss, siglip_loss(x, y, s, b).loss)


def test_loss_falls_with_linear_encoders() -> None:
    torch.manual_seed(0)
    latent = torch.randn(64, 6)
    x1 = latent @ torch.randn(6, 10) + 0.3 * torch.randn(64, 10)
    x2 = latent @ torch.randn(6, 12) + 0.3 * torch.randn(64, 12)
    enc1, enc2, scale_bias = torch.nn.Linear(10, 8), torch.nn.Linear(12, 8), SigmoidScaleBias()
    params = [*enc1.parameters(), *enc2.parameters(), *scale_bias.parameters()]
    opt = torch.optim.Adam(params, lr=0.03)
    losses, accs = [], []
    for _ in range(40):
        out = siglip_loss(enc1(x1), enc2(x2), *scale_bias())
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
        accs.append(out.acc["ssl_acc"].item())
    assert losses[-1] < 0.5 * losses[0]
    assert accs[-1] > accs[0]


WORLD, B, D = 2, 3, 5


def _global_pair() -> tuple[torch.Tensor, torch.Tensor]:
    return _pair(WORLD * B, D, seed=7)


def _gathered_step(rank: int) -> dict:
    """One rank's loss and gradients with negatives gathered from the other rank."""
    x, y = (t[rank * B : (rank + 1) * B].clone().requires_grad_() for t in _global_pair())
    scale, bias = _leaf(math.log(10.0)), _leaf(-10.0)
    out = siglip_loss(x, y, scale, bias, gather=True)
    out.loss.backward()
    res = {"loss": out.loss.detach(), "acc": out.acc["ssl_acc"], "grads": [x.grad, y.grad]}
    res["scale_bias_grads"] = [scale.grad, bias.grad]
    return res


def test_gathered_loss_and_gradients_match_one_process(tmp_path: Path) -> None:
    """Two gloo workers, each with its B rows and the other's as negatives, compute the loss of
    the global batch; DDP averages gradients, so each carries WORLD x its rows' gradient."""
    results = run_on_workers(_gathered_step, tmp_path, WORLD, timeout_s=60)

    x, y = (t.clone().requires_grad_() for t in _global_pair())
    scale, bias = _leaf(math.log(10.0)), _leaf(-10.0)
    ref = siglip_loss(x, y, scale, bias)
    ref.loss.backward()
    for rank, res in enumerate(results):
        torch.testing.assert_close(res["loss"], ref.loss.detach())
        torch.testing.assert_close(res["acc"], ref.acc["ssl_acc"])
        rows = slice(rank * B, (rank + 1) * B)
        torch.testing.assert_close(res["grads"][0], WORLD * x.grad[rows])
        torch.testing.assert_close(res["grads"][1], WORLD * y.grad[rows])
        # the scale and bias see the whole global loss on every rank, not a share of it
        torch.testing.assert_close(res["scale_bias_grads"], [scale.grad, bias.grad])


def test_errors() -> None:
    x, y = _pair(4, 3, seed=0)
    s, b = _leaf(0.0), _leaf(0.0)
    with pytest.raises(ValueError, match="share one shape"):
        siglip_loss(x, y[:, :2], s, b)
    with pytest.raises(ValueError, match="2-D"):
        siglip_loss(x[0], y[0], s, b)
    with pytest.raises(ValueError, match="logit_scale must be a scalar"):
        siglip_loss(x, y, torch.zeros(2), b)
    with pytest.raises(ValueError, match="logit_bias must be a scalar"):
        siglip_loss(x, y, s, torch.zeros(2))
    with pytest.raises(ValueError, match="scale_init must be > 0"):
        SigmoidScaleBias(scale_init=0.0)
