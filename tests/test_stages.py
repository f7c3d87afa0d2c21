"""Every stage's function and its CLI, on tiny phantom data in a temporary folder, chained as in dvc.yaml."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from committed import PARAMS
from pipeline_params import tiny_params

from nodeseg.cli import main
from nodeseg.stages.evaluate import evaluate
from nodeseg.stages.predict import predict
from nodeseg.train import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[1]

def test_generate_and_preprocess(run: dict[str, Path]) -> None:
    cases = sorted(p.name for p in run["raw"].iterdir())
    assert cases == [f"case_{i:05d}" for i in range(4)]
    manifest = json.loads((run["shards"] / "manifest.json").read_text())
    assert manifest["splits"]["val"]["items"] == 1 and manifest["splits"]["train"]["items"] == 3
    assert manifest["splits"]["train"]["rows"] > 0 and manifest["splits"]["val"]["rows"] > 0


def test_pretrain_and_select(run: dict[str, Path]) -> None:
    assert [e for e, _ in ckpt.list_checkpoints(run["pretrain"] / "checkpoints")] == [1, 2]
    selection = json.loads((run["select"] / "selection.json").read_text())
    losses = {c["epoch"]: c["val_loss_first8"] for c in selection["candidates"]}
    assert selection["epoch"] == min(losses, key=losses.get)
    assert "lowest val_loss_first8" in selection["reason"]
    chosen = ckpt.load(run["select"] / "model.pt")
    assert chosen["model_spec"]["kind"] == "unet" and "optimizer" not in chosen


def test_refine_keeps_the_unet_frozen(run: dict[str, Path]) -> None:
    unet = ckpt.load(run["select"] / "model.pt")["model"]
    refined = ckpt.load(run["refine"] / "model.pt")["model"]
    for name, value in unet.items():
        assert np.array_equal(refined[f"unet.{name}"].numpy(), value.numpy()), name
    steps = (run["refine"] / "train_log.csv").read_text().splitlines()
    assert "nfe_forward" in steps[0] and "nfe_backward" in steps[0]


def test_evaluate_writes_the_table_and_figures(run: dict[str, Path], tmp_path: Path) -> None:
    models = {"unet": run["select"] / "model.pt", "contour": run["refine"] / "model.pt",
              "image": run["image"] / "model.pt"}
    summary = evaluate(run["shards"], models, tmp_path, tiny_params())
    for name in models:
        for key in ("iou", "adaptive_fbeta", "weighted_fbeta", "mean_nfe"):
            assert 0.0 <= summary[name][key] <= (1.0 if key != "mean_nfe" else 1e4)
    assert summary["unet"]["mean_nfe"] == 0 and summary["contour"]["mean_nfe"] > 0
    table = (tmp_path / "table.md").read_text()
    assert "Contour Evolution" in table and "Image Evolution" in table
    for fig in ("fig3_predictions.png", "fig1_contour_evolution.png", "fig1_image_evolution.png"):
        assert (tmp_path / fig).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "registry.json").read_text())["promoted"] is False


def test_predict_keeps_affine_and_shape(run: dict[str, Path], tmp_path: Path) -> None:
    volume = run["raw"] / "case_00000" / "imaging.nii.gz"
    out = predict(str(run["refine"] / "model.pt"), volume, tmp_path / "labels.nii.gz")
    src, seg = nib.load(volume), nib.load(out)
    assert seg.shape == src.shape
    assert np.allclose(seg.affine, src.affine)
    assert nib.aff2axcodes(seg.affine) == nib.aff2axcodes(src.affine)
    labels = np.asarray(seg.dataobj)
    assert labels.dtype == np.uint8 and set(np.unique(labels)) <= {0, 1}


def test_cli_runs_a_stage_and_reports_bad_input(run: dict[str, Path], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(PARAMS.read_text())
    assert main(["select", "--params", str(params), "--run", str(run["pretrain"]), "--out", str(tmp_path / "s")]) == 0
    assert (tmp_path / "s" / "model.pt").is_file()
    code = main(["refine", "--params", str(params), "--shards", str(run["shards"]),
                 "--unet", str(run["refine"] / "model.pt"), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2
    assert err.startswith("nodeseg refine: error: ") and "holds a 'contour' model, expected 'unet'" in err
    assert not (tmp_path / "r").exists()
