"""Check a PyTorchJob before it is submitted: the SDK models accept it unchanged, and its torchrun
flags agree with what the Kubeflow training operator will inject into its pods.

``operator_env`` models the operator (v1.8/v1.9, pkg/controller.v1/pytorch/envvar.go, master.go,
elastic.go and the defaults in pkg/apis/kubeflow.org/v1/pytorch_defaults.go); ``check_wiring`` holds a
job against it. Both the launcher (before creating a job) and the manifest tests use them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from kubeflow.training import ApiClient

from nodeseg.errors import check_arg
from nodeseg.kube.job import API_VERSION, CONTAINER_NAME, DDP_STAGES, KIND, PORT_NAME


class _Response:
    """What ``ApiClient.deserialize`` reads: an object with the JSON text in ``data``."""

    def __init__(self, obj: Mapping[str, Any]) -> None:
        self.data = json.dumps(obj)


def _first_difference(a: Any, b: Any, path: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            if key not in b:
                return f"{path}.{key}"
            if key not in a:
                return f"{path}.{key} (added)"
            found = _first_difference(a[key], b[key], f"{path}.{key}")
            if found:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{path} (length {len(a)} vs {len(b)})"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            found = _first_difference(x, y, f"{path}[{i}]")
            if found:
                return found
        return None
    return None if a == b else path or "."


def check_roundtrip(job: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` unless ``job`` survives the SDK models unchanged (unknown or mistyped fields).

    The generated models drop fields they do not know; comparing the round trip with the input turns
    that into an error naming the first field that did not survive.
    """
    check_arg(isinstance(job, Mapping), "job", type(job).__name__, "a mapping")
    check_arg(
        job.get("apiVersion") == API_VERSION and job.get("kind") == KIND,
        "job",
        f"{job.get('apiVersion')}/{job.get('kind')}",
        f"a {API_VERSION} {KIND}",
    )
    client = ApiClient()
    try:
        model = client.deserialize(_Response(job), "KubeflowOrgV1PyTorchJob")
    except (ValueError, TypeError) as err:
        raise ValueError(
            f"PyTorchJob {job.get('metadata', {}).get('name')!r} does not fit the SDK models: {err}"
        ) from None
    back = client.sanitize_for_serialization(model)
    where = _first_difference(dict(job), back)
    if where is not None:
        raise ValueError(
            f"PyTorchJob {job.get('metadata', {}).get('name')!r}: field {where.lstrip('.')} is unknown to "
            "kubeflow.org/v1 or has the wrong type (it does not survive the SDK models)"
        )


def _port(job: Mapping[str, Any], replica_type: str) -> int | None:
    template = job["spec"]["pytorchReplicaSpecs"][replica_type]["template"]
    for c in template["spec"]["containers"]:
        if c.get("name") == CONTAINER_NAME:
            for p in c.get("ports") or []:
                if p.get("name") == PORT_NAME:
                    return int(p["containerPort"])
    return None


def elastic_bounds(job: Mapping[str, Any]) -> tuple[int, int] | None:
    """``(minReplicas, maxReplicas)`` after the operator's defaulting (pytorch_defaults.go), or None."""
    spec = job["spec"]
    policy = spec.get("elasticPolicy")
    if policy is None:
        return None
    lo, hi = policy.get("minReplicas"), policy.get("maxReplicas")
    if lo is None and hi is None:
        lo = hi = spec["pytorchReplicaSpecs"].get("Worker", {}).get("replicas", 1)
    return (hi if lo is None else lo), (lo if hi is None else hi)


def operator_env(job: Mapping[str, Any], replica_type: str, index: int) -> dict[str, str]:
    """The variables the training operator (v1.8/v1.9) adds to pod ``<job>-<replica>-<index>``.

    A model of pkg/controller.v1/pytorch/envvar.go (WORLD_SIZE, RANK, PET_NODE_RANK, PET_NPROC_PER_NODE,
    PET_NNODES), master.go (MASTER_ADDR, MASTER_PORT) and elastic.go (PET_RDZV_*, PET_NNODES=min:max,
    PET_MAX_RESTARTS), used to check that a job's torchrun flags say what the operator says.
    """
    spec = job["spec"]
    specs = spec["pytorchReplicaSpecs"]
    name = job["metadata"]["name"]
    total = sum(int(r.get("replicas", 1)) for r in specs.values())
    nproc = str(spec.get("nprocPerNode", ""))
    env = {"PYTHONUNBUFFERED": "1"}
    if "Master" in specs:
        rank = index + (1 if replica_type == "Worker" else 0)
        env.update(
            MASTER_PORT=str(_port(job, "Master")),
            MASTER_ADDR=f"{name}-master-0",
            WORLD_SIZE=str(total * (int(nproc) if nproc.isdigit() else 1)),
            RANK=str(rank),
            PET_NODE_RANK=str(rank),
        )
    if spec.get("nprocPerNode") is not None:
        env["PET_NPROC_PER_NODE"] = nproc
    policy = spec.get("elasticPolicy")
    if policy is None:
        env["PET_NNODES"] = str(total)
        return env
    host = policy.get("rdzvHost") or f"{name}-worker-0"
    port = policy.get("rdzvPort") or _port(job, "Worker")
    lo, hi = elastic_bounds(job) or (0, 0)
    env.update(
        PET_RDZV_ENDPOINT=f"{host}:{port}",
        PET_RDZV_BACKEND=policy.get("rdzvBackend") or "c10d",
        PET_NNODES=f"{lo}:{hi}",
    )
    if policy.get("maxRestarts") is not None:
        env["PET_MAX_RESTARTS"] = str(policy["maxRestarts"])
    if policy.get("rdzvId") is not None:
        env["PET_RDZV_ID"] = str(policy["rdzvId"])
    return env


def expand_vars(text: str, env: Mapping[str, str]) -> str:
    """Expand ``$(NAME)`` as the kubelet does in command and args (unknown names stay, ``$$`` escapes)."""
    return re.sub(
        r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
        lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)),
        text,
    )


def check_wiring(job: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` unless every replica's torchrun flags agree with what the operator injects.

    Checks, per replica type: container ``pytorch`` with port ``pytorchjob-port``, ``torchrun`` with
    c10d, ``--rdzv-endpoint`` expanding to the Master (and to ``PET_RDZV_ENDPOINT`` under an elastic
    policy), ``--nnodes`` counting the Master on top of the elastic Worker bounds, ``--nproc-per-node``
    equal to ``spec.nprocPerNode`` and within the GPU limit, Worker replicas within the bounds,
    ``restartPolicy: OnFailure``, and ``-m nodeseg <stage>`` after the flags.
    """
    spec = job["spec"]
    specs = spec["pytorchReplicaSpecs"]
    name = job["metadata"]["name"]

    def fail(where: str, problem: str) -> None:
        raise ValueError(f"PyTorchJob {name!r} {where}: {problem}")

    if set(specs) - {"Master", "Worker"} or "Master" not in specs:
        fail("spec.pytorchReplicaSpecs", f"must hold a Master and optionally a Worker, got {sorted(specs)}")
    if specs["Master"].get("replicas") != 1:
        fail(
            "Master.replicas", f"must be 1 (the operator's webhook), got {specs['Master'].get('replicas')!r}"
        )
    bounds = elastic_bounds(job)
    workers = int(specs.get("Worker", {}).get("replicas", 0))
    if bounds is not None:
        if "Worker" not in specs:
            fail("spec.elasticPolicy", "needs a Worker replica spec")
        if not bounds[0] <= workers <= bounds[1]:
            fail("Worker.replicas", f"{workers} is outside elasticPolicy [{bounds[0]}, {bounds[1]}]")
        expected_nnodes = f"{bounds[0] + 1}:{bounds[1] + 1}"
    else:
        expected_nnodes = str(1 + workers)
    for rtype, rspec in specs.items():
        where = f"{rtype}"
        if rspec.get("restartPolicy") != "OnFailure":
            fail(where, f"restartPolicy must be OnFailure, got {rspec.get('restartPolicy')!r}")
        containers = {c.get("name"): c for c in rspec["template"]["spec"]["containers"]}
        c = containers.get(CONTAINER_NAME)
        if c is None:
            fail(where, f"needs a container named {CONTAINER_NAME!r}, got {sorted(containers)}")
        if _port(job, rtype) is None:
            fail(where, f"container {CONTAINER_NAME!r} needs a port named {PORT_NAME!r}")
        if c.get("command") != ["torchrun"]:
            fail(where, f"command must be ['torchrun'], got {c.get('command')!r}")
        args = list(c.get("args") or [])
        if "-m" not in args or args[args.index("-m") + 1 : args.index("-m") + 3][:1] != ["nodeseg"]:
            fail(where, f"args must end in '-m nodeseg <stage> ...', got {args!r}")
        cut = args.index("-m")
        stage = args[cut + 2] if len(args) > cut + 2 else None
        if stage not in DDP_STAGES:
            fail(where, f"stage after '-m nodeseg' must be one of {DDP_STAGES}, got {stage!r}")
        flags = dict(a[2:].partition("=")[::2] for a in args[:cut] if a.startswith("--"))
        env = operator_env(job, rtype, 0)
        endpoint = expand_vars(flags.get("rdzv-endpoint", ""), env)
        if flags.get("rdzv-backend") != "c10d":
            fail(where, f"--rdzv-backend must be c10d, got {flags.get('rdzv-backend')!r}")
        if endpoint != f"{env['MASTER_ADDR']}:{env['MASTER_PORT']}":
            fail(
                where,
                f"--rdzv-endpoint expands to {endpoint!r}, not the Master {env['MASTER_ADDR']}:{env['MASTER_PORT']}",
            )
        if bounds is not None and endpoint != env["PET_RDZV_ENDPOINT"]:
            fail(
                where,
                f"--rdzv-endpoint expands to {endpoint!r} but the operator sets PET_RDZV_ENDPOINT={env['PET_RDZV_ENDPOINT']!r}",
            )
        if flags.get("nnodes") != expected_nnodes:
            fail(
                where,
                f"--nnodes must be {expected_nnodes} (Master + Worker bounds), got {flags.get('nnodes')!r}",
            )
        nproc = flags.get("nproc-per-node")
        if nproc != str(spec.get("nprocPerNode")):
            fail(
                where, f"--nproc-per-node={nproc} differs from spec.nprocPerNode={spec.get('nprocPerNode')!r}"
            )
        gpus = ((c.get("resources") or {}).get("limits") or {}).get("nvidia.com/gpu")
        if gpus is not None and nproc is not None and int(nproc) > int(gpus):
            fail(where, f"--nproc-per-node={nproc} exceeds the {gpus} GPU(s) of the node")
