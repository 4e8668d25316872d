import pytest
import torch

from commlab.models.adapters import PatchAdapter, sincos_2d
from commlab.models.fusion import FusionTransformer, attention, comm_masks


def _tokens(b=4, lengths=(5, 7, 3), e=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, n, e, generator=g) for n in lengths]


def _pads(b, lengths, valid):
    """pad masks with `valid[m][i]` valid tokens for sample i of modality m (None = all valid)."""
    out = []
    for n, v in zip(lengths, valid, strict=True):
        if v is None:
            out.append(None)
        else:
            out.append(torch.arange(n).unsqueeze(0) >= torch.tensor(v).unsqueeze(1))
    return out


@pytest.mark.parametrize("pool", ["cls", "mean"])
@pytest.mark.parametrize("n_mod", [2, 3])
@pytest.mark.parametrize("n_layers", [1, 2])
def test_batched_masks_equal_sequential(pool, n_mod, n_layers):
    torch.manual_seed(0)
    lengths = (5, 7, 3)[:n_mod]
    fusion = FusionTransformer(32, n_heads=4, n_layers=n_layers, pool=pool).eval()
    tokens = _tokens(lengths=lengths)
    valid = [[5, 2, 4, 1], None, [3, 3, 1, 2]][:n_mod]
    pads = _pads(4, lengths, valid)
    masks = comm_masks(n_mod)
    batched = fusion.fuse_batched(tokens, pads, masks)
    sequential = fusion.fuse_sequential(tokens, pads, masks)
    assert len(batched) == n_mod + 1
    for a, b in zip(batched, sequential, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pool", ["cls", "mean"])
@pytest.mark.parametrize(
    ("lengths", "valid"),
    [
        ((5, 5, 5), [[5, 2, 4, 1], None, [3, 5, 1, 2]]),  # equal lengths: one group of singles
        ((5, 7, 5), [None, [7, 2, 4, 1], None]),  # two of three alike
        ((4, 4), [None, None]),  # no padding anywhere
    ],
)
def test_grouped_equals_sequential_with_gradients(pool, lengths, valid):
    torch.manual_seed(4)
    f1 = FusionTransformer(32, 4, 2, pool)
    f2 = FusionTransformer(32, 4, 2, pool)
    f2.load_state_dict(f1.state_dict())
    tokens = _tokens(lengths=lengths)
    pads = _pads(4, lengths, valid)
    masks = comm_masks(len(lengths))
    grouped = f1.fuse_grouped(tokens, pads, masks)
    sequential = f2.fuse_sequential(tokens, pads, masks)
    assert len(grouped) == len(masks)
    for a, b in zip(grouped, sequential, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    sum(o.square().sum() for o in grouped).backward()
    sum(o.square().sum() for o in sequential).backward()
    for (n, p1), p2 in zip(f1.named_parameters(), f2.parameters(), strict=True):
        torch.testing.assert_close(p1.grad, p2.grad, atol=1e-5, rtol=1e-4, msg=n)


def test_batched_gradients_equal_sequential():
    torch.manual_seed(1)
    lengths = (4, 6)
    f1 = FusionTransformer(32, 4, 1, "cls")
    f2 = FusionTransformer(32, 4, 1, "cls")
    f2.load_state_dict(f1.state_dict())
    tokens = _tokens(lengths=lengths)
    pads = _pads(4, lengths, [[4, 1, 2, 3], [6, 6, 2, 1]])
    sum(o.square().sum() for o in f1.fuse_batched(tokens, pads, comm_masks(2))).backward()
    sum(o.square().sum() for o in f2.fuse_sequential(tokens, pads, comm_masks(2))).backward()
    for (n, p1), p2 in zip(f1.named_parameters(), f2.parameters(), strict=True):
        torch.testing.assert_close(p1.grad, p2.grad, atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_padding_values_never_matter(pool):
    """Changing what sits in padded positions changes nothing, in every fusion path."""
    torch.manual_seed(2)
    fusion = FusionTransformer(32, 4, 1, pool).eval()
    lengths = (6, 4)
    tokens = _tokens(lengths=lengths)
    pads = _pads(4, lengths, [[2, 6, 3, 1], None])
    noisy = [t.clone() for t in tokens]
    noisy[0][pads[0]] = 1e3 * torch.randn_like(noisy[0][pads[0]])
    for path in ("all", "batched", "sequential", "grouped"):
        if path == "all":
            a, b = [fusion(tokens, pads)], [fusion(noisy, pads)]
        else:
            fn = getattr(fusion, f"fuse_{path}")
            a, b = fn(tokens, pads, comm_masks(2)), fn(noisy, pads, comm_masks(2))
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


def test_mean_pool_ignores_padding_and_equals_unpadded():
    """A sample fused with padding equals the same sample fused without it."""
    torch.manual_seed(3)
    fusion = FusionTransformer(32, 4, 1, "mean").eval()
    t = torch.randn(1, 6, 32)
    pad = torch.tensor([[False, False, False, True, True, True]])
    other = torch.randn(1, 2, 32)
    padded = fusion([t, other], [pad, None])
    trimmed = fusion([t[:, :3], other], [None, None])
    torch.testing.assert_close(padded, trimmed, atol=1e-5, rtol=1e-5)


def test_all_modalities_mask_equals_plain_forward():
    torch.manual_seed(4)
    fusion = FusionTransformer(32, 4, 2, "cls").eval()
    tokens = _tokens(lengths=(3, 5))
    pads = _pads(4, (3, 5), [[3, 1, 2, 3], [5, 5, 1, 4]])
    full = fusion.fuse_batched(tokens, pads, comm_masks(2))[-1]
    torch.testing.assert_close(full, fusion(tokens, pads), atol=1e-5, rtol=1e-5)


def test_bad_masks_and_config():
    fusion = FusionTransformer(32, 4, 1, "cls")
    tokens = _tokens(lengths=(2, 2))
    with pytest.raises(ValueError, match="at least one modality"):
        fusion.fuse_batched(tokens, [None, None], [[False, False]])
    with pytest.raises(ValueError, match="2 modalities"):
        fusion.fuse_batched(tokens, [None, None], [[True]])
    with pytest.raises(ValueError, match="not divisible"):
        FusionTransformer(30, 4)
    with pytest.raises(ValueError, match="pool"):
        FusionTransformer(32, 4, pool="max")


def test_clip_init_stds():
    fusion = FusionTransformer(256, 8, 2)
    blk = fusion.blocks[0]
    assert abs(blk.in_proj.weight.std().item() - 256**-0.5) < 0.1 * 256**-0.5
    assert abs(blk.c_proj.weight.std().item() - 256**-0.5 * 4**-0.5) < 0.1 * 256**-0.5 * 0.5
    assert abs(blk.c_fc.weight.std().item() - 512**-0.5) < 0.1 * 512**-0.5
    assert fusion.cls is not None and abs(fusion.cls.std().item() - 1.0) < 0.3


def test_comm_masks_order():
    assert comm_masks(2) == [[True, False], [False, True], [True, True]]
    assert comm_masks(3)[-1] == [True, True, True] and len(comm_masks(3)) == 4


def test_sincos_and_patch_adapter():
    pe = sincos_2d(4, 4, 32)
    assert pe.shape == (16, 32)
    assert not pe.requires_grad
    assert len({tuple(r.tolist()) for r in pe}) == 16  # every position distinct
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(2, 2, 30)
    ada = PatchAdapter(8, 32)
    tokens, pad = ada(torch.zeros(2, 8, 4, 4))
    assert tokens.shape == (2, 16, 32) and pad is None
    # zero input -> tokens are bias + the fixed positional embedding
    torch.testing.assert_close(tokens[0] - ada.proj.bias, pe)
    assert not any(p is ada._pos_cache for p in ada.parameters())


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_no_padding_needs_no_mask_and_equals_all_valid_pads(pool):
    torch.manual_seed(3)
    fusion = FusionTransformer(32, 4, 1, pool).eval()
    lengths = (5, 7)
    tokens = _tokens(lengths=lengths)
    no_pads = [None, None]
    all_valid = _pads(4, lengths, [[5, 5, 5, 5], [7, 7, 7, 7]])
    assert FusionTransformer._present(tokens, no_pads) is None
    torch.testing.assert_close(fusion(tokens, no_pads), fusion(tokens, all_valid))
    for path in ("fuse_batched", "fuse_sequential", "fuse_grouped"):
        a = getattr(fusion, path)(tokens, no_pads, comm_masks(2))
        b = getattr(fusion, path)(tokens, all_valid, comm_masks(2))
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


def test_cpu_attention_under_bf16_is_mixed_precision_and_matches_sdpa():
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 4, 9, 16, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    keep = torch.rand(3, 1, 9, 9) > 0.3
    keep |= torch.eye(9, dtype=torch.bool)
    keep[0, 0, 2] = False  # a query with no key left: zeros, as SDPA gives
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = attention(q, k, v, keep, 0.0)
    assert y.dtype == torch.bfloat16
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(q32, k32, v32, attn_mask=keep)
    assert torch.equal(y[0, :, 2], torch.zeros_like(y[0, :, 2]))
    torch.testing.assert_close(y.float(), ref, atol=0.03, rtol=0.02)
    g = torch.randn_like(ref)
    y.backward(g.bfloat16())
    ref.backward(g)
    for low, high in ((q, q32), (k, k32), (v, v32)):
        assert low.grad is not None and torch.isfinite(low.grad).all()
        torch.testing.assert_close(low.grad.float(), high.grad, atol=0.06, rtol=0.05)
    # fp32 and other dtypes go to SDPA as they come
    assert attention(q.double(), k.double(), v.double(), None, 0.0).dtype == torch.float64
    torch.testing.assert_close(
        attention(q32, k32, v32, keep, 0.0),
        torch.nn.functional.scaled_dot_product_attention(q32, k32, v32, attn_mask=keep),
    )


def test_cpu_bf16_attention_dropout_drops_weights_in_training():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 6, 8, dtype=torch.bfloat16) for _ in range(3))
    plain = attention(q, k, v, None, 0.0)
    dropped = attention(q, k, v, None, 0.5)
    assert not torch.equal(plain, dropped)


def test_fusion_under_bf16_autocast_stays_close_to_fp32():
    torch.manual_seed(0)
    fusion = FusionTransformer(32, n_heads=4, n_layers=2)
    tokens = [torch.randn(6, 5, 32), torch.randn(6, 3, 32)]
    masks = comm_masks(2)
    ref = fusion(tokens, [None, None], masks)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = fusion(tokens, [None, None], masks)
    for a, b in zip(ref, low, strict=True):
        assert (a - b.float()).abs().max() < 0.1


@pytest.mark.parametrize("path", ["fuse_batched", "fuse_sequential", "fuse_grouped"])
@pytest.mark.parametrize("n_layers", [1, 2])
def test_cls_only_last_block_equals_the_full_block_with_gradients(path, n_layers):
    """pool='cls': the last block computing only the CLS outputs gives the numbers (and
    gradients) of the block run on every token, as the paper's code runs it."""
    torch.manual_seed(2)
    lengths, valid = (5, 7, 3), [[5, 2, 4, 1], None, [3, 3, 1, 2]]
    short = FusionTransformer(32, 4, n_layers, "cls")
    full = FusionTransformer(32, 4, n_layers, "cls")
    full.load_state_dict(short.state_dict())
    full.cls_only_last = False
    tokens = [t.requires_grad_(True) for t in _tokens(lengths=lengths)]
    pads = _pads(4, lengths, valid)
    masks = comm_masks(3)
    outs = [getattr(f, path)(tokens, pads, masks) for f in (short, full)]
    for a, b in zip(*outs, strict=True):
        assert a.shape == (4, 32)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    grads = []
    for f, out in zip((short, full), outs, strict=True):
        loss = sum((o * torch.linspace(-1, 1, 32)).square().sum() for o in out)
        grads.append(torch.autograd.grad(loss, [*tokens, *f.parameters()]))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # the plain forward (all modalities, what the probe sees) too
    torch.testing.assert_close(short(tokens, pads), full(tokens, pads), atol=1e-5, rtol=1e-5)
