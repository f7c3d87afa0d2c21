"""A real ``mlflow server`` process on 127.0.0.1 for tests: started, awaited, always stopped."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(text: str, n: int = 3000) -> str:
    return text[-n:]


@dataclass
class MlflowServer:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def wait_ready(self, timeout: float = 150.0) -> MlflowServer:
        """Block until ``/health`` answers (fail the test with the server's log otherwise)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"mlflow server exited {self.proc.returncode}:\n{tail(self.log.read_text(errors='replace'))}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.25)
        pytest.fail(f"mlflow server not ready after {timeout:.0f} s:\n{tail(self.log.read_text(errors='replace'))}")

    def stop(self) -> None:
        """Terminate the server's process group (mlflow starts uvicorn as a child)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=15)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # children left behind by the leader
        except ProcessLookupError:
            pass


def start(workdir: Path, env: Mapping[str, str], extra: Sequence[str] = ()) -> MlflowServer:
    """Start ``mlflow server --host 127.0.0.1 --workers 1`` on a sqlite store in ``workdir`` (not awaited)."""
    port = free_port()
    log = workdir / "mlflow-server.log"
    args = [
        *(sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)),
        *("--workers", "1", "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}"),
        *extra,
    ]
    full_env = {**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with log.open("wb") as out:
        proc = subprocess.Popen(args, env=full_env, stdout=out, stderr=subprocess.STDOUT, cwd=workdir,
                                start_new_session=True)
    return MlflowServer(f"http://127.0.0.1:{port}", proc, log)
