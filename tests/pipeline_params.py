"""Tiny pipeline params, and the tiny pipeline run once per session (a plugin: `pytest_plugins = [\"pipeline_params\"]`)."""

from __future__ import annotations

from pathlib import Path

import pytest
from committed import PARAMS

from nodeseg.params import Params, load_params
from nodeseg.stages.generate import generate
from nodeseg.stages.image_evolve import image_evolve
from nodeseg.stages.preprocess import preprocess
from nodeseg.stages.pretrain import pretrain
from nodeseg.stages.refine import refine
from nodeseg.stages.select import select_checkpoint

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
    return load_params([PARAMS], [*TINY, *extra])


@pytest.fixture(scope="session")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """generate → preprocess → pretrain → select → refine → image-evolve, once per test session."""
    root = tmp_path_factory.mktemp("pipeline")
    params = tiny_params()
    paths = {"raw": root / "raw", "shards": root / "shards", "pretrain": root / "pretrain",
             "select": root / "select", "refine": root / "refine", "image": root / "image_evolve"}
    generate(paths["raw"], params)
    preprocess(paths["raw"], paths["shards"], params)
    pretrain(paths["shards"], paths["pretrain"], params)
    select_checkpoint(paths["pretrain"], paths["select"], params.select)
    refine(paths["shards"], paths["select"] / "model.pt", paths["refine"], params)
    image_evolve(paths["shards"], paths["image"], params)
    return paths
