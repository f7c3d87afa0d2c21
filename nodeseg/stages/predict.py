"""`nodeseg predict`: a CT volume (NIfTI) or an image folder in, a label volume or mask folder out."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from PIL import Image
from torch import nn

from nodeseg.atomic import atomic_dir, atomic_file
from nodeseg.data.kits19 import normalise_hu, read_volume
from nodeseg.data.saliency import IMAGE_EXTS, load_image
from nodeseg.data.transforms import fit_canvas, resize_image
from nodeseg.errors import InputError
from nodeseg.models.spec import load_model

log = logging.getLogger(__name__)

KIDNEY_LABEL = 1


def load_predictor(model_ref: str) -> tuple[nn.Module, dict[str, Any]]:
    """A model and its checkpoint payload from a checkpoint file or an MLflow URI (models:/, runs:/)."""
    if model_ref.startswith(("models:/", "runs:/")):
        import mlflow.pyfunc

        from nodeseg.tracking import configure

        configure()
        wrapped = mlflow.pyfunc.load_model(model_ref).unwrap_python_model()
        return wrapped.model, wrapped.payload
    return load_model(Path(model_ref))


@torch.no_grad()
def _phi(model: nn.Module, images: np.ndarray, batch_size: int) -> np.ndarray:
    out = [model(torch.from_numpy(images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
    return torch.cat(out)[:, 0].numpy()


def predict_volume(model: nn.Module, preprocessing: dict[str, Any], volume: Path, output: Path,
                   batch_size: int = 8) -> Path:
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
        phi = _phi(model, chunk, batch_size)
        for j, p in enumerate(phi):
            labels[start + j] = (resize_image(p, (h, w)) < 0).astype(np.uint8) * KIDNEY_LABEL
    header = img.header.copy()
    header.set_data_dtype(np.uint8)
    out_img = nib.Nifti1Image(labels, img.affine, header)
    out_img.set_qform(img.get_qform(), code=int(img.header["qform_code"]))
    out_img.set_sform(img.get_sform(), code=int(img.header["sform_code"]))
    _atomic_nifti(out_img, output)
    log.info("%s: %d of %d slices hold the object", output, int(labels.any(axis=(1, 2)).sum()), len(labels))
    return output


def _atomic_nifti(img: nib.Nifti1Image, output: Path) -> None:
    with atomic_file(output, suffix=".nii.gz" if str(output).endswith(".gz") else ".nii") as tmp:
        nib.save(img, tmp)


def predict_folder(model: nn.Module, preprocessing: dict[str, Any], folder: Path, output: Path,
                   batch_size: int = 8) -> Path:
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
            phi = _phi(model, placed[None], batch_size)[0]
            rows, cols = int(valid.any(axis=1).sum()), int(valid.any(axis=0).sum())
            phi = resize_image(phi[:rows, :cols], (h, w))
            Image.fromarray(((phi < 0) * 255).astype(np.uint8)).save(tmp / f"{f.stem}.png")
    return output


def predict(model_ref: str, input_path: Path, output: Path, batch_size: int = 8) -> Path:
    """Run a model (checkpoint file or MLflow URI) on a NIfTI volume or an image folder."""
    model, payload = load_predictor(model_ref)
    model.eval()
    preprocessing = payload.get("model_spec", {}).get("preprocessing", {})
    input_path = Path(input_path)
    if input_path.is_dir():
        return predict_folder(model, preprocessing, input_path, Path(output), batch_size)
    if not input_path.name.endswith((".nii", ".nii.gz")):
        raise InputError(input_path, "expected a NIfTI volume (.nii or .nii.gz) or a folder of images")
    return predict_volume(model, preprocessing, input_path, Path(output), batch_size)
