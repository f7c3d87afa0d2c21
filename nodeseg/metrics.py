"""Segmentation metrics over a whole set, as the paper reports them (IoU, adaptive Fβ, weighted Fβ).

Every per-image quantity follows py_sod_metrics 1.6.2 (``FmeasureV2`` handlers, ``WeightedFmeasure``) to
floating-point rounding; the pooled ("over the set") values sum TP/FP/FN over images before dividing.
A ratio whose denominator is 0 is 0, as in py_sod_metrics.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from scipy.ndimage import correlate, distance_transform_edt

from nodeseg.errors import check_arg

__all__ = ["SetMetrics", "adaptive_threshold", "matlab_gaussian_kernel", "weighted_fbeta"]

EPS = float(np.spacing(1))  # MATLAB's eps, as in Margolin's code and py_sod_metrics
EMPTY_GT_RULES = ("zero", "skip")


def matlab_gaussian_kernel(size: int = 7, sigma: float = 5.0) -> np.ndarray:
    """MATLAB's ``fspecial('gaussian', size, sigma)``: a normalised ``(size, size)`` Gaussian."""
    half = (size - 1) / 2
    y, x = np.ogrid[-half : half + 1, -half : half + 1]
    h = np.exp(-(x * x + y * y) / (2.0 * sigma * sigma))
    h[h < np.finfo(h.dtype).eps * h.max()] = 0
    return h / h.sum()


_KERNEL = matlab_gaussian_kernel(7, 5.0)


def adaptive_threshold(saliency: np.ndarray) -> float:
    """min(2·mean(saliency), 1): the adaptive threshold; pixels ≥ it are positive."""
    return min(2.0 * float(saliency.mean()), 1.0)


def weighted_fbeta(saliency: np.ndarray, gt: np.ndarray, beta2: float = 1.0) -> float:
    """Weighted Fβ of Margolin et al. (CVPR 2014) for one image; ``gt`` must hold a foreground pixel.

    Port of the authors' MATLAB code as py_sod_metrics does it: errors of background pixels taken at
    the nearest foreground pixel, smoothed by a 7×7 σ=5 Gaussian (``imfilter`` with zero padding),
    importance B = 2 − exp(log(½)/5 · distance) on the background, and
    Q = (1+β²)·R·P / (R + β²·P + eps). ``beta2`` is β² (MATLAB hard-codes β = 1).
    """
    sal = np.asarray(saliency, dtype=np.float64)
    fg = np.asarray(gt, dtype=bool)
    n_fg = int(np.count_nonzero(fg))
    check_arg(n_fg > 0, "gt", "an empty mask", "a mask with at least one foreground pixel")
    err = np.abs(sal - fg)
    # Foreground pixels are zeros of ~fg, so their nearest index is themselves: Et = E on the
    # foreground and E at the nearest foreground pixel on the background.
    dist, idx = distance_transform_edt(~fg, return_indices=True)
    err_t = err[idx[0], idx[1]]
    err_a = correlate(err_t, _KERNEL, mode="constant", cval=0.0)  # symmetric kernel: imfilter == conv
    min_err = np.where(fg & (err_a < err), err_a, err)
    importance = np.where(fg, 1.0, 2.0 - np.exp(math.log(0.5) / 5.0 * dist))
    err_w = min_err * importance
    err_fg = float(err_w[fg].sum())
    tp_w = n_fg - err_fg
    fp_w = float(err_w[~fg].sum())
    recall = 1.0 - err_fg / n_fg
    precision = tp_w / (tp_w + fp_w + EPS)
    return (1.0 + beta2) * recall * precision / (recall + beta2 * precision + EPS)


def _ratio(num: float, den: float) -> float:
    return num / den if den != 0 else 0.0


def _fbeta(tp: float, fp: float, fn: float, beta2: float) -> float:
    p, r = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    return _ratio((1.0 + beta2) * p * r, beta2 * p + r)


def _first_bad(bad: np.ndarray, a: np.ndarray) -> object:
    return a.flat[int(np.argmax(bad.ravel()))].item()


def _check_binary(a: np.ndarray, name: str, shape: tuple[int, ...]) -> np.ndarray:
    check_arg(a.shape == shape, name, f"array of shape {a.shape}", f"the shape of saliency {shape}")
    if a.dtype == np.bool_:
        return a
    check_arg(np.issubdtype(a.dtype, np.number), name, f"array of dtype {a.dtype}", "bool or 0/1 numbers")
    bad = ~((a == 0) | (a == 1))
    check_arg(not bad.any(), name, _first_bad(bad, a) if bad.any() else None, "binary (bool or 0/1)")
    return a != 0


def _valid_box(valid: np.ndarray) -> tuple[slice, slice]:
    """The bounding box of the valid pixels, which must fill it (padding lies outside a rectangle)."""
    rows, cols = np.flatnonzero(valid.any(axis=1)), np.flatnonzero(valid.any(axis=0))
    check_arg(rows.size > 0, "valid", "a mask with no valid pixel", "a mask with at least one valid pixel")
    box = (slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1))
    check_arg(
        bool(valid[box].all()),
        "valid",
        f"a mask that leaves holes in its bounding box {box}",
        "an axis-aligned rectangle of valid pixels (padding only outside it)",
    )
    return box


def _to_numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


class SetMetrics:
    """Accumulates segmentation metrics over a set of images; :meth:`compute` returns them.

    ``compute()`` keys (floats):

    - ``iou``: TP/(TP+FP+FN) pooled over the set, prediction ``saliency > 0.5`` (φ < 0);
      ``iou_mean_per_image``: the per-image IoU averaged.
    - ``adaptive_fbeta``: per image, positives are pixels ≥ min(2·mean(saliency), 1); TP/FP/FN pooled
      over the set, F = (1+β²)PR/(β²P+R) with β² = ``beta2``. ``adaptive_fbeta_mean_per_image``: the
      per-image F averaged (py_sod_metrics' adaptive ``fm``). A constant-0 saliency has threshold 0 and
      so marks every pixel positive, exactly as py_sod_metrics does.
    - ``weighted_fbeta``: Margolin's weighted Fβ (β² = ``weighted_beta2``) per image, averaged.
    - ``n_images``, ``n_empty_gt``: images added, and those whose ground truth is empty.

    Empty ground truth (``empty_gt``): a per-image score has no foreground to recall. ``"zero"`` (default)
    scores such an image 0 in all three per-image means, as py_sod_metrics does, so numbers are
    comparable with published SOD results (it penalises a correct empty prediction). ``"skip"`` leaves
    such images out of the per-image means (NaN if every image is empty). Pooled ``iou`` and
    ``adaptive_fbeta`` always count their false positives.

    ``valid`` (padding excluded): the valid pixels must form an axis-aligned rectangle; every metric
    is computed on that rectangle, i.e. exactly as on the unpadded image (the weighted Fβ filter and
    distance transform need a rectangular image). Anything else raises ValueError.
    """

    def __init__(
        self, beta2: float = 0.3, weighted_beta2: float = 1.0, empty_gt: Literal["zero", "skip"] = "zero"
    ) -> None:
        for name, v in (("beta2", beta2), ("weighted_beta2", weighted_beta2)):
            ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > 0
            check_arg(ok, name, v, "a positive finite number")
        check_arg(empty_gt in EMPTY_GT_RULES, "empty_gt", empty_gt, f"one of {EMPTY_GT_RULES}")
        self.beta2 = float(beta2)
        self.weighted_beta2 = float(weighted_beta2)
        self.empty_gt = empty_gt
        self._iou_counts = np.zeros(3, dtype=np.int64)  # TP, FP, FN at saliency > 0.5
        self._adp_counts = np.zeros(3, dtype=np.int64)  # TP, FP, FN at the adaptive threshold
        self._iou: list[float] = []
        self._adp: list[float] = []
        self._wfm: list[float] = []
        self._empty: list[bool] = []

    def __len__(self) -> int:
        return len(self._empty)

    def update(self, saliency: np.ndarray, gt: np.ndarray, valid: np.ndarray | None = None) -> None:
        """Add one image: ``saliency`` (H, W) in [0, 1], ``gt`` (H, W) binary, ``valid`` (H, W) binary."""
        sal = np.asarray(saliency)
        check_arg(sal.ndim == 2, "saliency", f"array of shape {sal.shape}", "a 2-D (H, W) array")
        check_arg(sal.size > 0, "saliency", f"array of shape {sal.shape}", "a non-empty array")
        check_arg(
            np.issubdtype(sal.dtype, np.number) or sal.dtype == np.bool_,
            "saliency",
            f"array of dtype {sal.dtype}",
            "numbers in [0, 1]",
        )
        sal = sal.astype(np.float64, copy=False)
        bad = ~((sal >= 0) & (sal <= 1))  # NaN fails both comparisons
        check_arg(
            not bad.any(),
            "saliency",
            _first_bad(bad, sal) if bad.any() else None,
            "numbers in [0, 1] (no NaN)",
        )
        fg = _check_binary(np.asarray(gt), "gt", sal.shape)
        if valid is not None:
            box = _valid_box(_check_binary(np.asarray(valid), "valid", sal.shape))
            sal, fg = sal[box], fg[box]

        n_fg = int(np.count_nonzero(fg))
        empty = n_fg == 0
        pred = sal > 0.5
        tp = int(np.count_nonzero(pred & fg))
        iou_counts = np.array([tp, int(np.count_nonzero(pred)) - tp, n_fg - tp], dtype=np.int64)
        pos = sal >= adaptive_threshold(sal)
        tp = int(np.count_nonzero(pos & fg))
        adp_counts = np.array([tp, int(np.count_nonzero(pos)) - tp, n_fg - tp], dtype=np.int64)
        wfm = 0.0 if empty else weighted_fbeta(sal, fg, self.weighted_beta2)

        self._iou_counts += iou_counts
        self._adp_counts += adp_counts
        self._iou.append(_ratio(int(iou_counts[0]), int(iou_counts.sum())))
        self._adp.append(_fbeta(*(int(c) for c in adp_counts), self.beta2))
        self._wfm.append(wfm)
        self._empty.append(empty)

    def update_batch(
        self,
        saliency: np.ndarray | torch.Tensor,
        gt: np.ndarray | torch.Tensor,
        valid: np.ndarray | torch.Tensor | None = None,
    ) -> None:
        """Add a ``(B, 1, H, W)`` batch (numpy arrays or tensors), image by image."""
        arrays = {"saliency": _to_numpy(saliency), "gt": _to_numpy(gt)}
        if valid is not None:
            arrays["valid"] = _to_numpy(valid)
        for name, a in arrays.items():
            check_arg(
                a.ndim == 4 and a.shape[1] == 1,
                name,
                f"array of shape {a.shape}",
                "an array of shape (B, 1, H, W)",
            )
        n = arrays["saliency"].shape[0]
        for name, a in arrays.items():
            check_arg(a.shape[0] == n, name, f"array of shape {a.shape}", f"a batch of {n} like saliency")
        for i in range(n):
            v = arrays["valid"][i, 0] if valid is not None else None
            self.update(arrays["saliency"][i, 0], arrays["gt"][i, 0], v)

    def _per_image_mean(self, values: list[float]) -> float:
        keep = [v for v, e in zip(values, self._empty, strict=True) if not (e and self.empty_gt == "skip")]
        return float(np.mean(keep)) if keep else math.nan

    def compute(self) -> dict[str, float]:
        """The metrics of the images added so far (see the class docstring for the keys)."""
        if not self._empty:
            raise ValueError("SetMetrics.compute() needs at least one image: call update() first")
        tp, fp, fn = (int(c) for c in self._iou_counts)
        a_tp, a_fp, a_fn = (int(c) for c in self._adp_counts)
        return {
            "iou": _ratio(tp, tp + fp + fn),
            "iou_mean_per_image": self._per_image_mean(self._iou),
            "adaptive_fbeta": _fbeta(a_tp, a_fp, a_fn, self.beta2),
            "adaptive_fbeta_mean_per_image": self._per_image_mean(self._adp),
            "weighted_fbeta": self._per_image_mean(self._wfm),
            "n_images": float(len(self._empty)),
            "n_empty_gt": float(sum(self._empty)),
        }
