"""Resizing, canvas fitting and augmentation of (image, mask, φ, valid) samples.

Images are ``(C, H, W)`` float32; mask and valid ``(H, W)`` uint8 {0, 1}; φ ``(H, W)`` float32.

Resizing uses PIL's resampling on float32 ('F') planes, which low-pass filters when shrinking (an area-like
average for bilinear), so downsampling a 512² CT slice to 200² does not alias. A binary mask is resized as
its foreground *fraction* and thresholded at ½ (a majority vote over the source pixels), which keeps thin
structures better than nearest-neighbour subsampling; φ is then recomputed on the resized mask with
``nodeseg.levelset.signed_distance`` so that ``mask == (φ < 0)`` holds exactly and φ is in pixels of the
stored array.

Augmentation (:func:`augment`) draws a scale, a horizontal flip and a brightness shift from an explicit
``numpy.random.Generator``. The flip is applied to φ directly (the exact Euclidean distance transform
commutes with a flip, so this equals recomputing it, bit for bit); after a rescale φ is recomputed from the
augmented mask, because a resampled distance map is no longer a distance map (the clipping at ±clip and the
zero crossing would drift from the mask). Either way the augmented sample satisfies ``mask == (φ < 0)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image

from nodeseg.errors import check_arg
from nodeseg.levelset import signed_distance

__all__ = [
    "AugmentConfig",
    "augment",
    "fit_canvas",
    "resize_image",
    "resize_mask",
]

Size = tuple[int, int]


def _check_size(size: Size, name: str = "size") -> tuple[int, int]:
    ok = (
        isinstance(size, (tuple, list))
        and len(size) == 2
        and all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s > 0 for s in size)
    )
    check_arg(ok, name, size, "(height, width) with two positive integers")
    return int(size[0]), int(size[1])


def _resize_plane(plane: np.ndarray, size: Size, resample: Image.Resampling) -> np.ndarray:
    h, w = size
    if plane.shape == (h, w):
        return plane.astype(np.float32, copy=True)
    im = Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32), mode="F")
    return np.asarray(im.resize((w, h), resample=resample), dtype=np.float32).copy()


def resize_image(
    image: np.ndarray, size: Size, mode: Literal["bilinear", "nearest"] = "bilinear"
) -> np.ndarray:
    """Resize an ``(H, W)`` or ``(C, H, W)`` float image to ``size`` = (height, width); float32 out.

    ``bilinear`` is PIL's antialiased bilinear filter (averages over the source footprint when shrinking).
    """
    size = _check_size(size)
    a = np.asarray(image)
    check_arg(a.ndim in (2, 3), "image", f"array of shape {a.shape}", "an (H, W) or (C, H, W) array")
    check_arg(mode in ("bilinear", "nearest"), "mode", mode, "'bilinear' or 'nearest'")
    resample = Image.Resampling.BILINEAR if mode == "bilinear" else Image.Resampling.NEAREST
    if a.ndim == 2:
        return _resize_plane(a, size, resample)
    return np.stack([_resize_plane(p, size, resample) for p in a])


def resize_mask(mask: np.ndarray, size: Size) -> np.ndarray:
    """Resize a binary ``(H, W)`` mask: antialiased foreground fraction ≥ ½ (majority vote); uint8 {0, 1}."""
    size = _check_size(size)
    m = np.asarray(mask)
    check_arg(m.ndim == 2, "mask", f"array of shape {m.shape}", "an (H, W) array")
    if m.shape == size:
        return (m != 0).astype(np.uint8)
    frac = _resize_plane((m != 0).astype(np.float32), size, Image.Resampling.BILINEAR)
    return (frac >= 0.5).astype(np.uint8)


def fit_canvas(
    image: np.ndarray,
    mask: np.ndarray,
    size: Size,
    oversize: Literal["shrink", "crop"] = "shrink",
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Place ``image`` (C, H, W) and ``mask`` (H, W) on a ``size`` canvas, top-left aligned, zero padded.

    An image larger than the canvas is either shrunk to fit, keeping its aspect ratio (``shrink``, nothing
    is lost: the choice for evaluation sets) or centre-cropped (``crop``). Returns (image, mask, valid,
    scale) where ``valid`` is 1 on the image and 0 on the padding, and ``scale`` the resize factor applied
    (1.0 when none), so the stored pixel spacing is ``1 / scale`` source pixels.
    """
    ch, cw = _check_size(size)
    check_arg(oversize in ("shrink", "crop"), "oversize", oversize, "'shrink' or 'crop'")
    img = np.asarray(image, dtype=np.float32)
    m = np.asarray(mask)
    check_arg(img.ndim == 3, "image", f"array of shape {img.shape}", "a (C, H, W) array")
    check_arg(m.shape == img.shape[1:], "mask", f"array of shape {m.shape}", f"shape {img.shape[1:]} (the image's)")
    h, w = m.shape
    scale = 1.0
    if h > ch or w > cw:
        if oversize == "shrink":
            scale = min(ch / h, cw / w)
            nh, nw = max(1, min(ch, round(h * scale))), max(1, min(cw, round(w * scale)))
            img, m = resize_image(img, (nh, nw)), resize_mask(m, (nh, nw))
        else:
            top, left = max(0, (h - ch) // 2), max(0, (w - cw) // 2)
            img, m = img[:, top : top + ch, left : left + cw], m[top : top + ch, left : left + cw]
    h, w = m.shape
    out_img = np.zeros((img.shape[0], ch, cw), dtype=np.float32)
    out_mask = np.zeros((ch, cw), dtype=np.uint8)
    valid = np.zeros((ch, cw), dtype=np.uint8)
    out_img[:, :h, :w] = img
    out_mask[:h, :w] = m != 0
    valid[:h, :w] = 1
    return out_img, out_mask, valid, scale


@dataclass(frozen=True)
class AugmentConfig:
    """Training-time augmentation: random scale about the centre, horizontal flip, additive brightness."""

    enabled: bool = True
    scale_range: tuple[float, float] = (0.9, 1.1)
    flip_prob: float = 0.5
    brightness_range: tuple[float, float] = (-0.1, 0.1)

    def __post_init__(self) -> None:
        lo, hi = self.scale_range
        if not (math.isfinite(lo) and math.isfinite(hi) and 0.25 <= lo <= hi <= 4.0):
            raise ValueError(f"scale_range must be (low, high) with 0.25 <= low <= high <= 4, got {self.scale_range!r}")
        if not (0.0 <= self.flip_prob <= 1.0):
            raise ValueError(f"flip_prob must be in [0, 1], got {self.flip_prob!r}")
        blo, bhi = self.brightness_range
        if not (math.isfinite(blo) and math.isfinite(bhi) and -1.0 <= blo <= bhi <= 1.0):
            raise ValueError(
                f"brightness_range must be (low, high) with -1 <= low <= high <= 1, got {self.brightness_range!r}"
            )


def _rescale_centred(
    image: np.ndarray, mask: np.ndarray, valid: np.ndarray, s: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Zoom by ``s`` about the centre, then crop or zero-pad back to the original size."""
    _, h, w = image.shape
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    img = resize_image(image, (nh, nw))
    m = resize_mask(mask, (nh, nw))
    v = resize_mask(valid, (nh, nw))
    out_img = np.zeros_like(image)
    out_m = np.zeros((h, w), dtype=np.uint8)
    out_v = np.zeros((h, w), dtype=np.uint8)
    # source window (in the zoomed array) and destination window (in the output), both centred
    sy, sx = max(0, (nh - h) // 2), max(0, (nw - w) // 2)
    dy, dx = max(0, (h - nh) // 2), max(0, (w - nw) // 2)
    ch, cw = min(h, nh), min(w, nw)
    out_img[:, dy : dy + ch, dx : dx + cw] = img[:, sy : sy + ch, sx : sx + cw]
    out_m[dy : dy + ch, dx : dx + cw] = m[sy : sy + ch, sx : sx + cw]
    out_v[dy : dy + ch, dx : dx + cw] = v[sy : sy + ch, sx : sx + cw]
    out_m &= out_v  # no foreground on padding
    out_img *= out_v.astype(np.float32)  # and zero image there (resampling blurs the image into it)
    return out_img, out_m, out_v


def augment(
    image: np.ndarray,
    mask: np.ndarray,
    phi: np.ndarray,
    valid: np.ndarray,
    cfg: AugmentConfig,
    rng: np.random.Generator,
    clip: float = 32.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Apply one random scale / flip / brightness draw consistently to image, mask, φ and valid.

    Always draws the same three numbers from ``rng`` (so the stream does not depend on the outcome);
    returns new arrays ``(image (C,H,W) float32, mask uint8, phi float32, valid uint8)``.
    """
    check_arg(isinstance(cfg, AugmentConfig), "cfg", type(cfg).__name__, "an AugmentConfig")
    check_arg(isinstance(rng, np.random.Generator), "rng", type(rng).__name__, "a numpy.random.Generator")
    img = np.asarray(image, dtype=np.float32)
    check_arg(img.ndim == 3, "image", f"array of shape {img.shape}", "a (C, H, W) array")
    hw = img.shape[1:]
    for name, a in (("mask", mask), ("phi", phi), ("valid", valid)):
        check_arg(np.shape(a) == hw, name, f"array of shape {np.shape(a)}", f"shape {hw} (the image's)")
    s = float(rng.uniform(*cfg.scale_range))
    flip = bool(rng.random() < cfg.flip_prob)
    delta = float(rng.uniform(*cfg.brightness_range))
    m = (np.asarray(mask) != 0).astype(np.uint8)
    v = (np.asarray(valid) != 0).astype(np.uint8)
    p = np.asarray(phi, dtype=np.float32).copy()
    img = img.copy()
    if not cfg.enabled:
        return img, m, p, v
    new_shape = (max(1, round(hw[0] * s)), max(1, round(hw[1] * s)))
    rescaled = new_shape != hw
    if rescaled:
        img, m, v = _rescale_centred(img, m, v, s)
    if flip:
        img, m, v, p = img[..., ::-1].copy(), m[:, ::-1].copy(), v[:, ::-1].copy(), p[:, ::-1].copy()
    if rescaled:
        p = signed_distance(m, clip=clip)
    if delta != 0.0:
        img = img + np.float32(delta) * v.astype(np.float32)
    return img, m, p, v
