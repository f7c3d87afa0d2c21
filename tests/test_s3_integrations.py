"""DVC remotes and MLflow artifacts on S3, with the real ``dvc`` CLI and a real ``mlflow server`` against moto."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import mlflow_server as mlflow_server_process
import pytest
from mlflow_server import MlflowServer, tail

pytestmark = pytest.mark.slow
pytest_plugins = ["s3_server"]  # fixtures: moto_endpoint (one per session), s3_env, bucket


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(args)} exited {proc.returncode}:\n{tail(proc.stdout + proc.stderr)}")
    return proc.stdout + proc.stderr


# ----------------------------------------------------------------------------------------------- DVC


def _dvc_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("AWS_ENDPOINT_URL", None)  # the remote's endpointurl must be what points DVC at the server
    for name in ("DVC_GLOBAL_CONFIG_DIR", "DVC_SYSTEM_CONFIG_DIR", "DVC_SITE_CACHE_DIR"):
        env[name] = str(tmp_path / name.lower())
    env.update(DVC_NO_ANALYTICS="1", GIT_CONFIG_NOSYSTEM="1", AWS_EC2_METADATA_DISABLED="true")
    return env


def test_dvc_remote_on_s3(bucket: str, s3_env: str, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    env = _dvc_env(tmp_path)
    dvc = [sys.executable, "-m", "dvc"]
    data = b"case_00000,train\ncase_00001,val\n"
    (repo / "split.csv").write_bytes(data)

    _run(["git", "init", "-q"], repo, env)
    _run([*dvc, "init", "-q"], repo, env)
    _run([*dvc, "add", "-q", "split.csv"], repo, env)
    _run([*dvc, "remote", "add", "-d", "storage", f"s3://{bucket}/dvcstore"], repo, env)
    _run([*dvc, "remote", "modify", "storage", "endpointurl", s3_env], repo, env)
    _run([*dvc, "push"], repo, env)  # credentials come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY

    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket)["Contents"]]
    assert len(keys) == 1 and keys[0].startswith("dvcstore/files/md5/")
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    assert secret not in (repo / ".dvc" / "config").read_text()

    (repo / "split.csv").unlink()
    shutil.rmtree(repo / ".dvc" / "cache")
    _run([*dvc, "pull"], repo, env)
    assert (repo / "split.csv").read_bytes() == data

    # Credentials in the git-ignored .dvc/config.local instead of the environment.
    env_local = {k: v for k, v in env.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    _run(
        [*dvc, "remote", "modify", "--local", "storage", "access_key_id", os.environ["AWS_ACCESS_KEY_ID"]],
        repo,
        env,
    )
    _run([*dvc, "remote", "modify", "--local", "storage", "secret_access_key", secret], repo, env)
    assert secret not in (repo / ".dvc" / "config").read_text()
    assert "config.local" in (repo / ".dvc" / ".gitignore").read_text()
    (repo / "split.csv").unlink()
    shutil.rmtree(repo / ".dvc" / "cache")
    _run([*dvc, "pull"], repo, env_local)
    assert (repo / "split.csv").read_bytes() == data


# ----------------------------------------------------------------------------------------------- MLflow


@dataclass
class S3MlflowServer:
    server: MlflowServer
    bucket: str

    @property
    def url(self) -> str:
        return self.server.url


@pytest.fixture(scope="module", autouse=True)
def _mlflow_boot(aws_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3MlflowServer]:
    """Start ``mlflow server`` when the module starts, so that it boots while the DVC test runs.

    It binds 127.0.0.1 and proxies artifacts to ``s3://<bucket>/mlartifacts`` on moto; it is always stopped.
    """
    tmp = tmp_path_factory.mktemp("mlflow")
    endpoint = aws_env["AWS_ENDPOINT_URL"]
    bucket = f"nodeseg-ml-{uuid.uuid4().hex[:12]}"
    boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=aws_env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=aws_env["AWS_SECRET_ACCESS_KEY"],
        region_name=aws_env["AWS_DEFAULT_REGION"],
    ).create_bucket(Bucket=bucket)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    env.update(aws_env)
    del env["AWS_ENDPOINT_URL"]  # MLFLOW_S3_ENDPOINT_URL must be enough
    env.update(MLFLOW_S3_ENDPOINT_URL=endpoint)
    server = mlflow_server_process.start(tmp, env, ["--artifacts-destination", f"s3://{bucket}/mlartifacts"])
    try:
        yield S3MlflowServer(server, bucket)
    finally:
        server.stop()
    assert aws_env["AWS_SECRET_ACCESS_KEY"] not in server.log.read_text(errors="replace")


@pytest.fixture
def mlflow_server(_mlflow_boot: S3MlflowServer) -> S3MlflowServer:
    """The server, once ``/health`` answers."""
    _mlflow_boot.server.wait_ready()
    return _mlflow_boot


def test_mlflow_artifacts_on_s3(
    mlflow_server: S3MlflowServer, s3_env: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient

    bucket = mlflow_server.bucket
    client = MlflowClient(tracking_uri=mlflow_server.url)
    s3 = boto3.client("s3", endpoint_url=s3_env)
    report = tmp_path / "metrics.json"
    report.write_text(json.dumps({"iou": 0.91}))

    # Proxied: the client talks HTTP to the server only; the server writes to S3.
    exp = client.create_experiment("proxied")
    assert client.get_experiment(exp).artifact_location.startswith("mlflow-artifacts:")
    run = client.create_run(exp).info.run_id
    client.log_artifact(run, str(report), "eval")
    client.set_terminated(run)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="mlartifacts/")["Contents"]]
    assert keys == [f"mlartifacts/{exp}/{run}/artifacts/eval/metrics.json"]
    assert s3.get_object(Bucket=bucket, Key=keys[0])["Body"].read() == report.read_bytes()
    back = client.download_artifacts(run, "eval/metrics.json", str(tmp_path))
    assert Path(back).read_bytes() == report.read_bytes()

    # Direct: an s3:// artifact location; the client itself writes to S3 (needs MLFLOW_S3_ENDPOINT_URL).
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", s3_env)
    exp = client.create_experiment("direct", artifact_location=f"s3://{bucket}/direct")
    run = client.create_run(exp).info.run_id
    client.log_artifact(run, str(report))
    client.set_terminated(run)
    key = f"direct/{run}/artifacts/metrics.json"
    assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == report.read_bytes()
