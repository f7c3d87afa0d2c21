"""Resizing, canvas fitting and augmentation applied consistently to image, mask, φ and valid."""

from __future__ import annotations

import numpy as np
import pytest

from nodeseg.config import from_mapping
from nodeseg.data.transforms import AugmentConfig, augment, fit_canvas, resize_image, resize_mask
from nodeseg.errors import ConfigError
from nodeseg.levelset import signed_distance


def _sample(h: int = 40, w: int = 48) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    mask = np.zeros((h, w), np.uint8)
    mask[8:30, 5:20] = 1  # off-centre so a flip is visible
    image = rng.random((1, h, w), dtype=np.float32) + mask
    valid = np.ones((h, w), np.uint8)
    valid[:, -6:] = 0  # padded strip on the right
    mask &= valid
    image[:, valid == 0] = 0
    return image, mask, signed_distance(mask), valid


def test_resize_image_is_antialiased_and_keeps_constants() -> None:
    flat = np.full((2, 50, 60), 0.25, np.float32)
    out = resize_image(flat, (20, 24))
    assert out.shape == (2, 20, 24) and out.dtype == np.float32
    np.testing.assert_allclose(out, 0.25, atol=1e-6)
    stripes = np.zeros((100, 100), np.float32)
    stripes[:, ::2] = 1.0  # one-pixel stripes average to ½ when shrunk (no aliasing)
    np.testing.assert_allclose(resize_image(stripes, (25, 25))[2:-2, 2:-2], 0.5, atol=0.02)
    assert resize_image(stripes, (100, 100)) is not stripes
    with pytest.raises(ValueError, match="size"):
        resize_image(flat, (0, 3))


def test_resize_mask_majority_vote() -> None:
    m = np.zeros((100, 100), np.uint8)
    m[20:60, 30:90] = 1
    small = resize_mask(m, (50, 50))
    assert small.dtype == np.uint8 and set(np.unique(small)) == {0, 1}
    assert small.sum() == 20 * 30
    assert resize_mask(m, (200, 200)).sum() == pytest.approx(4 * m.sum(), rel=0.02)


def test_fit_canvas_pads_with_valid_mask() -> None:
    img = np.ones((3, 30, 20), np.float32)
    mask = np.ones((30, 20), np.uint8)
    out, m, valid, scale = fit_canvas(img, mask, (64, 64))
    assert out.shape == (3, 64, 64) and scale == 1.0
    assert valid[:30, :20].all() and valid.sum() == 600 and m.sum() == 600
    assert out[:, valid == 0].max() == 0


def test_fit_canvas_shrinks_or_crops_large_images() -> None:
    img = np.ones((3, 100, 50), np.float32)
    mask = np.ones((100, 50), np.uint8)
    out, m, valid, scale = fit_canvas(img, mask, (64, 64), "shrink")
    assert scale == pytest.approx(0.64) and valid[:64, :32].all() and valid.sum() == 64 * 32
    out, m, valid, scale = fit_canvas(img, mask, (64, 64), "crop")
    assert scale == 1.0 and valid.sum() == 64 * 50


def test_augment_config_validation() -> None:
    with pytest.raises(ValueError, match=r"flip_prob must be in \[0, 1\], got 2.0"):
        AugmentConfig(flip_prob=2.0)
    with pytest.raises(ValueError, match="scale_range"):
        AugmentConfig(scale_range=(1.2, 0.8))
    with pytest.raises(ValueError, match="brightness_range"):
        AugmentConfig(brightness_range=(-3.0, 0.0))
    cfg = from_mapping(AugmentConfig, {"scale_range": [0.8, 1.25], "flip_prob": 0})
    assert cfg.scale_range == (0.8, 1.25) and cfg.flip_prob == 0.0
    with pytest.raises(ConfigError, match="unknown key 'rotate'"):
        from_mapping(AugmentConfig, {"rotate": 10})


def test_flip_flips_all_four() -> None:
    image, mask, phi, valid = _sample()
    cfg = AugmentConfig(scale_range=(1.0, 1.0), flip_prob=1.0, brightness_range=(0.0, 0.0))
    a_img, a_mask, a_phi, a_valid = augment(image, mask, phi, valid, cfg, np.random.default_rng(0))
    assert np.array_equal(a_img, image[..., ::-1])
    assert np.array_equal(a_mask, mask[:, ::-1])
    assert np.array_equal(a_phi, phi[:, ::-1])
    assert np.array_equal(a_valid, valid[:, ::-1])
    # the flipped φ is exactly the distance map of the flipped mask
    assert np.array_equal(a_phi, signed_distance(a_mask))


@pytest.mark.parametrize("scale", [0.8, 1.2])
def test_rescale_keeps_mask_equal_to_phi_negative(scale: float) -> None:
    image, mask, phi, valid = _sample()
    cfg = AugmentConfig(scale_range=(scale, scale), flip_prob=0.5, brightness_range=(0.0, 0.0))
    for seed in range(3):
        a_img, a_mask, a_phi, a_valid = augment(image, mask, phi, valid, cfg, np.random.default_rng(seed), clip=32.0)
        assert a_img.shape == image.shape and a_phi.dtype == np.float32 and a_mask.dtype == np.uint8
        assert np.array_equal(a_mask.astype(bool), a_phi < 0)
        assert np.array_equal(a_phi, signed_distance(a_mask))
        assert not (a_mask & (1 - a_valid)).any()  # no foreground on padding
        assert a_img[:, a_valid == 0].max() == 0
        assert abs(int(a_mask.sum()) - scale**2 * int(mask.sum())) < 0.1 * mask.sum()
    if scale < 1:
        assert (a_valid[:2] == 0).all()  # zoom-out pads the border


def test_brightness_only_on_valid_pixels() -> None:
    image, mask, phi, valid = _sample()
    cfg = AugmentConfig(scale_range=(1.0, 1.0), flip_prob=0.0, brightness_range=(0.1, 0.1))
    a_img, a_mask, a_phi, a_valid = augment(image, mask, phi, valid, cfg, np.random.default_rng(0))
    np.testing.assert_allclose(a_img[:, valid == 1], image[:, valid == 1] + 0.1, rtol=1e-6)
    assert a_img[:, valid == 0].max() == 0
    assert np.array_equal(a_phi, phi) and np.array_equal(a_mask, mask)


def test_augment_is_seeded_and_can_be_disabled() -> None:
    image, mask, phi, valid = _sample()
    cfg = AugmentConfig()
    one = augment(image, mask, phi, valid, cfg, np.random.default_rng(7))
    two = augment(image, mask, phi, valid, cfg, np.random.default_rng(7))
    assert all(np.array_equal(a, b) for a, b in zip(one, two, strict=True))
    off = augment(image, mask, phi, valid, AugmentConfig(enabled=False), np.random.default_rng(7))
    assert all(np.array_equal(a, b) for a, b in zip(off, (image, mask, phi, valid), strict=True))
    with pytest.raises(ValueError, match="rng"):
        augment(image, mask, phi, valid, cfg, 7)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="phi"):
        augment(image, mask, phi[:-1], valid, cfg, np.random.default_rng(0))
