import pytest
import torch
import torch.nn.functional as F
from torch import nn

from commlab.models.dropout import EncoderLayer, dropout, keep_mask, relu_dropout


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_mask_keeps_one_minus_p(p):
    torch.manual_seed(0)
    n = 400_000
    keep = keep_mask((n,), p, torch.device("cpu"))
    assert keep.dtype == torch.bool and keep.shape == (n,)
    se = (p * (1 - p) / n) ** 0.5
    assert abs(keep.float().mean().item() - (1 - p)) < 5 * se + 2**-15


def test_keep_mask_is_independent_across_the_four_lanes_of_a_draw():
    # the four elements fed by one 64-bit draw each keep with probability 1 - p
    torch.manual_seed(1)
    keep = keep_mask((200_000, 4), 0.5, torch.device("cpu")).float()
    lane_means = keep.mean(0)
    assert torch.all((lane_means - 0.5).abs() < 0.01), lane_means
    both = (keep[:, 0] * keep[:, 3]).mean().item()  # independent: 0.25
    assert abs(both - 0.25) < 0.01


def test_keep_mask_follows_the_torch_seed():
    torch.manual_seed(3)
    a = keep_mask((1000,), 0.3, torch.device("cpu"))
    torch.manual_seed(3)
    b = keep_mask((1000,), 0.3, torch.device("cpu"))
    c = keep_mask((1000,), 0.3, torch.device("cpu"))
    assert torch.equal(a, b) and not torch.equal(b, c)


def test_dropout_zeroes_or_scales_and_its_gradient_is_the_mask():
    torch.manual_seed(0)
    x = torch.randn(64, 300, requires_grad=True)
    y = dropout(x, 0.25)
    kept = y != 0
    assert torch.allclose(y[kept], x[kept] / 0.75)
    assert 0.7 < kept.float().mean().item() < 0.8
    (y * 2).sum().backward()
    assert torch.allclose(x.grad, kept.float() * 2 / 0.75)


def test_dropout_edge_cases():
    x = torch.randn(10, 10)
    assert dropout(x, 0.3, training=False) is x
    assert dropout(x, 0.0) is x
    assert torch.count_nonzero(dropout(x, 1.0)) == 0
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        dropout(x, 1.5)


def test_relu_dropout_is_dropout_of_relu():
    torch.manual_seed(0)
    x = torch.randn(32, 500, requires_grad=True)
    y = relu_dropout(x, 0.2)
    kept = y != 0
    assert torch.all(x[kept] > 0)
    assert torch.allclose(y[kept], x[kept] / 0.8)
    positive = x > 0
    frac = (kept & positive).sum() / positive.sum()
    assert 0.77 < frac.item() < 0.83
    y.sum().backward()
    assert torch.allclose(x.grad, kept.float() / 0.8)
    # without dropout it is exactly relu
    assert torch.equal(relu_dropout(x, 0.3, training=False), F.relu(x))


def test_relu_dropout_in_bf16():
    torch.manual_seed(0)
    x = torch.randn(8, 64, dtype=torch.bfloat16, requires_grad=True)
    y = relu_dropout(x, 0.5)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert torch.equal(x.grad != 0, y != 0)


def _pair(dropout_p: float) -> tuple[nn.TransformerEncoderLayer, EncoderLayer]:
    torch.manual_seed(0)
    kw = {"batch_first": True, "norm_first": True}
    ref = nn.TransformerEncoderLayer(16, 4, 64, dropout_p, **kw)
    ours = EncoderLayer(16, 4, 64, dropout_p, **kw)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


@pytest.mark.parametrize("padded", [False, True])
def test_encoder_layer_without_dropout_matches_torchs_layer(padded):
    ref, ours = _pair(0.0)
    assert list(ref.state_dict()) == list(ours.state_dict())
    x = torch.randn(5, 7, 16)
    pad = torch.zeros(5, 7, dtype=torch.bool)
    if padded:
        pad[1, 4:] = True
        pad[3, 1:] = True
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    outs = [m(xi, src_key_padding_mask=pad) for m, xi in zip((ref, ours), xs, strict=True)]
    keep = ~pad[..., None]  # padded positions' outputs are discarded by the encoder
    assert torch.allclose(outs[0] * keep, outs[1] * keep, atol=1e-5)
    for o in outs:
        (o * keep).square().sum().backward()
    assert torch.allclose(xs[0].grad, xs[1].grad, atol=1e-4)
    for (name, a), b in zip(ref.named_parameters(), ours.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-4), name
    ref.eval(), ours.eval()
    with torch.no_grad():
        assert torch.allclose(ref(x) * keep, ours(x) * keep, atol=1e-5)


def test_encoder_layer_dropout_draws_from_the_torch_seed():
    _, ours = _pair(0.3)
    x = torch.randn(4, 6, 16)
    torch.manual_seed(5)
    a = ours(x)
    torch.manual_seed(5)
    b = ours(x)
    c = ours(x)
    assert torch.equal(a, b) and not torch.equal(b, c)
    ours.eval()
    assert torch.equal(ours(x), ours(x))


def test_encoder_layer_under_bf16_autocast():
    _, ours = _pair(0.1)
    x = torch.randn(4, 6, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ours(x)
    y.float().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("p", [-0.1, 1.0])
def test_keep_mask_refuses_p_outside_zero_one(p):
    with pytest.raises(ValueError, match=r"p in \[0, 1\)"):
        keep_mask((4,), p, torch.device("cpu"))


def test_large_masks_drawn_in_parallel_follow_the_seed_and_keep_one_minus_p():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # large draws split over the intra-op thread count
    try:
        shape = (1024, 2048)  # 2^21 elements: 2^19 words, above the parallel threshold
        torch.manual_seed(11)
        a = keep_mask(shape, 0.1, torch.device("cpu"))
        torch.manual_seed(11)
        b = keep_mask(shape, 0.1, torch.device("cpu"))
        c = keep_mask(shape, 0.1, torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(a, b) and not torch.equal(b, c)
    halves = a.view(2, -1).float().mean(1)  # each generator's part keeps 0.9
    assert torch.all((halves - 0.9).abs() < 0.002), halves
    # the parts are not copies of each other
    assert not torch.equal(a[:512], a[512:])
