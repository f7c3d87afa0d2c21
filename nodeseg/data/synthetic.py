"""Phantom CT cases in the KiTS19 layout, and pseudo-CT for real KiTS19 label volumes.

Both paths share one renderer: given a label volume (0 background, 1 kidney, 2 tumour) it lays out an
abdomen around the kidneys in millimetres — body outline with subcutaneous fat and muscle wall, a cluttered
fat / soft-tissue background, spine and psoas, aorta and IVC with renal vessels running into the hilum,
liver and spleen pressed against the upper poles, bowel loops (half of them touching a kidney, some filled
with positive oral contrast) — then paints cortex, medulla and tumour from the labels, adds a smooth bias
field, blurs with a Gaussian PSF and adds white plus correlated noise. The distractor organs sit
``contrast_hu`` below the kidney cortex, so the kidney outline is a weak edge against several neighbours;
that is what keeps a plain UNet well below IoU 0.97 (see ``PhantomConfig``).

Phantom label volumes add two bean-shaped kidneys (ellipsoid profile along the slices, rotated, with a
hilum notch and a wobbly outline) and, with ``tumour_probability``, a spherical tumour on each.

Arrays are (slices, H, W) like the interpolated KiTS19 release: slice 0 superior, rows run anterior to
posterior, columns toward the patient's right (the release's affine ``[[0, 0, -dx], [0, -dy, 0], [-dz, 0,
0]]``, which :func:`kits_affine` reproduces).
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from nodeseg.atomic import atomic_dir
from nodeseg.data.kits19 import IMAGING, SEGMENTATION, list_cases, open_case
from nodeseg.errors import InputError, check_arg

__all__ = [
    "PhantomConfig",
    "kits_affine",
    "phantom_labels",
    "synthesize_imaging",
    "write_phantom_cases",
    "write_pseudo_ct_cases",
]

KITS_SPACING = (3.0, 0.781625, 0.781625)
AIR_HU, FAT_HU, SOFT_HU, MUSCLE_HU, BONE_HU = -1000.0, -95.0, 30.0, 50.0, 500.0


@dataclass(frozen=True)
class PhantomConfig:
    """Phantom geometry (n_cases, n_slices, shape, spacing) and appearance (the difficulty knobs).

    Appearance knobs also drive the pseudo-CT of real labels. Difficulty grows with ``noise_hu``,
    ``texture_hu``, ``blur_mm``, ``bias_hu`` and ``n_distractors``, and as ``contrast_hu`` (kidney
    cortex minus distractor organs) shrinks. Measured with the defaults (24 cases of 256² at 1.5625 mm,
    ingested at 128², a 4-level UNet of 16–128 channels, Adam 1e-3, batch 8, CPU): val IoU 0.72 after
    600 steps, 0.77–0.81 from 900 to 2300 steps; with noise, texture, blur, bias and distractors off and
    ``contrast_hu=150`` the same UNet is at 0.89 after 290 steps.
    """

    n_cases: int = 20
    n_slices: int = 64
    shape: tuple[int, int] = (512, 512)
    spacing: tuple[float, float, float] = KITS_SPACING  # (slice, row, col) mm
    kidney_hu: float = 170.0
    medulla_hu: float = 50.0  # cortex minus medulla
    contrast_hu: float = 45.0  # cortex minus the mean of liver, spleen, bowel walls
    noise_hu: float = 45.0  # white noise std
    texture_hu: float = 25.0  # correlated (mottled) noise std
    blur_mm: float = 2.0  # Gaussian PSF sigma, in-plane
    bias_hu: float = 30.0  # amplitude of a smooth additive bias field
    n_distractors: int = 8  # bowel loops, half of them touching a kidney
    vessels: bool = True  # renal artery and vein into the hilum
    tumour_probability: float = 0.5  # per kidney

    def __post_init__(self) -> None:
        if not (isinstance(self.n_cases, int) and 1 <= self.n_cases <= 100_000):
            raise ValueError(f"n_cases must be an integer in [1, 100000], got {self.n_cases!r}")
        if not (isinstance(self.n_slices, int) and 1 <= self.n_slices <= 4096):
            raise ValueError(f"n_slices must be an integer in [1, 4096], got {self.n_slices!r}")
        if not (len(self.shape) == 2 and all(isinstance(s, int) and 16 <= s <= 4096 for s in self.shape)):
            raise ValueError(f"shape must be (H, W) with integers in [16, 4096], got {self.shape!r}")
        if not (len(self.spacing) == 3 and all(math.isfinite(s) and 0.05 <= s <= 50 for s in self.spacing)):
            raise ValueError(f"spacing must be (slice, row, col) mm, each in [0.05, 50], got {self.spacing!r}")
        for name in ("kidney_hu", "medulla_hu", "contrast_hu", "noise_hu", "texture_hu", "blur_mm", "bias_hu"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.kidney_hu > 1000:
            raise ValueError(f"kidney_hu must be <= 1000, got {self.kidney_hu!r}")
        if not (isinstance(self.n_distractors, int) and 0 <= self.n_distractors <= 64):
            raise ValueError(f"n_distractors must be an integer in [0, 64], got {self.n_distractors!r}")
        if not 0.0 <= self.tumour_probability <= 1.0:
            raise ValueError(f"tumour_probability must be in [0, 1], got {self.tumour_probability!r}")


def kits_affine(spacing: Sequence[float]) -> np.ndarray:
    """The affine of the interpolated KiTS19 release for (slice, row, col) ``spacing`` in mm."""
    dz, dy, dx = (float(s) for s in spacing)
    return np.array([[0, 0, -dx, 0], [0, -dy, 0, 0], [-dz, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64)


# --------------------------------------------------------------------------------------------------------
# geometry helpers (millimetres; x toward higher columns, y toward higher rows)


class _Grid:
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
class _Blob:
    """A rotated ellipse with a wobbly outline: (cx, cy) centre, (a, b) semi-axes in mm, angle in rad."""

    cx: float
    cy: float
    a: float
    b: float
    angle: float = 0.0
    harmonics: tuple[tuple[int, float, float], ...] = ()  # (k, amplitude, phase)

    def mask(self, grid: _Grid) -> tuple[tuple[slice, slice], np.ndarray] | None:
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


def _paint(img: np.ndarray, grid: _Grid, blob: _Blob, value: float | np.ndarray,
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


def _paint_segment(img: np.ndarray, grid: _Grid, p: tuple[float, float], q: tuple[float, float],
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


def _linear_weights(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) weights of ``ndimage.zoom(order=1, grid_mode=False)`` from ``n_in`` samples to an axis
    of ``round(n_in * n_out / (n_in - 1))`` samples, keeping its first ``n_out`` (what ``_smooth_field`` crops)."""
    full = int(round(n_in * n_out / (n_in - 1)))
    pos = np.arange(n_out, dtype=np.float64) * ((n_in - 1) / max(full - 1, 1))
    lo = np.minimum(np.floor(pos).astype(np.intp), n_in - 2)
    frac = pos - lo
    w = np.zeros((n_out, n_in), dtype=np.float32)
    rows = np.arange(n_out)
    w[rows, lo] = 1.0 - frac
    w[rows, lo + 1] += frac
    return w


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], cell: int) -> np.ndarray:
    """A smooth random field of unit-ish std: coarse Gaussian noise upsampled bilinearly.

    The bilinear upsampling is separable, so it is two small matrix products (the same values as
    ``ndimage.zoom(order=1, grid_mode=False)`` cropped to ``shape``, at a tenth of its cost).
    """
    ch, cw = max(2, shape[0] // cell + 2), max(2, shape[1] // cell + 2)
    coarse = rng.standard_normal((ch, cw)).astype(np.float32)
    return _linear_weights(shape[0], ch) @ coarse @ _linear_weights(shape[1], cw).T


def _wobble(rng: np.random.Generator, amp: float) -> tuple[tuple[int, float, float], ...]:
    return tuple((k, float(rng.uniform(0, amp)), float(rng.uniform(0, 2 * np.pi))) for k in (2, 3, 4))


# --------------------------------------------------------------------------------------------------------
# phantom labels


def phantom_labels(cfg: PhantomConfig, rng: np.random.Generator) -> np.ndarray:
    """A (n_slices, H, W) uint8 label volume: two bean-shaped kidneys (1), tumours (2) on some."""
    check_arg(isinstance(cfg, PhantomConfig), "cfg", type(cfg).__name__, "a PhantomConfig")
    dz, dy, dx = cfg.spacing
    grid = _Grid(cfg.shape, (dy, dx))
    out = np.zeros((cfg.n_slices, *cfg.shape), dtype=np.uint8)
    # scale anatomy to the field of view when it is smaller than an adult abdomen (tiny test phantoms)
    fov = min(cfg.shape[0] * dy, cfg.shape[1] * dx)
    k = min(1.0, fov / 360.0)
    bx, by = rng.normal(0, 5 * k), rng.normal(0, 5 * k)
    ky = by + rng.uniform(35, 55) * k
    z_centre = cfg.n_slices * dz / 2 + rng.normal(0, 8)
    for side in (+1, -1):  # +1: patient right (higher columns), -1: patient left
        cx = bx + side * rng.uniform(55, 75) * k
        cy = ky + rng.normal(0, 4 * k)
        zmid = z_centre + (rng.uniform(5, 20) if side < 0 else 0.0) * (-1)
        half_len = rng.uniform(45, 58)
        a, b = rng.uniform(24, 32) * k, rng.uniform(15, 21) * k
        angle = -side * np.deg2rad(rng.uniform(30, 60))
        wob = _wobble(rng, 0.05)
        drift = rng.normal(0, 4 * k, size=2)
        spin = rng.normal(0, np.deg2rad(10))
        # notch direction: perpendicular to the long axis, pointing toward the midline
        nx, ny = -math.sin(angle), math.cos(angle)
        if nx * side > 0:
            nx, ny = -nx, -ny
        tumour = None
        if rng.random() < cfg.tumour_probability:
            t_z = zmid + rng.uniform(-0.6, 0.6) * half_len
            t_alpha = rng.uniform(0, 2 * np.pi)
            t_out = rng.uniform(0.5, 1.0)
            t_r = rng.uniform(10, 30) * max(k, 0.5)
            tumour = (t_z, t_alpha, t_out, t_r, _wobble(rng, 0.04))
        for s in range(cfg.n_slices):
            z = s * dz
            t = (z - zmid) / half_len
            if abs(t) >= 1:
                continue
            p = (1 - t * t) ** 0.4
            ccx, ccy = cx + drift[0] * t, cy + drift[1] * t
            ang = angle + spin * t
            kid = _Blob(ccx, ccy, a * p, b * p, ang, wob)
            sl = out[s]
            got = kid.mask(grid)
            if got is None:
                continue
            win, inside = got
            sl[win][inside] = 1
            if abs(t) < 0.55:
                notch = _Blob(ccx + nx * b * p * 0.9, ccy + ny * b * p * 0.9, 0.45 * b * p, 0.35 * a * p, ang)
                got = notch.mask(grid)
                if got is not None:
                    nwin, ninside = got
                    sl[nwin][ninside & (sl[nwin] == 1)] = 0
        if tumour is not None:
            t_z, t_alpha, t_out, t_r, t_wob = tumour
            tt = np.clip((t_z - zmid) / half_len, -0.99, 0.99)
            p = (1 - tt * tt) ** 0.4
            ca, sa = math.cos(angle), math.sin(angle)
            ex, ey = a * p * math.cos(t_alpha) * t_out, b * p * math.sin(t_alpha) * t_out
            tcx, tcy = cx + ex * ca - ey * sa, cy + ex * sa + ey * ca
            for s in range(cfg.n_slices):
                dzs = s * dz - t_z
                if abs(dzs) >= t_r:
                    continue
                r = math.sqrt(t_r * t_r - dzs * dzs)
                got = _Blob(tcx, tcy, r, r * 0.9, angle, t_wob).mask(grid)
                if got is not None:
                    win, inside = got
                    out[s][win][inside] = 2
    return out


# --------------------------------------------------------------------------------------------------------
# rendering


@dataclass(frozen=True)
class _Side:
    present: bool
    cx: float
    cy: float
    z0: float  # first slice z (mm) with this kidney
    z1: float  # last


def _sides(seg: np.ndarray, grid: _Grid, z: np.ndarray) -> tuple[_Side, _Side]:
    """Centroid and z extent of the kidney(s) on each half of the image (patient right, left)."""
    fg = seg > 0
    h, w = seg.shape[1:]
    found = []
    for cols in (slice(w // 2, w), slice(0, w // 2)):
        part = fg[:, :, cols]
        per_slice = part.any(axis=(1, 2))
        if not per_slice.any():
            found.append(None)
            continue
        rows_w = part.sum(axis=(0, 2)).astype(np.float64)
        cols_w = part.sum(axis=(0, 1)).astype(np.float64)
        cy = float((grid.y * rows_w).sum() / rows_w.sum())
        cx = float((grid.x[cols] * cols_w).sum() / cols_w.sum())
        zs = z[per_slice]
        found.append(_Side(True, cx, cy, float(zs.min()), float(zs.max())))
    right, left = found
    zmid = float(z.mean()) if z.size else 0.0
    default_len = 90.0
    if right is None and left is None:
        right = _Side(False, 65.0, 45.0, zmid - default_len / 2, zmid + default_len / 2)
        left = _Side(False, -65.0, 45.0, zmid - default_len / 2 - 10, zmid + default_len / 2 - 10)
    elif right is None:
        assert left is not None
        right = _Side(False, -left.cx, left.cy, left.z0 + 10, left.z1 + 10)
    elif left is None:
        left = _Side(False, -right.cx, right.cy, right.z0 - 10, right.z1 - 10)
    return right, left


def _layout(seg: np.ndarray, grid: _Grid, z: np.ndarray, cfg: PhantomConfig, rng: np.random.Generator) -> dict:
    """Random abdomen around the kidneys of ``seg`` (mm): everything the per-slice renderer needs."""
    right, left = _sides(seg, grid, z)
    mid_x = (right.cx + left.cx) / 2
    kid_y = (right.cy + left.cy) / 2
    fg = seg > 0
    # body: cover every kidney pixel with a margin
    if fg.any():
        rows = np.flatnonzero(fg.any(axis=(0, 2)))
        cols = np.flatnonzero(fg.any(axis=(0, 1)))
        ext_x = max(abs(grid.x[cols[0]] - mid_x), abs(grid.x[cols[-1]] - mid_x))
        y_max = grid.y[rows[-1]]
    else:
        ext_x, y_max = 100.0, kid_y + 30
    body_cy = kid_y - rng.uniform(35, 55)
    body_a = max(rng.uniform(150, 185), ext_x + 45)
    body_b = max(rng.uniform(105, 130), y_max - body_cy + 40)
    spine_r = rng.uniform(17, 23)
    spine_y = kid_y + rng.uniform(0, 15)
    hu_k = cfg.kidney_hu
    c = cfg.contrast_hu
    lay = {
        "right": right,
        "left": left,
        "mid_x": mid_x,
        "body": (mid_x + rng.normal(0, 3), body_cy, body_a, body_b),
        "fat": rng.uniform(0.05, 0.11),
        "wall": rng.uniform(0.03, 0.05),
        "fat_frac": rng.uniform(-0.3, 0.4),
        "spine": (mid_x + rng.normal(0, 2), spine_y, spine_r),
        "psoas": rng.uniform(8, 12),
        "psoas_grow": rng.uniform(15, 25),
        "aorta": (mid_x - rng.uniform(10, 20), spine_y - spine_r - rng.uniform(12, 16), rng.uniform(9, 13),
                  hu_k + rng.uniform(10, 60)),
        "ivc": (mid_x + rng.uniform(18, 28), spine_y - spine_r - rng.uniform(8, 14), rng.uniform(9, 14),
                hu_k - rng.uniform(20, 60)),
        "vessel_width": rng.uniform(5, 8),
        "liver": (right.cx + rng.uniform(5, 35), right.cy - rng.uniform(45, 75), rng.uniform(95, 125),
                  rng.uniform(75, 95), rng.uniform(-0.3, 0.3), _wobble(rng, 0.06),
                  right.z0 + rng.uniform(0.3, 0.7) * (right.z1 - right.z0), hu_k - c * rng.uniform(0.7, 1.3)),
        "spleen": (left.cx - rng.uniform(5, 30), left.cy - rng.uniform(30, 50), rng.uniform(45, 60),
                   rng.uniform(28, 38), rng.uniform(-0.5, 0.5), _wobble(rng, 0.08),
                   left.z0 + rng.uniform(0.2, 0.6) * (left.z1 - left.z0), hu_k - c * rng.uniform(0.2, 0.8)),
        "cortex_mm": rng.uniform(5, 8),
        "medulla": hu_k - cfg.medulla_hu * rng.uniform(0.7, 1.3),
        "kidney": hu_k + rng.normal(0, 10),
        "tumour": hu_k - rng.uniform(30, 80),
        "bias": rng.normal(0, 1, size=4),
    }
    loops = []
    z_lo, z_hi = (float(z.min()), float(z.max())) if z.size else (0.0, 1.0)
    for i in range(cfg.n_distractors):
        r = rng.uniform(10, 24)
        side = right if i % 2 == 0 else left
        if i % 4 < 2:  # touching a kidney: on its anterior / lateral rim
            ang = rng.uniform(-np.pi, 0.0) if side is right else rng.uniform(-np.pi, 0.0)
            dist = rng.uniform(25, 40) + r * 0.6
            x0, y0 = side.cx + dist * math.cos(ang), side.cy + dist * math.sin(ang)
            zc = rng.uniform(side.z0, side.z1)
        else:
            x0 = mid_x + rng.uniform(-0.6, 0.6) * body_a
            y0 = body_cy + rng.uniform(-0.7, 0.3) * body_b
            zc = rng.uniform(z_lo, z_hi)
        kind = rng.choice(["fluid", "contrast", "air"], p=[0.4, 0.4, 0.2])
        lumen = {"fluid": rng.uniform(0, 30), "contrast": hu_k + rng.uniform(-30, 60),
                 "air": rng.uniform(-900, -600)}[kind]
        loops.append((x0, y0, zc, r, rng.normal(0, 0.4, size=2), rng.uniform(2, 4),
                      hu_k - c * rng.uniform(0.3, 1.3), lumen, rng.uniform(60, 160)))
    lay["loops"] = loops
    return lay


def _render_slice(labels: np.ndarray, z: float, grid: _Grid, lay: dict, cfg: PhantomConfig, look: _Look,
                  rng: np.random.Generator) -> np.ndarray:
    """HU (float32) of one slice with kidney labels ``labels`` at height ``z`` mm."""
    shape = labels.shape
    img = np.full(shape, AIR_HU, dtype=np.float32)
    bx, by, ba, bb = lay["body"]
    wob = 1 + 0.03 * math.sin(z / 60.0)
    ba, bb = ba * wob, bb * wob
    _paint(img, grid, _Blob(bx, by, ba, bb), FAT_HU + 8 * float(rng.standard_normal()))
    f = 1 - lay["fat"]
    _paint(img, grid, _Blob(bx, by, ba * f, bb * f), MUSCLE_HU)
    f2 = f - lay["wall"]
    cell = max(2, int(round(12.0 / grid.dx)))
    mix = _smooth_field(rng, shape, cell)
    background = np.where(mix > lay["fat_frac"], np.float32(SOFT_HU), np.float32(FAT_HU + 10))
    cavity_blob = _Blob(bx, by, ba * f2, bb * f2)
    _paint(img, grid, cavity_blob, background)
    cavity = np.zeros(shape, dtype=bool)
    got = cavity_blob.mask(grid)
    if got is not None:
        cavity[got[0]] = got[1]
    # spine, canal, paraspinal muscles, psoas
    sx, sy, sr = lay["spine"]
    for side in (-1, 1):
        _paint(img, grid, _Blob(sx + side * (sr + 18), sy + sr + 25, 22, 16), MUSCLE_HU)
    _paint(img, grid, _Blob(sx, sy, sr, sr * 0.9), BONE_HU + 150)
    _paint(img, grid, _Blob(sx, sy, sr * 0.8, sr * 0.72), BONE_HU - 250)
    _paint(img, grid, _Blob(sx, sy + sr + 9, 7, 7), 20.0)
    _paint(img, grid, _Blob(sx, sy + sr + 22, 6, 10), BONE_HU)
    z_lo = min(lay["right"].z0, lay["left"].z0)
    z_hi = max(lay["right"].z1, lay["left"].z1)
    grow = float(np.clip((z - z_lo) / max(z_hi - z_lo, 1.0), 0, 1.2))
    pr = lay["psoas"] + lay["psoas_grow"] * grow
    for side in (-1, 1):
        _paint(img, grid, _Blob(sx + side * (sr + pr * 0.8), sy - 3, pr, pr * 0.8), MUSCLE_HU + 5)
    # liver and spleen, shrinking toward their lower ends
    for organ in ("liver", "spleen"):
        ox, oy, oa, ob, oang, owob, zend, hu = lay[organ]
        scale = float(np.clip((zend - z) / 45.0, 0, 1)) ** 0.5
        if scale > 0:
            _paint(img, grid, _Blob(ox, oy, oa * scale, ob * scale, oang, owob), hu, cavity)
    # bowel loops: tubes drifting with z
    for x0, y0, zc, r, drift, wall, wall_hu, lumen_hu, zlen in lay["loops"]:
        if abs(z - zc) > zlen / 2:
            continue
        cx, cy = x0 + drift[0] * (z - zc), y0 + drift[1] * (z - zc)
        _paint(img, grid, _Blob(cx, cy, r, r * 0.85), wall_hu, cavity)
        _paint(img, grid, _Blob(cx, cy, max(r - wall, 1.0), max(r * 0.85 - wall, 1.0)), lumen_hu, cavity)
    # great vessels and renal vessels into the hilum
    ax, ay, ar, ahu = lay["aorta"]
    vx, vy, vr, vhu = lay["ivc"]
    _paint(img, grid, _Blob(ax, ay, ar, ar), ahu)
    _paint(img, grid, _Blob(vx, vy, vr, vr * 0.8), vhu)
    fg = labels > 0
    if cfg.vessels and fg.any():
        w = shape[1]
        for side, cols in ((lay["right"], slice(w // 2, w)), (lay["left"], slice(0, w // 2))):
            if not side.present or not (side.z0 <= z <= side.z1):
                continue
            t = (z - (side.z0 + side.z1) / 2) / max((side.z1 - side.z0) / 2, 1.0)
            part = fg[:, cols]
            if abs(t) > 0.35 or not part.any():
                continue
            rr, cc = np.nonzero(part)
            xs = grid.x[cols][cc]
            ys = grid.y[rr]
            i = int(np.argmin((xs - ax) ** 2 + (ys - ay) ** 2))
            hilum = (float(xs[i]), float(ys[i]))
            _paint_segment(img, grid, hilum, (ax, ay), lay["vessel_width"] * 0.8, ahu)
            _paint_segment(img, grid, (hilum[0], hilum[1] + 6), (vx, vy), lay["vessel_width"], vhu)
    # kidneys from the labels: cortex, lobulated medulla, tumour
    if fg.any():
        rr, cc = np.nonzero(fg)
        win = (slice(max(rr.min() - 2, 0), rr.max() + 3), slice(max(cc.min() - 2, 0), cc.max() + 3))
        lab = labels[win]
        kid = lab == 1
        sub = img[win]
        depth = ndimage.distance_transform_edt(lab > 0, sampling=(grid.dy, grid.dx))
        lobes = _smooth_field(rng, lab.shape, max(2, int(round(6.0 / grid.dx))))
        medulla = kid & (depth > lay["cortex_mm"]) & (lobes > -0.3)
        sub[kid] = lay["kidney"]
        sub[medulla] = lay["medulla"]
        tum = lab == 2
        if tum.any():
            sub[tum] = lay["tumour"] + 25 * lobes[tum]
    # bias field, PSF, noise
    h, w = shape
    yy = np.linspace(-1, 1, h, dtype=np.float32)[:, None]
    xx = np.linspace(-1, 1, w, dtype=np.float32)[None, :]
    b = lay["bias"]
    img += np.float32(cfg.bias_hu / 2) * (b[0] * xx + b[1] * yy + b[2] * (xx * xx + yy * yy - 0.66) + b[3] * xx * yy)
    if max(look.blur_px) > 0:
        img = ndimage.gaussian_filter(img, look.blur_px, mode="nearest")
    if look.texture_hu > 0:
        tex = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), look.texture_px)
        tex *= np.float32(look.texture_hu) / max(float(tex.std()), 1e-6)
        img += tex
    if look.noise_hu > 0:
        img += rng.standard_normal(shape, dtype=np.float32) * np.float32(look.noise_hu)
    return img


@dataclass(frozen=True)
class _Look:
    """Blur, texture and noise of the rendered grid (pixels of that grid, HU)."""

    blur_px: tuple[float, float]
    texture_px: tuple[float, float]
    texture_hu: float
    noise_hu: float


def _look(cfg: PhantomConfig, spacing: tuple[float, float], source_spacing: tuple[float, float] | None) -> _Look:
    """What :func:`_render_slice` applies at ``spacing`` (mm) so the image matches one rendered at
    ``source_spacing`` and shrunk to ``spacing`` with :func:`~nodeseg.data.transforms.resize_image`.

    Without ``source_spacing`` the grid is the source: PSF ``blur_mm``, texture correlated over 1.5 mm +
    ½ pixel, white noise ``noise_hu``. Shrinking by s (source pixels per output pixel, ≥ 1) with PIL's
    antialiased bilinear filter (a triangle of half-width s source pixels) adds s²/6 source px² of blur
    variance per axis and divides white-noise variance by 3s/2 per axis; a texture of correlation σ (source
    px) keeps the std fraction σ / √(σ² + s²/6) per axis. The renderer applies those directly.
    """
    dy, dx = spacing
    if source_spacing is None:
        return _Look((cfg.blur_mm / dy, cfg.blur_mm / dx), (1.5 / max(dx, 0.3) + 0.5,) * 2,  # type: ignore[arg-type]
                     cfg.texture_hu, cfg.noise_hu)
    blur, tex_px, tex_keep, noise_keep = [], [], 1.0, 1.0
    for d, d_src in zip(spacing, source_spacing, strict=True):
        s = max(d / d_src, 1.0)
        spread = s * s / 6.0 if s > 1.0 else 0.0  # resize_image leaves a plane of the same size untouched
        blur.append(math.sqrt((cfg.blur_mm / d_src) ** 2 + spread) / s)
        tex = 1.5 / max(d_src, 0.3) + 0.5  # the texture's correlation at the source grid, source px
        tex_px.append(math.sqrt(tex * tex + spread) / s)
        tex_keep *= math.sqrt(tex / math.sqrt(tex * tex + spread))
        noise_keep *= math.sqrt(2.0 / (3.0 * s)) if s > 1.0 else 1.0
    return _Look((blur[0], blur[1]), (tex_px[0], tex_px[1]), cfg.texture_hu * tex_keep, cfg.noise_hu * noise_keep)


def synthesize_imaging(
    segmentation: np.ndarray,
    rng: np.random.Generator,
    *,
    spacing: Sequence[float] = KITS_SPACING,
    cfg: PhantomConfig | None = None,
    slice_indices: Sequence[int] | np.ndarray | None = None,
    source_spacing: Sequence[float] | None = None,
) -> np.ndarray:
    """Pseudo-CT (int16 HU, same shape) for a (slices, H, W) KiTS19 label volume.

    ``spacing`` is (slice, row, col) mm; ``slice_indices`` gives the slice numbers of the rows of
    ``segmentation`` when it is a subset of a volume (their z positions drive liver and spleen extents).
    The appearance comes from ``cfg`` (default ``PhantomConfig()``); randomness only from ``rng``.

    ``source_spacing`` (row, col) mm, finer than ``spacing``, says that ``segmentation`` was shrunk from
    a grid of that spacing: the image is then rendered directly at ``spacing`` with the blur, texture and
    noise that rendering at the source grid and shrinking with ``resize_image`` would leave (see
    ``_look``) — what ingest does, at a fraction of the cost of rendering 512² slices.
    """
    seg = np.asarray(segmentation)
    check_arg(seg.ndim == 3, "segmentation", f"array of shape {seg.shape}", "a (slices, H, W) label array")
    check_arg(isinstance(rng, np.random.Generator), "rng", type(rng).__name__, "a numpy.random.Generator")
    check_arg(len(spacing) == 3 and all(float(s) > 0 for s in spacing), "spacing", spacing,
              "(slice, row, col) positive mm")
    cfg = PhantomConfig() if cfg is None else cfg
    check_arg(isinstance(cfg, PhantomConfig), "cfg", type(cfg).__name__, "a PhantomConfig or None")
    idx = np.arange(seg.shape[0]) if slice_indices is None else np.asarray(slice_indices)
    check_arg(idx.shape == (seg.shape[0],), "slice_indices", f"{idx.size} indices",
              f"{seg.shape[0]} indices, one per slice")
    dz, dy, dx = (float(s) for s in spacing)
    if source_spacing is not None:
        check_arg(len(source_spacing) == 2 and all(float(s) > 0 for s in source_spacing), "source_spacing",
                  source_spacing, "(row, col) positive mm, or None")
        source_spacing = (float(source_spacing[0]), float(source_spacing[1]))
    look = _look(cfg, (dy, dx), source_spacing)  # type: ignore[arg-type]
    grid = _Grid(seg.shape[1:], (dy, dx))
    z = idx.astype(np.float64) * dz
    lay = _layout(seg, grid, z, cfg, rng)
    base = int(rng.integers(2**63))
    out = np.empty(seg.shape, dtype=np.int16)
    for i in range(seg.shape[0]):
        slice_rng = np.random.default_rng([base, int(idx[i])])
        hu = _render_slice(seg[i], float(z[i]), grid, lay, cfg, look, slice_rng)
        out[i] = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    return out


# --------------------------------------------------------------------------------------------------------
# writing cases


def _case_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(index)]))


def _write_case_atomically(case_dir: Path, imaging: np.ndarray | None, segmentation: np.ndarray | None,
                           affine: np.ndarray, copy_segmentation_from: Path | None = None) -> None:
    """Write ``case_dir`` by building ``.<name>.tmp-*`` beside it and renaming it into place."""
    with atomic_dir(case_dir) as tmp:
        if imaging is not None:
            im = nib.Nifti1Image(imaging, affine)
            im.header.set_xyzt_units("mm")
            nib.save(im, tmp / IMAGING)
        if copy_segmentation_from is not None:
            shutil.copyfile(copy_segmentation_from, tmp / SEGMENTATION)
        elif segmentation is not None:
            sg = nib.Nifti1Image(segmentation.astype(np.uint8), affine)
            sg.header.set_xyzt_units("mm")
            nib.save(sg, tmp / SEGMENTATION)


def write_phantom_cases(out_dir: str | os.PathLike[str], cfg: PhantomConfig, seed: int) -> list[Path]:
    """Write ``cfg.n_cases`` phantom cases ``<out_dir>/case_00000/{imaging,segmentation}.nii.gz``.

    Deterministic for ``seed`` (case i depends only on (seed, i)); each case folder appears atomically.
    Imaging is int16 HU, segmentation uint8, with the KiTS19 affine for ``cfg.spacing``.
    """
    check_arg(isinstance(cfg, PhantomConfig), "cfg", type(cfg).__name__, "a PhantomConfig")
    check_arg(isinstance(seed, int) and seed >= 0, "seed", seed, "a non-negative integer")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    affine = kits_affine(cfg.spacing)
    written = []
    for i in range(cfg.n_cases):
        rng = _case_rng(seed, i)
        labels = phantom_labels(cfg, rng)
        hu = synthesize_imaging(labels, rng, spacing=cfg.spacing, cfg=cfg)
        case_dir = out / f"case_{i:05d}"
        _write_case_atomically(case_dir, hu, labels, affine)
        written.append(case_dir)
    return written


def write_pseudo_ct_cases(
    labels_root: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    seed: int,
    cfg: PhantomConfig | None = None,
    case_ids: Sequence[str] | None = None,
) -> list[Path]:
    """Copy real label volumes into ``out_dir`` and write a pseudo-CT ``imaging.nii.gz`` beside each.

    ``labels_root`` is only read (it may be a shared read-only folder); ``out_dir`` must lie outside it.
    The imaging gets the segmentation's affine; case ``case_XXXXX`` uses the random stream (seed, XXXXX).
    """
    src, out = Path(labels_root).resolve(), Path(out_dir).resolve()
    if out == src or src in out.parents:
        raise InputError(out, f"output folder lies inside the labels folder {src}: pick a folder outside it")
    out.mkdir(parents=True, exist_ok=True)
    folders = list_cases(src)
    if case_ids is not None:
        wanted = set(case_ids)
        missing = sorted(wanted - {f.name for f in folders})
        if missing:
            raise InputError(src, f"cases not found: {', '.join(missing[:5])}")
        folders = [f for f in folders if f.name in wanted]
    written = []
    for folder in folders:
        case = open_case(folder, require_imaging=False)
        seg = case.load_segmentation()
        rng = _case_rng(seed, int(case.case_id[5:]))
        hu = synthesize_imaging(seg, rng, spacing=case.spacing, cfg=cfg)
        del seg
        _write_case_atomically(out / case.case_id, hu, None, case.affine,
                               copy_segmentation_from=folder / SEGMENTATION)
        written.append(out / case.case_id)
    return written
