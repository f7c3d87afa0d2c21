"""Secrets and unsafe loading: credentials in the environment (signing real S3 requests, to moto) never reach
params, logs, MLflow, written files or uploaded objects; every checkpoint load is ``torch.load(weights_only=True)``
and loading a hostile file runs no code.

That the containers run as a numeric non-root user is checked by tests/test_dockerfiles.py
(test_final_stage_runs_as_a_numeric_non_root_user).
"""

from __future__ import annotations

import ast
import dataclasses
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_type_hints

import boto3
import pytest
import torch
from committed import PARAMS
from mlflow import MlflowClient
from pipeline_params import REPO, TINY

from nodeseg.errors import InputError
from nodeseg.params import Params, load_params
from nodeseg.stages.generate import generate
from nodeseg.train import checkpoint as ckpt

PACKAGE = REPO / "nodeseg"
SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIANODESEGFAKE77Q3",
    "AWS_SECRET_ACCESS_KEY": "nodeseg-FAKE-aws-secret-5b7e2c91d4",
    "AWS_SESSION_TOKEN": "nodeseg-FAKE-aws-session-token-0c4f8a",
    "MLFLOW_TRACKING_PASSWORD": "nodeseg-FAKE-mlflow-password-8a1f6b",
    "MLFLOW_TRACKING_TOKEN": "nodeseg-FAKE-mlflow-token-e27c5d",
    "GITHUB_TOKEN": "nodeseg-FAKE-github-token-94b3aa",
}
USER = "nodeseg-test-user"
ARGS = ["--params", str(PARAMS), *[a for s in [*TINY, "pretrain.epochs=1"] for a in ("--set", s)]]

# preprocess (to S3) → pretrain (from S3) → select in one interpreter (one start-up), with debug logging
STAGES = """
import sys
from nodeseg.cli import main
shards, args = sys.argv[1], sys.argv[2:]
for stage, paths in (("preprocess", ["--raw", "raw", "--out", shards]),
                     ("pretrain", ["--shards", shards, "--out", "pretrain"]),
                     ("select", ["--run", "pretrain", "--out", "select"])):
    code = main([stage, "-v", *args, *paths])
    if code:
        sys.exit(code)
"""

pytest_plugins = ["s3_server"]  # aws_env: the moto server's endpoint (it takes any credentials)


def _found(secret_bytes: list[bytes], data: bytes) -> list[bytes]:
    return [s for s in secret_bytes if s in data]


def _strings(obj: Any) -> Iterator[str]:
    """Every string (keys included) in a checkpoint's nested metadata; tensors are skipped."""
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _strings(v)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory, aws_env: dict[str, str]) -> dict[str, Any]:
    """The stages run with fake credentials in their environment (signing real S3 requests to moto)."""
    root = tmp_path_factory.mktemp("secrets")
    generate(root / "raw", load_params([PARAMS], TINY))
    bucket = f"nodeseg-secrets-{uuid.uuid4().hex[:8]}"
    s3 = boto3.client("s3", endpoint_url=aws_env["AWS_ENDPOINT_URL"], region_name=aws_env["AWS_DEFAULT_REGION"],
                      aws_access_key_id=SECRETS["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=SECRETS["AWS_SECRET_ACCESS_KEY"])
    s3.create_bucket(Bucket=bucket)
    experiment = f"security-{uuid.uuid4().hex[:8]}"  # its artifacts land in root/mlruns (cwd)
    # the user name is an identity, not a secret: MLflow records it as the runs' mlflow.user tag
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("AWS_")}, **aws_env, **SECRETS,
           "MLFLOW_TRACKING_USERNAME": USER, "OMP_NUM_THREADS": "1", "MLFLOW_EXPERIMENT_NAME": experiment}
    done = subprocess.run([sys.executable, "-c", STAGES, f"s3://{bucket}/shards", *ARGS], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    objects = {o["Key"]: s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
               for o in s3.list_objects_v2(Bucket=bucket)["Contents"]}
    return {"root": root, "stderr": done.stderr + done.stdout, "experiment": experiment, "objects": objects}


def test_scanner_finds_a_planted_secret(tmp_path: Path) -> None:
    planted = tmp_path / "x.json"
    planted.write_text(f'{{"k": "{SECRETS["AWS_SECRET_ACCESS_KEY"]}"}}')
    assert _found([s.encode() for s in SECRETS.values()], planted.read_bytes())


def test_no_secret_in_logs(work: dict[str, Any]) -> None:
    assert "DEBUG" in work["stderr"] and "pretrain epoch 1" in work["stderr"]  # debug logging was on
    assert [name for name, s in SECRETS.items() if s in work["stderr"]] == []


def test_no_secret_in_mlflow_params_or_tags(work: dict[str, Any]) -> None:
    client = MlflowClient()  # the session's store (MLFLOW_TRACKING_URI, set by conftest)
    experiments = client.search_experiments()
    ours = [e for e in experiments if e.name == work["experiment"]]
    assert ours
    stages = {r.data.tags.get("nodeseg.stage") for r in client.search_runs([ours[0].experiment_id])}
    assert {"preprocess", "pretrain"} <= stages
    leaks = []
    for run in client.search_runs([e.experiment_id for e in experiments], max_results=5000):
        for kind, items in (("param", run.data.params), ("tag", run.data.tags)):
            for key, value in items.items():
                leaks += [f"{run.info.run_id} {kind} {key}" for s in SECRETS.values() if s in key or s in str(value)]
    assert leaks == []
    uri = os.environ["MLFLOW_TRACKING_URI"]
    if uri.startswith("sqlite:///"):  # the store itself, metrics and everything else included
        db = Path(uri.removeprefix("sqlite:///"))
        assert _found([s.encode() for s in SECRETS.values()], db.read_bytes()) == []


def test_no_secret_in_written_files(work: dict[str, Any]) -> None:
    root: Path = work["root"]
    written = [p for p in root.rglob("*") if p.is_file() and not p.is_relative_to(root / "raw")]
    names = {p.name for p in written}
    assert {"selection.json", "val_log.csv", "train_log.csv", "model.pt", "epoch-0001.pt"} <= names
    assert any(p.is_relative_to(root / "mlruns") for p in written)  # the runs' artifacts
    secret_bytes = [s.encode() for s in SECRETS.values()]
    assert {str(p.relative_to(root)): _found(secret_bytes, p.read_bytes()) for p in written} == {
        str(p.relative_to(root)): [] for p in written}
    objects = work["objects"]  # what preprocess uploaded: the shards, the manifest and the marker
    assert {"shards/manifest.json", "shards/_SUCCESS"} <= set(objects)
    assert {key: _found(secret_bytes, body) for key, body in objects.items()} == {key: [] for key in objects}


def test_checkpoints_load_safely_and_hold_no_secret(work: dict[str, Any]) -> None:
    paths = sorted(work["root"].rglob("*.pt"))
    assert len(paths) >= 2
    for path in paths:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        text = "\n".join(_strings({k: v for k, v in payload.items() if k not in ("model", "optimizer")}))
        assert "model_spec" in payload and [s for s in SECRETS.values() if s in text] == []


def test_params_hold_no_credentials() -> None:
    """Credentials come from the environment only: no params key could hold one."""

    def names(cls: type, prefix: str = "") -> Iterator[str]:
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            yield prefix + f.name
            if dataclasses.is_dataclass(hints[f.name]):
                yield from names(hints[f.name], f"{prefix}{f.name}.")

    keys = list(names(Params))
    assert "refine.lr" in keys and "contour.solver.atol" in keys and "ingest.phantom.noise_hu" in keys
    words = ("secret", "password", "token", "credential", "access_key", "endpoint")
    assert [k for k in keys if any(w in k.lower() for w in words)] == []


# ----------------------------------------------------------------------------------------------- safe loading

_FORBIDDEN = {  # calls that can run code from the data they load
    "pickle.load", "pickle.loads", "cPickle.load", "dill.load", "dill.loads", "cloudpickle.load",
    "cloudpickle.loads", "marshal.load", "marshal.loads", "joblib.load", "yaml.unsafe_load", "yaml.full_load",
    "torch.jit.load", "shelve.open", "pandas.read_pickle", "pd.read_pickle",
}
_UNSAFE_NAMES = {  # importing these by name would hide a call from the audit
    "pickle": {"load", "loads", "Unpickler"}, "dill": {"load", "loads"}, "cloudpickle": {"load", "loads"},
    "marshal": {"load", "loads"}, "joblib": {"load"}, "torch": {"load"}, "yaml": {"load", "unsafe_load", "full_load"},
}


def _dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _true(call: ast.Call, keyword: str) -> bool:
    return any(k.arg == keyword and isinstance(k.value, ast.Constant) and k.value.value is True
               for k in call.keywords)


def _audit(source: str, where: str) -> tuple[int, list[str]]:
    """(torch.load calls, problems) of one source file."""
    loads, problems = 0, []
    tree = ast.parse(source)
    pyyaml = any(isinstance(n, ast.Import) and any(a.name == "yaml" for a in n.names) for n in ast.walk(tree))
    for node in ast.walk(tree):
        at = f"{where}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.ImportFrom) and node.module:
            unsafe = _UNSAFE_NAMES.get(node.module.split(".")[0], set())
            problems += [f"{at}: from {node.module} import {a.name}" for a in node.names if a.name in unsafe]
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        if name in ("torch.load", "torch.serialization.load"):
            loads += 1
            if not _true(node, "weights_only"):
                problems.append(f"{at}: {name} without weights_only=True")
        elif name in _FORBIDDEN:
            problems.append(f"{at}: {name}")
        elif name == "yaml.load" and pyyaml and not any(k.arg == "Loader" and "Safe" in _dotted(k.value) for k in node.keywords):
            problems.append(f"{at}: yaml.load without a SafeLoader")
        elif name in ("np.load", "numpy.load") and _true(node, "allow_pickle"):
            problems.append(f"{at}: {name}(allow_pickle=True)")
    return loads, problems


def test_every_torch_load_passes_weights_only_true() -> None:
    results = [_audit(p.read_text(), str(p.relative_to(REPO))) for p in sorted(PACKAGE.rglob("*.py"))]
    assert sum(n for n, _ in results) >= 1  # the checkpoint loader is found: the audit sees what it should
    assert [p for _, problems in results for p in problems] == []


def test_audit_catches_unsafe_loading() -> None:
    loads, problems = _audit("import pickle, torch, yaml\nfrom torch import load\ntorch.load('a')\n"
                             "torch.load('b', weights_only=False)\npickle.loads(b'')\nyaml.load('x')\n"
                             "torch.load('c', weights_only=True)\n", "bad.py")
    assert loads == 3 and len(problems) == 5, problems


def test_loading_a_hostile_checkpoint_runs_no_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (exec, (f"open({str(marker)!r}, 'w').close()",))

    torch.save({"format": ckpt.FORMAT, "model": Exploit()}, tmp_path / "evil.pt")
    with pytest.raises(InputError, match="refuses the Python object exec"):
        ckpt.load(tmp_path / "evil.pt")
    assert not marker.exists()
