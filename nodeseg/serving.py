"""The MLflow pyfunc flavour of a nodeseg checkpoint (MLflow's default pt2 export fails on torchdiffeq models)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import torch

PIP_REQUIREMENTS = [
    "torch==2.13.0", "torchdiffeq==0.2.5", "numpy", "scipy", "pyyaml", "mlflow",
]


class NodesegModel(mlflow.pyfunc.PythonModel):
    """Wraps a checkpoint: ``predict`` takes images (N, H, W) or (N, C, H, W), float32, preprocessed like the
    shards, and returns φ̂ (N, H, W) float32 (foreground where φ̂ < 0)."""

    def load_context(self, context: Any) -> None:
        from nodeseg.models.spec import load_model

        self.model, self.payload = load_model(Path(context.artifacts["checkpoint"]))

    def predict(self, context: Any, model_input: np.ndarray, params: dict[str, Any] | None = None) -> np.ndarray:
        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        if x.ndim == 3:
            x = x[:, None]
        with torch.no_grad():
            return self.model(x)[:, 0].numpy()


def signature(channels: int, size: int) -> Any:
    """Tensor signature: float32 images (-1, C, size, size) in, φ̂ (-1, size, size) out."""
    from mlflow.models import infer_signature

    return infer_signature(np.zeros((1, channels, size, size), np.float32), np.zeros((1, size, size), np.float32))


def log_pyfunc(checkpoint: Path, name: str, registered_model_name: str | None = None,
               channels: int = 1, size: int = 200) -> Any:
    """Log ``checkpoint`` as a pyfunc model in the active run (optionally registering it); the model info.

    The model is logged "from code" (``serving_entry.py``), with the nodeseg package as code, so loading it
    needs torch and torchdiffeq but neither nodeseg installed nor unpickling of Python objects.
    """
    import nodeseg

    package = Path(nodeseg.__file__).parent
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=str(package / "serving_entry.py"),
        artifacts={"checkpoint": str(checkpoint)},
        code_paths=[str(package)],
        pip_requirements=PIP_REQUIREMENTS,
        registered_model_name=registered_model_name,
        signature=signature(channels, size),
    )
