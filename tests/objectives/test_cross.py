"""clip_loss / LogitScale: naive-loop reference, loss falls, shapes x scales, errors.

CLIP contrasts exactly two modalities, so there is no n_modalities axis here.
"""

import math

import pytest
import torch

from commlab.objectives import LogitScale, clip_loss
from tests.objectives.reference import dot, normalise


def naive_clip(z1: torch.Tensor, z2: torch.Tensor, log_scale: float) -> tuple[float, float]:
    """Symmetric cross entropy, one query at a time, scale exp(log_scale) capped at 100."""
    q1 = [normalise(r) for r in z1.tolist()]
    q2 = [normalise(r) for r in z2.tolist()]
    s = min(math.exp(log_scale), 100.0)
    n = len(q1)
    total, hits = 0.0, 0
    for queries, keys in ((q1, q2), (q2, q1)):
        for i in range(n):
            logits = [s * dot(queries[i], keys[j]) for j in range(n)]
            total += -(logits[i] - math.log(sum(math.exp(x) for x in logits)))
            hits += max(range(n), key=lambda j, logits=logits: logits[j]) == i
    return total / (2 * n), 100.0 * hits / (2 * n)


def _pair(b: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(b, d, generator=g, dtype=torch.float64)
    return z1, z1 + 0.8 * torch.randn(b, d, generator=g, dtype=torch.float64)


@pytest.mark.parametrize(("b", "d"), [(2, 3), (7, 8), (16, 32)])
@pytest.mark.parametrize("log_scale", [0.0, math.log(1 / 0.07), 5.0])
def test_matches_naive_reference(b: int, d: int, log_scale: float) -> None:
    z1, z2 = _pair(b, d, seed=b)
    out = clip_loss(z1, z2, torch.tensor(log_scale, dtype=torch.float64))
    ref_loss, ref_acc = naive_clip(z1, z2, log_scale)
    assert out.loss.item() == pytest.approx(ref_loss, abs=1e-5)
    assert out.acc["ssl_acc"].item() == pytest.approx(ref_acc, abs=1e-4)
    assert out.terms["clip_loss"].item() == pytest.approx(ref_loss, abs=1e-5)
    assert set(out.terms) == {"clip_loss"} and set(out.acc) == {"ssl_acc"}


def test_logit_scale_module_and_clamp() -> None:
    scale = LogitScale()
    assert scale().item() == pytest.approx(math.log(1 / 0.07))
    assert [n for n, _ in scale.named_parameters()] == ["logit_scale"]
    z1, z2 = _pair(4, 3, seed=0)
    clip_loss(z1, z2, scale()).loss.backward()
    assert scale.logit_scale.grad is not None and scale.logit_scale.grad.item() != 0.0
    # above log(100) the clamp holds the scale and blocks its gradient
    big = LogitScale(init=1000.0)
    out = clip_loss(z1, z2, big())
    out.loss.backward()
    assert big.logit_scale.grad.item() == 0.0
    assert out.loss.item() == pytest.approx(naive_clip(z1, z2, math.log(100.0))[0], abs=1e-5)


def test_gather_is_identity_without_process_group() -> None:
    z1, z2 = _pair(5, 4, seed=1)
    s = torch.tensor(2.0)
    assert torch.equal(clip_loss(z1, z2, s, gather=True).loss, clip_loss(z1, z2, s).loss)


def test_loss_falls_with_linear_encoders() -> None:
    torch.manual_seed(0)
    latent = torch.randn(64, 6)
    x1, x2 = latent @ torch.randn(6, 10), latent @ torch.randn(6, 12)
    enc1, enc2, scale = torch.nn.Linear(10, 8), torch.nn.Linear(12, 8), LogitScale()
    params = [*enc1.parameters(), *enc2.parameters(), *scale.parameters()]
    opt = torch.optim.Adam(params, lr=0.03)
    losses = []
    for _ in range(30):
        loss = clip_loss(enc1(x1), enc2(x2), scale()).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_errors() -> None:
    z1, z2 = _pair(4, 3, seed=0)
    s = torch.tensor(1.0)
    with pytest.raises(ValueError, match="one shape"):
        clip_loss(z1, z2[:3], s)
    with pytest.raises(ValueError, match="2-D"):
        clip_loss(z1[0], z2[0], s)
    with pytest.raises(ValueError, match="scalar"):
        clip_loss(z1, z2, torch.ones(2))
    with pytest.raises(ValueError, match="at least 2"):
        clip_loss(z1[:1], z2[:1], s)
    with pytest.raises(ValueError, match="> 0"):
        LogitScale(init=0.0)
