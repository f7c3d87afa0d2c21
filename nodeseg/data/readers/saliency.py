"""``data.source: saliency``: image + mask folders (ECSSD, DUTS, a user's own slices) in; an image folder to
predict on.

The folders are found and read by :mod:`nodeseg.data.saliency`; one item per image, placed on a
``saliency_crop``² canvas with a ``valid`` mask. Masks are grey/binary (thresholded at
``saliency_threshold``) or, with ``ingest.mask_colors``, colour label maps turned into labels and then into the
target by ``foreground_labels``, as for NIfTI label volumes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from nodeseg.atomic import atomic_dir
from nodeseg.data.ingest_config import IngestConfig
from nodeseg.data.kits19 import foreground
from nodeseg.data.readers.base import ItemResult, PhiFn, Reader
from nodeseg.data.saliency import IMAGE_EXTS, SaliencyPair, find_pairs, load_image, load_label_mask, load_mask
from nodeseg.data.shardio import SliceRecord
from nodeseg.data.transforms import fit_canvas, resize_image
from nodeseg.errors import InputError
from nodeseg.levelset import signed_distance

__all__ = ["SaliencyReader", "predict_folder", "read_pair"]


def read_pair(pair: SaliencyPair, cfg: IngestConfig, label: str) -> ItemResult:
    """The one row of an image and its mask."""
    image = load_image(pair.image)
    if cfg.mask_colors:
        mask = foreground(load_label_mask(pair.mask, cfg.mask_colors), cfg.foreground_labels)
    else:
        mask = load_mask(pair.mask, cfg.saliency_threshold, cfg.require_binary_masks)
    if mask.shape != image.shape[1:]:
        raise InputError(pair.mask, f"mask size {mask.shape[::-1]} (W, H) does not match its image "
                                    f"{pair.image.name} {image.shape[:0:-1]}")
    size = (cfg.saliency_crop, cfg.saliency_crop)
    image, mask, valid, scale = fit_canvas(image, mask, size, cfg.saliency_oversize)
    rec = SliceRecord(
        case_id=pair.stem,
        slice_index=0,
        image=image,
        mask=mask,
        phi=signed_distance(mask, clip=cfg.clip),
        valid=valid,
        spacing=(1.0 / scale, 1.0 / scale),
        source=label,
    )
    return ItemResult(pair.stem, [rec], 1, empty_masks=int(not mask.any()))


def predict_folder(phi: PhiFn, preprocessing: dict[str, Any], folder: Path, output: Path) -> Path:
    """Segment every image in ``folder``; write ``<stem>.png`` masks (0/255) of the images' sizes to ``output``."""
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise InputError(folder, f"no images ({', '.join(sorted(IMAGE_EXTS))}) found")
    canvas = int(preprocessing.get("saliency_crop", 512))
    output = Path(output)
    with atomic_dir(output) as tmp:
        for f in files:
            image = load_image(f)
            h, w = image.shape[1:]
            placed, _, valid, _ = fit_canvas(image, np.zeros((h, w), np.uint8), (canvas, canvas))
            p = phi(placed[None])[0]
            rows, cols = int(valid.any(axis=1).sum()), int(valid.any(axis=0).sum())
            p = resize_image(p[:rows, :cols], (h, w))
            Image.fromarray(((p < 0) * 255).astype(np.uint8)).save(tmp / f"{f.stem}.png")
    return output


class SaliencyReader(Reader):
    """Image + mask folders matched by stem; one item per image."""

    name: ClassVar[str] = "saliency"
    noun: ClassVar[str] = "image"
    input_kind: ClassVar[str] = "a folder of images"

    def list_items(self, root: Path, cfg: IngestConfig) -> dict[str, Any]:
        return {p.stem: p for p in find_pairs(root, cfg.image_dir, cfg.mask_dir)}

    def item_path(self, item: Any) -> Path:
        return Path(item.image)

    def read_item(self, item: Any, cfg: IngestConfig, seed: int, label: str) -> ItemResult:
        return read_pair(item, cfg, label)

    def source_label(self, root: Path) -> str:
        return f"saliency:{root.name}"

    def input_side(self, preprocessing: dict[str, Any]) -> int:
        return int(preprocessing.get("saliency_crop", 512))

    def accepts(self, path: Path) -> bool:
        return path.is_dir()

    def predict(self, phi: PhiFn, preprocessing: dict[str, Any], input_path: Path, output: Path) -> Path:
        return predict_folder(phi, preprocessing, input_path, output)
