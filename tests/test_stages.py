"""Every stage's function and its CLI, on tiny phantom data in a temporary folder, chained as in dvc.yaml."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
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
    for name in models:
        assert 0.0 <= summary[name]["dice"] <= 1.0 and summary[name]["hd95_mm"] >= 0.0
        assert 0.0 <= summary[name]["nsd_2px"] <= 1.0 and summary[name]["components_error"] >= 0.0
    table = (tmp_path / "table.md").read_text()
    assert "Contour Evolution" in table and "Image Evolution" in table and "HD95 (mm)" in table
    rows = list(csv.DictReader((tmp_path / "per_slice.csv").open()))
    n_val = summary["n_val"]
    assert len(rows) == 3 * n_val and {r["model"] for r in rows} == set(models)
    unet_rows = [r for r in rows if r["model"] == "unet"]
    tp, fp, fn = (sum(int(r[k]) for r in unet_rows) for k in ("tp", "fp", "fn"))
    assert summary["unet"]["iou"] == pytest.approx(tp / (tp + fp + fn))  # the per-slice counts pool to the IoU
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
    params.write_text((REPO / "params.yaml").read_text())
    assert main(["select", "--params", str(params), "--run", str(run["pretrain"]), "--out", str(tmp_path / "s")]) == 0
    assert (tmp_path / "s" / "model.pt").is_file()
    code = main(["refine", "--params", str(params), "--shards", str(run["shards"]),
                 "--unet", str(run["refine"] / "model.pt"), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2
    assert err.startswith("nodeseg refine: error: ") and "holds a 'contour' model, expected 'unet'" in err
    assert not (tmp_path / "r").exists()


def test_table_flags_an_adaptive_fbeta_of_zero_instead_of_printing_a_bare_zero() -> None:
    from nodeseg.stages.evaluate import table_markdown

    row = {"iou": 0.8, "dice": 0.9, "hd95_mm": 3.0, "asd_mm": 1.0, "nsd_1px": 0.7, "nsd_2px": 0.8,
           "components_error": 0.1, "adaptive_fbeta": 0.0, "weighted_fbeta": 0.5, "mean_nfe": 0.0}
    table = table_markdown({"unet": row, "contour": {**row, "adaptive_fbeta": 0.4, "hd95_mm": math.nan}})
    assert "| 0 † |" in table and "capped at 1" in table
    assert "| 0.4000 |" in table and "| n/a |" in table
    assert "capped" not in table_markdown({"contour": {**row, "adaptive_fbeta": 0.4}})
