"""Phantom CT cases in the KiTS19 layout and pseudo-CT for label volumes, read back through nibabel."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from nodeseg.config import from_mapping
from nodeseg.data.kits19 import IMAGING, SEGMENTATION, kept_slices, list_cases, open_case
from nodeseg.data.render import PhantomConfig, synthesize_imaging
from nodeseg.data.synthetic import kits_affine, phantom_labels, write_phantom_cases, write_pseudo_ct_cases
from nodeseg.data.transforms import resize_image, resize_mask
from nodeseg.errors import ConfigError, InputError

# a 400 mm field of view on a small grid, like the real 512 × 0.78 mm
TINY = PhantomConfig(n_cases=2, n_slices=48, shape=(64, 64), spacing=(3.0, 6.25, 6.25))


def test_config_validation_names_field_and_value() -> None:
    with pytest.raises(ValueError, match=r"noise_hu must be a finite number >= 0, got -1.0"):
        PhantomConfig(noise_hu=-1.0)
    with pytest.raises(ValueError, match=r"tumour_probability must be in \[0, 1\], got 1.5"):
        PhantomConfig(tumour_probability=1.5)
    with pytest.raises(ValueError, match="shape"):
        PhantomConfig(shape=(8, 64))
    cfg = from_mapping(PhantomConfig, {"n_cases": 3, "shape": [64, 64], "spacing": [3, 6.25, 6.25], "blur_mm": 1})
    assert cfg.shape == (64, 64) and cfg.spacing == (3.0, 6.25, 6.25) and cfg.blur_mm == 1.0
    with pytest.raises(ConfigError, match="unknown key 'noise'"):
        from_mapping(PhantomConfig, {"noise": 3})


def test_phantom_cases_read_back_through_nifti(tmp_path: Path) -> None:
    written = write_phantom_cases(tmp_path / "raw", TINY, seed=3)
    assert [p.name for p in written] == ["case_00000", "case_00001"]
    assert [p.name for p in list_cases(tmp_path / "raw")] == ["case_00000", "case_00001"]
    assert not [p for p in (tmp_path / "raw").iterdir() if p.name.startswith(".")]  # no temp folders left
    for folder in written:
        img, seg = nib.load(folder / IMAGING), nib.load(folder / SEGMENTATION)
        assert img.shape == seg.shape == (48, 64, 64)
        assert img.get_data_dtype() == np.int16 and seg.get_data_dtype() == np.uint8
        np.testing.assert_allclose(seg.affine, kits_affine(TINY.spacing), atol=1e-5)
        np.testing.assert_allclose(img.affine, seg.affine)
        # like the interpolated release: sform 'aligned', spacing in the zooms, mm units
        assert int(seg.header["sform_code"]) == 2
        assert seg.header.get_zooms() == pytest.approx(TINY.spacing)
        assert seg.header.get_xyzt_units()[0] == "mm"
        case = open_case(folder)
        labels = case.load_segmentation()
        assert set(np.unique(labels)) <= {0, 1, 2} and (labels == 1).any()
        kept = kept_slices(labels, (1,))
        assert 0 < kept.size < 48  # some slices without kidney, as in real scans
        hu = case.load_imaging()
        assert -1024 <= hu.min() and hu.max() <= 3071
        # both kidneys: foreground on either half of the image
        assert (labels[:, :, :32] > 0).any() and (labels[:, :, 32:] > 0).any()


def test_phantoms_are_deterministic_per_seed(tmp_path: Path) -> None:
    one = TINY.__class__(**{**TINY.__dict__, "n_cases": 1})
    a = write_phantom_cases(tmp_path / "a", one, seed=5)[0]
    b = write_phantom_cases(tmp_path / "b", TINY, seed=5)[0]  # case 0 does not depend on n_cases
    c = write_phantom_cases(tmp_path / "c", one, seed=6)[0]
    for name in (IMAGING, SEGMENTATION):
        assert np.array_equal(np.asarray(nib.load(a / name).dataobj), np.asarray(nib.load(b / name).dataobj))
    assert not np.array_equal(np.asarray(nib.load(a / IMAGING).dataobj), np.asarray(nib.load(c / IMAGING).dataobj))


def test_tumours_follow_probability() -> None:
    cfg = TINY.__class__(**{**TINY.__dict__, "tumour_probability": 1.0})
    assert (phantom_labels(cfg, np.random.default_rng(0)) == 2).any()
    cfg = TINY.__class__(**{**TINY.__dict__, "tumour_probability": 0.0})
    assert not (phantom_labels(cfg, np.random.default_rng(0)) == 2).any()


def _kidney_and_rim(seg: np.ndarray, hu: np.ndarray) -> tuple[float, float]:
    fg = seg > 0
    rim = ndimage.binary_dilation(fg, iterations=3) & ~fg
    return float(hu[fg].mean()), float(hu[rim].mean())


def test_difficulty_knobs_change_the_image() -> None:
    labels = phantom_labels(TINY, np.random.default_rng(1))
    clean_cfg = PhantomConfig(noise_hu=0, texture_hu=0, blur_mm=0, bias_hu=0, n_distractors=0, contrast_hu=150)
    noisy_cfg = PhantomConfig(noise_hu=80, texture_hu=40, blur_mm=0, bias_hu=0, n_distractors=0, contrast_hu=150)
    spacing = TINY.spacing
    clean = synthesize_imaging(labels, np.random.default_rng(2), spacing=spacing, cfg=clean_cfg).astype(np.float32)
    noisy = synthesize_imaging(labels, np.random.default_rng(2), spacing=spacing, cfg=noisy_cfg).astype(np.float32)
    inside = labels == 1
    assert noisy[inside].std() > clean[inside].std() + 40
    k_clean, rim_clean = _kidney_and_rim(labels, clean)
    assert k_clean > rim_clean  # kidneys brighter than their immediate surroundings on average
    same = synthesize_imaging(labels, np.random.default_rng(2), spacing=spacing, cfg=clean_cfg)
    assert np.array_equal(same, clean.astype(np.int16))


def _appearance(image: np.ndarray, organ: np.ndarray) -> dict[str, float]:
    """Mean inside the organ, mean on a ring around it, and the std of the high-pass residual there."""
    inner = np.stack([ndimage.binary_erosion(m, iterations=1) for m in organ])
    ring = np.stack([ndimage.binary_dilation(m, iterations=5) & ~ndimage.binary_dilation(m, iterations=1)
                     for m in organ])
    high = image - ndimage.gaussian_filter(image, (0, 1.5, 1.5))
    return {"organ": float(image[inner].mean()), "ring": float(image[ring].mean()),
            "noise": float(high[inner | ring].std())}


def test_rendering_at_the_output_grid_matches_rendering_then_shrinking() -> None:
    """Ingest renders the pseudo-CT from shrunk labels (``source_spacing``): its organ and ring means and
    its fine-scale noise must match rendering at the source grid and shrinking with resize_image, to 10 %."""
    src = PhantomConfig(n_slices=40, shape=(256, 256), spacing=(3.0, 1.5625, 1.5625))
    labels = phantom_labels(src, np.random.default_rng(3))
    keep = kept_slices(labels, (1,))[::3]
    seg, out = labels[keep], (96, 96)
    fine = synthesize_imaging(seg, np.random.default_rng(8), spacing=src.spacing, slice_indices=keep)
    reference = np.stack([resize_image(h.astype(np.float32), out) for h in fine])
    organ = np.stack([resize_mask(s > 0, out) for s in seg])
    tumour = np.stack([resize_mask(s == 2, out) for s in seg]) & organ
    small = organ + tumour
    spacing = (3.0, 1.5625 * 256 / 96, 1.5625 * 256 / 96)
    direct = synthesize_imaging(small, np.random.default_rng(8), spacing=spacing, slice_indices=keep,
                                source_spacing=src.spacing[1:]).astype(np.float32)
    naive = synthesize_imaging(small, np.random.default_rng(8), spacing=spacing, slice_indices=keep).astype(np.float32)
    a, b, c = _appearance(reference, organ), _appearance(direct, organ), _appearance(naive, organ)
    assert a["organ"] - a["ring"] > 40  # the comparison is about a visible organ
    for key in a:
        assert b[key] == pytest.approx(a[key], rel=0.1), (key, a, b)
    assert c["noise"] > 1.5 * a["noise"]  # rendering at the coarse grid without it is far too noisy
    with pytest.raises(ValueError, match="source_spacing"):
        synthesize_imaging(small, np.random.default_rng(0), spacing=spacing, source_spacing=(0.0, 1.0))
    # nothing shrunk: the same image as rendering without source_spacing
    same = synthesize_imaging(small, np.random.default_rng(8), spacing=spacing, slice_indices=keep,
                              source_spacing=spacing[1:])
    assert np.array_equal(same, naive.astype(np.int16))


def test_synthesize_imaging_on_a_subset_of_slices() -> None:
    labels = phantom_labels(TINY, np.random.default_rng(4))
    keep = kept_slices(labels, (1,))
    hu = synthesize_imaging(labels[keep], np.random.default_rng(0), spacing=TINY.spacing, slice_indices=keep)
    assert hu.shape == (keep.size, 64, 64) and hu.dtype == np.int16
    with pytest.raises(ValueError, match="slice_indices"):
        synthesize_imaging(labels[keep], np.random.default_rng(0), slice_indices=keep[:-1])
    with pytest.raises(ValueError, match="segmentation"):
        synthesize_imaging(labels[0], np.random.default_rng(0))


def test_pseudo_ct_written_beside_copied_labels(tmp_path: Path) -> None:
    raw = write_phantom_cases(tmp_path / "raw", TINY, seed=0)
    labels_root = tmp_path / "labels"
    for folder in raw:  # a labels-only release like the shared real data
        (labels_root / folder.name).mkdir(parents=True)
        (labels_root / folder.name / SEGMENTATION).write_bytes((folder / SEGMENTATION).read_bytes())
    out = write_pseudo_ct_cases(labels_root, tmp_path / "pseudo", seed=1, cfg=TINY, case_ids=["case_00001"])
    assert [p.name for p in out] == ["case_00001"]
    assert not (labels_root / "case_00001" / IMAGING).exists()  # the source folder is left alone
    case = open_case(out[0])
    assert (out[0] / SEGMENTATION).read_bytes() == (labels_root / "case_00001" / SEGMENTATION).read_bytes()
    np.testing.assert_allclose(case.imaging_image.affine, case.affine)
    assert case.load_imaging().shape == (48, 64, 64)
    with pytest.raises(InputError, match="inside the labels folder"):
        write_pseudo_ct_cases(labels_root, labels_root / "sub", seed=0)
    with pytest.raises(InputError, match="cases not found: case_00099"):
        write_pseudo_ct_cases(labels_root, tmp_path / "p2", seed=0, case_ids=["case_00099"])
