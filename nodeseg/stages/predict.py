"""`nodeseg predict`: a CT volume (NIfTI) or an image folder in, a label volume or mask folder out.

The input's kind is the model's data source (its reader in ``nodeseg.data.readers``): a model trained on
KiTS19 cases segments a NIfTI volume, one trained on image folders a folder of images.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from nodeseg.data.readers import READERS, PhiFn, get_reader, reader_for_input
from nodeseg.errors import InputError
from nodeseg.models.spec import load_model

log = logging.getLogger(__name__)


def load_predictor(model_ref: str) -> tuple[nn.Module, dict[str, Any]]:
    """A model and its checkpoint payload from a checkpoint file or an MLflow URI (models:/, runs:/)."""
    if model_ref.startswith(("models:/", "runs:/")):
        import mlflow.pyfunc

        from nodeseg.tracking import configure

        configure()
        wrapped = mlflow.pyfunc.load_model(model_ref).unwrap_python_model()
        return wrapped.model, wrapped.payload
    return load_model(Path(model_ref))


def phi_function(model: nn.Module, batch_size: int = 8) -> PhiFn:
    """The model as the readers call it: images (N, C, H, W) float32 → φ̂ (N, H, W), in batches, no grad."""

    @torch.no_grad()
    def phi(images: np.ndarray) -> np.ndarray:
        out = [model(torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size])))
               for i in range(0, len(images), batch_size)]
        return torch.cat(out)[:, 0].numpy()

    return phi


def predict(model_ref: str, input_path: Path, output: Path, batch_size: int = 8) -> Path:
    """Run a model (checkpoint file or MLflow URI) on its source's kind of input (a NIfTI volume, an image folder).

    A model that does not record its source (an older checkpoint) takes whichever kind ``input_path`` is.
    """
    model, payload = load_predictor(model_ref)
    model.eval()
    preprocessing = payload.get("model_spec", {}).get("preprocessing", {})
    input_path = Path(input_path)
    source = preprocessing.get("source")
    if source in READERS:
        reader = get_reader(source)
        if not reader.accepts(input_path):
            raise InputError(input_path, f"the model was trained on {source} data: expected {reader.input_kind}")
    else:
        found = reader_for_input(input_path)
        if found is None:
            raise InputError(input_path, "expected " + " or ".join(cls.input_kind for cls in READERS.values()))
        reader = found
    out = reader.predict(phi_function(model, batch_size), preprocessing, input_path, Path(output))
    log.info("%s: %s prediction written", out, reader.name)
    return out
