"""Kubeflow Pipelines components of nodeseg: one per ``nodeseg <stage>``, and the PyTorchJob launcher.

``container_component(stage)`` runs ``nodeseg <stage>`` in the project image (:func:`config.image`);
``container_component(stage, launcher=True)`` runs ``python -m nodeseg.kube.pytorchjob launch`` there, which
creates a PyTorchJob for the stage, follows it and cleans up. ``local_component`` gives the ``kfp.local``
stand-ins with the same interface. Hyperparameters are component inputs named after params.yaml keys
(``refine__lr``), see :mod:`components.params`. The Dockerfiles beside this package build the image.
"""

from components.config import DEFAULT_IMAGE, IMAGE_ENV, Cluster, image
from components.factory import container_component, local_component
from components.params import PipelineParam, pipeline_params, stage_params
from components.stages import LAUNCHER_OPTIONS, STAGES, StageSpec

__all__ = [
    "DEFAULT_IMAGE",
    "IMAGE_ENV",
    "LAUNCHER_OPTIONS",
    "STAGES",
    "Cluster",
    "PipelineParam",
    "StageSpec",
    "container_component",
    "image",
    "local_component",
    "pipeline_params",
    "stage_params",
]
