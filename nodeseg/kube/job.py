"""Build the Kubeflow PyTorchJob that runs one DDP stage under torchrun (its CLI: :mod:`nodeseg.kube.pytorchjob`).

How the job is wired (Kubeflow training operator v1.9, ``kubeflow.org/v1``):

* one ``Master`` (replicas 1, the webhook refuses more) and ``workers`` ``Worker`` replicas, one image,
  the container named ``pytorch`` with a port named ``pytorchjob-port`` (both required by the operator);
* the operator injects ``MASTER_ADDR=<job>-master-0`` and ``MASTER_PORT=<Master's pytorchjob-port>``
  into every pod, so the command ``torchrun --rdzv-backend=c10d --rdzv-endpoint=$(MASTER_ADDR):$(MASTER_PORT)``
  (expanded by the kubelet) hosts the c10d rendezvous on the Master pod;
* with an ``elasticPolicy`` the operator also injects ``PET_*`` variables that torchrun reads as
  defaults (``PET_RDZV_ENDPOINT``, ``PET_NNODES``, ``PET_NPROC_PER_NODE``, ...). The policy here sets
  ``rdzvHost``/``rdzvPort``/``rdzvId`` so that ``PET_RDZV_ENDPOINT`` names the same endpoint (the
  operator's default would be ``<job>-worker-0``). Explicit flags win over ``PET_*``, which matters for
  ``--nnodes``: the operator counts ``minReplicas``/``maxReplicas`` in Worker replicas (it defaults them
  to ``Worker.replicas`` and scales ``Worker.replicas`` between them), so ``PET_NNODES`` leaves the Master
  out (kubeflow/trainer#2277); the flag counts it: ``--nnodes=<min+1>:<max+1>``.

torchrun then sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` for each process, which ``nodeseg.train.ddp``
reads. That module picks nccl when CUDA is visible and gloo otherwise, so ``backend`` here must agree
with ``gpus_per_node``. ``nodeseg.kube.validate.check_wiring`` holds any job (a kustomized one too)
against this wiring.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import PurePosixPath
from typing import Any, Literal

from kubeflow.training import ApiClient
from kubeflow.training.models import (
    KubeflowOrgV1ElasticPolicy,
    KubeflowOrgV1PyTorchJob,
    KubeflowOrgV1PyTorchJobSpec,
    KubeflowOrgV1ReplicaSpec,
    KubeflowOrgV1RunPolicy,
)
from kubernetes import client as k8s
from kubernetes.utils import parse_quantity

from nodeseg.errors import check_arg

API_VERSION = "kubeflow.org/v1"
KIND = "PyTorchJob"
CONTAINER_NAME = "pytorch"  # the operator finds the training container by this name
PORT_NAME = "pytorchjob-port"  # ... and MASTER_PORT by this port name
DEFAULT_PORT = 23456  # the operator's default for that port
DDP_STAGES = ("pretrain", "refine")  # the `nodeseg` stages that run under torchrun
BACKENDS = ("nccl", "gloo")
RUN_AS_UID = 10001  # the image's user (components/Dockerfile*)

# Names of the objects k8s/base creates; the CLI defaults to them.
DEFAULT_PVC = "nodeseg-data"
DEFAULT_MOUNT_PATH = "/mnt/nodeseg"
DEFAULT_CONFIG_MAPS = ("nodeseg-env",)
DEFAULT_SECRETS = ("s3-credentials",)

# Environment variables the operator or torchrun owns; a caller may not set them.
_RESERVED_ENV = frozenset(
    {"MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "PYTHONUNBUFFERED"}
)
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
TAINT_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")


def is_dns1035_label(value: object) -> bool:
    """True for a DNS-1035 label (what the operator's webhook requires of a PyTorchJob name)."""
    return isinstance(value, str) and len(value) <= 63 and bool(_DNS1035.match(value))


def is_dns1123_label(value: object) -> bool:
    """True for a DNS-1123 label (namespaces)."""
    return isinstance(value, str) and len(value) <= 63 and bool(_DNS1123_LABEL.match(value))


def is_dns1123_subdomain(value: object) -> bool:
    """True for a DNS-1123 subdomain (Secrets, ConfigMaps, PVCs)."""
    return isinstance(value, str) and len(value) <= 253 and bool(_DNS1123_SUBDOMAIN.match(value))


def _is_pinned_image(image: object) -> bool:
    if not isinstance(image, str) or not image or any(c.isspace() for c in image):
        return False
    if "@sha256:" in image:
        return True
    last = image.rsplit("/", 1)[-1]
    return ":" in last and last.rsplit(":", 1)[1] not in ("", "latest")


def _quantity(value: object, name: str) -> Any:
    try:
        q = parse_quantity(value)
    except (ValueError, TypeError):
        q = None
    check_arg(
        q is not None and q > 0, name, value, "a positive Kubernetes quantity such as '4', '500m' or '16Gi'"
    )
    return q


def _toleration(t: Mapping[str, Any], i: int) -> k8s.V1Toleration:
    allowed = {"key", "operator", "value", "effect", "tolerationSeconds"}
    check_arg(
        isinstance(t, Mapping) and set(t) <= allowed,
        f"tolerations[{i}]",
        t,
        f"a mapping with keys from {sorted(allowed)}",
    )
    op = t.get("operator", "Equal" if "value" in t else "Exists")
    check_arg(op in ("Equal", "Exists"), f"tolerations[{i}].operator", op, "'Equal' or 'Exists'")
    effect = t.get("effect")
    check_arg(
        effect is None or effect in TAINT_EFFECTS,
        f"tolerations[{i}].effect",
        effect,
        f"one of {TAINT_EFFECTS}",
    )
    return k8s.V1Toleration(
        key=t.get("key"),
        operator=op,
        value=t.get("value"),
        effect=effect,
        toleration_seconds=t.get("tolerationSeconds"),
    )


def torchrun_args(
    *,
    nnodes: str,
    nproc_per_node: int,
    rdzv_id: str,
    max_restarts: int,
    stage: str,
    stage_args: Sequence[str],
) -> list[str]:
    """The container args after ``torchrun``: rendezvous flags, then ``-m nodeseg <stage> <args>``.

    ``--nnodes`` comes first so a kustomize overlay can replace it alone (``.../args/0``).
    """
    return [
        f"--nnodes={nnodes}",
        f"--nproc-per-node={nproc_per_node}",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=$(MASTER_ADDR):$(MASTER_PORT)",
        f"--rdzv-id={rdzv_id}",
        f"--max-restarts={max_restarts}",
        "-m",
        "nodeseg",
        stage,
        *stage_args,
    ]


def build_pytorchjob(
    name: str,
    *,
    image: str,
    stage: str,
    stage_args: Sequence[str] = (),
    namespace: str | None = None,
    workers: int = 1,
    gpus_per_node: int = 1,
    nproc_per_node: int | None = None,
    backend: Literal["nccl", "gloo"] = "nccl",
    cpu_request: str = "4",
    cpu_limit: str = "8",
    memory_request: str = "16Gi",
    memory_limit: str = "32Gi",
    shm_size: str = "2Gi",
    pvc_name: str | None = DEFAULT_PVC,
    mount_path: str = DEFAULT_MOUNT_PATH,
    env_from_secrets: Sequence[str] = (),
    env_from_config_maps: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    node_selector: Mapping[str, str] | None = None,
    tolerations: Sequence[Mapping[str, Any]] = (),
    elastic_min_workers: int | None = None,
    elastic_max_workers: int | None = None,
    max_restarts: int = 3,
    backoff_limit: int = 3,
    active_deadline_seconds: int | None = None,
    ttl_seconds_after_finished: int | None = None,
    port: int = DEFAULT_PORT,
    image_pull_policy: str = "IfNotPresent",
    labels: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The PyTorchJob running ``torchrun ... -m nodeseg <stage> <stage_args>`` on 1 Master + ``workers``.

    Every node gets ``gpus_per_node`` GPUs and runs ``nproc_per_node`` processes (default: one per GPU,
    or one on CPU). ``elastic_min_workers``/``elastic_max_workers`` bound the Worker replicas (default:
    ``workers``); the Master always counts as one more node. Returns the JSON-ready dict (``namespace``
    None leaves it out, for a namespace-agnostic manifest).
    """
    check_arg(
        is_dns1035_label(name),
        "name",
        name,
        "a DNS-1035 label: lower-case letters, digits and '-', starting with a letter, at most 63 characters",
    )
    check_arg(
        namespace is None or is_dns1123_label(namespace), "namespace", namespace, "a DNS-1123 label or None"
    )
    check_arg(
        _is_pinned_image(image),
        "image",
        image,
        "an image pinned by tag or digest (no ':latest', no whitespace)",
    )
    check_arg(
        stage in DDP_STAGES, "stage", stage, f"one of {DDP_STAGES} (the stages that run under torchrun)"
    )
    check_arg(
        not isinstance(stage_args, str) and all(isinstance(a, str) for a in stage_args),
        "stage_args",
        stage_args,
        "a list of strings",
    )
    check_arg(
        isinstance(workers, int) and not isinstance(workers, bool) and workers >= 0,
        "workers",
        workers,
        "an integer >= 0",
    )
    check_arg(
        isinstance(gpus_per_node, int) and not isinstance(gpus_per_node, bool) and gpus_per_node >= 0,
        "gpus_per_node",
        gpus_per_node,
        "an integer >= 0",
    )
    check_arg(backend in BACKENDS, "backend", backend, f"one of {BACKENDS}")
    check_arg(
        (backend == "nccl") == (gpus_per_node > 0),
        "backend",
        backend,
        "'nccl' with GPUs and 'gloo' without (nodeseg.train.ddp picks nccl whenever CUDA is visible); "
        f"gpus_per_node is {gpus_per_node}",
    )
    if nproc_per_node is None:
        nproc_per_node = max(gpus_per_node, 1)
    check_arg(
        isinstance(nproc_per_node, int) and not isinstance(nproc_per_node, bool) and nproc_per_node >= 1,
        "nproc_per_node",
        nproc_per_node,
        "an integer >= 1",
    )
    check_arg(
        gpus_per_node == 0 or nproc_per_node <= gpus_per_node,
        "nproc_per_node",
        nproc_per_node,
        f"at most gpus_per_node ({gpus_per_node}): one GPU per process",
    )
    cpu_req = _quantity(cpu_request, "cpu_request")
    check_arg(
        _quantity(cpu_limit, "cpu_limit") >= cpu_req,
        "cpu_limit",
        cpu_limit,
        f"at least cpu_request ({cpu_request})",
    )
    mem_req = _quantity(memory_request, "memory_request")
    check_arg(
        _quantity(memory_limit, "memory_limit") >= mem_req,
        "memory_limit",
        memory_limit,
        f"at least memory_request ({memory_request})",
    )
    _quantity(shm_size, "shm_size")
    check_arg(
        pvc_name is None or is_dns1123_subdomain(pvc_name),
        "pvc_name",
        pvc_name,
        "a DNS-1123 subdomain or None",
    )
    check_arg(
        isinstance(mount_path, str) and PurePosixPath(mount_path).is_absolute() and mount_path != "/",
        "mount_path",
        mount_path,
        "an absolute path other than '/'",
    )
    for arg, names in (
        ("env_from_secrets", env_from_secrets),
        ("env_from_config_maps", env_from_config_maps),
    ):
        check_arg(
            not isinstance(names, str) and all(is_dns1123_subdomain(n) for n in names),
            arg,
            names,
            "a list of DNS-1123 subdomain names",
        )
    env = dict(env or {})
    for key in env:
        check_arg(bool(_ENV_NAME.match(key)), "env", key, "environment variable names like NAME_1")
        check_arg(
            key not in _RESERVED_ENV and not key.startswith("PET_"),
            "env",
            key,
            "a name the training operator and torchrun do not set",
        )
    check_arg(all(isinstance(v, str) for v in env.values()), "env", env, "a mapping of strings to strings")
    node_selector = dict(node_selector or {})
    check_arg(
        all(
            isinstance(k, str) and isinstance(v, str) and _LABEL_VALUE.match(v)
            for k, v in node_selector.items()
        ),
        "node_selector",
        node_selector,
        "a mapping of label keys to label values",
    )
    k8s_tolerations = [_toleration(t, i) for i, t in enumerate(tolerations)]
    if workers == 0:
        check_arg(
            elastic_min_workers is None,
            "elastic_min_workers",
            elastic_min_workers,
            "None when workers is 0 (the operator needs a Worker replica for an elastic policy)",
        )
        check_arg(
            elastic_max_workers is None,
            "elastic_max_workers",
            elastic_max_workers,
            "None when workers is 0 (the operator needs a Worker replica for an elastic policy)",
        )
        lo = hi = 0
    else:
        lo = workers if elastic_min_workers is None else elastic_min_workers
        hi = workers if elastic_max_workers is None else elastic_max_workers
        check_arg(
            isinstance(lo, int) and 1 <= lo <= workers,
            "elastic_min_workers",
            elastic_min_workers,
            f"an integer in [1, workers={workers}]",
        )
        check_arg(
            isinstance(hi, int) and hi >= workers,
            "elastic_max_workers",
            elastic_max_workers,
            f"an integer >= workers={workers}",
        )
    longest = f"{name}-worker-{max(hi - 1, 0)}"
    check_arg(
        len(longest) <= 63, "name", name, f"short enough that pod/service '{longest}' fits in 63 characters"
    )
    check_arg(
        isinstance(max_restarts, int) and max_restarts >= 0, "max_restarts", max_restarts, "an integer >= 0"
    )
    check_arg(
        isinstance(backoff_limit, int) and backoff_limit >= 0,
        "backoff_limit",
        backoff_limit,
        "an integer >= 0",
    )
    for arg, value in (
        ("active_deadline_seconds", active_deadline_seconds),
        ("ttl_seconds_after_finished", ttl_seconds_after_finished),
    ):
        check_arg(
            value is None or (isinstance(value, int) and value > 0), arg, value, "None or an integer > 0"
        )
    check_arg(
        isinstance(port, int) and 1024 <= port <= 65535, "port", port, "an unprivileged port in [1024, 65535]"
    )
    check_arg(
        image_pull_policy in ("Always", "IfNotPresent", "Never"),
        "image_pull_policy",
        image_pull_policy,
        "'Always', 'IfNotPresent' or 'Never'",
    )
    labels = dict(labels or {})
    check_arg(
        all(isinstance(v, str) and _LABEL_VALUE.match(v) for v in labels.values()),
        "labels",
        labels,
        "a mapping of label keys to label values",
    )

    all_labels = {
        "app.kubernetes.io/name": "nodeseg",
        "app.kubernetes.io/component": stage,
        "app.kubernetes.io/part-of": "nodeseg",
        **labels,
    }
    nnodes = "1" if workers == 0 else f"{lo + 1}:{hi + 1}"
    threads = max(1, int(cpu_req // nproc_per_node))
    container_env = [k8s.V1EnvVar(name="OMP_NUM_THREADS", value=str(threads))]
    if backend == "nccl":
        container_env.append(k8s.V1EnvVar(name="NCCL_DEBUG", value="WARN"))
    container_env += [k8s.V1EnvVar(name=k, value=v) for k, v in sorted(env.items())]

    requests = {"cpu": cpu_request, "memory": memory_request}
    limits = {"cpu": cpu_limit, "memory": memory_limit}
    if gpus_per_node:
        # extended resources: requests must equal limits
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = str(gpus_per_node)

    mounts = [k8s.V1VolumeMount(name="dshm", mount_path="/dev/shm")]
    volumes = [
        k8s.V1Volume(name="dshm", empty_dir=k8s.V1EmptyDirVolumeSource(medium="Memory", size_limit=shm_size))
    ]
    if pvc_name is not None:
        mounts.append(k8s.V1VolumeMount(name="data", mount_path=mount_path))
        volumes.append(
            k8s.V1Volume(
                name="data",
                persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(claim_name=pvc_name),
            )
        )

    container = k8s.V1Container(
        name=CONTAINER_NAME,
        image=image,
        image_pull_policy=image_pull_policy,
        command=["torchrun"],
        args=torchrun_args(
            nnodes=nnodes,
            nproc_per_node=nproc_per_node,
            rdzv_id=name,
            max_restarts=max_restarts,
            stage=stage,
            stage_args=list(stage_args),
        ),
        ports=[k8s.V1ContainerPort(name=PORT_NAME, container_port=port, protocol="TCP")],
        env=container_env,
        env_from=[
            k8s.V1EnvFromSource(config_map_ref=k8s.V1ConfigMapEnvSource(name=n)) for n in env_from_config_maps
        ]
        + [k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=n)) for n in env_from_secrets],
        resources=k8s.V1ResourceRequirements(requests=requests, limits=limits),
        volume_mounts=mounts,
        security_context=k8s.V1SecurityContext(
            allow_privilege_escalation=False,
            capabilities=k8s.V1Capabilities(drop=["ALL"]),
        ),
    )
    template = k8s.V1PodTemplateSpec(
        metadata=k8s.V1ObjectMeta(
            labels=dict(all_labels),
            # An Istio sidecar would keep the pod running after training ends and the job would never finish.
            annotations={"sidecar.istio.io/inject": "false"},
        ),
        spec=k8s.V1PodSpec(
            containers=[container],
            volumes=volumes,
            node_selector=node_selector or None,
            tolerations=k8s_tolerations or None,
            automount_service_account_token=False,
            security_context=k8s.V1PodSecurityContext(
                run_as_non_root=True,
                run_as_user=RUN_AS_UID,
                run_as_group=RUN_AS_UID,
                fs_group=RUN_AS_UID,
                seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault"),
            ),
        ),
    )
    replica_specs = {
        "Master": KubeflowOrgV1ReplicaSpec(replicas=1, restart_policy="OnFailure", template=template)
    }
    elastic = None
    if workers > 0:
        replica_specs["Worker"] = KubeflowOrgV1ReplicaSpec(
            replicas=workers, restart_policy="OnFailure", template=template
        )
        elastic = KubeflowOrgV1ElasticPolicy(
            rdzv_backend="c10d",
            rdzv_host=f"{name}-master-0",
            rdzv_port=port,
            rdzv_id=name,
            min_replicas=lo,
            max_replicas=hi,
            max_restarts=max_restarts,
        )
    job = KubeflowOrgV1PyTorchJob(
        api_version=API_VERSION,
        kind=KIND,
        metadata=k8s.V1ObjectMeta(name=name, namespace=namespace, labels=dict(all_labels)),
        spec=KubeflowOrgV1PyTorchJobSpec(
            nproc_per_node=str(nproc_per_node),
            elastic_policy=elastic,
            pytorch_replica_specs=replica_specs,
            run_policy=KubeflowOrgV1RunPolicy(
                # keep finished pods so their logs can be read; deleting the job removes them
                clean_pod_policy="None",
                backoff_limit=backoff_limit,
                active_deadline_seconds=active_deadline_seconds,
                ttl_seconds_after_finished=ttl_seconds_after_finished,
            ),
        ),
    )
    return ApiClient().sanitize_for_serialization(job)
