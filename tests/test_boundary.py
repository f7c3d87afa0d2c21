"""Boundary metrics (MONAI) on shapes with known answers, against a scipy reference, and the empty-mask rules."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import f1_score

from nodeseg.boundary import BOUNDARY_KEYS, boundary_scores, count_components, summarise_boundary


def _disc(shape: tuple[int, int], centre: tuple[float, float], r: float) -> np.ndarray:
    y, x = np.ogrid[: shape[0], : shape[1]]
    return (y - centre[0]) ** 2 + (x - centre[1]) ** 2 <= r * r


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask)


def _reference_distances(a: np.ndarray, b: np.ndarray, spacing: tuple[float, float]) -> np.ndarray:
    """Distances (mm) from each surface pixel of ``a`` to the nearest surface pixel of ``b`` (scipy's EDT)."""
    return ndimage.distance_transform_edt(~_surface(b), sampling=spacing)[_surface(a)]


@pytest.mark.parametrize("d", [3, 6, 10])
def test_hd95_and_asd_of_concentric_discs_are_their_gap(d: int) -> None:
    # every point of one circle lies d from the other: HD95 = ASD = d, up to the pixel grid (±1 px)
    gt = _disc((96, 96), (48, 48), 30)
    pred = _disc((96, 96), (48, 48), 30 - d)
    s = boundary_scores(pred, gt)
    assert s["hd95_mm"] == pytest.approx(d, abs=1.0)
    assert s["asd_mm"] == pytest.approx(d, abs=1.0)
    assert s["nsd_1px"] == 0.0 if d > 2 else s["nsd_1px"] > 0


@pytest.mark.parametrize("spacing", [(1.0, 1.0), (2.5, 2.5), (0.8, 1.7)])
def test_distances_match_a_scipy_reference_in_mm(spacing: tuple[float, float]) -> None:
    rng = np.random.default_rng(0)
    gt = ndimage.binary_opening(_disc((80, 90), (40, 44), 25) | (rng.random((80, 90)) < 0.02))
    pred = _disc((80, 90), (37, 50), 22) | _disc((80, 90), (10, 10), 4)
    s = boundary_scores(pred, gt, spacing)
    d_pg, d_gp = _reference_distances(pred, gt, spacing), _reference_distances(gt, pred, spacing)
    assert s["hd95_mm"] == pytest.approx(max(np.percentile(d_pg, 95), np.percentile(d_gp, 95)), rel=1e-6)
    assert s["asd_mm"] == pytest.approx((d_pg.sum() + d_gp.sum()) / (d_pg.size + d_gp.size), rel=1e-6)
    # surface Dice in pixels: the share of both surfaces within the tolerance of the other
    px_pg, px_gp = _reference_distances(pred, gt, (1, 1)), _reference_distances(gt, pred, (1, 1))
    for tol, key in ((1.0, "nsd_1px"), (2.0, "nsd_2px")):
        ref = ((px_pg <= tol).sum() + (px_gp <= tol).sum()) / (px_pg.size + px_gp.size)
        assert s[key] == pytest.approx(ref, abs=1e-6)
    assert s["dice"] == pytest.approx(f1_score(gt.ravel(), pred.ravel()), abs=1e-12)


def test_spacing_scales_the_distances() -> None:
    gt, pred = _disc((64, 64), (32, 32), 20), _disc((64, 64), (32, 32), 14)
    one, two = boundary_scores(pred, gt, (1.0, 1.0)), boundary_scores(pred, gt, (2.0, 2.0))
    assert two["hd95_mm"] == pytest.approx(2 * one["hd95_mm"], rel=1e-9)
    assert two["asd_mm"] == pytest.approx(2 * one["asd_mm"], rel=1e-9)
    assert two["nsd_2px"] == one["nsd_2px"]  # the surface-Dice tolerance is in pixels


def test_identical_masks_are_perfect() -> None:
    m = _disc((40, 40), (20, 20), 9)
    s = boundary_scores(m, m)
    assert s["dice"] == 1.0 and s["hd95_mm"] == 0.0 and s["asd_mm"] == 0.0
    assert s["nsd_1px"] == 1.0 and s["nsd_2px"] == 1.0
    assert s["components_pred"] == s["components_gt"] == 1.0


def test_empty_masks_follow_the_stated_rules() -> None:
    gt, empty = _disc((30, 40), (15, 20), 5), np.zeros((30, 40), bool)
    missed = boundary_scores(empty, gt, (2.0, 1.0))
    assert missed["dice"] == 0.0 and missed["nsd_1px"] == 0.0
    assert missed["hd95_mm"] == missed["asd_mm"] == pytest.approx(math.hypot(30 * 2.0, 40 * 1.0))
    nothing = boundary_scores(empty, empty)
    assert nothing["dice"] == 1.0 and math.isnan(nothing["hd95_mm"]) and math.isnan(nothing["nsd_2px"])
    false_alarm = boundary_scores(gt, empty)
    assert false_alarm["dice"] == 0.0 and math.isnan(false_alarm["asd_mm"])
    summary = summarise_boundary([missed, nothing, false_alarm])
    assert summary["n_empty_pred"] == 1.0
    assert summary["hd95_mm"] == missed["hd95_mm"]  # NaN distances are left out of the mean
    assert summary["components_error"] == pytest.approx((1 + 0 + 1) / 3)


def test_components_count_eight_connected_blobs() -> None:
    m = np.zeros((20, 20), bool)
    m[2:5, 2:5] = True
    m[5, 5] = True  # touches the square diagonally: the same component
    m[10:12, 10:15] = True
    m[17, 1] = True
    assert count_components(m) == 3
    s = boundary_scores(m, _disc((20, 20), (10, 10), 4))
    assert s["components_pred"] == 3.0 and s["components_gt"] == 1.0
    assert set(s) == set(BOUNDARY_KEYS)


@pytest.mark.parametrize(("pred", "gt", "spacing", "needle"), [
    (np.zeros((4, 4)), np.zeros((4, 5)), (1, 1), "shape"),
    (np.zeros(4), np.zeros(4), (1,), "2-D or 3-D"),
    (np.zeros((4, 4)), np.zeros((4, 4)), (1, 0), "positive"),
    (np.zeros((4, 4)), np.zeros((4, 4)), (1, 1, 1), "2 positive"),
])
def test_bad_arguments_are_named(pred: np.ndarray, gt: np.ndarray, spacing: tuple, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        boundary_scores(pred, gt, spacing)
