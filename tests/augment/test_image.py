import math

import pytest
import torch
from kornia.color import rgb_to_grayscale

from commlab.augment.image import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageAugmenter,
    blur_kernel_size,
    crop_and_resize,
    crop_boxes,
    normalize,
    shift_hue,
)
from commlab.config import ImageAugmentConfig

ALL_OFF = dict(crop_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, flip_p=0.0)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(b: int = 4, c: int = 3, h: int = 16, w: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (b, c, h, w), dtype=torch.uint8, generator=gen(seed))


def only(**on) -> ImageAugmenter:
    return ImageAugmenter(ImageAugmentConfig(**{**ALL_OFF, **on}))


def test_same_seed_same_views_different_seed_different_views():
    aug, x = ImageAugmenter(), images(8)
    assert torch.equal(aug(x, None, gen(3)), aug(x, None, gen(3)))
    assert not torch.allclose(aug(x, None, gen(3)), aug(x, None, gen(4)))


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.float64])
def test_output_is_float32_with_input_shape(channels, dtype):
    x = images(c=channels, h=12, w=20)
    x = x if dtype == torch.uint8 else (x.to(dtype) / 255)
    out = ImageAugmenter(ImageAugmentConfig(grayscale_p=1.0, jitter_p=1.0))(x, None, gen())
    assert out.dtype == torch.float32 and out.shape == x.shape and out.device == x.device
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("normalize_", [True, False])
def test_every_probability_zero_is_the_prepare_path(normalize_):
    aug = ImageAugmenter(ImageAugmentConfig(**ALL_OFF, normalize=normalize_))
    x = images()
    assert torch.equal(aug(x, None, gen()), aug.prepare(x))


def test_prepare_scales_uint8_and_normalises_with_imagenet_stats():
    x = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    expected = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(ImageAugmenter().prepare(x)[0, :, 0, 0], expected)
    raw = ImageAugmenter(ImageAugmentConfig(normalize=False)).prepare(x)
    assert torch.equal(raw, torch.ones(1, 3, 2, 2))


def test_single_channel_normalisation_uses_mean_statistics():
    x = torch.full((1, 1, 2, 2), sum(IMAGENET_MEAN) / 3)
    assert torch.allclose(normalize(x), torch.zeros_like(x), atol=1e-6)
    one = torch.ones(1, 1, 1, 1)
    assert torch.allclose(normalize(one), (one - sum(IMAGENET_MEAN) / 3) / (sum(IMAGENET_STD) / 3))


@pytest.mark.parametrize(
    "on",
    [
        dict(crop_p=1.0),
        dict(jitter_p=1.0),
        dict(grayscale_p=1.0),
        dict(blur_p=1.0),
        dict(flip_p=1.0),
    ],
    ids=lambda d: next(iter(d)),
)
def test_each_op_at_probability_one_changes_every_image(on):
    aug, x = only(**on), images()
    out, ref = aug(x, None, gen()), aug.prepare(x)
    assert ((out - ref).abs().amax(dim=(1, 2, 3)) > 1e-3).all()


def test_probability_is_per_sample():
    aug, x = only(flip_p=0.5), images(64)
    flipped = (aug(x, None, gen()) != aug.prepare(x)).flatten(1).any(1)
    assert 10 < int(flipped.sum()) < 54


def test_crop_boxes_respect_scale_and_aspect_ratio():
    boxes = crop_boxes(gen(), 500, 32, 32, (0.2, 0.5))
    w = boxes[:, 1, 0] - boxes[:, 0, 0] + 1
    h = boxes[:, 2, 1] - boxes[:, 1, 1] + 1
    area = w * h / (32 * 32)
    assert (boxes >= 0).all() and (boxes <= 31).all()
    # integer rounding of w and h moves the area and ratio a little off the sampled values
    assert area.min() > 0.2 * 0.85 and area.max() < 0.5 * 1.15
    assert (w / h).min() > 0.75 * 0.9 and (w / h).max() < 4 / 3 * 1.1
    assert area.max() - area.min() > 0.2  # scales are spread over the range


def test_full_scale_crop_keeps_the_whole_square_image():
    aug, x = only(crop_p=1.0, crop_scale_min=1.0, crop_scale_max=1.0), images()
    assert torch.allclose(aug(x, None, gen()), aug.prepare(x), atol=1e-5)


def test_tall_image_full_scale_crop_falls_back_to_ratio_bound():
    boxes = crop_boxes(gen(), 4, 40, 10, (1.0, 1.0))
    h = boxes[:, 2, 1] - boxes[:, 1, 1] + 1
    w = boxes[:, 1, 0] - boxes[:, 0, 0] + 1
    assert (w == 10).all() and (h == round(10 / 0.75)).all()


def test_small_crop_zooms_in():
    # 1-pixel checkerboard: neighbours differ by 1; an upsampled small crop varies slowly
    ii, jj = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    board = ((ii + jj) % 2).float().expand(8, 3, 32, 32)
    aug = only(crop_p=1.0, crop_scale_min=0.05, crop_scale_max=0.1, normalize=False)
    out = aug(board, None, gen())
    step = (out[..., 1:] - out[..., :-1]).abs().mean()
    assert (board[..., 1:] - board[..., :-1]).abs().mean() == 1
    assert step < 0.6


def test_zero_jitter_strengths_leave_images_unchanged():
    aug = only(
        jitter_p=1.0, jitter_brightness=0, jitter_contrast=0, jitter_saturation=0, jitter_hue=0
    )
    x = images()
    assert torch.equal(aug(x, None, gen()), aug.prepare(x))


@pytest.mark.parametrize("component", ["brightness", "contrast", "saturation", "hue"])
def test_each_jitter_component_alone_changes_images(component):
    strengths = dict(jitter_brightness=0, jitter_contrast=0, jitter_saturation=0, jitter_hue=0)
    strengths[f"jitter_{component}"] = 0.3
    aug, x = only(jitter_p=1.0, **strengths), images()
    assert not torch.allclose(aug(x, None, gen()), aug.prepare(x), atol=1e-3)


def test_brightness_scales_values_like_torchvision():
    off = dict(jitter_contrast=0, jitter_saturation=0, jitter_hue=0)
    aug = only(jitter_p=1.0, jitter_brightness=0.5, normalize=False, **off)
    x = torch.full((16, 3, 4, 4), 0.5)
    out = aug(x, None, gen())
    factor = out[:, 0, 0, 0] / 0.5
    assert torch.allclose(out, (0.5 * factor).view(-1, 1, 1, 1).expand_as(out))
    assert factor.min() >= 0.5 and factor.max() <= 1.5 and factor.std() > 0.05


def test_grayscale_gives_equal_channels_and_skips_single_channel():
    raw = only(grayscale_p=1.0, normalize=False)(images(), None, gen())
    assert torch.equal(raw[:, 0], raw[:, 1]) and torch.equal(raw[:, 1], raw[:, 2])
    aug, gray = only(grayscale_p=1.0), images(c=1)
    assert torch.equal(aug(gray, None, gen()), aug.prepare(gray))


def test_flip_equals_torch_flip():
    aug, x = only(flip_p=1.0), images()
    assert torch.equal(aug(x, None, gen()), torch.flip(aug.prepare(x), dims=[-1]))


def test_blur_reduces_variance_of_noise():
    noise = torch.rand(4, 3, 32, 32, generator=gen(1))
    aug = only(blur_p=1.0, blur_sigma_min=1.0, blur_sigma_max=2.0, normalize=False)
    assert aug(noise, None, gen()).var() < 0.3 * noise.var()


def test_blur_sigma_range_matters():
    noise = torch.rand(4, 3, 32, 32, generator=gen(1))
    weak = only(blur_p=1.0, blur_sigma_min=0.1, blur_sigma_max=0.2, normalize=False)
    strong = only(blur_p=1.0, blur_sigma_min=1.5, blur_sigma_max=2.0, normalize=False)
    assert strong(noise, None, gen()).var() < 0.5 * weak(noise, None, gen()).var()


@pytest.mark.parametrize(("side", "k"), [(8, 3), (32, 3), (64, 7), (128, 13), (224, 23)])
def test_blur_kernel_is_odd_and_about_a_tenth_of_the_side(side, k):
    assert (
        blur_kernel_size(side, side) == k and k % 2 == 1 and math.isclose(k, side / 10, abs_tol=3)
    )


def test_rejects_bad_shapes():
    with pytest.raises(ValueError, match="C in"):
        ImageAugmenter()(torch.zeros(2, 4, 8, 8), None, gen())


def _hue_cases() -> torch.Tensor:
    x = torch.rand(64, 3, 12, 12, generator=gen(2))
    x[:8] = x[:8, :1]  # grey pixels (C = 0)
    x[8:16, 1] = x[8:16, 0]  # red and green tied for the maximum
    x[16:24, 2] = x[16:24, 1]  # green and blue tied
    x[24:40] = (x[24:40] * 4).round() / 4  # many ties, exact 0s and 1s
    return x


@pytest.mark.parametrize("spread", [0.02, 0.1, 0.5])
def test_shift_hue_matches_kornias_hsv_round_trip(spread):
    from kornia.enhance import adjust_hue

    x = _hue_cases()
    turns = (torch.rand(64, generator=gen(3)) * 2 - 1) * spread
    expected = adjust_hue(x, turns * 2 * math.pi)  # kornia's factor is in radians
    assert torch.allclose(shift_hue(x, turns), expected, atol=1e-5)


def test_shift_hue_by_a_whole_turn_or_nothing_keeps_the_image():
    x = _hue_cases()
    assert torch.allclose(shift_hue(x, torch.zeros(64)), x, atol=1e-6)
    assert torch.allclose(shift_hue(x, torch.ones(64)), x, atol=1e-5)


def test_shift_hue_by_a_third_turn_rotates_the_primaries():
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    green = torch.tensor([0.0, 1.0, 0.0]).view(1, 3, 1, 1)
    assert torch.allclose(shift_hue(red, torch.tensor([1 / 3])), green, atol=1e-6)


@pytest.mark.parametrize(("h", "w", "scale"), [(16, 16, (0.08, 1.0)), (40, 24, (0.3, 0.9))])
def test_crop_and_resize_matches_kornias(h, w, scale):
    from kornia.geometry.transform import crop_and_resize as kornia_crop

    x = torch.rand(32, 3, h, w, generator=gen(4))
    boxes = crop_boxes(gen(5), 32, h, w, scale)
    expected = kornia_crop(x, boxes, (h, w), align_corners=True)
    assert torch.allclose(crop_and_resize(x, boxes, (h, w)), expected, atol=1e-4)


def test_crop_and_resize_of_the_whole_image_is_the_image():
    x = torch.rand(4, 3, 10, 14, generator=gen(6))
    whole = torch.tensor([[0.0, 0.0], [13.0, 0.0], [13.0, 9.0], [0.0, 9.0]]).expand(4, 4, 2)
    assert torch.allclose(crop_and_resize(x, whole, (10, 14)), x, atol=1e-6)


def test_contrast_and_saturation_blend_like_torchvision():
    """torchvision: contrast blends with the mean grey level, saturation with the grey image,
    factor * img + (1 - factor) * other, clamped."""
    x = 0.4 + 0.2 * torch.rand(16, 3, 6, 6, generator=gen(7))  # no factor in [0.2, 1.8] clamps
    for component in ("contrast", "saturation"):
        strengths = dict(jitter_brightness=0, jitter_contrast=0, jitter_saturation=0, jitter_hue=0)
        strengths[f"jitter_{component}"] = 0.8
        out = only(jitter_p=1.0, normalize=False, **strengths)(x, None, gen(8))
        grey = rgb_to_grayscale(x)
        other = grey.mean(dim=(1, 2, 3), keepdim=True) if component == "contrast" else grey
        # recover each image's factor (median over pixels), then check every pixel against it
        f = ((out - other) / (x - other)).flatten(1).median(1).values.view(-1, 1, 1, 1)
        assert torch.allclose(out, (f * x + (1 - f) * other).clamp(0, 1), atol=1e-5)
        assert f.min() >= 0.2 - 1e-4 and f.max() <= 1.8 + 1e-4 and f.std() > 0.05


def test_blur_changes_only_the_images_chosen_for_it():
    aug, x = only(blur_p=0.5, blur_sigma_min=1.0, blur_sigma_max=2.0), images(32)
    out, ref = aug(x, None, gen()), aug.prepare(x)
    untouched = (out == ref).flatten(1).all(1)
    assert 4 < int(untouched.sum()) < 28
    assert ((out - ref).abs().amax(dim=(1, 2, 3))[~untouched] > 1e-3).all()
