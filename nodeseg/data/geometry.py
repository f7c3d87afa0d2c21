"""Geometry of the phantom renderer in millimetres: a slice's pixel grid, soft blobs and segments painted on it,
smooth random fields. x runs toward higher columns, y toward higher rows; (0, 0) is the image centre.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["Blob", "Grid", "linear_weights", "paint", "paint_segment", "smooth_field", "wobble"]


class Grid:
    """Pixel-centre coordinates in mm of one (H, W) slice, centred on the image centre."""

    def __init__(self, shape: tuple[int, int], spacing: tuple[float, float]) -> None:
        self.shape = shape
        self.dy, self.dx = spacing
        self.y = (np.arange(shape[0], dtype=np.float32) - (shape[0] - 1) / 2) * self.dy
        self.x = (np.arange(shape[1], dtype=np.float32) - (shape[1] - 1) / 2) * self.dx

    def window(self, cx: float, cy: float, r: float) -> tuple[slice, slice] | None:
        """Row/col slices covering the square of half-side ``r`` mm around (cx, cy), or None if outside."""
        h, w = self.shape
        r0 = max(0, int(math.floor((cy - r) / self.dy + (h - 1) / 2)))
        r1 = min(h, int(math.ceil((cy + r) / self.dy + (h - 1) / 2)) + 1)
        c0 = max(0, int(math.floor((cx - r) / self.dx + (w - 1) / 2)))
        c1 = min(w, int(math.ceil((cx + r) / self.dx + (w - 1) / 2)) + 1)
        if r0 >= r1 or c0 >= c1:
            return None
        return slice(r0, r1), slice(c0, c1)

    def to_pixel(self, x: float, y: float) -> tuple[float, float]:
        return y / self.dy + (self.shape[0] - 1) / 2, x / self.dx + (self.shape[1] - 1) / 2


@dataclass(frozen=True)
class Blob:
    """A rotated ellipse with a wobbly outline: (cx, cy) centre, (a, b) semi-axes in mm, angle in rad."""

    cx: float
    cy: float
    a: float
    b: float
    angle: float = 0.0
    harmonics: tuple[tuple[int, float, float], ...] = ()  # (k, amplitude, phase)

    def mask(self, grid: Grid) -> tuple[tuple[slice, slice], np.ndarray] | None:
        if self.a <= 0 or self.b <= 0:
            return None
        grow = 1.0 + sum(abs(h[1]) for h in self.harmonics)
        win = grid.window(self.cx, self.cy, max(self.a, self.b) * grow)
        if win is None:
            return None
        ys, xs = grid.y[win[0]][:, None] - self.cy, grid.x[win[1]][None, :] - self.cx
        c, s = math.cos(self.angle), math.sin(self.angle)
        u = (xs * c + ys * s) / self.a
        v = (-xs * s + ys * c) / self.b
        rho2 = u * u + v * v
        if self.harmonics:
            alpha = np.arctan2(v, u)
            r = np.ones_like(alpha)
            for k, amp, ph in self.harmonics:
                r += amp * np.cos(k * alpha + ph)
            inside = rho2 <= r * r
        else:
            inside = rho2 <= 1.0
        return win, inside


def paint(img: np.ndarray, grid: Grid, blob: Blob, value: float | np.ndarray,
           within: np.ndarray | None = None) -> None:
    """Set ``img`` to ``value`` inside ``blob`` (and inside ``within`` if given); ``value`` scalar or full-size."""
    got = blob.mask(grid)
    if got is None:
        return
    win, inside = got
    if within is not None:
        inside = inside & within[win]
    sub = img[win]
    if isinstance(value, np.ndarray):
        sub[inside] = value[win][inside]
    else:
        sub[inside] = value


def paint_segment(img: np.ndarray, grid: Grid, p: tuple[float, float], q: tuple[float, float],
                   width: float, value: float) -> None:
    """Set ``img`` to ``value`` within ``width``/2 mm of the segment p–q."""
    cx, cy = (p[0] + q[0]) / 2, (p[1] + q[1]) / 2
    half = math.hypot(q[0] - p[0], q[1] - p[1]) / 2 + width
    win = grid.window(cx, cy, half)
    if win is None:
        return
    ys, xs = grid.y[win[0]][:, None], grid.x[win[1]][None, :]
    dx, dy = q[0] - p[0], q[1] - p[1]
    length2 = dx * dx + dy * dy
    if length2 == 0:
        return
    t = np.clip(((xs - p[0]) * dx + (ys - p[1]) * dy) / length2, 0.0, 1.0)
    d2 = (xs - p[0] - t * dx) ** 2 + (ys - p[1] - t * dy) ** 2
    img[win][d2 <= (width / 2) ** 2] = value


def linear_weights(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) weights of ``ndimage.zoom(order=1, grid_mode=False)`` from ``n_in`` samples to an axis
    of ``round(n_in * n_out / (n_in - 1))`` samples, keeping its first ``n_out`` (what ``smooth_field`` crops)."""
    full = int(round(n_in * n_out / (n_in - 1)))
    pos = np.arange(n_out, dtype=np.float64) * ((n_in - 1) / max(full - 1, 1))
    lo = np.minimum(np.floor(pos).astype(np.intp), n_in - 2)
    frac = pos - lo
    w = np.zeros((n_out, n_in), dtype=np.float32)
    rows = np.arange(n_out)
    w[rows, lo] = 1.0 - frac
    w[rows, lo + 1] += frac
    return w


def smooth_field(rng: np.random.Generator, shape: tuple[int, int], cell: int) -> np.ndarray:
    """A smooth random field of unit-ish std: coarse Gaussian noise upsampled bilinearly.

    The bilinear upsampling is separable, so it is two small matrix products (the same values as
    ``ndimage.zoom(order=1, grid_mode=False)`` cropped to ``shape``, at a tenth of its cost).
    """
    ch, cw = max(2, shape[0] // cell + 2), max(2, shape[1] // cell + 2)
    coarse = rng.standard_normal((ch, cw)).astype(np.float32)
    return linear_weights(shape[0], ch) @ coarse @ linear_weights(shape[1], cw).T


def wobble(rng: np.random.Generator, amp: float) -> tuple[tuple[int, float, float], ...]:
    return tuple((k, float(rng.uniform(0, amp)), float(rng.uniform(0, 2 * np.pi))) for k in (2, 3, 4))
