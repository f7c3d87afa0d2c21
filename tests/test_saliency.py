"""Saliency folder datasets: folder detection, stem matching, thresholds, mask checks, bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nodeseg.data.saliency import find_pairs, load_image, load_mask
from nodeseg.errors import InputError


def _soft_mask(h: int = 20, w: int = 30) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    m[5:15, 5:15] = 255
    m[5:15, 15:20] = 100  # soft edge: foreground at threshold 0, background at 0.5
    return m


def _dataset(root: Path, stems: tuple[str, ...] = ("a", "b"), img_dir: str = "images", mask_dir: str = "masks") -> Path:
    rng = np.random.default_rng(0)
    (root / img_dir).mkdir(parents=True, exist_ok=True)
    (root / mask_dir).mkdir(parents=True, exist_ok=True)
    for s in stems:
        Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(root / img_dir / f"{s}.jpg")
        Image.fromarray(_soft_mask()).save(root / mask_dir / f"{s}.png")
    return root


def test_find_pairs_common_layouts(tmp_path: Path) -> None:
    pairs = find_pairs(_dataset(tmp_path / "ecssd", ("b", "a")))
    assert [p.stem for p in pairs] == ["a", "b"]
    assert pairs[0].image.name == "a.jpg" and pairs[0].mask.name == "a.png"
    assert len(find_pairs(_dataset(tmp_path / "pascal", img_dir="Imgs", mask_dir="GT"))) == 2
    assert len(find_pairs(_dataset(tmp_path / "custom", img_dir="x", mask_dir="y"), "x", "y")) == 2
    # MSRA10K: images and masks side by side in one folder
    msra = _dataset(tmp_path / "msra", img_dir="Imgs", mask_dir="Imgs")
    assert [p.mask.suffix for p in find_pairs(msra)] == [".png", ".png"]


def test_missing_folders(tmp_path: Path) -> None:
    (tmp_path / "stuff").mkdir()
    with pytest.raises(InputError, match="no image folder found: expected one of images"):
        find_pairs(tmp_path)
    _dataset(tmp_path / "d")
    with pytest.raises(InputError, match="mask folder not found"):
        find_pairs(tmp_path / "d", mask_dir="nope")


def test_non_image_file_in_folder(tmp_path: Path) -> None:
    root = _dataset(tmp_path)
    (root / "images" / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match=r"not an image file: expected one of .bmp, .jpeg, .jpg, .png") as err:
        find_pairs(root)
    assert err.value.path.endswith("notes.txt")
    (root / "images" / "notes.txt").unlink()
    (root / "masks" / "c.jpg").write_bytes(b"x")
    with pytest.raises(InputError, match=r"not a mask file: expected one of .bmp, .png") as err:
        find_pairs(root)
    assert err.value.path.endswith("c.jpg")


def test_unmatched_stems_are_named(tmp_path: Path) -> None:
    root = _dataset(tmp_path, ("a", "b", "c"))
    (root / "masks" / "b.png").unlink()
    Image.fromarray(_soft_mask()).save(root / "masks" / "zz.png")
    with pytest.raises(InputError, match=r"unmatched stems: 1 image\(s\) without a mask \(b\); 1 mask\(s\) without an image \(zz\)"):
        find_pairs(root)


def test_load_image_rgb_and_grey(tmp_path: Path) -> None:
    root = _dataset(tmp_path)
    img = load_image(root / "images" / "a.jpg")
    assert img.shape == (3, 20, 30) and img.dtype == np.float32 and 0 <= img.min() and img.max() <= 1
    Image.fromarray(np.full((4, 5), 255, np.uint8)).save(tmp_path / "g.png")
    grey = load_image(tmp_path / "g.png")
    assert grey.shape == (3, 4, 5) and np.all(grey == 1.0)


def test_unreadable_image(tmp_path: Path) -> None:
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(InputError, match="unreadable image") as err:
        load_image(tmp_path / "bad.jpg")
    assert err.value.path.endswith("bad.jpg")


def test_threshold_soft_ground_truth(tmp_path: Path) -> None:
    root = _dataset(tmp_path)
    path = root / "masks" / "a.png"
    m0, m5 = load_mask(path, threshold=0.0), load_mask(path, threshold=0.5)
    assert m0.dtype == np.uint8 and m0.sum() == 150 and m5.sum() == 100
    # a mask stored as 0/1 is read as binary, not as 1/255
    Image.fromarray((_soft_mask() == 255).astype(np.uint8)).save(tmp_path / "01.png")
    assert load_mask(tmp_path / "01.png", 0.5).sum() == 100
    Image.fromarray(_soft_mask() == 255).convert("1").save(tmp_path / "bits.png")
    assert load_mask(tmp_path / "bits.png").sum() == 100
    with pytest.raises(ValueError, match="threshold"):
        load_mask(path, threshold=1.0)


def test_mask_must_be_single_channel(tmp_path: Path) -> None:
    rgb = np.stack([_soft_mask()] * 3, axis=-1)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    with pytest.raises(InputError, match=r"single-channel grey or binary, got mode 'RGB' with 3 channels") as err:
        load_mask(tmp_path / "rgb.png")
    assert err.value.path.endswith("rgb.png")
    pal = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), mode="P")
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.save(tmp_path / "pal.png")
    with pytest.raises(InputError, match="palette mask with colours"):
        load_mask(tmp_path / "pal.png")


def test_require_binary(tmp_path: Path) -> None:
    root = _dataset(tmp_path)
    with pytest.raises(InputError, match=r"mask is not binary: found grey levels \[100\] besides 0 and 255"):
        load_mask(root / "masks" / "a.png", require_binary=True)
    Image.fromarray(np.where(_soft_mask() > 0, 255, 0).astype(np.uint8)).save(tmp_path / "bin.png")
    assert load_mask(tmp_path / "bin.png", require_binary=True).sum() == 150
