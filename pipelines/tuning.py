"""The tolerance study: create the Optuna study, N parallel ``nodeseg tune`` tasks join it, then the report.

Every task talks to one study storage (``storage``; the default is the PostgreSQL of k8s/base, its password
comes from the ``postgres-credentials`` Secret as ``PGPASSWORD``). ``worker_indices`` holds one distinct
index per parallel task (its sampler seed is ``seed + index``); each runs ``trials_per_task`` trials with
``--workers 1``. The report step writes the Pareto front, the chosen operating point (``choice.json``) and
that point's solver as a params file (``solver_params``: ``contour.solver`` keys, for ``--params``).
The shards and the selected UNet come from URIs (e.g. the artifacts of a training run).

    python -m pipelines.tuning compile
    python -m pipelines.tuning submit --host URL --namespace NS --set shards_uri=... --set unet_uri=...
    python -m pipelines.tuning local --set shards_uri=DIR --set unet_uri=DIR --set storage=journal:study.log
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kfp import dsl

from components import pipeline_params
from components.stages import DEFAULT_STORAGE
from nodeseg.tuning import DEFAULT_STUDY
from pipelines.definition import REQUIRED, Option, PipelineDef
from pipelines.steps import Steps

TASKS = 4  # parallel tasks by default, and at most this many at once


def _trials_per_task() -> int:
    """tune.n_trials of params.yaml spread over :data:`TASKS` tasks."""
    n_trials = next(p.default for p in pipeline_params() if p.key == "tune.n_trials")
    return math.ceil(n_trials / TASKS)


OPTIONS = (
    Option("shards_uri", str, REQUIRED, "URI of the shards (the preprocess output of a training run)"),
    Option("unet_uri", str, REQUIRED, "URI of the selected UNet (a select output folder holding model.pt)"),
    Option("storage", str, DEFAULT_STORAGE,
           "Optuna storage URL every task joins (no password: PGPASSWORD comes from the Secret)"),
    Option("study_name", str, DEFAULT_STUDY, "the study's name in the storage"),
    Option("worker_indices", list, list(range(TASKS)), "one distinct index per parallel task"),
    Option("trials_per_task", int, _trials_per_task(), "trials each task runs"),
)


def graph(p: Mapping[str, Any], steps: Steps) -> None:
    """The tuning pipeline's steps."""
    shards = dsl.importer(artifact_uri=p["shards_uri"], artifact_class=dsl.Dataset, reimport=False)
    unet = dsl.importer(artifact_uri=p["unet_uri"], artifact_class=dsl.Model, reimport=False)
    create = steps.add("tune-create", p)
    with dsl.ParallelFor(p["worker_indices"], parallelism=TASKS, name="study-workers") as index:
        optimize = steps.add("tune-optimize", p, shards=shards.output, unet=unet.output, worker_index=index)
        optimize.after(create)
    steps.add("tune-report", p).after(optimize)


PIPELINE = PipelineDef(
    name="nodeseg-tuning",
    description="nodeseg: solver tolerance study (Optuna), parallel trials, Pareto front and operating point.",
    options=OPTIONS,
    graph=graph,
    package=Path(__file__).with_suffix(".yaml"),
)


if __name__ == "__main__":
    from pipelines.cli import main

    sys.exit(main(PIPELINE))
