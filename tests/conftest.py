"""Shared fixtures: one torch thread, fixed seeds, the optional real-data folder."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]

# the tests read the committed params.yaml, never the working one a user's experiment rewrote (tests/committed.py);
# the pipelines' parameter defaults too, set before components.params is first imported
from committed import PARAMS  # noqa: E402

os.environ["NODESEG_PIPELINE_DEFAULTS"] = str(PARAMS)

# shared fixtures, imported as plugins so that their asserts are rewritten too:
# pipeline_params (tiny params, the session pipeline `run`), s3_server (moto on 127.0.0.1)
pytest_plugins = ["pipeline_params", "s3_server"]


def shared_data_dir() -> Path | None:
    """The real-data folder: $NODESEG_TEST_DATA, else ../shared/data from the repository root."""
    env = os.environ.get("NODESEG_TEST_DATA")
    candidates = [Path(env)] if env else []
    candidates.append(REPO.parent / "shared" / "data")
    for c in candidates:
        if c.is_dir():
            return c
    return None


@pytest.fixture
def kits19_labels_dir() -> Path:
    """The 210 real KiTS19 label volumes, or a skip with the reason."""
    root = shared_data_dir()
    if root is None or not (root / "kits19-interpolated").is_dir():
        pytest.skip(
            "real KiTS19 labels absent: set NODESEG_TEST_DATA or provide ../shared/data/kits19-interpolated"
        )
    return root / "kits19-interpolated"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture(scope="session", autouse=True)
def _mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Keep test runs out of the working directory's MLflow store: one sqlite store for the session."""
    if "MLFLOW_TRACKING_URI" in os.environ:
        yield
        return
    db = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{db}"
    try:
        yield
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
