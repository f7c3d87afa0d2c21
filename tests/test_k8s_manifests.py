"""The manifests under k8s/: schema-valid, rendered by kustomize, secret-free, pinned, resourced, wired.

Core objects are validated with kubernetes-validate (strict: unknown fields fail) against Kubernetes
1.30; PyTorchJobs against the kubeflow-training SDK models (strict round trip) and the operator's env
wiring. Overlays are rendered with `kubectl kustomize` (kustomize v5 built into kubectl) in a copy of
k8s/ where each secrets/*.env.example stands in for the gitignored secrets/*.env.
"""

from __future__ import annotations

import io
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from nodeseg.kube.pytorchjob import main
from nodeseg.kube.validate import check_roundtrip, check_wiring

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
K8S_VERSION = "1.30.0"
KUSTOMIZATIONS = sorted(p.parent.relative_to(K8S).as_posix() for p in K8S.rglob("kustomization.yaml"))
OVERLAYS = ["overlays/dev", "overlays/gpu"]
GENERATED_SECRETS = {"postgres-credentials", "minio-credentials", "s3-credentials"}
SECRETISH_ENV = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|TOKEN|CREDENTIAL", re.IGNORECASE)


def load_kustomization(rel: str) -> dict[str, Any]:
    return yaml.safe_load((K8S / rel / "kustomization.yaml").read_text())


def referenced_files(rel: str, key: str) -> list[Path]:
    """Files (not directories) that a kustomization lists under ``key`` (resources or patches)."""
    k = load_kustomization(rel)
    entries = k.get(key) or []
    paths = [e if isinstance(e, str) else e.get("path") for e in entries]
    return [K8S / rel / p for p in paths if p and (K8S / rel / p).is_file()]


RESOURCE_FILES = sorted({p for rel in KUSTOMIZATIONS for p in referenced_files(rel, "resources")})
PATCH_FILES = sorted({p for rel in KUSTOMIZATIONS for p in referenced_files(rel, "patches")})


def docs_of(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def validate_object(doc: dict[str, Any]) -> None:
    """PyTorchJob: SDK round trip + wiring; anything else: kubernetes-validate, strict."""
    if doc.get("kind") == "PyTorchJob":
        check_roundtrip(doc)
        check_wiring(doc)
        return
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as err:
        where = "/".join(str(p) for p in err.absolute_path)
        pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {where}: {err.message}")


Rendered = dict[str, tuple[dict[str, Any], ...]]


@pytest.fixture(scope="session")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Rendered:
    """Every kustomization rendered with `kubectl kustomize`, in a copy of k8s/ whose secrets/*.env are
    the committed examples (the real ones are gitignored)."""
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed: overlays cannot be rendered")
    root = tmp_path_factory.mktemp("rendered") / "k8s"
    shutil.copytree(K8S, root, ignore=shutil.ignore_patterns("*.env"))
    for example in root.rglob("*.env.example"):
        shutil.copy(example, example.with_suffix(""))
    out: Rendered = {}
    for rel in KUSTOMIZATIONS:
        proc = subprocess.run(
            ["kubectl", "kustomize", str(root / rel)], capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 0, f"kubectl kustomize {rel} failed: {proc.stderr.strip()}"
        out[rel] = tuple(d for d in yaml.safe_load_all(proc.stdout) if d)
    return out


def pod_specs(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    kind = doc["kind"]
    if kind in ("Deployment", "StatefulSet", "Job", "DaemonSet", "ReplicaSet"):
        yield kind, doc["spec"]["template"]["spec"]
    elif kind == "PyTorchJob":
        for rtype, rspec in doc["spec"]["pytorchReplicaSpecs"].items():
            yield f"PyTorchJob.{rtype}", rspec["template"]["spec"]


def containers(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for where, spec in pod_specs(doc):
        for c in [*spec.get("initContainers", []), *spec.get("containers", [])]:
            yield f"{doc['kind']}/{doc['metadata']['name']} {where} container {c['name']}", c


def all_rendered(rendered: Rendered) -> list[tuple[str, dict[str, Any]]]:
    return [(rel, d) for rel, docs in rendered.items() for d in docs]


# ---- files as written ----------------------------------------------------------------------------------


def test_every_yaml_file_is_a_kustomization_a_resource_or_a_patch() -> None:
    known = (
        {K8S / rel / "kustomization.yaml" for rel in KUSTOMIZATIONS} | set(RESOURCE_FILES) | set(PATCH_FILES)
    )
    orphans = sorted(str(p.relative_to(REPO)) for p in K8S.rglob("*.yaml") if p not in known)
    assert not orphans, f"YAML files no kustomization uses: {orphans}"


@pytest.mark.parametrize("path", RESOURCE_FILES, ids=lambda p: str(p.relative_to(K8S)))
def test_resource_files_validate(path: Path) -> None:
    docs = docs_of(path)
    assert docs
    for doc in docs:
        validate_object(doc)


def test_base_is_namespace_agnostic() -> None:
    for path in RESOURCE_FILES:
        if "overlays" in path.relative_to(K8S).parts and path.name == "namespace.yaml":
            continue
        for doc in docs_of(path):
            assert "namespace" not in doc["metadata"], (
                f"{path.relative_to(REPO)}: {doc['kind']} pins a namespace"
            )


@pytest.mark.parametrize(
    "path",
    [p for p in RESOURCE_FILES if p.name == "pytorchjob.yaml"],
    ids=lambda p: str(p.relative_to(K8S)),
)
def test_rendered_pytorchjobs_are_what_the_builder_renders_now(path: Path) -> None:
    """Each pytorchjob.yaml names its render command in its header; re-running it reproduces the file."""
    header = [
        line
        for line in path.read_text().splitlines()[:5]
        if "python -m nodeseg.kube.pytorchjob render" in line
    ]
    assert header, f"{path.relative_to(REPO)}: no render command in the header"
    argv = shlex.split(header[0].lstrip("# ").split(" > ")[0])[3:]
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(argv) == 0
    body = "\n".join(line for line in path.read_text().splitlines() if not line.startswith("#")) + "\n"
    assert out.getvalue() == body, f"{path.relative_to(REPO)} is stale: re-run the command in its header"


# ---- rendered overlays -------------------------------------------------------------------------------------


@pytest.mark.parametrize("rel", KUSTOMIZATIONS)
def test_rendered_objects_validate(rendered: Rendered, rel: str) -> None:
    docs = rendered[rel]
    assert docs
    for doc in docs:
        validate_object(doc)


def test_every_container_has_cpu_and_memory_requests_and_limits(rendered: Rendered) -> None:
    missing = []
    for _, doc in all_rendered(rendered):
        for where, c in containers(doc):
            res = c.get("resources") or {}
            for part in ("requests", "limits"):
                for key in ("cpu", "memory"):
                    if key not in (res.get(part) or {}):
                        missing.append(f"{where}: {part}.{key}")
    assert not missing, missing


def test_images_are_pinned_by_tag_or_digest(rendered: Rendered) -> None:
    bad = []
    for _, doc in all_rendered(rendered):
        for where, c in containers(doc):
            image = c["image"]
            last = image.rsplit("/", 1)[-1]
            if "@sha256:" not in image and (":" not in last or last.endswith(":latest")):
                bad.append(f"{where}: {image}")
    assert not bad, bad


def test_every_object_carries_the_part_of_label(rendered: Rendered) -> None:
    for rel, doc in all_rendered(rendered):
        labels = doc["metadata"].get("labels") or {}
        assert labels.get("app.kubernetes.io/part-of") == "nodeseg", (
            f"{rel}: {doc['kind']}/{doc['metadata']['name']}"
        )


@pytest.mark.parametrize("rel", OVERLAYS)
def test_overlay_namespaces_everything_and_creates_its_namespace(rendered: Rendered, rel: str) -> None:
    docs = rendered[rel]
    namespace = load_kustomization(rel)["namespace"]
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "Namespace"] == [namespace]
    for d in docs:
        if d["kind"] != "Namespace":
            assert d["metadata"]["namespace"] == namespace
    binding = next(d for d in docs if d["kind"] == "RoleBinding")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "nodeseg-launcher", "namespace": namespace}
    ]


# ---- secrets -----------------------------------------------------------------------------------------------


def test_no_secret_is_written_in_the_repository() -> None:
    for path in K8S.rglob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict):
                assert doc.get("kind") != "Secret", (
                    f"{path.relative_to(REPO)} holds a Secret: generate it instead"
                )


@pytest.mark.parametrize("rel", KUSTOMIZATIONS)
def test_secrets_come_only_from_gitignored_env_files(rel: str) -> None:
    for gen in load_kustomization(rel).get("secretGenerator") or []:
        assert set(gen) <= {"name", "envs", "type", "options"}, (
            f"{rel}: {gen['name']} uses {sorted(set(gen) - {'name', 'envs'})}; only envs files"
        )
        assert gen["name"] in GENERATED_SECRETS
        for env_file in gen["envs"]:
            path = K8S / rel / env_file
            assert env_file.startswith("secrets/") and env_file.endswith(".env")
            rel_repo = str(path.relative_to(REPO))
            ignored = subprocess.run(["git", "check-ignore", "-q", "--no-index", rel_repo], cwd=REPO)
            assert ignored.returncode == 0, f"{rel_repo} is not gitignored"
            tracked = subprocess.run(
                ["git", "ls-files", "--error-unmatch", rel_repo], cwd=REPO, capture_output=True
            )
            assert tracked.returncode != 0, f"{rel_repo} is tracked by git"
            example = path.with_name(path.name + ".example")
            assert example.is_file(), f"{example.relative_to(REPO)} missing"
            pairs = [
                line.split("=", 1)
                for line in example.read_text().splitlines()
                if line and not line.startswith("#")
            ]
            secret = [(k, v) for k, v in pairs if SECRETISH_ENV.search(k)]
            assert secret and all(v.startswith("change-me") for _, v in secret), (
                f"{example.relative_to(REPO)}: placeholders only"
            )


def test_rendered_secrets_are_the_generated_ones_and_credentials_come_from_refs(rendered: Rendered) -> None:
    for rel, doc in all_rendered(rendered):
        if doc["kind"] == "Secret":
            assert doc["metadata"]["name"] in GENERATED_SECRETS, (
                f"{rel}: unexpected Secret {doc['metadata']['name']}"
            )
        for where, c in containers(doc):
            for e in c.get("env") or []:
                if SECRETISH_ENV.search(e["name"]):
                    assert "value" not in e, (
                        f"{rel} {where}: {e['name']} is a literal; use valueFrom.secretKeyRef"
                    )
                    assert e["valueFrom"].get("secretKeyRef", {}).get("name") in GENERATED_SECRETS


def test_secret_references_resolve_to_generated_keys(rendered: Rendered) -> None:
    keys: dict[str, set[str]] = {}
    for env_example in (K8S / "overlays" / "dev" / "secrets").glob("*.env.example"):
        gen = {g["envs"][0]: g["name"] for g in load_kustomization("overlays/dev")["secretGenerator"]}
        name = gen[f"secrets/{env_example.name.removesuffix('.example')}"]
        keys[name] = {
            line.split("=", 1)[0]
            for line in env_example.read_text().splitlines()
            if line and not line.startswith("#")
        }
    for rel in OVERLAYS:
        for doc in rendered[rel]:
            for where, c in containers(doc):
                for e in c.get("env") or []:
                    ref = (e.get("valueFrom") or {}).get("secretKeyRef")
                    if ref:
                        assert ref["key"] in keys[ref["name"]], f"{rel} {where}: {ref} not in the env file"


# ---- what the objects say ------------------------------------------------------------------------------------


def find(rendered: Rendered, rel: str, kind: str, name: str) -> dict[str, Any]:
    return next(d for d in rendered[rel] if d["kind"] == kind and d["metadata"]["name"] == name)


def test_mlflow_server_binds_all_interfaces_with_postgres_and_s3(rendered: Rendered) -> None:
    c = find(rendered, "overlays/gpu", "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]
    args = c["args"]
    assert args[0] == "server" and "--host=0.0.0.0" in args
    assert (
        "--backend-store-uri=postgresql+psycopg2://mlflow:$(MLFLOW_DB_PASSWORD)@postgres:5432/mlflow" in args
    )
    assert "--artifacts-destination=s3://mlflow-artifacts" in args
    assert any(a.startswith("--allowed-hosts=") and "mlflow:*" in a for a in args)
    assert c["image"].startswith("ghcr.io/nodeseg/nodeseg-mlflow:3.17.2")


def test_postgres_init_script_creates_both_databases_and_is_valid_bash(
    rendered: Rendered, tmp_path: Path
) -> None:
    cm = find(rendered, "overlays/dev", "ConfigMap", "postgres-init")
    (script,) = cm["data"].values()
    assert (
        "CREATE DATABASE mlflow OWNER mlflow;" in script and "CREATE DATABASE optuna OWNER optuna;" in script
    )
    path = tmp_path / "init.sh"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0


def test_minio_setup_script_is_valid_sh(rendered: Rendered, tmp_path: Path) -> None:
    c = find(rendered, "overlays/dev", "Job", "minio-setup")["spec"]["template"]["spec"]["containers"][0]
    path = tmp_path / "setup.sh"
    path.write_text(c["args"][0])
    assert subprocess.run(["sh", "-n", str(path)]).returncode == 0
    assert "mc mb --ignore-existing local/nodeseg-data local/mlflow-artifacts" in c["args"][0]


def test_launcher_role_covers_what_the_launcher_calls(rendered: Rendered) -> None:
    role = find(rendered, "overlays/gpu", "Role", "nodeseg-launcher")
    grants = {
        (g, r): set(rule["verbs"])
        for rule in role["rules"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
    }
    assert {"create", "get", "watch", "delete"} <= grants[("kubeflow.org", "pytorchjobs")]
    assert {"list"} <= grants[("", "pods")] and {"get"} <= grants[("", "pods/log")]
    assert {"list"} <= grants[("", "events")]


def test_data_volume_is_rwx_in_production_and_rwo_in_dev(rendered: Rendered) -> None:
    assert find(rendered, "overlays/gpu", "PersistentVolumeClaim", "nodeseg-data")["spec"]["accessModes"] == [
        "ReadWriteMany"
    ]
    assert find(rendered, "overlays/dev", "PersistentVolumeClaim", "nodeseg-data")["spec"]["accessModes"] == [
        "ReadWriteOnce"
    ]


def test_gpu_pretrain_overlay_equals_the_builder_with_the_same_choices(rendered: Rendered) -> None:
    """The GPU overlay patches the base job; the result must be what build_pytorchjob gives directly."""
    (rendered,) = rendered["overlays/gpu/pretrain"]
    header = next(
        line
        for line in (K8S / "base/pretrain/pytorchjob.yaml").read_text().splitlines()
        if "render" in line and "python -m" in line
    )
    argv = shlex.split(header.lstrip("# ").split(" > ")[0])[3:]
    cut = argv.index("--")
    extra = [
        "--namespace",
        "nodeseg",
        "--workers",
        "3",
        "--elastic-min-workers",
        "1",
        "--elastic-max-workers",
        "3",
        "--node-selector",
        "nvidia.com/gpu.present=true",
        "--toleration",
        "nvidia.com/gpu:NoSchedule",
    ]
    out = io.StringIO()
    with redirect_stdout(out):
        assert main([*argv[:cut], *extra, *argv[cut:]]) == 0
    assert rendered == yaml.safe_load(out.getvalue())
    assert (
        rendered["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["args"][0]
        == "--nnodes=2:4"
    )


def test_dev_pretrain_job_is_cpu_only(rendered: Rendered) -> None:
    (rendered,) = rendered["overlays/dev/pretrain"]
    assert rendered["metadata"]["namespace"] == "nodeseg-dev"
    for _, c in containers(rendered):
        assert "nvidia.com/gpu" not in c["resources"]["limits"]
        assert c["image"].endswith("-cpu")
