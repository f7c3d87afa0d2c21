"""A real S3 endpoint for tests: moto's threaded server on 127.0.0.1, and AWS variables pointing at it.

Test modules load this as a plugin (``pytest_plugins = ["s3_server"]``), so that one server serves the whole
session.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator

import pytest

ACCESS_KEY = "AKIANODESEGTEST00001"
SECRET_KEY = "nodeseg-test-SECRET-d41d8cd98f00b204e980"
REGION = "us-east-1"


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """Start moto's S3 server on 127.0.0.1 (a free port) for the session; yield its URL."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture(scope="session")
def aws_env(moto_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The standard AWS variables for the moto server, with config files that do not exist."""
    tmp = tmp_path_factory.mktemp("aws")
    return {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_ENDPOINT_URL": moto_endpoint,
        "AWS_CONFIG_FILE": str(tmp / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp / "no-aws-credentials"),
    }


def _foreign(name: str) -> bool:
    return name.startswith(("AWS_", "NODESEG_S3_")) or name in ("NODESEG_CACHE", "MLFLOW_S3_ENDPOINT_URL")


@pytest.fixture
def s3_env(aws_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> str:
    """Point boto3 at the moto server through the environment only; return the endpoint URL."""
    for name in list(os.environ):
        if _foreign(name):
            monkeypatch.delenv(name)
    for name, value in aws_env.items():
        monkeypatch.setenv(name, value)
    return aws_env["AWS_ENDPOINT_URL"]


@pytest.fixture
def bucket(s3_env: str) -> str:
    """A new, uniquely named bucket on the moto server."""
    import boto3

    name = f"nodeseg-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_env).create_bucket(Bucket=name)
    return name
