"""Saliency datasets stored as image + mask folders (ECSSD, PASCAL-S, HKU-IS, MSRA10K, DUTS, …).

Images (jpg/png/bmp) and ground-truth masks (png/bmp) are matched by file stem. The folders are found by
common names (``images/`` + ``masks/``, ``Imgs/`` + ``GT/``, ``imgs/`` + ``gt/``, …, case-insensitive) or
given explicitly; one folder holding both ``x.jpg`` and ``x.png`` (the MSRA10K release) also works: the jpg
is the image, the png the mask. Soft (grey) ground truth is thresholded: foreground where value / 255 >
``threshold`` (the paper evaluates 0 and 0.5). Colour label maps (one RGB colour per label, e.g. blue kidney,
red tumour) are read by :func:`load_label_mask` with a colour → label table (``ingest.mask_colors``).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from nodeseg.errors import InputError, check_arg

__all__ = [
    "IMAGE_DIR_NAMES",
    "IMAGE_EXTS",
    "MASK_EXTS",
    "MASK_DIR_NAMES",
    "SaliencyPair",
    "find_pairs",
    "load_image",
    "load_label_mask",
    "load_mask",
]

IMAGE_DIR_NAMES = ("images", "image", "imgs", "img", "jpegimages", "im")
MASK_DIR_NAMES = ("masks", "mask", "gt", "gts", "groundtruth", "ground_truth", "ground_truth_mask", "annotations",
                  "labels")
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp"}
MASK_EXTS = {".png", ".bmp"}
_PIL_ERRORS = (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError)


@dataclass(frozen=True)
class SaliencyPair:
    """One sample: its stem, the image file and the mask file."""

    stem: str
    image: Path
    mask: Path


def _find_dir(root: Path, names: tuple[str, ...], given: str | None, what: str) -> Path:
    if given is not None:
        folder = root / given
        if not folder.is_dir():
            raise InputError(folder, f"{what} folder not found")
        return folder
    subdirs = {d.name.lower(): d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")}
    for name in names:
        if name in subdirs:
            return subdirs[name]
    raise InputError(root, f"no {what} folder found: expected one of {', '.join(names)} "
                           f"(case-insensitive), or name it with image_dir / mask_dir")


def _files(folder: Path, exts: set[str], what: str) -> dict[str, Path]:
    """stem → file for the files of ``folder``; a file with another extension raises InputError."""
    out: dict[str, Path] = {}
    for f in sorted(folder.iterdir()):
        if f.name.startswith(".") or f.is_dir():
            continue
        ext = f.suffix.lower()
        if ext not in exts:
            article = "an" if what[0] in "aeiou" else "a"
            raise InputError(f, f"not {article} {what} file: expected one of {', '.join(sorted(exts))}; "
                                f"remove it from {folder.name}/")
        if f.stem in out:
            raise InputError(f, f"two {what} files with stem {f.stem!r} ({out[f.stem].name} and {f.name})")
        out[f.stem] = f
    return out


def find_pairs(
    root: str | os.PathLike[str], image_dir: str | None = None, mask_dir: str | None = None
) -> list[SaliencyPair]:
    """Image/mask pairs under ``root`` sorted by stem; InputError for stray files or unmatched stems."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(root, "not a folder: expected a saliency dataset with image and mask folders")
    img_dir = _find_dir(root, IMAGE_DIR_NAMES, image_dir, "image")
    try:
        msk_dir = _find_dir(root, MASK_DIR_NAMES, mask_dir, "mask")
    except InputError:
        if mask_dir is not None:
            raise
        msk_dir = img_dir  # MSRA10K: x.jpg and x.png side by side
    if img_dir == msk_dir:
        images: dict[str, Path] = {}
        masks: dict[str, Path] = {}
        for f in sorted(img_dir.iterdir()):
            if f.name.startswith(".") or f.is_dir():
                continue
            ext = f.suffix.lower()
            if ext in (".jpg", ".jpeg"):
                images[f.stem] = f
            elif ext in MASK_EXTS:
                masks[f.stem] = f
            else:
                raise InputError(f, "not an image file: expected .jpg/.jpeg images with .png/.bmp masks")
    else:
        images = _files(img_dir, IMAGE_EXTS, "image")
        masks = _files(msk_dir, MASK_EXTS, "mask")
    only_img = sorted(set(images) - set(masks))
    only_mask = sorted(set(masks) - set(images))
    if only_img or only_mask:
        parts = []
        if only_img:
            parts.append(f"{len(only_img)} image(s) without a mask ({', '.join(only_img[:5])}"
                         f"{', ...' if len(only_img) > 5 else ''})")
        if only_mask:
            parts.append(f"{len(only_mask)} mask(s) without an image ({', '.join(only_mask[:5])}"
                         f"{', ...' if len(only_mask) > 5 else ''})")
        raise InputError(root, "unmatched stems: " + "; ".join(parts))
    if not images:
        raise InputError(img_dir, "no images found")
    return [SaliencyPair(s, images[s], masks[s]) for s in sorted(images)]


def _open(path: Path) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(path)
            im.load()
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    except (*_PIL_ERRORS, Image.DecompressionBombWarning) as err:
        raise InputError(path, f"unreadable image ({' '.join(str(err).split()) or type(err).__name__}); "
                               "re-download or re-export it") from None
    return im


def load_image(path: str | os.PathLike[str]) -> np.ndarray:
    """An image as float32 RGB (3, H, W) in [0, 1] (grey images are repeated on three channels)."""
    path = Path(path)
    im = _open(path)
    if im.mode not in ("RGB", "L", "RGBA", "P", "CMYK", "YCbCr", "LA", "I;16", "I"):
        raise InputError(path, f"unsupported image mode {im.mode!r}: expected an RGB or grey image")
    if im.mode in ("I;16", "I"):
        a = np.asarray(im, dtype=np.float32)
        a = a / max(float(a.max()), 1.0)
        return np.repeat(a[None], 3, axis=0)
    rgb = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    return np.ascontiguousarray(rgb.transpose(2, 0, 1))


def load_mask(path: str | os.PathLike[str], threshold: float = 0.5, require_binary: bool = False) -> np.ndarray:
    """A ground-truth mask as uint8 {0, 1} (H, W): 1 where value / max > ``threshold``.

    Masks must be single-channel ('1', 'L', 'I;16'; palette images with grey entries are accepted). Values
    are scaled by 255 (65535 for 16-bit), except that a mask holding only 0 and 1 is read as 0/1. With
    ``require_binary`` a mask with grey levels other than the two extremes raises InputError.
    """
    check_arg(0.0 <= threshold < 1.0, "threshold", threshold, "a number in [0, 1)")
    path = Path(path)
    im = _open(path)
    if im.mode == "P":
        palette = np.asarray(im.getpalette() or [], dtype=np.int64).reshape(-1, 3)
        used = np.unique(np.asarray(im))
        grey = used.size > 0 and used.max() < len(palette)
        if grey:
            colours = palette[used]
            grey = bool(((colours[:, 0] == colours[:, 1]) & (colours[:, 1] == colours[:, 2])).all())
        if not grey:
            raise InputError(path, "palette mask with colours: expected a single-channel grey or binary mask")
        im = im.convert("L")
    if im.mode not in ("1", "L", "I;16", "I"):
        raise InputError(path, f"mask must be single-channel grey or binary, got mode {im.mode!r} "
                               f"with {len(im.getbands())} channels; save it as 8-bit grey ('L'), or map its colours "
                               "to labels with ingest.mask_colors")
    a = np.asarray(im)
    if a.dtype == np.bool_:
        return a.astype(np.uint8)
    values = np.unique(a)
    if values.size and values.min() < 0:
        raise InputError(path, f"negative mask values (min {values.min()}): expected 0..255")
    full = 1.0 if set(values.tolist()) <= {0, 1} else (255.0 if a.dtype == np.uint8 or values.max() <= 255 else 65535.0)
    if require_binary and not set(values.tolist()) <= {0, int(full)}:
        grey = [int(v) for v in values if v not in (0, int(full))]
        raise InputError(path, f"mask is not binary: found grey levels {grey[:5]}{' ...' if len(grey) > 5 else ''} "
                               f"besides 0 and {int(full)}; save it as a binary mask, or set ingest.require_binary_masks: false "
                               "to threshold it at ingest.saliency_threshold")
    return (a.astype(np.float32) / np.float32(full) > np.float32(threshold)).astype(np.uint8)


def _rgb_code(rgb: np.ndarray) -> np.ndarray:
    """(…, 3) uint8 colours as one int32 each: r·2¹⁶ + g·2⁸ + b."""
    a = rgb.astype(np.int32)
    return (a[..., 0] << 16) | (a[..., 1] << 8) | a[..., 2]


def load_label_mask(path: str | os.PathLike[str], colors: dict[int, tuple[int, int, int]]) -> np.ndarray:
    """A colour label map as uint8 labels (H, W): the pixels of colour ``colors[label]`` get ``label``.

    Black is background (label 0) unless ``colors`` gives label 0 a colour of its own. The mask is read as RGB
    (grey, palette and RGBA masks are converted; the alpha channel is ignored). A colour that is not in the
    table raises InputError naming it, how many pixels have it and where the first is.
    """
    path = Path(path)
    check_arg(bool(colors), "colors", colors, "a non-empty mapping label -> (r, g, b)")
    im = _open(path)
    if im.mode in ("I;16", "I", "F"):
        raise InputError(path, f"mask mode {im.mode!r} holds no colours: ingest.mask_colors expects an RGB mask "
                               "(8 bits per channel); leave mask_colors empty for grey or binary masks")
    rgb = np.asarray(im.convert("RGB"))
    table = dict(colors)
    if 0 not in table:
        table[0] = (0, 0, 0)
    lut_codes = np.array([(r << 16) | (g << 8) | b for r, g, b in table.values()], dtype=np.int32)
    lut_labels = np.array(list(table), dtype=np.uint8)
    order = np.argsort(lut_codes)
    lut_codes, lut_labels = lut_codes[order], lut_labels[order]
    codes = _rgb_code(rgb)
    at = np.clip(np.searchsorted(lut_codes, codes), 0, len(lut_codes) - 1)
    known = lut_codes[at] == codes
    if not known.all():
        bad = ~known
        row, col = (int(v) for v in np.unravel_index(int(np.argmax(bad.ravel())), bad.shape))
        colour = [int(v) for v in rgb[row, col]]
        others = np.unique(codes[bad])
        table_text = ", ".join(f"{label}: {list(c)}" for label, c in sorted(table.items()))
        raise InputError(path, f"colour {colour} ({int(bad.sum())} pixels, first at (row, col) = ({row}, {col})"
                               f"{f'; {others.size - 1} other unknown colours' if others.size > 1 else ''}) is not "
                               f"in ingest.mask_colors ({table_text}): add it to the table or repaint the mask")
    return lut_labels[at]
