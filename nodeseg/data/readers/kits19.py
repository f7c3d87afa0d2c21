"""``data.source: kits19``: KiTS19 case folders (NIfTI) in, kidney slices out; a NIfTI volume to predict on.

The folders themselves are read and checked by :mod:`nodeseg.data.kits19`; this module turns a case into
rows (the slices holding any of ``keep_labels``, windowed, normalised, resized to ``size``², φ on the
resized mask; a pseudo-CT rendered from the labels where ``pseudo_ct`` and no imaging) and segments a volume.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import nibabel as nib
import numpy as np

from nodeseg.atomic import atomic_file
from nodeseg.data.ingest_config import IngestConfig
from nodeseg.data.kits19 import (
    foreground,
    kept_slices,
    list_cases,
    normalise_hu,
    open_case,
    read_volume,
    take_slices,
)
from nodeseg.data.readers.base import ItemResult, PhiFn, Reader
from nodeseg.data.render import synthesize_imaging
from nodeseg.data.shardio import SliceRecord
from nodeseg.data.transforms import resize_image, resize_mask
from nodeseg.levelset import signed_distance

__all__ = ["KIDNEY_LABEL", "Kits19Reader", "read_case"]

log = logging.getLogger(__name__)

KIDNEY_LABEL = 1  # what a predicted label volume marks the object with


def read_case(folder: str, cfg: IngestConfig, seed: int) -> ItemResult:
    """The rows of one case folder (see the module docstring)."""
    case = open_case(folder, require_imaging=not cfg.pseudo_ct, max_axis=cfg.max_axis, max_voxels=cfg.max_voxels)
    seg = case.load_segmentation()
    keep = kept_slices(seg, cfg.keep_labels)
    n_total = int(seg.shape[0])
    if keep.size == 0:
        labels = ", ".join(str(v) for v in cfg.keep_labels)
        reason = f"no slice with label(s) {labels}: the case contributes no rows"
        return ItemResult(case.case_id, [], n_total, skipped=reason, warnings=[f"{case.folder}: {reason}"])
    seg_k = take_slices(seg, keep)
    del seg
    h, w = seg_k.shape[1:]
    size = (cfg.size, cfg.size)
    spacing = (case.spacing[1] * h / cfg.size, case.spacing[2] * w / cfg.size)
    masks = np.stack([resize_mask(foreground(s, cfg.foreground_labels), size) for s in seg_k])
    if case.has_imaging:
        hu = case.load_imaging(keep)
        image = np.stack([resize_image(p, size) for p in normalise_hu(hu, cfg.hu_window, cfg.normalisation,
                                                                        cfg.zscore_stats, inplace=True)])
        source = "kits19"
    else:
        # the pseudo-CT is rendered at the output grid from the shrunk labels, with the blur and noise
        # that rendering at the source grid and shrinking would leave (synthesize_imaging's source_spacing)
        rng = np.random.default_rng(np.random.SeedSequence([seed, int(case.case_id[5:])]))
        hu = synthesize_imaging(_shrunk_labels(seg_k, masks, cfg.foreground_labels, size), rng,
                                spacing=(case.spacing[0], *spacing), cfg=cfg.phantom, slice_indices=keep,
                                source_spacing=case.spacing[1:])
        image = normalise_hu(hu, cfg.hu_window, cfg.normalisation, cfg.zscore_stats)
        source = "kits19-pseudo-ct"
    del hu
    valid = np.ones(size, dtype=np.uint8)
    records = [
        SliceRecord(
            case_id=case.case_id,
            slice_index=int(s),
            image=image[j][None],
            mask=masks[j],
            phi=signed_distance(masks[j], clip=cfg.clip),
            valid=valid,
            spacing=spacing,
            source=source,
        )
        for j, s in enumerate(keep)
    ]
    empty = int(np.count_nonzero(~masks.any(axis=(1, 2))))
    return ItemResult(case.case_id, records, n_total, empty_masks=empty)


def _shrunk_labels(seg: np.ndarray, masks: np.ndarray, foreground_labels: Sequence[int],
                   size: tuple[int, int]) -> np.ndarray:
    """Labels (0, 1, 2) of ``seg`` (slices, H, W) at ``size``: kidney ∪ tumour and tumour each by majority
    vote, so the rendered organ outline is the shrunk target's (``masks`` when that is kidney ∪ tumour)."""
    if tuple(sorted(foreground_labels)) == (1, 2):
        organ = masks
    else:
        organ = np.stack([resize_mask(s > 0, size) for s in seg])
    out = organ.copy()
    for j, s in enumerate(seg):
        tumour = s == 2
        if tumour.any():
            out[j][(resize_mask(tumour, size) == 1) & (organ[j] == 1)] = 2
    return out


def predict_volume(phi: PhiFn, preprocessing: dict[str, Any], volume: Path, output: Path) -> Path:
    """Segment every slice of ``volume`` (slices, H, W); write a uint8 label volume with its affine and header.

    Slices are windowed and resized as in training; φ̂ is resized back to (H, W) bilinearly and thresholded at
    0, which is smoother than resizing a mask. Label 1 marks the segmented object (kidney and tumour).
    """
    hu, img = read_volume(volume)
    size = int(preprocessing.get("size", 200))
    window = tuple(preprocessing.get("hu_window", (-79.0, 304.0)))
    image = normalise_hu(hu, window, preprocessing.get("normalisation", "minmax"),
                         tuple(preprocessing.get("zscore_stats", (101.0, 76.9))))
    del hu
    h, w = image.shape[1:]
    labels = np.zeros(image.shape, dtype=np.uint8)
    for start in range(0, image.shape[0], 64):  # bounded memory on long volumes
        chunk = np.stack([resize_image(s, (size, size)) for s in image[start : start + 64]])[:, None]
        for j, p in enumerate(phi(chunk)):
            labels[start + j] = (resize_image(p, (h, w)) < 0).astype(np.uint8) * KIDNEY_LABEL
    header = img.header.copy()
    header.set_data_dtype(np.uint8)
    out_img = nib.Nifti1Image(labels, img.affine, header)
    out_img.set_qform(img.get_qform(), code=int(img.header["qform_code"]))
    out_img.set_sform(img.get_sform(), code=int(img.header["sform_code"]))
    with atomic_file(output, suffix=".nii.gz" if str(output).endswith(".gz") else ".nii") as tmp:
        nib.save(out_img, tmp)
    log.info("%s: %d of %d slices hold the object", output, int(labels.any(axis=(1, 2)).sum()), len(labels))
    return output


class Kits19Reader(Reader):
    """KiTS19's layout: ``<root>/case_XXXXX/{imaging,segmentation}.nii.gz``; one item per case (= patient)."""

    name: ClassVar[str] = "kits19"
    noun: ClassVar[str] = "case"
    input_kind: ClassVar[str] = "a NIfTI volume (.nii or .nii.gz)"

    def list_items(self, root: Path, cfg: IngestConfig) -> dict[str, Any]:
        return {f.name: str(f) for f in list_cases(root)}

    def item_path(self, item: Any) -> Path:
        return Path(item)

    def read_item(self, item: Any, cfg: IngestConfig, seed: int, label: str) -> ItemResult:
        return read_case(item, cfg, seed)

    def input_side(self, preprocessing: dict[str, Any]) -> int:
        return int(preprocessing.get("size", 200))

    def accepts(self, path: Path) -> bool:
        return path.name.endswith((".nii", ".nii.gz")) and not path.is_dir()

    def predict(self, phi: PhiFn, preprocessing: dict[str, Any], input_path: Path, output: Path) -> Path:
        return predict_volume(phi, preprocessing, input_path, output)
