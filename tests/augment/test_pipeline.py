import pytest
import torch

from commlab.augment import (
    AUGMENTERS,
    ImageAugmenter,
    SequenceAugmenter,
    TabularAugmenter,
    TextAugmenter,
    build_augmenter,
)
from commlab.config import (
    AugmentConfig,
    IdentityAugmentConfig,
    ImageAugmentConfig,
    SequenceAugmentConfig,
    TabularAugmentConfig,
    TextAugmentConfig,
)
from commlab.data.base import Batch

KINDS = ["image", "sequence", "tabular", "text"]
# CUDA joins the parametrisation only where a GPU exists, so CPU machines report no skips.
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def batch(b: int = 6) -> Batch:
    g = gen(7)
    pad = torch.arange(9)[None] >= torch.tensor([9, 4, 1, 9, 6, 2])[:b, None]
    seq = torch.randn(b, 9, 3, generator=g).masked_fill(pad[..., None], 0.0)
    ids = torch.randint(5, 50, (b, 7), generator=g)
    return Batch(
        xs=[
            torch.randint(0, 256, (b, 3, 16, 16), dtype=torch.uint8, generator=g),
            seq,
            torch.randn(b, 5, generator=g),
            ids,
        ],
        pad=[None, pad, None, None],
        labels={"y": torch.arange(b)},
    )


def test_registry_has_one_augmenter_per_kind():
    assert AUGMENTERS.names() == sorted(KINDS)


def test_empty_config_uses_each_kinds_defaults():
    aug = build_augmenter(AugmentConfig(), KINDS)
    assert [type(a) for a in aug.augmenters] == [
        ImageAugmenter,
        SequenceAugmenter,
        TabularAugmenter,
        TextAugmenter,
    ]
    assert aug.augmenters[0].cfg == ImageAugmentConfig()
    assert aug.augmenters[3].cfg == TextAugmentConfig()


@pytest.mark.parametrize("device", DEVICES)
def test_views_have_expected_dtypes_shapes_devices_and_carry_pads_and_labels(device):
    b = batch().to(device)
    out = build_augmenter(AugmentConfig(), KINDS)(b, gen())
    assert [x.dtype for x in out.xs] == [torch.float32] * 3 + [torch.int64]
    assert [x.shape for x in out.xs] == [x.shape for x in b.xs]
    assert all(x.device == b.xs[0].device for x in out.xs)
    assert out.pad[1] is b.pad[1] and out.pad[0] is None
    assert out.labels["y"] is b.labels["y"]


def test_same_seed_gives_the_same_views_on_every_device():
    aug, b = build_augmenter(AugmentConfig(), KINDS), batch()
    ref = aug(b, gen(3))
    for device in DEVICES:
        other = aug(b.to(device), gen(3))
        for x, y in zip(ref.xs, other.xs, strict=True):
            assert torch.allclose(x, y.cpu(), atol=1e-4)


def test_seeded_views_are_reproducible_and_two_views_differ():
    aug, b = build_augmenter(AugmentConfig(), KINDS), batch()
    v1, v2 = aug(b, gen(1)), aug(b, gen(1))
    assert all(torch.equal(x, y) for x, y in zip(v1.xs, v2.xs, strict=True))
    g = gen(1)
    first, second = aug(b, g), aug(b, g)
    assert not torch.equal(first.xs[0], second.xs[0])


def test_prepare_is_deterministic_float_and_normalised():
    aug, b = build_augmenter(AugmentConfig(), KINDS), batch()
    out = aug.prepare(b)
    expected_image = ImageAugmenter().prepare(b.xs[0])
    assert torch.equal(out.xs[0], expected_image) and out.xs[0].dtype == torch.float32
    assert torch.equal(out.xs[1], b.xs[1]) and torch.equal(out.xs[3], b.xs[3])
    assert out.pad[1] is b.pad[1]


def test_per_modality_configs_are_honoured():
    cfg = AugmentConfig(
        modalities=[
            ImageAugmentConfig(
                normalize=False, crop_p=0, jitter_p=0, grayscale_p=0, blur_p=0, flip_p=1
            ),
            SequenceAugmentConfig(noise_p=0, drop_p=0),
            TabularAugmentConfig(noise_p=1, noise_std=0.5, drop_p=0),
            TextAugmentConfig(mask_p=1.0, mask_token_id=4),
        ]
    )
    b = batch()
    out = build_augmenter(cfg, KINDS)(b, gen())
    assert torch.equal(out.xs[0], b.xs[0].float().div(255).flip(-1))
    assert torch.equal(out.xs[1], b.xs[1])
    assert not torch.equal(out.xs[2], b.xs[2])
    assert (out.xs[3] == 4).all()


def test_identity_config_is_allowed_for_any_kind_and_uses_prepare():
    cfg = AugmentConfig(modalities=[IdentityAugmentConfig()] * 4)
    aug, b = build_augmenter(cfg, KINDS), batch()
    view, ref = aug(b, gen()), aug.prepare(b)
    assert all(torch.equal(x, y) for x, y in zip(view.xs, ref.xs, strict=True))
    assert view.xs[0].dtype == torch.float32


def test_kind_mismatch_names_the_key():
    cfg = AugmentConfig(modalities=[ImageAugmentConfig(), TextAugmentConfig()])
    with pytest.raises(ValueError, match=r"augment\.modalities\.1.*'text'.*'sequence'"):
        build_augmenter(cfg, ["image", "sequence"])


def test_length_mismatch_names_the_key():
    cfg = AugmentConfig(modalities=[ImageAugmentConfig()])
    with pytest.raises(ValueError, match=r"augment\.modalities has 1 entries.*2 modalities"):
        build_augmenter(cfg, ["image", "image"])


def test_unknown_kind_lists_valid_kinds():
    with pytest.raises(ValueError, match="valid: image, sequence, tabular, text"):
        build_augmenter(AugmentConfig(), ["audio"])


def test_batch_with_wrong_number_of_modalities_is_rejected():
    aug = build_augmenter(AugmentConfig(), ["tabular"])
    with pytest.raises(ValueError, match="2 modalities"):
        aug(Batch(xs=[torch.zeros(2, 3)] * 2, pad=[None, None]), gen())
