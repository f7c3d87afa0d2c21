"""SetMetrics against py_sod_metrics 1.6.2, sklearn and hand computations; padding, empty gt, bad inputs.

py_sod_metrics takes uint8 maps: gt binarised at > 128, pred divided by 255 and min-max normalised
when not constant. Predictions here span exactly 0..255 (or are constant), so that normalisation is
the identity and ours receives the same float64 values as pred / 255.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import py_sod_metrics as psm
import pytest
import torch
from scipy.ndimage import gaussian_filter
from sklearn.metrics import jaccard_score

from nodeseg.levelset import saliency_from_phi, signed_distance
from nodeseg.metrics import SetMetrics, matlab_gaussian_kernel, weighted_fbeta

TOL = 1e-6
Pair = tuple[np.ndarray, np.ndarray]  # (pred uint8 (H, W), gt bool (H, W))


def _to_u8(s: np.ndarray) -> np.ndarray:
    """Stretch a map to span exactly 0..255 (so py_sod_metrics' min-max normalisation is a no-op)."""
    s = s.astype(np.float64)
    return np.round((s - s.min()) / (s.max() - s.min()) * 255).astype(np.uint8)


def _random_pairs(seed: int) -> list[Pair]:
    rng = np.random.default_rng(seed)
    pairs = []
    for shape in [(37, 53), (64, 64), (96, 80), (50, 31)]:
        gt = rng.random(shape) < rng.uniform(0.05, 0.6)
        pred = rng.integers(0, 256, shape).astype(np.uint8)
        pred.flat[rng.choice(pred.size, 2, replace=False)] = (0, 255)
        pairs.append((pred, gt))
    return pairs


def _structured_pairs(seed: int) -> list[Pair]:
    """Discs, rectangles and noisy blobs, predicted by shifted / blurred / noisy versions of themselves."""
    rng = np.random.default_rng(seed)
    pairs = []
    for shape in [(64, 64), (96, 80), (45, 70)]:
        yy, xx = np.mgrid[: shape[0], : shape[1]]
        # disc, predicted by a shifted, soft disc
        c, r = rng.uniform(0.3, 0.7, 2) * shape, rng.uniform(5, min(shape) / 3)
        gt = np.hypot(yy - c[0], xx - c[1]) < r
        moved = np.hypot(yy - c[0] - 2.3, xx - c[1] + 1.1) < r * 0.9
        pairs.append((_to_u8(saliency_from_phi(signed_distance(moved), width=2.0)), gt))
        # rectangle touching the border, predicted by a blurred, offset rectangle plus noise
        gt = np.zeros(shape, dtype=bool)
        gt[: shape[0] // 2, shape[1] // 4 : shape[1] - 3] = True
        pred = gaussian_filter(np.roll(gt, (3, -2), axis=(0, 1)).astype(float), 2.0)
        pairs.append((_to_u8(pred + rng.normal(0, 0.05, shape)), gt))
        # noisy blob (thresholded smooth noise), predicted by a noisier smoothing of the same field
        field = gaussian_filter(rng.normal(size=shape), 4.0)
        gt = field > np.quantile(field, 0.7)
        pairs.append((_to_u8(field + gaussian_filter(rng.normal(size=shape), 2.0) * 0.5 * field.std()), gt))
    return pairs


def _edge_pairs() -> list[Pair]:
    """Constant predictions, empty and full ground truth, a perfect prediction."""
    rng = np.random.default_rng(9)
    shape = (40, 48)
    blob = np.zeros(shape, dtype=bool)
    blob[10:25, 5:30] = True
    empty, full = np.zeros(shape, dtype=bool), np.ones(shape, dtype=bool)
    noisy = rng.integers(0, 256, shape).astype(np.uint8)
    noisy.flat[:2] = (0, 255)
    return [
        (np.zeros(shape, np.uint8), blob),  # threshold 0: every pixel positive
        (np.full(shape, 255, np.uint8), blob),
        (np.full(shape, 128, np.uint8), blob),  # constant, not renormalised
        (blob.astype(np.uint8) * 255, blob),  # perfect
        (noisy, empty),
        (np.zeros(shape, np.uint8), empty),
        (noisy, full),
        (np.full(shape, 255, np.uint8), full),
    ]


def _psm(pairs: list[Pair], beta2: float = 0.3, weighted_beta2: float = 1.0) -> dict:
    """py_sod_metrics' numbers for a set of pairs: per-image lists and its own set-level values."""
    iou_pooled = psm.IOUHandler(False, False, with_binary=True, sample_based=False)
    iou_mean = psm.IOUHandler(False, False, with_binary=True, sample_based=True)
    fm_adp = psm.FmeasureHandler(False, True, beta=beta2)
    v2 = psm.FmeasureV2({"iou_pooled": iou_pooled, "iou_mean": iou_mean, "fm": fm_adp})
    wfm = psm.WeightedFmeasure(beta=weighted_beta2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Fmeasure's deprecation notice
        fm_v1 = psm.Fmeasure(beta=beta2)
    adaptive_counts = np.zeros(4, dtype=np.int64)
    for pred, gt in pairs:
        gt_u8 = gt.astype(np.uint8) * 255
        v2.step(pred, gt_u8)
        wfm.step(pred, gt_u8)
        fm_v1.step(pred, gt_u8)
        p, g = pred / 255, gt  # the normalised inputs (min-max is the identity here)
        stats = v2.adaptively_binarizing(p, g, int(g.sum()), int(g.size - g.sum()))
        adaptive_counts += [stats[k] for k in ("tp", "fp", "tn", "fn")]
    res = v2.get_results()
    pooled_adp = psm.FmeasureHandler(False, False, beta=beta2)(*adaptive_counts)
    return {
        "iou": float(res["iou_pooled"]["binary"]),
        "iou_mean_per_image": float(res["iou_mean"]["binary"]),
        "adaptive_per_image": np.array(fm_adp.adaptive_results, dtype=np.float64),
        "adaptive_v1_per_image": np.array(fm_v1.adaptive_fms, dtype=np.float64),
        "adaptive_pooled_from_psm_counts": float(pooled_adp),
        "weighted_per_image": np.array(wfm.weighted_fms, dtype=np.float64),
        "weighted_fbeta": float(wfm.get_results()["wfm"]),
    }


def _ours(pairs: list[Pair], **kw: object) -> dict[str, float]:
    m = SetMetrics(**kw)  # type: ignore[arg-type]
    for pred, gt in pairs:
        m.update(pred / 255, gt)
    return m.compute()


def _hand_pooled(pairs: list[Pair], beta2: float = 0.3) -> tuple[float, float]:
    """Pooled IoU (at > 0.5) and pooled adaptive Fβ, written out from the definitions."""
    tp = fp = fn = a_tp = a_fp = a_fn = 0
    for pred, gt in pairs:
        s = pred.astype(np.float64) / 255
        b = s > 0.5
        tp, fp, fn = tp + np.sum(b & gt), fp + np.sum(b & ~gt), fn + np.sum(~b & gt)
        a = s >= min(2 * s.mean(), 1.0)
        a_tp, a_fp, a_fn = a_tp + np.sum(a & gt), a_fp + np.sum(a & ~gt), a_fn + np.sum(~a & gt)
    iou = tp / (tp + fp + fn) if tp + fp + fn else 0.0
    p = a_tp / (a_tp + a_fp) if a_tp + a_fp else 0.0
    r = a_tp / (a_tp + a_fn) if a_tp + a_fn else 0.0
    f = (1 + beta2) * p * r / (beta2 * p + r) if p + r else 0.0
    return float(iou), float(f)


SETS = {
    "random": _random_pairs(0),
    "random2": _random_pairs(1),
    "structured": _structured_pairs(2),
    "structured2": _structured_pairs(3),
    "edge_cases": _edge_pairs(),
}


@pytest.mark.parametrize("name", list(SETS))
def test_set_metrics_agree_with_py_sod_metrics(name: str) -> None:
    pairs = SETS[name]
    ref, ours = _psm(pairs), _ours(pairs)
    assert ours["n_images"] == len(pairs)
    assert ours["iou"] == pytest.approx(ref["iou"], abs=TOL)
    assert ours["iou_mean_per_image"] == pytest.approx(ref["iou_mean_per_image"], abs=TOL)
    assert ours["adaptive_fbeta_mean_per_image"] == pytest.approx(ref["adaptive_per_image"].mean(), abs=TOL)
    assert ours["adaptive_fbeta"] == pytest.approx(ref["adaptive_pooled_from_psm_counts"], abs=TOL)
    assert ours["weighted_fbeta"] == pytest.approx(ref["weighted_fbeta"], abs=TOL)
    # the pooled and per-image adaptive Fβ are genuinely different numbers on these sets
    assert abs(ours["adaptive_fbeta"] - ours["adaptive_fbeta_mean_per_image"]) > 1e-4
    # the two py_sod_metrics adaptive F implementations agree with each other
    np.testing.assert_allclose(ref["adaptive_v1_per_image"], ref["adaptive_per_image"], atol=1e-12)


@pytest.mark.parametrize("name", list(SETS))
def test_per_image_values_agree_with_py_sod_metrics(name: str) -> None:
    """A one-image set: every per-image metric, and the pooled adaptive Fβ equals the per-image one."""
    pairs = SETS[name]
    ref = _psm(pairs)
    for i, pair in enumerate(pairs):
        one = _ours([pair])
        assert one["adaptive_fbeta"] == pytest.approx(ref["adaptive_per_image"][i], abs=TOL)
        assert one["adaptive_fbeta_mean_per_image"] == pytest.approx(ref["adaptive_per_image"][i], abs=TOL)
        assert one["weighted_fbeta"] == pytest.approx(ref["weighted_per_image"][i], abs=TOL)
        assert one["iou"] == pytest.approx(_psm([pair])["iou"], abs=TOL)


@pytest.mark.parametrize("name", list(SETS))
def test_pooled_values_agree_with_hand_computation_and_sklearn(name: str) -> None:
    pairs = SETS[name]
    ours = _ours(pairs)
    iou, adp = _hand_pooled(pairs)
    assert ours["iou"] == pytest.approx(iou, abs=1e-12)
    assert ours["adaptive_fbeta"] == pytest.approx(adp, abs=1e-12)
    y_true = np.concatenate([gt.ravel() for _, gt in pairs])
    y_pred = np.concatenate([(pred.astype(np.float64) / 255 > 0.5).ravel() for pred, _ in pairs])
    assert ours["iou"] == pytest.approx(jaccard_score(y_true, y_pred, zero_division=0.0), abs=TOL)


@pytest.mark.parametrize("beta2", [0.3, 1.0, 2.0])
def test_beta_parameters(beta2: float) -> None:
    pairs = SETS["structured"] + SETS["random"][:2]
    ref = _psm(pairs, beta2=beta2, weighted_beta2=beta2)
    ours = _ours(pairs, beta2=beta2, weighted_beta2=beta2)
    assert ours["adaptive_fbeta_mean_per_image"] == pytest.approx(ref["adaptive_per_image"].mean(), abs=TOL)
    assert ours["adaptive_fbeta"] == pytest.approx(_hand_pooled(pairs, beta2)[1], abs=1e-12)
    assert ours["weighted_fbeta"] == pytest.approx(ref["weighted_fbeta"], abs=TOL)


def test_perfect_prediction_scores_one() -> None:
    _, gt = SETS["structured"][0]
    out = _ours([(gt.astype(np.uint8) * 255, gt)])
    assert out["iou"] == 1.0 and out["adaptive_fbeta"] == 1.0
    assert out["weighted_fbeta"] == pytest.approx(1.0, abs=1e-12)


def test_kernel_is_matlab_fspecial() -> None:
    k = matlab_gaussian_kernel(7, 5.0)
    np.testing.assert_array_equal(k, psm.WeightedFmeasure().matlab_style_gauss2D((7, 7), sigma=5))
    assert k.shape == (7, 7) and k.sum() == pytest.approx(1.0) and k[3, 3] == k.max()


def test_weighted_fbeta_function_refuses_empty_gt() -> None:
    with pytest.raises(ValueError, match="'gt'"):
        weighted_fbeta(np.zeros((5, 5)), np.zeros((5, 5), dtype=bool))


def _pad(
    s: np.ndarray, g: np.ndarray, rng: np.random.Generator, top: int, left: int, bottom: int, right: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    shape = (s.shape[0] + top + bottom, s.shape[1] + left + right)
    sp, gp = rng.random(shape), rng.random(shape) < 0.5  # arbitrary values in the padding
    valid = np.zeros(shape, dtype=np.uint8)
    box = (slice(top, top + s.shape[0]), slice(left, left + s.shape[1]))
    sp[box], gp[box], valid[box] = s, g, 1
    return sp, gp, valid


def test_padding_masked_by_valid_changes_nothing() -> None:
    rng = np.random.default_rng(11)
    pairs = SETS["structured"][:4] + SETS["edge_cases"][:2]
    plain, padded, unmasked = SetMetrics(), SetMetrics(), SetMetrics()
    for k, (pred, gt) in enumerate(pairs):
        s = pred / 255
        sp, gp, valid = _pad(s, gt, rng, *[(0, 0, 9, 13), (5, 7, 0, 0), (3, 4, 5, 6)][k % 3])
        plain.update(s, gt)
        padded.update(sp, gp, valid)
        unmasked.update(sp, gp)
    a, b, c = plain.compute(), padded.compute(), unmasked.compute()
    assert a.keys() == b.keys()
    for key in a:
        assert b[key] == pytest.approx(a[key], abs=1e-12), key
    # without the mask the padding does change every metric: the test above can fail
    for key in ("iou", "adaptive_fbeta", "weighted_fbeta"):
        assert abs(c[key] - a[key]) > 1e-3, key


def test_update_batch_matches_update() -> None:
    rng = np.random.default_rng(12)
    sal = rng.random((3, 1, 20, 24)).astype(np.float32)
    gt = rng.random((3, 1, 20, 24)) < 0.3
    valid = np.zeros((3, 1, 20, 24), dtype=np.float32)
    valid[:, :, :15, :20] = 1
    one, batch, tens = SetMetrics(), SetMetrics(), SetMetrics()
    for i in range(3):
        one.update(sal[i, 0], gt[i, 0], valid[i, 0])
    batch.update_batch(sal, gt, valid)
    tens.update_batch(torch.from_numpy(sal), torch.from_numpy(gt), torch.from_numpy(valid))
    assert len(batch) == 3
    assert one.compute() == batch.compute() == tens.compute()
    with pytest.raises(ValueError, match="'gt'"):
        batch.update_batch(sal, gt[:2])
    with pytest.raises(ValueError, match="'saliency'"):
        batch.update_batch(sal[:, 0], gt[:, 0])


def test_empty_gt_zero_rule_follows_py_sod_metrics() -> None:
    blob_pred, blob_gt = SETS["structured"][0]
    empty = np.zeros_like(blob_gt)
    correct_empty = (np.zeros(blob_gt.shape, np.uint8), empty)  # a correct empty prediction
    pairs = [(blob_pred, blob_gt), correct_empty]
    ours, ref = _ours(pairs), _psm(pairs)
    assert ours["n_empty_gt"] == 1
    # "zero": the empty image scores 0 in each per-image mean, as py_sod_metrics scores it
    assert ref["weighted_per_image"][1] == 0 and ref["adaptive_per_image"][1] == 0
    single = _ours([(blob_pred, blob_gt)])
    assert ours["weighted_fbeta"] == pytest.approx(ref["weighted_fbeta"], abs=TOL)
    assert ours["weighted_fbeta"] == pytest.approx(single["weighted_fbeta"] / 2, abs=1e-12)
    assert ours["adaptive_fbeta_mean_per_image"] == pytest.approx(single["adaptive_fbeta"] / 2, abs=1e-12)
    assert ours["iou_mean_per_image"] == pytest.approx(ref["iou_mean_per_image"], abs=TOL)


def test_empty_gt_skip_rule() -> None:
    blob_pred, blob_gt = SETS["structured"][0]
    empty = np.zeros_like(blob_gt)
    fp_on_empty = np.zeros(blob_gt.shape, np.uint8)
    fp_on_empty[:5, :5] = 255  # 25 false positives on an empty image
    single = _ours([(blob_pred, blob_gt)], empty_gt="skip")
    both = _ours([(blob_pred, blob_gt), (fp_on_empty, empty)], empty_gt="skip")
    for key in ("iou_mean_per_image", "adaptive_fbeta_mean_per_image", "weighted_fbeta"):
        assert both[key] == single[key], key  # left out of the per-image means
    # ... but its false positives still count in the pooled metrics
    assert both["iou"] < single["iou"] and both["adaptive_fbeta"] < single["adaptive_fbeta"]
    all_empty = _ours([(fp_on_empty, empty)], empty_gt="skip")
    assert math.isnan(all_empty["weighted_fbeta"]) and math.isnan(all_empty["iou_mean_per_image"])
    assert all_empty["iou"] == 0.0 and all_empty["n_empty_gt"] == 1


@pytest.mark.parametrize(
    ("saliency", "gt", "valid", "name", "quoted"),
    [
        (np.full((4, 5), 1.5), np.zeros((4, 5), bool), None, "saliency", "1.5"),
        (np.full((4, 5), -0.25), np.zeros((4, 5), bool), None, "saliency", "-0.25"),
        (np.array([[0.2, np.nan], [0.1, 0.0]]), np.zeros((2, 2), bool), None, "saliency", "nan"),
        (np.zeros((2, 4, 5)), np.zeros((2, 4, 5), bool), None, "saliency", "(2, 4, 5)"),
        (np.zeros((4, 5)), np.zeros((4, 6), bool), None, "gt", "(4, 6)"),
        (np.zeros((4, 5)), np.full((4, 5), 255, np.uint8), None, "gt", "255"),
        (np.zeros((4, 5)), np.zeros((4, 5), bool), np.ones((5, 4), bool), "valid", "(5, 4)"),
        (np.zeros((4, 5)), np.zeros((4, 5), bool), np.full((4, 5), 2), "valid", "2"),
        (np.zeros((4, 5)), np.zeros((4, 5), bool), np.zeros((4, 5), bool), "valid", "no valid pixel"),
        (np.zeros((4, 5)), np.zeros((4, 5), bool), np.eye(4, 5, dtype=bool), "valid", "rectangle"),
    ],
)
def test_bad_inputs(
    saliency: np.ndarray, gt: np.ndarray, valid: np.ndarray | None, name: str, quoted: str
) -> None:
    m = SetMetrics()
    with pytest.raises(ValueError, match=f"'{name}'") as info:
        m.update(saliency, gt, valid)
    assert quoted in str(info.value)
    assert len(m) == 0  # nothing was accumulated


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"beta2": 0.0}, "beta2"),
        ({"weighted_beta2": -1.0}, "weighted_beta2"),
        ({"empty_gt": "one"}, "empty_gt"),
    ],
)
def test_bad_constructor_arguments(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=f"'{name}'"):
        SetMetrics(**kwargs)


def test_compute_without_images_raises() -> None:
    with pytest.raises(ValueError, match="update"):
        SetMetrics().compute()


def test_float_maps_with_ties_agree_with_py_sod_metrics() -> None:
    """Float saliency fed unnormalised (normalize=False): exact 0.5 values and threshold ties."""
    rng = np.random.default_rng(13)
    shape = (30, 40)
    gt = rng.random(shape) < 0.4
    tie = np.where(rng.permutation(np.arange(gt.size) % 2 == 0).reshape(shape), 0.5, 0.0)  # 2·mean = 0.5
    levels = rng.choice([0.0, 0.25, 0.5, 0.75, 1.0], size=shape)
    phi_map = saliency_from_phi(signed_distance(gt) + rng.normal(0, 1, shape).astype(np.float32)).astype(
        np.float64
    )
    maps = [tie, levels, phi_map]
    assert np.all(tie.mean() * 2 == 0.5) and (levels == 0.5).any()
    v2 = psm.FmeasureV2(
        {
            "iou": psm.IOUHandler(False, False, with_binary=True, sample_based=False),
            "fm": psm.FmeasureHandler(False, True, beta=0.3),
        }
    )
    wfm = psm.WeightedFmeasure()
    ours = SetMetrics()
    for s in maps:
        v2.step(s, gt, normalize=False)
        wfm.step(s, gt, normalize=False)
        ours.update(s, gt)
    res, out = v2.get_results(), ours.compute()
    assert out["iou"] == pytest.approx(float(res["iou"]["binary"]), abs=TOL)
    assert out["adaptive_fbeta_mean_per_image"] == pytest.approx(float(res["fm"]["adaptive"]), abs=TOL)
    assert out["weighted_fbeta"] == pytest.approx(float(wfm.get_results()["wfm"]), abs=TOL)
    # on the tie map every 0.5 pixel is positive at the adaptive threshold (≥) and negative at 0.5 (>)
    one = SetMetrics()
    one.update(tie, gt)
    assert one.compute()["iou"] == 0.0 and one.compute()["adaptive_fbeta"] > 0.2
