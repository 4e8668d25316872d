import pytest
import torch

from commlab.augment.tabular import TabularAugmenter
from commlab.augment.text import TextAugmenter
from commlab.config import TabularAugmentConfig, TextAugmentConfig


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def features(b: int = 16, n: int = 10) -> torch.Tensor:
    return torch.randn(b, n, generator=gen(9)) + 3.0  # no feature is zero before dropping


def tabular(**cfg) -> TabularAugmenter:
    return TabularAugmenter(TabularAugmentConfig(**{"noise_p": 0.0, "drop_p": 0.0, **cfg}))


def test_tabular_probability_zero_is_identity_and_converts_to_float():
    x = features()
    assert torch.equal(tabular()(x, None, gen()), x)
    assert tabular().prepare(x.double()).dtype == torch.float32


@pytest.mark.parametrize("on", [dict(noise_p=1.0), dict(drop_p=1.0)], ids=["noise", "drop"])
def test_tabular_op_at_probability_one_changes_input(on):
    x = features()
    assert not torch.equal(tabular(**on)(x, None, gen()), x)


def test_tabular_seeded():
    aug, x = TabularAugmenter(), features()
    assert torch.equal(aug(x, None, gen(1)), aug(x, None, gen(1)))
    assert not torch.equal(aug(x, None, gen(1)), aug(x, None, gen(2)))


def test_tabular_noise_std():
    x = features(64, 64)
    out = tabular(noise_p=1.0, noise_std=0.2)(x, None, gen())
    assert abs(float((out - x).std()) - 0.2) < 0.01


def test_tabular_drop_zeroes_at_most_drop_max_of_the_features():
    x = features(64, 10)
    out = tabular(drop_p=1.0, drop_max=0.3)(x, None, gen())
    n_zero = (out == 0).sum(1)
    assert n_zero.max() <= 3 and n_zero.sum() > 0
    kept = out != 0
    assert torch.equal(out[kept], x[kept])


def test_tabular_rejects_non_2d():
    with pytest.raises(ValueError, match=r"\(B, n\)"):
        TabularAugmenter()(torch.zeros(2, 3, 4), None, gen())


def tokens(b: int = 8, length: int = 20):
    ids = torch.randint(5, 100, (b, length), generator=gen(3))
    lengths = torch.tensor([20, 1, 5, 12, 20, 3, 8, 16])[:b]
    pad = torch.arange(length)[None] >= lengths[:, None]
    ids = ids.masked_fill(pad, 0)
    ids[0, 4] = 0  # a pad id inside the valid part is still never masked
    return ids, pad


def text(**cfg) -> TextAugmenter:
    return TextAugmenter(TextAugmentConfig(**cfg))


def test_mask_p_one_masks_every_non_pad_token_and_no_pad():
    ids, pad = tokens()
    out = text(mask_p=1.0, mask_token_id=3)(ids, pad, gen())
    is_pad = pad | (ids == 0)
    assert (out[~is_pad] == 3).all()
    assert torch.equal(out[is_pad], ids[is_pad])
    assert out.dtype == torch.int64 and out.shape == ids.shape


def test_pad_mask_protects_tokens_that_are_not_the_pad_id():
    ids = torch.full((2, 6), 42)
    pad = torch.tensor([[False, False, True, True, True, True]] * 2)
    out = text(mask_p=1.0, mask_token_id=1)(ids, pad, gen())
    assert (out[~pad] == 1).all() and (out[pad] == 42).all()


def test_custom_pad_token_id_is_never_masked_without_a_pad_mask():
    ids = torch.tensor([[7, 9, 9, 9]])
    out = text(mask_p=1.0, pad_token_id=9, mask_token_id=2)(ids, None, gen())
    assert out.tolist() == [[2, 9, 9, 9]]


def test_mask_rate_matches_mask_p_and_zero_is_identity():
    ids = torch.randint(5, 100, (64, 64), generator=gen())
    out = text(mask_p=0.3)(ids, None, gen())
    assert abs(float((out == 1).float().mean()) - 0.3) < 0.03
    assert torch.equal(text(mask_p=0.0)(ids, None, gen()), ids)


def test_text_seeded():
    ids, pad = tokens()
    aug = text(mask_p=0.5)
    assert torch.equal(aug(ids, pad, gen(1)), aug(ids, pad, gen(1)))
    assert not torch.equal(aug(ids, pad, gen(1)), aug(ids, pad, gen(2)))


def test_text_rejects_float_input():
    with pytest.raises(ValueError, match="token ids"):
        TextAugmenter()(torch.zeros(2, 3), None, gen())
