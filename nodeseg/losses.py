"""Training loss: mean squared error between narrow-band (tanh) level sets over the valid pixels.

Images ``(B, 1, H, W)`` or volumes ``(B, 1, D, H, W)`` (a pixel is then a voxel): the reductions run over
every axis but the batch's, so 2-D sums the same values in the same order as before volumes were allowed.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from nodeseg.errors import check_arg
from nodeseg.levelset import narrow_band

__all__ = ["balanced_mean", "narrow_band_mse", "narrow_band_sums"]

_REDUCTIONS = ("mean", "none", "sum")


def _check_phi(t: Tensor, name: str) -> None:
    check_arg(isinstance(t, Tensor), name, type(t).__name__, "a torch.Tensor")
    check_arg(t.ndim in (4, 5) and t.shape[1] == 1, name, tuple(t.shape),
              "a tensor of shape (B, 1, H, W) or (B, 1, D, H, W)")
    check_arg(t.is_floating_point(), name, t.dtype, "a floating-point tensor")


def _all_axes(t: Tensor) -> tuple[int, ...]:
    return tuple(range(t.ndim))


def _sample_axes(t: Tensor) -> tuple[int, ...]:
    """Every axis but the batch's: (1, 2, 3) for images, (1, 2, 3, 4) for volumes."""
    return tuple(range(1, t.ndim))


def narrow_band_mse(
    phi_pred: Tensor,
    phi_true: Tensor,
    valid: Tensor | None = None,
    width: float = 1.0,
    reduction: Literal["mean", "none", "sum"] = "mean",
    balance: bool = False,
) -> Tensor:
    """Mean of (tanh(φ̂/width) − tanh(φ/width))² over the valid pixels.

    ``balance``: the class-balanced mean instead, ½·(mean inside the object) + ½·(mean outside), the object
    being φ < 0 (:func:`balanced_mean`); ``"mean"`` pools the batch, ``"none"`` balances each sample (a
    ``"sum"`` cannot be balanced: use :func:`narrow_band_sums`).

    Shapes ``(B, 1, H, W)`` (or ``(B, 1, D, H, W)``). ``valid`` (same shape, bool or 0/1; non-zero counts as valid) leaves padded
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
    check_arg(not (balance and reduction == "sum"), "reduction", reduction,
              "'mean' or 'none' with balance=True (narrow_band_sums gives the two sums)")
    phi_true = phi_true.to(phi_pred.dtype)
    if balance:
        dims = _all_axes(phi_pred) if reduction == "mean" else _sample_axes(phi_pred)
        s_in, s_out, n_in, n_out = _class_sums(phi_pred, phi_true, valid, width, dims)
        return balanced_mean(s_in, s_out, n_in, n_out)

    if valid is None:
        sq = (narrow_band(phi_pred, width) - narrow_band(phi_true, width)) ** 2
        if reduction == "sum":
            return sq.sum()
        return sq.mean() if reduction == "mean" else sq.mean(dim=_sample_axes(sq))

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
    axes = _sample_axes(sq)
    return sq.sum(dim=axes) / keep.sum(dim=axes).clamp(min=1).to(sq.dtype)


def _class_sums(
    phi_pred: Tensor, phi_true: Tensor, valid: Tensor | None, width: float, dims: tuple[int, ...]
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    keep = torch.ones_like(phi_true, dtype=torch.bool) if valid is None else (
        valid if valid.dtype == torch.bool else valid != 0)
    zero = phi_pred.new_zeros(())
    sq = (narrow_band(torch.where(keep, phi_pred, zero), width)
          - narrow_band(torch.where(keep, phi_true, zero), width)) ** 2  # 0 on padded pixels
    inside = keep & (phi_true < 0)
    s_in = torch.where(inside, sq, zero).sum(dim=dims)
    s_out = sq.sum(dim=dims) - s_in
    n_in = inside.sum(dim=dims).to(sq.dtype)
    return s_in, s_out, n_in, keep.sum(dim=dims).to(sq.dtype) - n_in


def narrow_band_sums(
    phi_pred: Tensor, phi_true: Tensor, valid: Tensor | None = None, width: float = 1.0
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(Σ inside, Σ outside) of the squared narrow-band error over the valid pixels, and the two pixel counts.

    Inside is φ < 0. Data-parallel training sums these over ranks before :func:`balanced_mean`.
    """
    _check_phi(phi_pred, "phi_pred")
    _check_phi(phi_true, "phi_true")
    return _class_sums(phi_pred, phi_true.to(phi_pred.dtype), valid, width, _all_axes(phi_pred))


def balanced_mean(s_in: Tensor, s_out: Tensor, n_in: Tensor | float, n_out: Tensor | float) -> Tensor:
    """½·s_in/n_in + ½·s_out/n_out; where one class has no pixel, the other's mean alone (0 with none)."""
    n_in = torch.as_tensor(n_in, dtype=s_in.dtype, device=s_in.device)
    n_out = torch.as_tensor(n_out, dtype=s_in.dtype, device=s_in.device)
    m_in, m_out = s_in / n_in.clamp(min=1), s_out / n_out.clamp(min=1)
    both = (n_in > 0) & (n_out > 0)
    return torch.where(both, 0.5 * (m_in + m_out), torch.where(n_in > 0, m_in, m_out))
