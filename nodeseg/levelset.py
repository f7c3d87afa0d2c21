"""Level-set representation of masks: signed distance, narrow band, saliency and zero contours.

Sign convention (docs/architecture.md): φ < 0 inside, φ > 0 outside, the boundary half a pixel outside
the last foreground pixel, so a pixel is foreground iff φ < 0.

``signed_distance`` and ``signed_distance_batch`` take ``spatial_dims`` (2, the default: images; 3: volumes,
``(D, H, W)`` masks and a (slice, row, col) ``spacing``): the same code on 2 or 3 axes.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from scipy.ndimage import distance_transform_edt
from scipy.special import expit
from skimage.measure import find_contours

from nodeseg.errors import check_arg

if TYPE_CHECKING:
    import torch

ArrayT = TypeVar("ArrayT", np.ndarray, "torch.Tensor")

__all__ = [
    "narrow_band",
    "saliency_from_phi",
    "signed_distance",
    "signed_distance_batch",
    "zero_contours",
]


def _first_non_binary(a: np.ndarray) -> object | None:
    """The first value of ``a`` that is neither 0 nor 1 (NaN included), or None."""
    if a.dtype == np.bool_:
        return None
    bad = ~((a == 0) | (a == 1))
    if not bad.any():
        return None
    return a.flat[int(np.argmax(bad.ravel()))].item()


def _as_binary_mask(mask: object, name: str, ndim: int) -> np.ndarray:
    """``mask`` as a bool array of ``ndim`` dimensions; ValueError naming ``name`` otherwise."""
    a = np.asarray(mask)
    check_arg(a.ndim == ndim, name, f"array of shape {a.shape}", f"a {ndim}-D array")
    check_arg(a.size > 0, name, f"array of shape {a.shape}", "a non-empty array")
    check_arg(
        a.dtype == np.bool_ or np.issubdtype(a.dtype, np.number),
        name,
        f"array of dtype {a.dtype}",
        "bool or numeric with values 0 and 1",
    )
    bad = _first_non_binary(a)
    check_arg(bad is None, name, bad, "binary (bool, or numbers that are all 0 or 1)")
    return a.astype(bool, copy=False)


def _is_positive_number(x: object) -> bool:
    ok = isinstance(x, int | float | np.integer | np.floating) and not isinstance(x, bool | np.bool_)
    return ok and math.isfinite(x) and x > 0  # type: ignore[arg-type, operator]


_SPACING_AXES = {2: "(row, col) with two", 3: "(slice, row, col) with three"}


def _check_spatial_dims(spatial_dims: object) -> int:
    ok = isinstance(spatial_dims, int) and not isinstance(spatial_dims, bool) and spatial_dims in _SPACING_AXES
    check_arg(ok, "spatial_dims", spatial_dims, "2 (images) or 3 (volumes)")
    return int(spatial_dims)  # type: ignore[arg-type]


def _check_spacing(spacing: Sequence[float] | None, spatial_dims: int = 2) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * spatial_dims
    ok = (
        isinstance(spacing, Sequence | np.ndarray)
        and len(spacing) == spatial_dims
        and all(map(_is_positive_number, spacing))
    )
    check_arg(ok, "spacing", spacing, f"None or {_SPACING_AXES[spatial_dims]} positive finite numbers")
    return tuple(float(d) for d in spacing)


def _check_positive(value: float, name: str) -> float:
    check_arg(_is_positive_number(value), name, value, "a positive finite number")
    return float(value)


def signed_distance(
    mask: np.ndarray, spacing: Sequence[float] | None = None, clip: float = 32.0, spatial_dims: int = 2
) -> np.ndarray:
    """Signed distance φ (float32, same shape) of a 2-D binary mask (3-D with ``spatial_dims=3``): φ < 0
    inside, φ > 0 outside.

    φ = EDT(background) − h on background pixels and −(EDT(foreground) − h) on foreground pixels, with
    ``scipy.ndimage.distance_transform_edt`` (``sampling=spacing`` when given, so φ is then in the units
    of ``spacing``) and h = ½·min(spacing) (½ pixel without spacing), which keeps ``mask == (φ < 0)``
    for any spacing. Clipped to ±``clip``; an empty mask gives +clip everywhere, a full one −clip.
    """
    spatial_dims = _check_spatial_dims(spatial_dims)
    fg = _as_binary_mask(mask, "mask", spatial_dims)
    sampling = _check_spacing(spacing, spatial_dims)
    clip = _check_positive(clip, "clip")
    if not fg.any():
        return np.full(fg.shape, clip, dtype=np.float32)
    if fg.all():
        return np.full(fg.shape, -clip, dtype=np.float32)
    half = 0.5 * min(sampling)
    kw = {"sampling": sampling} if spacing is not None else {}
    # Only pixels within clip + half of the foreground's bounding box can have |φ| < clip, and the nearest
    # background of a foreground pixel with |φ| < clip lies there too: the transforms run on that window
    # (the same values, a fraction of the work for small objects); everything outside it is +clip.
    win = _window(fg, clip + half, sampling)
    sub = fg[win]
    outside = distance_transform_edt(~sub, **kw)  # distance of background pixels to the nearest foreground
    inside = distance_transform_edt(sub, **kw)  # distance of foreground pixels to the nearest background
    phi = np.full(fg.shape, clip, dtype=np.float32)
    phi[win] = np.clip(np.where(sub, half - inside, outside - half), -clip, clip)
    return phi


def _window(fg: np.ndarray, reach: float, sampling: tuple[float, ...]) -> tuple[slice, ...]:
    """The bounding box of ``fg`` grown on each side by more than ``reach`` (in the units of ``sampling``)."""
    out = []
    for axis, d in enumerate(sampling):
        idx = np.flatnonzero(fg.any(axis=tuple(a for a in range(fg.ndim) if a != axis)))
        grow = int(math.ceil(reach / d)) + 1
        out.append(slice(max(int(idx[0]) - grow, 0), min(int(idx[-1]) + grow + 1, fg.shape[axis])))
    return tuple(out)


def signed_distance_batch(
    masks: np.ndarray, spacing: Sequence[float] | None = None, clip: float = 32.0, spatial_dims: int = 2
) -> np.ndarray:
    """:func:`signed_distance` of each mask of a ``(B, H, W)`` or ``(B, 1, H, W)`` stack (``(B, D, H, W)`` or
    ``(B, 1, D, H, W)`` with ``spatial_dims=3``); same shape."""
    spatial_dims = _check_spatial_dims(spatial_dims)
    a = np.asarray(masks)
    n = spatial_dims + 1
    ok = a.ndim == n or (a.ndim == n + 1 and a.shape[1] == 1)
    axes = "H, W" if spatial_dims == 2 else "D, H, W"
    check_arg(ok, "masks", f"array of shape {a.shape}", f"an array of shape (B, {axes}) or (B, 1, {axes})")
    flat = a.reshape((a.shape[0], *a.shape[-spatial_dims:]))
    out = np.empty(flat.shape, dtype=np.float32)
    for i, m in enumerate(flat):
        out[i] = signed_distance(m, spacing=spacing, clip=clip, spatial_dims=spatial_dims)
    return out.reshape(a.shape)


def _torch_of(x: object) -> Any:
    """The torch module when ``x`` is a torch tensor, else None (torch is not imported to find out: the
    numpy functions here run in ingest workers that never load it)."""
    torch = sys.modules.get("torch")
    return torch if torch is not None and isinstance(x, torch.Tensor) else None


def narrow_band(phi: ArrayT, width: float = 1.0) -> ArrayT:
    """tanh(φ / width): the level set squashed to (−1, 1), saturated away from the boundary."""
    width = _check_positive(width, "width")
    if (torch := _torch_of(phi)) is not None:
        return torch.tanh(phi / width)
    check_arg(isinstance(phi, np.ndarray), "phi", type(phi).__name__, "a numpy array or a torch tensor")
    return np.tanh(phi / width)


def saliency_from_phi(phi: ArrayT, width: float = 1.0) -> ArrayT:
    """(1 − tanh(φ / width)) / 2 ∈ [0, 1]: foreground probability, > ½ where φ < 0.

    Computed as sigmoid(−2φ / width), the same function without the cancellation of 1 − tanh.
    """
    width = _check_positive(width, "width")
    if (torch := _torch_of(phi)) is not None:
        return torch.sigmoid(phi * (-2.0 / width))
    check_arg(isinstance(phi, np.ndarray), "phi", type(phi).__name__, "a numpy array or a torch tensor")
    return expit(phi * (-2.0 / width))


def zero_contours(phi: np.ndarray) -> list[np.ndarray]:
    """The zero level set of a 2-D φ as ``(N, 2)`` (row, col) polylines (skimage ``find_contours``)."""
    a = np.asarray(phi)
    check_arg(a.ndim == 2, "phi", f"array of shape {a.shape}", "a 2-D array")
    check_arg(
        np.issubdtype(a.dtype, np.number) and bool(np.isfinite(a).all()),
        "phi",
        f"array of dtype {a.dtype}",
        "finite numbers",
    )
    return find_contours(a.astype(np.float64, copy=False), 0.0)
