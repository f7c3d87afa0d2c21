"""Tiny pipeline params shared by the stage and DVC tests (imported as a plain module, like s3_server)."""

from __future__ import annotations

from pathlib import Path

from nodeseg.params import Params, load_params

REPO = Path(__file__).resolve().parents[1]

TINY = [
    "phantom.n_cases=4", "phantom.n_slices=12", "phantom.shape=[48, 48]", "phantom.spacing=[8.0, 8.0, 8.0]",
    "data.workers=1", "ingest.size=32", "ingest.val_fraction=0.25",
    "pretrain.epochs=2", "pretrain.batch_size=4", "pretrain.warmup_steps=2",
    "refine.epochs=1", "refine.batch_size=4", "refine.max_batches_per_epoch=3",
    "image_evolve.epochs=1", "image_evolve.batch_size=4", "image_evolve.max_batches_per_epoch=3",
    "image.solver.method=euler", "image.solver.step_size=0.5", "image.solver.first_step=null",
    "evaluate.register=false", "evaluate.figure_samples=2", "evaluate.figure_times=3",
]


def tiny_params(*extra: str) -> Params:
    """The committed params.yaml shrunk to seconds of work."""
    return load_params([REPO / "params.yaml"], [*TINY, *extra])
