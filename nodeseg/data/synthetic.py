"""Phantom CT cases in the KiTS19 layout, and pseudo-CT cases for real KiTS19 label volumes.

Phantom label volumes hold two bean-shaped kidneys (ellipsoid profile along the slices, rotated, with a hilum
notch and a wobbly outline) and, with ``tumour_probability``, a spherical tumour on each; their images, like
those of real labels (``write_pseudo_ct_cases``), come from the renderer in ``nodeseg.data.render``.

Arrays are (slices, H, W) like the interpolated KiTS19 release: slice 0 superior, rows run anterior to
posterior, columns toward the patient's right (the release's affine ``[[0, 0, -dx], [0, -dy, 0], [-dz, 0,
0]]``, which :func:`kits_affine` reproduces).
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from nodeseg.atomic import atomic_dir
from nodeseg.data.geometry import Blob, Grid, wobble
from nodeseg.data.kits19 import IMAGING, SEGMENTATION, list_cases, open_case
from nodeseg.data.render import PhantomConfig, synthesize_imaging
from nodeseg.errors import InputError, check_arg

__all__ = [
    "PhantomConfig",
    "kits_affine",
    "phantom_labels",
    "write_phantom_cases",
    "write_pseudo_ct_cases",
]


def kits_affine(spacing: Sequence[float]) -> np.ndarray:
    """The affine of the interpolated KiTS19 release for (slice, row, col) ``spacing`` in mm."""
    dz, dy, dx = (float(s) for s in spacing)
    return np.array([[0, 0, -dx, 0], [0, -dy, 0, 0], [-dz, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64)


# --------------------------------------------------------------------------------------------------------
# phantom labels


def phantom_labels(cfg: PhantomConfig, rng: np.random.Generator) -> np.ndarray:
    """A (n_slices, H, W) uint8 label volume: two bean-shaped kidneys (1), tumours (2) on some."""
    check_arg(isinstance(cfg, PhantomConfig), "cfg", type(cfg).__name__, "a PhantomConfig")
    dz, dy, dx = cfg.spacing
    grid = Grid(cfg.shape, (dy, dx))
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
        wob = wobble(rng, 0.05)
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
            tumour = (t_z, t_alpha, t_out, t_r, wobble(rng, 0.04))
        for s in range(cfg.n_slices):
            z = s * dz
            t = (z - zmid) / half_len
            if abs(t) >= 1:
                continue
            p = (1 - t * t) ** 0.4
            ccx, ccy = cx + drift[0] * t, cy + drift[1] * t
            ang = angle + spin * t
            kid = Blob(ccx, ccy, a * p, b * p, ang, wob)
            sl = out[s]
            got = kid.mask(grid)
            if got is None:
                continue
            win, inside = got
            sl[win][inside] = 1
            if abs(t) < 0.55:
                notch = Blob(ccx + nx * b * p * 0.9, ccy + ny * b * p * 0.9, 0.45 * b * p, 0.35 * a * p, ang)
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
                got = Blob(tcx, tcy, r, r * 0.9, angle, t_wob).mask(grid)
                if got is not None:
                    win, inside = got
                    out[s][win][inside] = 2
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
