"""The training pipeline: raw data → preprocess → pretrain → select → refine (+ image-evolve) → evaluate → register.

``distributed`` picks, at run time, whether pretrain and refine run as plain steps (one pod, one GPU) or as
PyTorchJobs through the launcher step. kfp.local cannot merge artifacts from two branches (``dsl.OneOf``),
so each branch holds its own pretrain → select → refine → evaluate → register chain, built by one function;
image-evolve (never a PyTorchJob) runs once, before the branches. ``register`` runs when
``evaluate.register`` is true.

    python -m pipelines.training compile                       # writes pipelines/training.yaml
    python -m pipelines.training submit --host URL --namespace NS --set raw_data=s3://... [--set key=value]
    python -m pipelines.training local --set raw_data=data/raw/phantom [--set key=value]   # kfp.local, here
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kfp import dsl

from components.stages import LAUNCHER_OPTIONS
from pipelines.definition import REQUIRED, Option, PipelineDef
from pipelines.steps import Steps

OPTIONS = (
    Option("raw_data", str, REQUIRED,
           "URI of the raw data folder (KiTS19 case folders, a saliency folder, `nodeseg generate` output):"
           " s3://, minio://, gs://, or a local path for a local run"),
    Option("distributed", bool, False, "run pretrain and refine as PyTorchJobs (multi-node DDP)"),
    *(Option(o.name, o.type, o.default, o.help) for o in LAUNCHER_OPTIONS),
)


def train_and_evaluate(p: Mapping[str, Any], steps: Steps, shards: Any, image: Any, *, launcher: bool) -> None:
    """pretrain → select → refine → evaluate → register, with pretrain and refine as PyTorchJobs or not."""
    pretrain = steps.add("pretrain", p, launcher=launcher, shards=shards)
    select = steps.add("select", p, run=pretrain.outputs["run"])
    unet = select.outputs["model"]
    refine = steps.add("refine", p, launcher=launcher, shards=shards, unet=unet)
    models = {"unet": unet, "contour": refine.outputs["run"], "image": image}
    evaluate = steps.add("evaluate", p, shards=shards, **models)
    with dsl.If(p["evaluate__register"] == True, name="register-models"):  # noqa: E712 - a kfp condition
        steps.add("register", p, report=evaluate.outputs["report"], **models)


def graph(p: Mapping[str, Any], steps: Steps) -> None:
    """The training pipeline's steps."""
    raw = dsl.importer(artifact_uri=p["raw_data"], artifact_class=dsl.Dataset, reimport=False)
    shards = steps.add("preprocess", p, raw=raw.output).outputs["shards"]
    image = steps.add("image-evolve", p, shards=shards).outputs["run"]
    with dsl.If(p["distributed"] == True, name="distributed"):  # noqa: E712
        train_and_evaluate(p, steps, shards, image, launcher=True)
    with dsl.Else(name="single-pod"):
        train_and_evaluate(p, steps, shards, image, launcher=False)


PIPELINE = PipelineDef(
    name="nodeseg-training",
    description="nodeseg: preprocess, pretrain, select, refine, image-evolve, evaluate, register.",
    options=OPTIONS,
    graph=graph,
    package=Path(__file__).with_suffix(".yaml"),
)


if __name__ == "__main__":
    from pipelines.cli import main

    sys.exit(main(PIPELINE))
