"""Training loss: mean squared error between narrow-band (tanh) level sets over the valid pixels."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from nodeseg.errors import check_arg
from nodeseg.levelset import narrow_band

__all__ = ["narrow_band_mse"]

_REDUCTIONS = ("mean", "none", "sum")


def _check_phi(t: Tensor, name: str) -> None:
    check_arg(isinstance(t, Tensor), name, type(t).__name__, "a torch.Tensor")
    check_arg(t.ndim == 4 and t.shape[1] == 1, name, tuple(t.shape), "a tensor of shape (B, 1, H, W)")
    check_arg(t.is_floating_point(), name, t.dtype, "a floating-point tensor")


def narrow_band_mse(
    phi_pred: Tensor,
    phi_true: Tensor,
    valid: Tensor | None = None,
    width: float = 1.0,
    reduction: Literal["mean", "none", "sum"] = "mean",
) -> Tensor:
    """Mean of (tanh(φ̂/width) − tanh(φ/width))² over the valid pixels.

    Shapes ``(B, 1, H, W)``. ``valid`` (same shape, bool or 0/1; non-zero counts as valid) leaves padded
    pixels out: they neither change the loss nor receive gradient, even if φ there is NaN.
    ``reduction="mean"`` pools all valid pixels of the batch (sum / valid count) into a scalar;
    ``"none"`` gives each sample's own valid-pixel mean, shape ``(B,)``; ``"sum"`` the sum over valid pixels
    (data-parallel training divides it by the valid count of the global batch). With no valid pixel the
    result is 0 (still attached to the graph), never NaN.
    """
    _check_phi(phi_pred, "phi_pred")
    _check_phi(phi_true, "phi_true")
    check_arg(
        phi_true.shape == phi_pred.shape,
        "phi_true",
        tuple(phi_true.shape),
        f"the shape of phi_pred {tuple(phi_pred.shape)}",
    )
    check_arg(
        isinstance(width, int | float) and not isinstance(width, bool) and math.isfinite(width) and width > 0,
        "width",
        width,
        "a positive finite number",
    )
    check_arg(reduction in _REDUCTIONS, "reduction", reduction, f"one of {_REDUCTIONS}")
    phi_true = phi_true.to(phi_pred.dtype)

    if valid is None:
        sq = (narrow_band(phi_pred, width) - narrow_band(phi_true, width)) ** 2
        if reduction == "sum":
            return sq.sum()
        return sq.mean() if reduction == "mean" else sq.mean(dim=(1, 2, 3))

    check_arg(isinstance(valid, Tensor), "valid", type(valid).__name__, "None or a torch.Tensor")
    check_arg(
        valid.shape == phi_pred.shape,
        "valid",
        tuple(valid.shape),
        f"the shape of phi_pred {tuple(phi_pred.shape)}",
    )
    keep = valid if valid.dtype == torch.bool else valid != 0
    # Mask the inputs, not the squared error: a NaN/inf at a padded pixel then never reaches the sum
    # or the backward pass (where() routes zero gradient to the unselected branch).
    zero = phi_pred.new_zeros(())
    diff = narrow_band(torch.where(keep, phi_pred, zero), width) - narrow_band(
        torch.where(keep, phi_true, zero), width
    )
    sq = diff**2  # exactly 0 on padded pixels
    if reduction == "sum":
        return sq.sum()
    if reduction == "mean":
        return sq.sum() / keep.sum().clamp(min=1).to(sq.dtype)
    return sq.sum(dim=(1, 2, 3)) / keep.sum(dim=(1, 2, 3)).clamp(min=1).to(sq.dtype)
