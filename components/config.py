"""Where the pipeline steps run: the image and the Kubernetes objects of ``k8s/base``, named in one place."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from nodeseg.kube.job import DEFAULT_CONFIG_MAPS, DEFAULT_PVC, DEFAULT_SECRETS

DEFAULT_IMAGE = "ghcr.io/nodeseg/nodeseg:0.1.0"
IMAGE_ENV = "NODESEG_IMAGE"

#: keys of the ConfigMap ``nodeseg-env`` (k8s/base/config.yaml) and of the Secret ``s3-credentials``
CONFIG_MAP_KEYS = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_EXPERIMENT_NAME",
    "AWS_ENDPOINT_URL",
    "MLFLOW_S3_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
)
SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")

#: where a KFP v2 step finds its artifacts on disk, by pipeline-root scheme (the KFP launcher's rule)
ARTIFACT_ROOTS = {"minio": "/minio", "s3": "/s3", "gs": "/gcs"}


def image() -> str:
    """The project image every step runs: ``$NODESEG_IMAGE``, else :data:`DEFAULT_IMAGE`."""
    return os.environ.get(IMAGE_ENV) or DEFAULT_IMAGE


@dataclass(frozen=True)
class Cluster:
    """Compile-time Kubernetes settings of the pipeline steps (the defaults match ``k8s/overlays/gpu``).

    ``artifact_root`` is where KFP puts artifacts inside a step (``/minio`` for the default ``minio://``
    pipeline root, ``/s3`` for ``s3://``): the launcher step mounts ``pvc`` there, and so do the
    PyTorchJob pods it creates, so they read and write the step's artifacts on the shared volume.
    """

    image: str = field(default_factory=image)
    pvc: str = DEFAULT_PVC
    config_map: str = DEFAULT_CONFIG_MAPS[0]
    config_map_keys: tuple[str, ...] = CONFIG_MAP_KEYS
    secret: str = DEFAULT_SECRETS[0]
    secret_keys: tuple[str, ...] = SECRET_KEYS
    database_secret: str = "postgres-credentials"  # the Optuna database password, as PGPASSWORD for libpq
    database_password_key: str = "OPTUNA_DB_PASSWORD"
    gpu_resource: str = "nvidia.com/gpu"
    gpus_per_node: int = 1
    node_selector: tuple[tuple[str, str], ...] = (("nvidia.com/gpu.present", "true"),)
    tolerations: tuple[tuple[str, str], ...] = (("nvidia.com/gpu", "NoSchedule"),)  # (key, effect): Exists
    artifact_root: str = ARTIFACT_ROOTS["minio"]

    def __post_init__(self) -> None:
        if self.artifact_root not in ARTIFACT_ROOTS.values():
            raise ValueError(
                f"artifact_root must be one of {sorted(ARTIFACT_ROOTS.values())} (KFP's local artifact roots),"
                f" got {self.artifact_root!r}"
            )
        if self.gpus_per_node < 0:
            raise ValueError(f"gpus_per_node must be >= 0, got {self.gpus_per_node!r}")
