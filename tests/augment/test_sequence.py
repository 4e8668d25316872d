import pytest
import torch

from commlab.augment.sequence import (
    SequenceAugmenter,
    beta,
    crop_block,
    drop_block,
    drop_rows,
    mixup_rows,
    permute_rows,
)
from commlab.config import SequenceAugmentConfig

ALL_OFF = dict(
    noise_p=0.0, drop_p=0.0, drop_consecutive_p=0.0, crop_p=0.0, permute_p=0.0, mixup_p=0.0
)
OPS = {
    "noise": dict(noise_p=1.0),
    "drop": dict(drop_p=1.0),
    "drop_consecutive": dict(drop_consecutive_p=1.0),
    "crop": dict(crop_p=1.0, crop_min=0.1),
    "permute": dict(permute_p=1.0),
    "mixup": dict(mixup_p=1.0),
}
PAD_VALUE = 7.0  # a sentinel: padding must come out exactly as it went in


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def sequences(b: int = 8, t: int = 12, p: int = 3, seed: int = 0):
    lengths = torch.tensor([t, 1, 2, 5, t - 1, 7, 3, t])[:b]
    pad = torch.arange(t)[None] >= lengths[:, None]
    x = torch.randn(b, t, p, generator=gen(seed)) + 3.0  # valid rows are far from zero
    return x.masked_fill(pad[..., None], PAD_VALUE), pad


def only(**on) -> SequenceAugmenter:
    return SequenceAugmenter(SequenceAugmentConfig(**{**ALL_OFF, **on}))


def zeroed(out: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: valid rows that came out all zero."""
    return (out == 0).all(-1) & ~pad


def test_all_probabilities_zero_is_identity():
    x, pad = sequences()
    assert torch.equal(only()(x, pad, gen()), x)


def test_same_seed_same_output_different_seed_different_output():
    aug = only(**{k: v for on in OPS.values() for k, v in on.items()})
    x, pad = sequences()
    assert torch.equal(aug(x, pad, gen(1)), aug(x, pad, gen(1)))
    assert not torch.equal(aug(x, pad, gen(1)), aug(x, pad, gen(2)))


@pytest.mark.parametrize("op", OPS)
def test_op_changes_valid_rows_and_never_touches_padding(op):
    aug = only(**OPS[op])
    x, pad = sequences()
    changed = False
    for seed in range(5):
        out = aug(x, pad, gen(seed))
        assert out.shape == x.shape and out.dtype == torch.float32
        assert torch.equal(out[pad], x[pad])
        changed |= not torch.equal(out[~pad], x[~pad])
    assert changed


@pytest.mark.parametrize("op", OPS)
def test_op_without_pad_mask_treats_every_row_as_valid(op):
    x, _ = sequences()
    out = only(**OPS[op])(x, None, gen())
    assert out.shape == x.shape and not torch.equal(out, x)


def test_integer_input_is_converted_to_float():
    x = torch.ones(2, 3, 1, dtype=torch.int64)
    assert only().prepare(x).dtype == torch.float32


def test_noise_has_the_configured_std_on_valid_rows():
    x, pad = sequences(t=12, p=64)
    out = only(noise_p=1.0, noise_std=0.5)(x, pad, gen())
    assert abs(float((out - x)[~pad].std()) - 0.5) < 0.03


def test_drop_fraction_is_bounded_by_drop_max():
    x, pad = sequences(t=20)
    n_valid = (~pad).sum(1)
    total = 0
    for seed in range(20):
        n_zero = zeroed(drop_rows(x, pad, gen(seed), 0.3, 1.0), pad).sum(1)
        assert (n_zero <= (0.3 * n_valid).floor()).all()
        total += int(n_zero.sum())
    assert total > 0


def test_consecutive_drop_zeroes_one_contiguous_block():
    x, pad = sequences(t=20)
    n_valid = (~pad).sum(1)
    seen = 0
    for seed in range(20):
        z = zeroed(drop_block(x, pad, gen(seed), 0.5, 1.0), pad)
        assert (z.sum(1) <= (0.5 * n_valid).floor()).all()
        for row in z:
            idx = row.nonzero().flatten()
            if len(idx):
                assert idx[-1] - idx[0] + 1 == len(idx)
                seen += 1
    assert seen > 0


def test_crop_keeps_one_contiguous_block_of_at_least_crop_min():
    x, pad = sequences(t=20)
    n_valid = (~pad).sum(1)
    for seed in range(20):
        kept = ~zeroed(crop_block(x, pad, gen(seed), 0.4, 1.0), pad) & ~pad
        assert (kept.sum(1) >= (0.4 * n_valid).floor().clamp(min=1)).all()
        for row in kept:
            idx = row.nonzero().flatten()
            assert idx[-1] - idx[0] + 1 == len(idx)


def test_crop_min_one_keeps_everything():
    x, pad = sequences()
    assert torch.equal(crop_block(x, pad, gen(), 1.0, 1.0), x)


def test_permute_keeps_each_samples_multiset_of_valid_rows():
    x, pad = sequences()
    moved = False
    for seed in range(3):
        out = permute_rows(x, pad, gen(seed), 1.0)
        for b in range(x.shape[0]):
            before = x[b][~pad[b]]
            after = out[b][~pad[b]]
            assert torch.equal(before[before[:, 0].argsort()], after[after[:, 0].argsort()])
            moved |= not torch.equal(before, after)
    assert moved


def test_permute_handles_padding_that_is_not_at_the_end():
    x, _ = sequences(b=2, t=6)
    pad = torch.tensor([[True, False, True, False, False, True]] * 2)
    out = permute_rows(x, pad, gen(), 1.0)
    assert torch.equal(out[pad], x[pad])
    assert torch.equal(out[~pad].sort(0).values, x[~pad].sort(0).values)


def test_mixup_preserves_row_sums_of_each_sample():
    # sum_t (lam x_t + (1 - lam) x_perm(t)) = sum_t x_t for any lam and permutation
    x, pad = sequences()
    out = mixup_rows(x, pad, gen(), 1.0, 1.0)
    valid = (~pad)[..., None]
    assert torch.allclose((out * valid).sum(1), (x * valid).sum(1), atol=1e-4)
    assert not torch.allclose(out, x)


def test_beta_draws_follow_alpha():
    uniform = beta(gen(), 1.0, 4000)
    assert abs(float(uniform.mean()) - 0.5) < 0.03 and abs(float(uniform.var()) - 1 / 12) < 0.01
    extreme = beta(gen(), 0.05, 4000)
    assert float(((extreme < 0.05) | (extreme > 0.95)).float().mean()) > 0.7
    assert torch.equal(beta(gen(5), 1.0, 10), beta(gen(5), 1.0, 10))


def test_rejects_mismatched_pad_mask():
    x, pad = sequences()
    with pytest.raises(ValueError, match="pad mask"):
        only(noise_p=1.0)(x, pad[:, :-1], gen())
