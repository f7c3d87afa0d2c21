"""Signed distance, narrow band, saliency and zero contours against analytic and scipy references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import distance_transform_edt

from nodeseg.levelset import (
    narrow_band,
    saliency_from_phi,
    signed_distance,
    signed_distance_batch,
    zero_contours,
)

# A disc sampled at pixel centres, mask = ‖x − c‖ < r. For a background pixel p with nearest
# foreground centre q: ‖p − q‖ ≥ ‖p − c‖ − ‖q − c‖ > ‖p − c‖ − r, so φ − analytic > −½ always; and q
# lies within about one pixel of the ideal boundary point, so φ − analytic ≲ +½ (0.53 measured for
# r ≥ 2 over 200 random discs). The same holds inside by symmetry. Hence the half-pixel-plus-margin
# tolerance below; a sign or offset error (e.g. forgetting the ½) would exceed it.
DISC_TOL = 0.75


def _disc(
    shape: tuple[int, int], centre: tuple[float, float], radius: float
) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    d = np.hypot(yy - centre[0], xx - centre[1])
    return d < radius, d - radius


@pytest.mark.parametrize(
    ("centre", "radius"),
    [((31.3, 30.7), 11.2), ((20.45, 40.1), 5.6), ((32.0, 32.0), 17.0), ((29.9, 33.2), 2.5)],
)
def test_disc_matches_analytic_sdf(centre: tuple[float, float], radius: float) -> None:
    mask, analytic = _disc((64, 64), centre, radius)
    phi = signed_distance(mask, clip=1000.0)
    assert phi.dtype == np.float32 and phi.shape == mask.shape
    err = phi - analytic
    assert err.min() > -0.5 - 1e-5  # the provable one-sided bound
    assert np.abs(err).max() <= DISC_TOL
    # the error stays O(pixel) however far from the boundary: no drift
    far = np.abs(analytic) > 10
    if far.any():
        assert np.abs(err[far]).max() <= DISC_TOL


def _square_sdf(shape: tuple[int, int], r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    """Exact SDF of the box covering pixels [r0, r1) × [c0, c1): edges at r0 − ½, r1 − ½, ..."""
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float64)
    top, bottom, left, right = r0 - 0.5, r1 - 0.5, c0 - 0.5, c1 - 0.5
    dy = np.maximum(np.maximum(top - yy, yy - bottom), 0.0)
    dx = np.maximum(np.maximum(left - xx, xx - right), 0.0)
    outside = np.hypot(dy, dx)
    inside = -np.minimum(np.minimum(yy - top, bottom - yy), np.minimum(xx - left, right - xx))
    inside_box = (yy > top) & (yy < bottom) & (xx > left) & (xx < right)
    return np.where(inside_box, inside, outside)


def test_square_matches_analytic_sdf() -> None:
    shape, (r0, r1, c0, c1) = (48, 56), (12, 31, 15, 40)
    mask = np.zeros(shape, dtype=np.uint8)
    mask[r0:r1, c0:c1] = 1
    phi = signed_distance(mask, clip=1000.0)
    ref = _square_sdf(shape, r0, r1, c0, c1)
    inside = mask.astype(bool)
    # Inside: the nearest background centre is straight across an edge, k pixels away, and the edge is
    # k − ½ away: exact (the Euclidean, not Chebyshev, distance to the edges).
    np.testing.assert_allclose(phi[inside], ref[inside], atol=1e-5)
    # Outside beside an edge (not in a corner quadrant): also exact.
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    beside = ~inside & (((yy >= r0) & (yy < r1)) | ((xx >= c0) & (xx < c1)))
    np.testing.assert_allclose(phi[beside], ref[beside], atol=1e-5)
    # Corner quadrants: distance to the corner pixel's centre minus ½ vs distance to the box corner,
    # d − ½ vs |(d_y − ½, d_x − ½)|; the gap is largest on the diagonal, (√2 − 1)/2 ≈ 0.207.
    corner = ~inside & ~beside
    gap = phi[corner] - ref[corner]
    assert gap.min() >= -1e-5 and gap.max() <= (np.sqrt(2) - 1) / 2 + 1e-5
    assert gap.max() > 0.2  # the diagonal is present, so the bound is tight, not vacuous


def test_equals_scipy_edt_construction() -> None:
    rng = np.random.default_rng(3)
    mask = rng.random((40, 37)) < 0.3
    mask[5:25, 8:30] = True  # a solid block so that the clip is reached inside
    phi = signed_distance(mask, clip=5.0)
    ref = np.where(mask, -(distance_transform_edt(mask) - 0.5), distance_transform_edt(~mask) - 0.5)
    assert ref.min() < -5.0  # the clip matters
    np.testing.assert_allclose(phi, np.clip(ref, -5.0, 5.0).astype(np.float32), rtol=0, atol=1e-6)
    assert phi.min() == pytest.approx(-5.0)


@pytest.mark.parametrize("spacing", [None, (0.78, 0.78), (2.5, 0.4)])
def test_small_objects_equal_the_whole_image_transform(spacing: tuple[float, float] | None) -> None:
    """φ is computed on a window around the object; it must equal the transforms over the whole image,
    bit for bit, for objects in the middle, at the border and with clip just beyond a half-pixel."""
    rng = np.random.default_rng(7)
    sampling = spacing or (1.0, 1.0)
    half = 0.5 * min(sampling)
    kw = {"sampling": spacing} if spacing else {}
    for trial in range(40):
        mask = np.zeros((int(rng.integers(20, 90)), int(rng.integers(20, 90))), dtype=bool)
        for _ in range(int(rng.integers(1, 3))):
            r, c = int(rng.integers(0, mask.shape[0])), int(rng.integers(0, mask.shape[1]))
            mask[r:r + int(rng.integers(1, 12)), c:c + int(rng.integers(1, 12))] = True
        clip = float(rng.choice([0.6, 1.0, 3.3, 8.0, 20.0]))
        ref = np.where(mask, half - distance_transform_edt(mask, **kw), distance_transform_edt(~mask, **kw) - half)
        ref = np.clip(ref, -clip, clip).astype(np.float32)
        np.testing.assert_array_equal(signed_distance(mask, spacing=spacing, clip=clip), ref, err_msg=f"trial {trial}")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sign_is_the_mask(seed: int) -> None:
    rng = np.random.default_rng(seed)
    mask = rng.random((33, 45)) < rng.uniform(0.05, 0.95)
    for spacing in (None, (1.0, 1.0), (0.3, 0.3), (2.5, 0.4)):
        phi = signed_distance(mask, spacing=spacing)
        np.testing.assert_array_equal(phi < 0, mask)
        assert np.all(phi != 0)


@pytest.mark.parametrize(("fill", "expected"), [(0, 7.5), (1, -7.5)])
def test_empty_and_full_masks(fill: int, expected: float) -> None:
    mask = np.full((9, 13), fill, dtype=np.int64)
    for spacing in (None, (2.0, 0.5)):
        phi = signed_distance(mask, spacing=spacing, clip=7.5)
        assert phi.dtype == np.float32 and np.isfinite(phi).all()
        np.testing.assert_array_equal(phi, np.full(mask.shape, expected, dtype=np.float32))


def test_spacing_anisotropy() -> None:
    mask = np.zeros((21, 31), dtype=bool)
    mask[10, 15] = True
    phi = signed_distance(mask, spacing=(2.0, 0.5), clip=100.0)
    half = 0.25  # ½ · min(spacing)
    assert phi[10, 15] == pytest.approx(-(0.5 - half))  # nearest background: one column away, 0.5
    assert phi[11, 15] == pytest.approx(2.0 - half)  # one row: 2.0 physical units
    assert phi[10, 16] == pytest.approx(0.5 - half)  # one column: 0.5
    assert phi[13, 19] == pytest.approx(np.hypot(3 * 2.0, 4 * 0.5) - half, rel=1e-6)
    # the same as scipy's EDT with sampling, away from the half-pixel offset
    rng = np.random.default_rng(4)
    blob = rng.random((30, 20)) < 0.2
    phi = signed_distance(blob, spacing=(1.5, 0.7), clip=100.0)
    ref = np.where(
        blob,
        -(distance_transform_edt(blob, sampling=(1.5, 0.7)) - 0.35),
        distance_transform_edt(~blob, sampling=(1.5, 0.7)) - 0.35,
    )
    np.testing.assert_allclose(phi, ref, atol=1e-5)
    # spacing (1, 1) is the default
    np.testing.assert_array_equal(signed_distance(blob, spacing=(1, 1)), signed_distance(blob))


def test_batch_helper() -> None:
    rng = np.random.default_rng(5)
    masks = rng.random((3, 1, 17, 19)) < 0.4
    masks[1] = False
    out = signed_distance_batch(masks, clip=4.0)
    assert out.shape == masks.shape and out.dtype == np.float32
    for i in range(3):
        np.testing.assert_array_equal(out[i, 0], signed_distance(masks[i, 0], clip=4.0))
    assert signed_distance_batch(masks[:, 0]).shape == (3, 17, 19)
    with pytest.raises(ValueError, match="'masks'"):
        signed_distance_batch(masks[0, 0])


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"mask": np.zeros((2, 3, 4), dtype=bool)}, "mask"),
        ({"mask": np.zeros(5, dtype=bool)}, "mask"),
        ({"mask": np.array([[0, 1], [2, 0]])}, "mask"),
        ({"mask": np.array([[0.0, np.nan], [1.0, 0.0]])}, "mask"),
        ({"mask": np.array([["a", "b"]])}, "mask"),
        ({"mask": np.eye(3, dtype=bool), "clip": 0.0}, "clip"),
        ({"mask": np.eye(3, dtype=bool), "clip": float("inf")}, "clip"),
        ({"mask": np.eye(3, dtype=bool), "spacing": (1.0,)}, "spacing"),
        ({"mask": np.eye(3, dtype=bool), "spacing": (1.0, -2.0)}, "spacing"),
        ({"mask": np.eye(3, dtype=bool), "spacing": (1.0, float("nan"))}, "spacing"),
        ({"mask": np.eye(3, dtype=bool), "spacing": "1,1"}, "spacing"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=f"'{name}'"):
        signed_distance(**kwargs)


def test_bad_value_is_quoted() -> None:
    with pytest.raises(ValueError, match="got 2"):
        signed_distance(np.array([[0, 1], [2, 0]]))


def test_narrow_band_and_saliency_numpy_and_torch() -> None:
    phi = np.linspace(-40, 40, 161, dtype=np.float32).reshape(7, 23)
    for width in (1.0, 2.5):
        nb = narrow_band(phi, width)
        assert nb.dtype == np.float32
        np.testing.assert_allclose(nb, np.tanh(phi.astype(np.float64) / width), atol=1e-6)
        s = saliency_from_phi(phi, width)
        assert s.dtype == np.float32 and s.min() >= 0 and s.max() <= 1
        np.testing.assert_allclose(s, (1 - np.tanh(phi.astype(np.float64) / width)) / 2, atol=1e-6)
        t = torch.from_numpy(phi).requires_grad_()
        np.testing.assert_allclose(narrow_band(t, width).detach().numpy(), nb, atol=1e-6)
        st = saliency_from_phi(t, width)
        np.testing.assert_allclose(st.detach().numpy(), s, atol=1e-6)
        st.sum().backward()  # differentiable
        assert t.grad is not None and bool((t.grad <= 0).all()) and float(t.grad.abs().max()) > 0
    # saliency > ½ exactly where φ < 0 on a signed distance
    mask = np.random.default_rng(6).random((20, 20)) < 0.5
    np.testing.assert_array_equal(saliency_from_phi(signed_distance(mask)) > 0.5, mask)
    with pytest.raises(ValueError, match="'width'"):
        narrow_band(phi, 0.0)
    with pytest.raises(ValueError, match="'width'"):
        saliency_from_phi(torch.zeros(2), -1.0)
    with pytest.raises(ValueError, match="'phi'"):
        narrow_band([0.0, 1.0])  # type: ignore[type-var]


def test_zero_contours_of_a_disc() -> None:
    centre, radius = (30.4, 33.7), 12.3
    mask, _ = _disc((64, 64), centre, radius)
    contours = zero_contours(signed_distance(mask))
    assert len(contours) == 1
    c = contours[0]
    assert c.ndim == 2 and c.shape[1] == 2 and len(c) > 50
    np.testing.assert_allclose(c[0], c[-1])  # closed
    r = np.hypot(c[:, 0] - centre[0], c[:, 1] - centre[1])
    # The zero level runs along pixel edges, half way between a foreground and a background centre
    # (φ = ∓½ there); those edges lie within ½ px of the ideal circle, same argument as DISC_TOL.
    assert np.abs(r - radius).max() <= DISC_TOL
    assert zero_contours(signed_distance(np.zeros((8, 8), dtype=bool))) == []
    with pytest.raises(ValueError, match="'phi'"):
        zero_contours(np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match="'phi'"):
        zero_contours(np.array([[0.0, np.nan], [1.0, 1.0]]))
