"""The phantom renderer: pseudo-CT for a KiTS19 label volume (phantom labels and real ones alike).

Given a label volume (0 background, 1 kidney, 2 tumour) it lays out an abdomen around the kidneys in
millimetres — body outline with subcutaneous fat and muscle wall, a cluttered fat / soft-tissue background,
spine and psoas, aorta and IVC with renal vessels running into the hilum, liver and spleen pressed against the
upper poles, bowel loops (half of them touching a kidney, some filled with positive oral contrast) — then
paints cortex, medulla and tumour from the labels, adds a smooth bias field, blurs with a Gaussian PSF and adds
white plus correlated noise. The distractor organs sit ``contrast_hu`` below the kidney cortex, so the kidney
outline is a weak edge against several neighbours; that is what keeps a plain UNet well below IoU 0.97 (see
``PhantomConfig``). Arrays are (slices, H, W) like the interpolated KiTS19 release.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from nodeseg.data.geometry import Blob, Grid, paint, paint_segment, smooth_field, wobble
from nodeseg.errors import check_arg

__all__ = ["KITS_SPACING", "PhantomConfig", "synthesize_imaging"]

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


# --------------------------------------------------------------------------------------------------------
# rendering


@dataclass(frozen=True)
class _Side:
    present: bool
    cx: float
    cy: float
    z0: float  # first slice z (mm) with this kidney
    z1: float  # last


def _sides(seg: np.ndarray, grid: Grid, z: np.ndarray) -> tuple[_Side, _Side]:
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


def _layout(seg: np.ndarray, grid: Grid, z: np.ndarray, cfg: PhantomConfig, rng: np.random.Generator) -> dict:
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
                  rng.uniform(75, 95), rng.uniform(-0.3, 0.3), wobble(rng, 0.06),
                  right.z0 + rng.uniform(0.3, 0.7) * (right.z1 - right.z0), hu_k - c * rng.uniform(0.7, 1.3)),
        "spleen": (left.cx - rng.uniform(5, 30), left.cy - rng.uniform(30, 50), rng.uniform(45, 60),
                   rng.uniform(28, 38), rng.uniform(-0.5, 0.5), wobble(rng, 0.08),
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


def _render_slice(labels: np.ndarray, z: float, grid: Grid, lay: dict, cfg: PhantomConfig, look: _Look,
                  rng: np.random.Generator) -> np.ndarray:
    """HU (float32) of one slice with kidney labels ``labels`` at height ``z`` mm."""
    shape = labels.shape
    img = np.full(shape, AIR_HU, dtype=np.float32)
    bx, by, ba, bb = lay["body"]
    wob = 1 + 0.03 * math.sin(z / 60.0)
    ba, bb = ba * wob, bb * wob
    paint(img, grid, Blob(bx, by, ba, bb), FAT_HU + 8 * float(rng.standard_normal()))
    f = 1 - lay["fat"]
    paint(img, grid, Blob(bx, by, ba * f, bb * f), MUSCLE_HU)
    f2 = f - lay["wall"]
    cell = max(2, int(round(12.0 / grid.dx)))
    mix = smooth_field(rng, shape, cell)
    background = np.where(mix > lay["fat_frac"], np.float32(SOFT_HU), np.float32(FAT_HU + 10))
    cavity_blob = Blob(bx, by, ba * f2, bb * f2)
    paint(img, grid, cavity_blob, background)
    cavity = np.zeros(shape, dtype=bool)
    got = cavity_blob.mask(grid)
    if got is not None:
        cavity[got[0]] = got[1]
    # spine, canal, paraspinal muscles, psoas
    sx, sy, sr = lay["spine"]
    for side in (-1, 1):
        paint(img, grid, Blob(sx + side * (sr + 18), sy + sr + 25, 22, 16), MUSCLE_HU)
    paint(img, grid, Blob(sx, sy, sr, sr * 0.9), BONE_HU + 150)
    paint(img, grid, Blob(sx, sy, sr * 0.8, sr * 0.72), BONE_HU - 250)
    paint(img, grid, Blob(sx, sy + sr + 9, 7, 7), 20.0)
    paint(img, grid, Blob(sx, sy + sr + 22, 6, 10), BONE_HU)
    z_lo = min(lay["right"].z0, lay["left"].z0)
    z_hi = max(lay["right"].z1, lay["left"].z1)
    grow = float(np.clip((z - z_lo) / max(z_hi - z_lo, 1.0), 0, 1.2))
    pr = lay["psoas"] + lay["psoas_grow"] * grow
    for side in (-1, 1):
        paint(img, grid, Blob(sx + side * (sr + pr * 0.8), sy - 3, pr, pr * 0.8), MUSCLE_HU + 5)
    # liver and spleen, shrinking toward their lower ends
    for organ in ("liver", "spleen"):
        ox, oy, oa, ob, oang, owob, zend, hu = lay[organ]
        scale = float(np.clip((zend - z) / 45.0, 0, 1)) ** 0.5
        if scale > 0:
            paint(img, grid, Blob(ox, oy, oa * scale, ob * scale, oang, owob), hu, cavity)
    # bowel loops: tubes drifting with z
    for x0, y0, zc, r, drift, wall, wall_hu, lumen_hu, zlen in lay["loops"]:
        if abs(z - zc) > zlen / 2:
            continue
        cx, cy = x0 + drift[0] * (z - zc), y0 + drift[1] * (z - zc)
        paint(img, grid, Blob(cx, cy, r, r * 0.85), wall_hu, cavity)
        paint(img, grid, Blob(cx, cy, max(r - wall, 1.0), max(r * 0.85 - wall, 1.0)), lumen_hu, cavity)
    # great vessels and renal vessels into the hilum
    ax, ay, ar, ahu = lay["aorta"]
    vx, vy, vr, vhu = lay["ivc"]
    paint(img, grid, Blob(ax, ay, ar, ar), ahu)
    paint(img, grid, Blob(vx, vy, vr, vr * 0.8), vhu)
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
            paint_segment(img, grid, hilum, (ax, ay), lay["vessel_width"] * 0.8, ahu)
            paint_segment(img, grid, (hilum[0], hilum[1] + 6), (vx, vy), lay["vessel_width"], vhu)
    # kidneys from the labels: cortex, lobulated medulla, tumour
    if fg.any():
        rr, cc = np.nonzero(fg)
        win = (slice(max(rr.min() - 2, 0), rr.max() + 3), slice(max(cc.min() - 2, 0), cc.max() + 3))
        lab = labels[win]
        kid = lab == 1
        sub = img[win]
        depth = ndimage.distance_transform_edt(lab > 0, sampling=(grid.dy, grid.dx))
        lobes = smooth_field(rng, lab.shape, max(2, int(round(6.0 / grid.dx))))
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
    grid = Grid(seg.shape[1:], (dy, dx))
    z = idx.astype(np.float64) * dz
    lay = _layout(seg, grid, z, cfg, rng)
    base = int(rng.integers(2**63))
    out = np.empty(seg.shape, dtype=np.int16)
    for i in range(seg.shape[0]):
        slice_rng = np.random.default_rng([base, int(idx[i])])
        hu = _render_slice(seg[i], float(z[i]), grid, lay, cfg, look, slice_rng)
        out[i] = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    return out
