"""Adding ``nodeseg`` steps to a pipeline graph: the component per mode, its inputs, its Kubernetes settings.

The graph functions of :mod:`pipelines.training` and :mod:`pipelines.tuning` call :meth:`Steps.add` and
never see which mode they build: ``local=False`` gives container components with GPUs, node selectors,
tolerations, the ConfigMap and Secret as environment and the data volume (through kfp-kubernetes);
``local=True`` gives the lightweight stand-ins that ``kfp.local`` runs on this machine.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kfp import dsl, kubernetes
from kfp.dsl.base_component import BaseComponent

from components import Cluster, container_component, local_component
from components.stages import STAGES


class Steps:
    """A factory of ``nodeseg`` pipeline tasks for one mode (cluster or local)."""

    def __init__(self, *, local: bool = False, cluster: Cluster | None = None) -> None:
        self.local = local
        self.cluster = cluster or Cluster()
        self._components: dict[tuple[str, bool], BaseComponent] = {}

    def component(self, stage: str, *, launcher: bool = False) -> BaseComponent:
        """The component of ``stage`` in this mode (built once)."""
        key = (stage, launcher)
        if key not in self._components:
            self._components[key] = (
                local_component(stage, launcher=launcher) if self.local
                else container_component(stage, self.cluster, launcher=launcher)
            )
        return self._components[key]

    def add(self, stage: str, values: Mapping[str, Any], *, launcher: bool = False, **artifacts: Any) -> dsl.PipelineTask:
        """A task of ``stage`` taking its artifacts from ``artifacts`` and every other input it declares from
        ``values`` (the pipeline's parameters, by name)."""
        comp = self.component(stage, launcher=launcher)
        inputs = comp.component_spec.inputs or {}
        unknown = sorted(set(artifacts) - set(inputs))
        if unknown:
            raise ValueError(f"{stage}: no input named {unknown[0]!r} (inputs: {sorted(inputs)})")
        kwargs = {name: values[name] for name in inputs if name not in artifacts and name in values}
        task = comp(**kwargs, **artifacts)
        if STAGES[stage].database:  # its work is in an outside database: a cached result would skip the trials
            task.set_caching_options(False)
        if not self.local:  # kfp.local ignores (and warns about) display names and platform settings
            task.set_display_name(f"{stage} (PyTorchJob)" if launcher else stage)
            self._kubernetes(task, stage, launcher)
        return task

    def _kubernetes(self, task: dsl.PipelineTask, stage: str, launcher: bool) -> None:
        c = self.cluster
        kubernetes.use_config_map_as_env(task, c.config_map, {k: k for k in c.config_map_keys})
        kubernetes.use_secret_as_env(task, c.secret, {k: k for k in c.secret_keys})
        if STAGES[stage].database:  # libpq reads the password from PGPASSWORD: none in the storage URL
            kubernetes.use_secret_as_env(task, c.database_secret, {c.database_password_key: "PGPASSWORD"})
        if launcher:
            # KFP downloads the inputs to, and uploads the outputs from, <artifact_root>/...: on the shared
            # volume, where the PyTorchJob's pods (mounting it at the same path) read and write them
            kubernetes.mount_pvc(task, pvc_name=c.pvc, mount_path=c.artifact_root)
        elif STAGES[stage].gpu and c.gpus_per_node:
            task.set_accelerator_type(c.gpu_resource).set_accelerator_limit(c.gpus_per_node)
            for key, value in c.node_selector:
                kubernetes.add_node_selector(task, key, value)
            for key, effect in c.tolerations:
                kubernetes.add_toleration(task, key=key, operator="Exists", effect=effect)
