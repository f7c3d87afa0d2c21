"""The PyTorchJob builder (nodeseg.kube.job), its CLI (nodeseg.kube.pytorchjob) and the launcher's state machine
(nodeseg.kube.launcher)."""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.client import ApiException

from nodeseg.kube.job import build_pytorchjob
from nodeseg.kube.launcher import JobOutcome, LaunchError, launch, run_cli_launch, terminal_condition
from nodeseg.kube.pytorchjob import main
from nodeseg.kube.validate import check_roundtrip, check_wiring, expand_vars, operator_env

IMAGE = "ghcr.io/nodeseg/nodeseg:0.1.0"
STAGE_ARGS = [
    "--params",
    "/mnt/nodeseg/params.yaml",
    "--shards",
    "/mnt/nodeseg/shards",
    "--out",
    "/mnt/nodeseg/runs/p",
]


def job(**kw: Any) -> dict[str, Any]:
    args: dict[str, Any] = {"image": IMAGE, "stage": "pretrain", "stage_args": STAGE_ARGS}
    args.update(kw)
    return build_pytorchjob(
        kw.pop("name", "nodeseg-pretrain"), **{k: v for k, v in args.items() if k != "name"}
    )


def container(j: dict[str, Any], replica: str = "Master") -> dict[str, Any]:
    return j["spec"]["pytorchReplicaSpecs"][replica]["template"]["spec"]["containers"][0]


# ---- builder -------------------------------------------------------------------------------------------


def test_job_round_trips_through_the_sdk_models_and_wiring_holds() -> None:
    j = job(namespace="nodeseg", workers=2, gpus_per_node=4)
    check_roundtrip(j)
    check_wiring(j)
    assert j["apiVersion"] == "kubeflow.org/v1" and j["kind"] == "PyTorchJob"
    assert j["metadata"] == {
        "name": "nodeseg-pretrain",
        "namespace": "nodeseg",
        "labels": {
            "app.kubernetes.io/name": "nodeseg",
            "app.kubernetes.io/component": "pretrain",
            "app.kubernetes.io/part-of": "nodeseg",
        },
    }


def test_torchrun_command_with_c10d_rendezvous_on_the_master() -> None:
    j = job(workers=2, gpus_per_node=4)
    for replica in ("Master", "Worker"):
        c = container(j, replica)
        assert c["name"] == "pytorch"
        assert c["command"] == ["torchrun"]
        assert c["args"] == [
            "--nnodes=3:3",
            "--nproc-per-node=4",
            "--rdzv-backend=c10d",
            "--rdzv-endpoint=$(MASTER_ADDR):$(MASTER_PORT)",
            "--rdzv-id=nodeseg-pretrain",
            "--max-restarts=3",
            "-m",
            "nodeseg",
            "pretrain",
            *STAGE_ARGS,
        ]
        assert c["ports"] == [{"name": "pytorchjob-port", "containerPort": 23456, "protocol": "TCP"}]
    assert j["spec"]["nprocPerNode"] == "4"


def test_the_endpoint_the_kubelet_expands_is_the_one_the_operator_publishes() -> None:
    j = job(workers=2)
    for replica in ("Master", "Worker"):
        env = operator_env(j, replica, 0)
        endpoint = expand_vars(container(j, replica)["args"][3].split("=", 1)[1], env)
        assert endpoint == "nodeseg-pretrain-master-0:23456" == env["PET_RDZV_ENDPOINT"]
    # the operator's own PET_NNODES leaves the Master out (kubeflow/trainer#2277); the flag counts it
    assert operator_env(j, "Worker", 0)["PET_NNODES"] == "2:2"
    assert container(j)["args"][0] == "--nnodes=3:3"
    assert operator_env(j, "Worker", 1)["RANK"] == "2"


def test_gpu_limits_requests_and_nccl() -> None:
    c = container(
        job(gpus_per_node=2, cpu_request="8", cpu_limit="16", memory_request="32Gi", memory_limit="64Gi")
    )
    assert c["resources"] == {
        "requests": {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "2"},
        "limits": {"cpu": "16", "memory": "64Gi", "nvidia.com/gpu": "2"},
    }
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env == {"OMP_NUM_THREADS": "4", "NCCL_DEBUG": "WARN"}  # 8 cores / 2 processes


def test_cpu_job_uses_gloo_and_no_gpu() -> None:
    j = job(
        gpus_per_node=0,
        backend="gloo",
        cpu_request="2",
        cpu_limit="2",
        memory_request="2Gi",
        memory_limit="4Gi",
    )
    check_wiring(j)
    c = container(j)
    assert (
        "nvidia.com/gpu" not in c["resources"]["limits"]
        and "nvidia.com/gpu" not in c["resources"]["requests"]
    )
    assert {e["name"] for e in c["env"]} == {"OMP_NUM_THREADS"}
    assert j["spec"]["nprocPerNode"] == "1"


def test_elastic_policy_counts_workers_and_torchrun_counts_the_master_too() -> None:
    j = job(workers=3, elastic_min_workers=1, elastic_max_workers=5, max_restarts=7)
    assert j["spec"]["elasticPolicy"] == {
        "minReplicas": 1,
        "maxReplicas": 5,
        "maxRestarts": 7,
        "rdzvBackend": "c10d",
        "rdzvHost": "nodeseg-pretrain-master-0",
        "rdzvId": "nodeseg-pretrain",
        "rdzvPort": 23456,
    }
    assert j["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 3
    assert container(j, "Worker")["args"][0] == "--nnodes=2:6"
    check_wiring(j)


def test_restart_policy_run_policy_and_pod_security() -> None:
    j = job(workers=1, backoff_limit=5, active_deadline_seconds=3600, ttl_seconds_after_finished=600)
    specs = j["spec"]["pytorchReplicaSpecs"]
    assert specs["Master"]["replicas"] == 1
    assert {r["restartPolicy"] for r in specs.values()} == {"OnFailure"}
    assert j["spec"]["runPolicy"] == {
        "cleanPodPolicy": "None",
        "backoffLimit": 5,
        "activeDeadlineSeconds": 3600,
        "ttlSecondsAfterFinished": 600,
    }
    pod = specs["Worker"]["template"]
    assert pod["metadata"]["annotations"] == {"sidecar.istio.io/inject": "false"}
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert pod["spec"]["securityContext"]["runAsUser"] == 10001
    assert pod["spec"]["automountServiceAccountToken"] is False


def test_data_pvc_mount_shm_and_env_sources() -> None:
    j = job(
        pvc_name="nodeseg-data",
        mount_path="/mnt/nodeseg",
        env_from_secrets=["s3-credentials"],
        env_from_config_maps=["nodeseg-env"],
        env={"MLFLOW_EXPERIMENT_NAME": "x"},
    )
    pod = j["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    assert {"name": "data", "persistentVolumeClaim": {"claimName": "nodeseg-data"}} in pod["volumes"]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}} in pod["volumes"]
    c = pod["containers"][0]
    assert {"name": "data", "mountPath": "/mnt/nodeseg"} in c["volumeMounts"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    assert c["envFrom"] == [
        {"configMapRef": {"name": "nodeseg-env"}},
        {"secretRef": {"name": "s3-credentials"}},
    ]
    assert {"name": "MLFLOW_EXPERIMENT_NAME", "value": "x"} in c["env"]
    no_pvc = job(pvc_name=None)["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert [v["name"] for v in no_pvc["volumes"]] == ["dshm"]


def test_scheduling_node_selector_and_tolerations() -> None:
    tol = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    pod = job(node_selector={"nvidia.com/gpu.present": "true"}, tolerations=tol)["spec"][
        "pytorchReplicaSpecs"
    ]["Master"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"] == tol


def test_master_only_job_has_no_worker_and_no_elastic_policy() -> None:
    j = job(workers=0)
    check_roundtrip(j)
    check_wiring(j)
    assert set(j["spec"]["pytorchReplicaSpecs"]) == {"Master"}
    assert "elasticPolicy" not in j["spec"]
    assert container(j)["args"][0] == "--nnodes=1"


@pytest.mark.parametrize(
    ("kwargs", "argument", "value"),
    [
        ({"name": "Nodeseg"}, "name", "'Nodeseg'"),
        ({"name": "1-job"}, "name", "'1-job'"),
        ({"name": "a" * 60}, "name", "'" + "a" * 60 + "'"),
        ({"namespace": "Bad_NS"}, "namespace", "'Bad_NS'"),
        ({"image": "ghcr.io/nodeseg/nodeseg:latest"}, "image", "':latest'"),
        ({"image": "ghcr.io/nodeseg/nodeseg"}, "image", "'ghcr.io/nodeseg/nodeseg'"),
        ({"stage": "select"}, "stage", "'select'"),
        ({"stage_args": "--out x"}, "stage_args", "'--out x'"),
        ({"workers": -1}, "workers", "-1"),
        ({"gpus_per_node": -2}, "gpus_per_node", "-2"),
        ({"gpus_per_node": 0}, "backend", "'nccl'"),
        ({"backend": "gloo"}, "backend", "'gloo'"),
        ({"backend": "mpi"}, "backend", "'mpi'"),
        ({"gpus_per_node": 2, "nproc_per_node": 3}, "nproc_per_node", "3"),
        ({"nproc_per_node": 0}, "nproc_per_node", "0"),
        ({"cpu_request": "lots"}, "cpu_request", "'lots'"),
        ({"cpu_request": "8", "cpu_limit": "4"}, "cpu_limit", "'4'"),
        ({"memory_limit": "1Gi"}, "memory_limit", "'1Gi'"),
        ({"pvc_name": "Data_PVC"}, "pvc_name", "'Data_PVC'"),
        ({"mount_path": "data"}, "mount_path", "'data'"),
        ({"env_from_secrets": ["S3"]}, "env_from_secrets", "['S3']"),
        ({"env": {"WORLD_SIZE": "4"}}, "env", "'WORLD_SIZE'"),
        ({"env": {"PET_NNODES": "4"}}, "env", "'PET_NNODES'"),
        ({"env": {"1BAD": "x"}}, "env", "'1BAD'"),
        ({"tolerations": [{"key": "k", "effect": "Sometimes"}]}, "tolerations[0].effect", "'Sometimes'"),
        ({"tolerations": [{"key": "k", "colour": "red"}]}, "tolerations[0]", "'colour'"),
        ({"workers": 2, "elastic_min_workers": 3}, "elastic_min_workers", "3"),
        ({"workers": 2, "elastic_min_workers": 0}, "elastic_min_workers", "0"),
        ({"workers": 2, "elastic_max_workers": 1}, "elastic_max_workers", "1"),
        ({"workers": 0, "elastic_max_workers": 2}, "elastic_max_workers", "2"),
        ({"max_restarts": -1}, "max_restarts", "-1"),
        ({"port": 80}, "port", "80"),
        ({"image_pull_policy": "Sometimes"}, "image_pull_policy", "'Sometimes'"),
    ],
)
def test_bad_arguments_are_named_with_their_value(kwargs: dict[str, Any], argument: str, value: str) -> None:
    with pytest.raises(ValueError) as info:
        job(**kwargs)
    message = str(info.value)
    assert f"argument {argument!r}" in message
    assert value in message


def test_check_roundtrip_rejects_unknown_fields_and_wrong_types() -> None:
    j = job()
    bad = copy.deepcopy(j)
    bad["spec"]["elasticPolicy"]["rdzvBackEnd"] = "c10d"
    with pytest.raises(ValueError, match=r"spec\.elasticPolicy\.rdzvBackEnd"):
        check_roundtrip(bad)
    bad = copy.deepcopy(j)
    container(bad)["resourcez"] = {}
    with pytest.raises(ValueError, match=r"containers\[0\]\.resourcez"):
        check_roundtrip(bad)
    bad = copy.deepcopy(j)
    bad["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] = "2"
    with pytest.raises(ValueError, match=r"Worker\.replicas"):
        check_roundtrip(bad)
    with pytest.raises(ValueError, match="kubeflow.org/v1 PyTorchJob"):
        check_roundtrip({**j, "kind": "TFJob"})


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda j: container(j, "Worker")["args"].__setitem__(0, "--nnodes=1:1"), "--nnodes must be 2:2"),
        (
            lambda j: container(j, "Worker")["args"].__setitem__(3, "--rdzv-endpoint=$(PET_X):1"),
            "--rdzv-endpoint expands",
        ),
        (lambda j: j["spec"]["elasticPolicy"].pop("rdzvHost"), "PET_RDZV_ENDPOINT"),
        (lambda j: j["spec"].__setitem__("nprocPerNode", "2"), "--nproc-per-node=1 differs"),
        (
            lambda j: j["spec"]["pytorchReplicaSpecs"]["Worker"].__setitem__("replicas", 4),
            "outside elasticPolicy",
        ),
        (
            lambda j: j["spec"]["pytorchReplicaSpecs"]["Master"].__setitem__("restartPolicy", "Never"),
            "OnFailure",
        ),
        (lambda j: container(j).__setitem__("name", "trainer"), "container named 'pytorch'"),
    ],
)
def test_check_wiring_catches_inconsistent_edits(edit: Any, problem: str) -> None:
    j = job()
    edit(j)
    with pytest.raises(ValueError, match=problem.replace("$", r"\$").replace("(", r"\(").replace(")", r"\)")):
        check_wiring(j)


def test_cli_render_matches_the_builder(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "render",
            "--name",
            "nodeseg-pretrain",
            "--stage",
            "pretrain",
            "--image",
            IMAGE,
            "--workers",
            "2",
            "--gpus-per-node",
            "2",
            "--node-selector",
            "nvidia.com/gpu.present=true",
            "--toleration",
            "nvidia.com/gpu:NoSchedule",
            "--env-from-secret",
            "s3-credentials",
            "--env-from-config-map",
            "nodeseg-env",
            "--",
            *STAGE_ARGS,
        ]
    )
    assert code == 0
    rendered = yaml.safe_load(capsys.readouterr().out)
    assert rendered == job(
        workers=2,
        gpus_per_node=2,
        node_selector={"nvidia.com/gpu.present": "true"},
        tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        env_from_secrets=["s3-credentials"],
        env_from_config_maps=["nodeseg-env"],
    )


def test_cli_reports_a_bad_argument_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["render", "--name", "Bad", "--stage", "pretrain", "--image", IMAGE])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: argument 'name' must be a DNS-1035 label") and "\n" not in err


@pytest.mark.slow
def test_torchrun_with_the_jobs_flags_and_the_operators_env_forms_one_world(tmp_path: Path) -> None:
    """Two real torchrun agents, one per 'pod' (Master, Worker), each with the variables the operator
    injects (PET_NNODES=1:1 among them) and the job's own flags: one world of 2 ranks must form."""
    j = job(
        workers=1,
        gpus_per_node=0,
        backend="gloo",
        cpu_request="1",
        cpu_limit="1",
        memory_request="1Gi",
        memory_limit="1Gi",
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    probe = tmp_path / "probe.py"
    probe.write_text(
        textwrap.dedent(
            """
            import json, os, sys
            import torch, torch.distributed as dist
            dist.init_process_group("gloo")
            t = torch.ones(1)
            dist.all_reduce(t)
            rank = os.environ["RANK"]
            keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
            with open(os.path.join(sys.argv[1], "rank" + rank + ".json"), "w") as f:
                json.dump({**{k: os.environ[k] for k in keys}, "sum": t.item()}, f)
            dist.destroy_process_group()
            """
        )
    )
    procs = []
    for replica in ("Master", "Worker"):
        env = {
            **os.environ,
            **operator_env(j, replica, 0),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
        env["PET_RDZV_ENDPOINT"] = f"127.0.0.1:{port}"
        args = container(j, replica)["args"]
        flags = [expand_vars(a, env) for a in args[: args.index("-m")]]
        flags = [f for f in flags if not f.startswith("--max-restarts")] + ["--max-restarts=0"]
        cmd = [sys.executable, "-m", "torch.distributed.run", *flags, str(probe), str(tmp_path)]
        procs.append(
            subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["WORLD_SIZE"] for r in ranks] == ["2", "2"]
    assert [r["sum"] for r in ranks] == [2.0, 2.0]


# ---- launcher ------------------------------------------------------------------------------------------


class FakeCustomObjectsApi:
    """In-memory stand-in for the three kubernetes.client.CustomObjectsApi methods launch() calls.

    No Kubernetes API server can run in this environment, so this is the one fake the test suite uses:
    it replays a scripted sequence of PyTorchJob statuses (one per get) and records creates and deletes.
    """

    def __init__(
        self, statuses: list[dict[str, Any] | Exception], create_error: Exception | None = None
    ) -> None:
        self.statuses = list(statuses)
        self.create_error = create_error
        self.created: list[dict[str, Any]] = []
        self.deleted: list[str] = []
        self.gets = 0

    def create_namespaced_custom_object(
        self, group: str, version: str, namespace: str, plural: str, body: dict[str, Any]
    ) -> dict[str, Any]:
        assert (group, version, plural) == ("kubeflow.org", "v1", "pytorchjobs")
        if self.create_error is not None:
            raise self.create_error
        self.created.append(copy.deepcopy(body))
        return body

    def get_namespaced_custom_object(
        self, group: str, version: str, namespace: str, plural: str, name: str
    ) -> dict[str, Any]:
        assert (group, version, plural) == ("kubeflow.org", "v1", "pytorchjobs")
        assert self.created and self.created[-1]["metadata"]["name"] == name
        status = self.statuses[min(self.gets, len(self.statuses) - 1)]
        self.gets += 1
        if isinstance(status, Exception):
            raise status
        return {**self.created[-1], "status": status}

    def delete_namespaced_custom_object(
        self, group: str, version: str, namespace: str, plural: str, name: str, **kwargs: Any
    ) -> dict[str, Any]:
        assert kwargs == {"propagation_policy": "Background"}
        self.deleted.append(name)
        return {}


class FakeClock:
    """A clock that advances only when slept on, so waits and timeouts take no real time."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def cond(kind: str, reason: str = "", message: str = "", status: str = "True") -> dict[str, str]:
    return {"type": kind, "status": status, "reason": reason, "message": message}


CREATED = {"conditions": [cond("Created", "PyTorchJobCreated")]}
RUNNING = {
    "conditions": [cond("Created", "PyTorchJobCreated"), cond("Running", "PyTorchJobRunning", "running")]
}
SUCCEEDED = {
    "conditions": [
        cond("Created", "PyTorchJobCreated"),
        cond("Running", "PyTorchJobRunning", status="False"),
        cond("Succeeded", "PyTorchJobSucceeded", "PyTorchJob nodeseg-pretrain is successfully completed."),
    ]
}
FAILED = {
    "conditions": [
        cond("Created", "PyTorchJobCreated"),
        cond("Running", "PyTorchJobRunning", status="False"),
        cond(
            "Failed",
            "PyTorchJobFailed",
            "PyTorchJob nodeseg-pretrain is failed because 1 Worker replica(s) failed.",
        ),
    ]
}


def run(statuses: list[Any], **kw: Any) -> tuple[JobOutcome, FakeCustomObjectsApi, FakeClock]:
    api = FakeCustomObjectsApi(statuses, kw.pop("create_error", None))
    clock = FakeClock()
    args: dict[str, Any] = {
        "namespace": "nodeseg",
        "api": api,
        "clock": clock,
        "sleep": clock.sleep,
        "poll_s": 10.0,
        "timeout_s": 3600.0,
    }
    args.update(kw)
    outcome = launch(job(), **args)
    return outcome, api, clock


def test_success_after_created_and_running() -> None:
    outcome, api, clock = run([CREATED, RUNNING, RUNNING, SUCCEEDED])
    assert outcome.state == "Succeeded" and outcome.ok
    assert outcome.reason == "PyTorchJobSucceeded"
    assert api.gets == 4 and clock.now == 30.0 and outcome.elapsed_s == 30.0
    assert api.created[0]["metadata"]["namespace"] == "nodeseg"
    assert outcome.diagnostics == ""
    assert outcome.summary().startswith("PyTorchJob nodeseg/nodeseg-pretrain Succeeded after 30 s")


def test_failure_surfaces_the_operators_reason_and_message() -> None:
    outcome, api, _ = run([RUNNING, FAILED])
    assert outcome.state == "Failed" and not outcome.ok
    assert outcome.reason == "PyTorchJobFailed"
    assert "1 Worker replica(s) failed" in outcome.message
    assert "1 Worker replica(s) failed" in outcome.summary()
    assert outcome.diagnostics == "(no CoreV1Api: events and logs not collected)"


def test_timeout_reports_the_last_condition() -> None:
    outcome, api, clock = run([RUNNING], timeout_s=95.0)
    assert outcome.state == "TimedOut" and outcome.reason == "Timeout"
    assert clock.now == 95.0  # the last sleep is cut to the deadline
    assert "not finished after 95 s" in outcome.message and "Running: running" in outcome.message


@pytest.mark.parametrize(
    ("delete", "statuses", "deleted"),
    [
        ("always", [SUCCEEDED], True),
        ("always", [FAILED], True),
        ("always", [RUNNING], True),  # a timed-out job is stopped
        ("on-success", [SUCCEEDED], True),
        ("on-success", [FAILED], False),  # kept for inspection
        ("on-success", [RUNNING], False),
        ("never", [SUCCEEDED], False),
        ("never", [FAILED], False),
    ],
)
def test_delete_policy(delete: str, statuses: list[Any], deleted: bool) -> None:
    outcome, api, _ = run(statuses, delete=delete, timeout_s=60.0)
    assert outcome.deleted is deleted
    assert api.deleted == (["nodeseg-pretrain"] if deleted else [])


def test_transient_read_errors_are_retried() -> None:
    outcome, api, _ = run([RUNNING, ApiException(status=503, reason="Service Unavailable"), SUCCEEDED])
    assert outcome.state == "Succeeded" and api.gets == 3


def test_a_job_deleted_by_someone_else_is_a_failure() -> None:
    outcome, api, _ = run([RUNNING, ApiException(status=404, reason="Not Found")], delete="always")
    assert outcome.state == "Failed" and outcome.reason == "NotFound"
    assert api.deleted == []


def test_create_conflict_names_the_job_and_the_fix() -> None:
    err = ApiException(status=409, reason="Conflict")
    err.body = json.dumps({"message": 'pytorchjobs.kubeflow.org "nodeseg-pretrain" already exists'})
    with pytest.raises(
        LaunchError,
        match=r"nodeseg/nodeseg-pretrain \(HTTP 409\): .*already exists; .*kubectl delete pytorchjob",
    ):
        run([RUNNING], create_error=err)


def test_interrupted_wait_deletes_the_job_unless_never() -> None:
    def interrupted(seconds: float) -> None:
        raise KeyboardInterrupt

    for delete, expected in (("on-success", ["nodeseg-pretrain"]), ("never", [])):
        api = FakeCustomObjectsApi([RUNNING])
        with pytest.raises(KeyboardInterrupt):
            launch(job(), namespace="nodeseg", api=api, sleep=interrupted, delete=delete)
        assert api.deleted == expected


def test_no_wait_returns_submitted_and_requires_delete_never() -> None:
    outcome, api, _ = run([RUNNING], wait=False, delete="never")
    assert outcome.state == "Submitted" and outcome.ok and api.gets == 0
    with pytest.raises(ValueError, match="argument 'delete' must be 'never' when wait is False"):
        run([RUNNING], wait=False, delete="always")


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"namespace": "Not_A_Namespace"}, "namespace"),
        ({"delete": "sometimes"}, "delete"),
        ({"timeout_s": 0}, "timeout_s"),
        ({"poll_s": -1}, "poll_s"),
    ],
)
def test_launch_checks_its_arguments(kwargs: dict[str, Any], argument: str) -> None:
    with pytest.raises(ValueError, match=f"argument '{argument}'"):
        run([RUNNING], **kwargs)


def test_launch_refuses_a_job_for_another_namespace_unknown_fields_or_bad_wiring() -> None:
    api = FakeCustomObjectsApi([SUCCEEDED])
    with pytest.raises(ValueError, match="argument 'namespace'"):
        launch(job(namespace="other"), namespace="nodeseg", api=api)
    bad = job()
    bad["spec"]["elasticPolicy"]["minReplica"] = 1
    with pytest.raises(ValueError, match="minReplica"):
        launch(bad, namespace="nodeseg", api=api)
    miswired = job()
    container(miswired, "Worker")["args"][0] = "--nnodes=1:1"
    with pytest.raises(ValueError, match="--nnodes must be 2:2"):
        launch(miswired, namespace="nodeseg", api=api)
    assert api.created == []


def test_terminal_condition_takes_the_last_true_terminal_condition() -> None:
    assert terminal_condition({"status": RUNNING}) is None
    assert terminal_condition({}) is None
    assert terminal_condition({"status": SUCCEEDED})["type"] == "Succeeded"
    restarted = {"conditions": [*FAILED["conditions"][:2], cond("Failed", status="False"), cond("Succeeded")]}
    assert terminal_condition({"status": restarted})["type"] == "Succeeded"


def test_cli_launch_writes_the_outcome_and_exits_by_state(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for statuses, code in (([SUCCEEDED], 0), ([FAILED], 1)):
        api = FakeCustomObjectsApi(statuses)
        clock = FakeClock()
        out = tmp_path / "outcome.json"
        rc = run_cli_launch(
            launch, job(), outcome_json=str(out), namespace="nodeseg", api=api, clock=clock, sleep=clock.sleep
        )
        assert rc == code
        saved = json.loads(out.read_text())
        assert saved["state"] == ("Succeeded" if code == 0 else "Failed")
        assert f"PyTorchJob nodeseg/nodeseg-pretrain {saved['state']}" in capsys.readouterr().err
