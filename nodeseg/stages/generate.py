"""`nodeseg generate`: phantom CT cases in the KiTS19 layout (the embedded default data)."""

from __future__ import annotations

from pathlib import Path

from nodeseg.data.synthetic import write_phantom_cases
from nodeseg.params import Params


def generate(out: Path, params: Params) -> list[Path]:
    """Write ``params.phantom.n_cases`` phantom cases (imaging + segmentation NIfTI) under ``out``."""
    return write_phantom_cases(Path(out), params.phantom, params.seed)
