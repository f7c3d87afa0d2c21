"""Boundary metrics of one predicted mask against its ground truth, computed by MONAI.

Dice, the 95th-percentile Hausdorff distance and the average (symmetric) surface distance in millimetres
(the image's pixel spacing), MONAI's normalised surface Dice at 1 and 2 pixels (the boundary F-score of
Nikolov et al. 2021: the share of both boundaries within the tolerance of the other), and the number of
connected components (8-connected in 2-D, scipy) of each mask. The surface distances are MONAI's
(``compute_hausdorff_distance``, ``compute_average_surface_distance``, ``compute_surface_dice``), not
hand-written ones.

Empty masks, where the distances are undefined: an empty ground truth leaves the distances NaN (such
an image is left out of their means), with Dice 1 for an empty prediction and 0 otherwise; an empty
prediction of a non-empty ground truth scores Dice 0, surface Dice 0 and, for HD95 and ASD, the image's
diagonal in mm (the largest distance the image can hold), so that a model that misses an object is never
rewarded by leaving it out of the mean.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from scipy import ndimage

from nodeseg.errors import check_arg

__all__ = ["BOUNDARY_KEYS", "boundary_scores", "count_components", "summarise_boundary"]

#: the per-image keys :func:`boundary_scores` returns
BOUNDARY_KEYS = ("dice", "hd95_mm", "asd_mm", "nsd_1px", "nsd_2px", "components_pred", "components_gt")


def count_components(mask: np.ndarray) -> int:
    """Connected components of a binary mask (8-connectivity in 2-D, 26 in 3-D)."""
    structure = np.ones((3,) * mask.ndim, dtype=bool)
    return int(ndimage.label(mask, structure=structure)[1])


def _monai(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float]) -> tuple[float, float, float, float]:
    from monai.metrics import (
        compute_average_surface_distance,
        compute_hausdorff_distance,
        compute_surface_dice,
    )

    p = torch.from_numpy(np.ascontiguousarray(pred))[None, None]
    g = torch.from_numpy(np.ascontiguousarray(gt))[None, None]
    sp = [float(s) for s in spacing]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # both masks are non-empty here: MONAI's empty-mask warnings cannot apply
        hd95 = compute_hausdorff_distance(p, g, include_background=True, percentile=95, spacing=sp)
        asd = compute_average_surface_distance(p, g, include_background=True, symmetric=True, spacing=sp)
        nsd1 = compute_surface_dice(p, g, [1.0], include_background=True)
        nsd2 = compute_surface_dice(p, g, [2.0], include_background=True)
    return float(hd95), float(asd), float(nsd1), float(nsd2)


def boundary_scores(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] = (1.0, 1.0)) -> dict[str, float]:
    """The boundary metrics of one image (keys :data:`BOUNDARY_KEYS`; empty masks: see the module docstring).

    ``pred`` and ``gt`` are binary arrays of one shape (2-D or 3-D); ``spacing`` the pixel size in mm per axis.
    """
    pred = np.asarray(pred).astype(bool, copy=False)
    gt = np.asarray(gt).astype(bool, copy=False)
    check_arg(pred.shape == gt.shape, "gt", f"array of shape {gt.shape}", f"the shape of pred {pred.shape}")
    check_arg(pred.ndim in (2, 3), "pred", f"array of shape {pred.shape}", "a 2-D or 3-D mask")
    spacing = tuple(float(s) for s in spacing)
    check_arg(len(spacing) == pred.ndim and all(math.isfinite(s) and s > 0 for s in spacing), "spacing",
              spacing, f"{pred.ndim} positive finite numbers")
    n_pred, n_gt = int(pred.sum()), int(gt.sum())
    out = {"components_pred": float(count_components(pred)), "components_gt": float(count_components(gt))}
    inter = int(np.count_nonzero(pred & gt))
    out["dice"] = 2.0 * inter / (n_pred + n_gt) if n_pred + n_gt else 1.0
    if n_gt == 0:
        out.update(hd95_mm=math.nan, asd_mm=math.nan, nsd_1px=math.nan, nsd_2px=math.nan)
    elif n_pred == 0:
        diagonal = float(np.sqrt(sum((n * s) ** 2 for n, s in zip(pred.shape, spacing, strict=True))))
        out.update(hd95_mm=diagonal, asd_mm=diagonal, nsd_1px=0.0, nsd_2px=0.0)
    else:
        hd95, asd, nsd1, nsd2 = _monai(pred, gt, spacing)
        out.update(hd95_mm=hd95, asd_mm=asd, nsd_1px=nsd1, nsd_2px=nsd2)
    return {k: out[k] for k in BOUNDARY_KEYS}


def summarise_boundary(rows: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Means over images of :func:`boundary_scores` rows (NaN distances left out) and the component error.

    ``components_error``: the mean of |components(pred) − components(gt)|; ``n_empty_pred``: images whose
    prediction is empty while their ground truth is not.
    """
    rows = list(rows)
    check_arg(len(rows) > 0, "rows", "no rows", "at least one image's scores")

    def mean(values: list[float]) -> float:
        kept = [v for v in values if not math.isnan(v)]
        return float(np.mean(kept)) if kept else math.nan

    out = {k: mean([r[k] for r in rows]) for k in ("dice", "hd95_mm", "asd_mm", "nsd_1px", "nsd_2px")}
    out["components_error"] = float(np.mean([abs(r["components_pred"] - r["components_gt"]) for r in rows]))
    out["n_empty_pred"] = float(sum(1 for r in rows if r["components_pred"] == 0 and r["components_gt"] > 0))
    return out
