"""Components from :data:`components.stages.STAGES`: container components for the cluster, lightweight
Python stand-ins with the same interface for ``kfp.local``.

Container component: ``nodeseg <stage>`` (or ``python -m nodeseg.kube.pytorchjob launch ... -- <stage args>``
for the launcher) in the project image, its args built by :func:`components._runtime.stage_argv` from KFP
placeholders; no code in the args.

Local component: kfp builds a lightweight component from a function's *source*, and the stage interfaces
(dozens of typed parameters) are generated from params.yaml, so the stand-in is a generated function with
exactly the container component's signature whose body is one call, ``run_local(<layout>, locals())``;
that runs the same argv through ``nodeseg.cli.main`` (the launcher's stand-in runs it under ``torchrun``).
"""

from __future__ import annotations

import inspect
import linecache
from collections.abc import Callable
from typing import Any

from kfp import dsl
from kfp.dsl.base_component import BaseComponent

from components._runtime import run_local, run_local_launch, stage_argv
from components.config import Cluster
from components.stages import LAUNCH_COMMAND, NO_DEFAULT, OUTCOME, STAGES, Interface, StageSpec, interface

LOCAL_BASE_IMAGE = "python:3.11"  # never pulled: kfp.local runs the stand-ins in this interpreter


def _spec(stage: str, launcher: bool) -> StageSpec:
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}: expected one of {sorted(STAGES)}")
    spec = STAGES[stage]
    if launcher and not spec.ddp:
        raise ValueError(f"stage {stage!r} does not run as a PyTorchJob: expected one of "
                         f"{sorted(s for s, v in STAGES.items() if v.ddp)}")
    return spec


def _name(spec: StageSpec, launcher: bool) -> str:
    return spec.function_name + ("_pytorchjob" if launcher else "")


def _signature(iface: Interface) -> inspect.Signature:
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    return inspect.Signature([
        inspect.Parameter(name, kind, annotation=ann, **({} if default is NO_DEFAULT else {"default": default}))
        for name, ann, _, default in iface.entries
    ])


def launcher_argv(spec: StageSpec, values: dict[str, Any], cluster: Cluster) -> list[Any]:
    """The launcher's own arguments (before ``--``): the job, its volume, env, scheduling and clean-up."""
    argv: list[Any] = [
        "--namespace", values["namespace"], "--stage", spec.command, "--image", cluster.image,
        "--workers", values["ddp_workers"], "--gpus-per-node", str(cluster.gpus_per_node),
        "--pvc", cluster.pvc, "--mount-path", cluster.artifact_root,
        "--env-from-secret", cluster.secret, "--env-from-config-map", cluster.config_map,
    ]
    if cluster.gpus_per_node:
        for key, value in cluster.node_selector:
            argv += ["--node-selector", f"{key}={value}"]
        for key, effect in cluster.tolerations:
            argv += ["--toleration", f"{key}:{effect}"]
    argv += ["--delete", values["job_delete"], "--timeout-s", values["job_timeout_s"],
             "--outcome-json", values[OUTCOME]]
    return [a if isinstance(a, str) else f"{a}" for a in argv]


def container_component(stage: str, cluster: Cluster | None = None, *, launcher: bool = False) -> BaseComponent:
    """The container component of ``stage`` (``launcher``: the step that runs it as a PyTorchJob)."""
    spec = _spec(stage, launcher)
    cluster = cluster or Cluster()
    iface = interface(spec, launcher=launcher)
    layout = spec.plain()

    def build(*args: Any) -> dsl.ContainerSpec:
        values = dict(zip(iface.names, args, strict=True))
        if launcher:
            return dsl.ContainerSpec(image=cluster.image, command=list(LAUNCH_COMMAND),
                                     args=[*launcher_argv(spec, values, cluster), "--", *stage_argv(layout, values)])
        return dsl.ContainerSpec(image=cluster.image, command=["nodeseg", spec.command],
                                 args=stage_argv(layout, values))

    build.__signature__ = _signature(iface)  # type: ignore[attr-defined]
    build.__name__ = build.__qualname__ = _name(spec, launcher)
    build.__doc__ = (f"PyTorchJob: {spec.description}" if launcher else spec.description)
    return dsl.container_component(build)


def _source(name: str, iface: Interface, body: str) -> str:
    params = [f"{n}: {text}" + ("" if d is NO_DEFAULT else f" = {d!r}") for n, _, text, d in iface.entries]
    return f"def {name}({', '.join(params)}):\n    {body}\n"


def local_component(stage: str, *, launcher: bool = False) -> BaseComponent:
    """The ``kfp.local`` stand-in of :func:`container_component` (same name, inputs and outputs)."""
    spec = _spec(stage, launcher)
    iface = interface(spec, launcher=launcher)
    name = _name(spec, launcher)
    runner: Callable[..., None] = run_local_launch if launcher else run_local
    source = _source(name, iface, f"return {runner.__name__}({spec.plain()!r}, locals())")
    filename = f"<nodeseg-local-{name}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)  # for inspect.getsource
    namespace: dict[str, Any] = {"__name__": "components.local", "Input": dsl.Input, "Output": dsl.Output,
                                 "OutputPath": dsl.OutputPath, "Artifact": dsl.Artifact, "Dataset": dsl.Dataset,
                                 "Model": dsl.Model, runner.__name__: runner}
    # dont_inherit: this module's `from __future__ import annotations` would turn the annotations into strings
    exec(compile(source, filename, "exec", dont_inherit=True), namespace)  # noqa: S102 - generated from STAGES
    func = namespace[name]
    func.__doc__ = spec.description
    return dsl.component(func, base_image=LOCAL_BASE_IMAGE, install_kfp_package=False,
                         additional_funcs=[stage_argv, runner])
