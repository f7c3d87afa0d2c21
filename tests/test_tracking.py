"""MLflow: stage runs, the model registry and the champion rule, against a real `mlflow server` and serverless."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import mlflow_server
import nibabel as nib
import numpy as np
import pytest
from committed import PARAMS
from mlflow import MlflowClient
from pipeline_params import tiny_params

from nodeseg.stages.evaluate import evaluate
from nodeseg.stages.predict import predict
from nodeseg.stages.register import CHAMPION, decide, register
from nodeseg.tracking import tracking_uri

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[mlflow_server.MlflowServer]:
    """A real tracking server (sqlite store, artifacts served by the server) for this module."""
    work = tmp_path_factory.mktemp("mlflow-server")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    proc = mlflow_server.start(work, env, ["--artifacts-destination", str(work / "artifacts")])
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def evaluated(run: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny pipeline's UNet and refined model evaluated (not registered yet)."""
    out = tmp_path_factory.mktemp("eval")
    evaluate(run["shards"], {"unet": run["select"] / "model.pt", "contour": run["refine"] / "model.pt"}, out,
             tiny_params())
    return out


def _variant(evaluated: Path, dest: Path, contour_iou: float) -> Path:
    """A copy of the evaluation with the refined model's IoU set, to drive the champion rule both ways."""
    shutil.copytree(evaluated, dest)
    metrics = json.loads((dest / "metrics.json").read_text())
    metrics["contour"]["iou"] = contour_iou
    (dest / "metrics.json").write_text(json.dumps(metrics))
    return dest


def test_decide_rule() -> None:
    base = {"unet": {"iou": 0.80}, "contour": {"iou": 0.82}}
    assert decide(base, "iou", 0.0)[0] is True
    assert decide(base, "iou", 0.05) == (False, "refined iou 0.8200 does not beat the UNet's 0.8000 by more "
                                                 "than 0.05")
    assert decide({"unet": {"iou": 0.8}}, "iou", 0.0)[0] is False


def test_registry_and_champion_on_a_server(server: mlflow_server.MlflowServer, evaluated: Path, run: dict[str, Path],
                                           tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    name = f"nodeseg-{uuid.uuid4().hex[:8]}"
    params = tiny_params("evaluate.register=true", f"evaluate.model_name={name}")
    client = MlflowClient(tracking_uri=server.url)

    better = register(_variant(evaluated, tmp_path / "better", 0.99), params)
    assert better["promoted"] is True
    champion = client.get_model_version_by_alias(name, CHAMPION)
    assert str(champion.version) == better["versions"]["contour"]
    assert champion.tags["nodeseg.kind"] == "contour"
    assert "beats the UNet" in champion.tags["nodeseg.champion_decision"]

    worse = register(_variant(evaluated, tmp_path / "worse", 0.0), params)
    assert worse["promoted"] is False
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == better["versions"]["contour"]
    tag = client.get_model_version(name, worse["versions"]["contour"]).tags["nodeseg.champion_decision"]
    assert "does not beat" in tag
    assert json.loads((tmp_path / "worse" / "registry.json").read_text())["reason"] == tag

    # the champion serves predictions through the registry (pyfunc, loaded from the server)
    volume = run["raw"] / "case_00001" / "imaging.nii.gz"
    out = predict(f"models:/{name}@{CHAMPION}", volume, tmp_path / "labels.nii.gz")
    assert nib.load(out).shape == nib.load(volume).shape
    assert np.allclose(nib.load(out).affine, nib.load(volume).affine)


def test_stage_runs_are_logged_on_the_server(server: mlflow_server.MlflowServer, run: dict[str, Path],
                                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    experiment = f"exp-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", experiment)
    evaluate(run["shards"], {"unet": run["select"] / "model.pt"}, tmp_path, tiny_params())
    client = MlflowClient(tracking_uri=server.url)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["nodeseg.stage"] == "evaluate"
    assert 0.0 <= runs[0].data.metrics["unet/iou"] <= 1.0
    assert "evaluate.beta2" in runs[0].data.params
    artifacts = {a.path for a in client.list_artifacts(runs[0].info.run_id)}
    assert {"metrics.json", "table.md", "fig3_predictions.png"} <= artifacts


def test_serverless_default_is_a_sqlite_file_in_the_working_directory(evaluated: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    decision = register(_variant(evaluated, tmp_path / "e", 0.99), tiny_params("evaluate.register=true"))
    assert (tmp_path / "mlflow.db").is_file()
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert str(client.get_model_version_by_alias("nodeseg", CHAMPION).version) == decision["versions"]["contour"]


def test_unreachable_tracking_server_gives_one_line(run: dict[str, Path], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from nodeseg.cli import main

    url = f"http://127.0.0.1:{mlflow_server.free_port()}"  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    code = main(["preprocess", "--params", str(PARAMS),
                 "--raw", str(run["raw"]), "--out", str(tmp_path / "shards")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 5
    assert err[-1].startswith(f"nodeseg preprocess: error: MLflow at {url}: ")
    assert not (tmp_path / "shards").exists()
