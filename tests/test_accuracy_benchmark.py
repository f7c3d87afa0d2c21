"""benchmarks/accuracy.py: the patient-bootstrap statistics against known answers, and quick runs end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks import accuracy
from benchmarks.__main__ import _headline
from benchmarks.common import SHARED_DATA


def _rows(model: str, case: str, tp: int, fp: int, fn: int, hd: float = 2.0, n: int = 2) -> list[dict]:
    return [{"model": model, "case_id": case, "slice_index": i, "tp": tp, "fp": fp, "fn": fn, "dice": 0.5,
             "hd95_mm": hd, "asd_mm": 1.0, "nsd_1px": 0.5, "nsd_2px": 0.7, "components_pred": 1, "components_gt": 2}
            for i in range(n)]


def _seed_rows(shift: dict[str, int]) -> list[dict]:
    rows = []
    for c, case in enumerate(["p1", "p2", "p3", "p4", "p5"]):
        for model in accuracy.MODELS:
            rows += _rows(model, case, 10 + c + shift.get(model, 0), 3, 4 - min(shift.get(model, 0), 4))
    return rows


def test_pooled_iou_and_identical_models_give_a_zero_difference() -> None:
    per_seed = {0: _seed_rows({}), 1: _seed_rows({})}
    st = accuracy.statistics(per_seed, n_boot=300)
    tp = sum(2 * (10 + c) for c in range(5))
    fp, fn = 2 * 3 * 5, 2 * 4 * 5
    assert st["models"]["unet"]["iou"]["mean"] == pytest.approx(tp / (tp + fp + fn), abs=1e-12)
    d = st["differences"]["contour-unet"]["iou"]
    assert d["mean"] == 0.0 and d["ci95"] == [0.0, 0.0]
    assert st["models"]["unet"]["components_error"]["mean"] == pytest.approx(1.0)
    lo, hi = st["models"]["unet"]["iou"]["ci95"]
    assert lo <= st["models"]["unet"]["iou"]["mean"] <= hi and lo < hi  # patients differ: a real interval


def test_a_model_better_on_every_patient_has_an_interval_above_zero() -> None:
    per_seed = {s: _seed_rows({"contour": 2, "image": -3}) for s in range(3)}
    st = accuracy.statistics(per_seed, n_boot=500)
    assert st["differences"]["contour-unet"]["iou"]["ci95"][0] > 0
    assert st["differences"]["image-unet"]["iou"]["ci95"][1] < 0
    assert len(st["differences"]["contour-unet"]["iou"]["per_seed"]) == 3
    text = accuracy.markdown({"dataset": "synthetic", "statistics": st})
    assert "Contour Evolution beats its UNet" in text and "**holds**" in text
    assert "Image Evolution at least matches its UNet" in text and "**does not hold**" in text


def test_the_bootstrap_resamples_patients_not_slices() -> None:
    # one patient with many slices and a big gain, four patients with a loss: resampling slices would give a
    # tight interval around the slice-weighted gain; resampling patients must reach below zero
    rows = []
    for case, gain, n in (("big", 20, 40), ("a", -2, 1), ("b", -2, 1), ("c", -2, 1), ("d", -2, 1)):
        for model in accuracy.MODELS:
            rows += _rows(model, case, 30 + (gain if model == "contour" else 0), 5, 5, n=n)
    st = accuracy.statistics({0: rows}, n_boot=2000)
    lo, hi = st["differences"]["contour-unet"]["iou"]["ci95"]
    assert lo < 0 < hi
    assert st["n_cases"] == 5


def test_nan_distances_are_left_out_of_the_means() -> None:
    rows = []
    for model in accuracy.MODELS:
        rows += _rows(model, "p1", 5, 1, 1, hd=4.0) + _rows(model, "p2", 5, 1, 1, hd=math.nan)
    st = accuracy.statistics({0: rows}, n_boot=50)
    assert st["models"]["unet"]["hd95_mm"]["mean"] == pytest.approx(4.0)


def _saliency_folder(root: Path, n: int = 10) -> Path:
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    y, x = np.ogrid[:24, :24]
    for i in range(n):
        r = 4 + i % 5
        mask = ((y - 12) ** 2 + (x - 11 - i % 3) ** 2 <= r * r).astype(np.uint8) * 255
        img = np.clip(rng.normal(80, 20, (24, 24, 3)) + (mask[..., None] > 0) * 90, 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / "images" / f"im{i:02d}.jpg")
        Image.fromarray(mask).save(root / "masks" / f"im{i:02d}.png")
    return root


@pytest.mark.slow
def test_quick_run_on_phantoms_writes_the_table_and_json(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["--quick", "--threads", "1", "--out", str(tmp_path), "--bootstrap", "100",
            "--kits-root", str(tmp_path / "absent")]
    assert accuracy.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| MONAI UNet (Dice+CE) |" in printed and "Contour Evolution − UNet" in printed
    data = json.loads((tmp_path / "accuracy.json").read_text())
    assert data["benchmark"] == "accuracy" and data["quick"] is True and list(data["datasets"]) == ["phantom"]
    st = data["datasets"]["phantom"]["statistics"]
    assert st["seeds"] == [0, 1] and set(st["models"]) == set(accuracy.MODELS)
    for model in accuracy.MODELS:
        assert 0.0 <= st["models"][model]["iou"]["mean"] <= 1.0
        assert len(st["models"][model]["iou"]["per_seed"]) == 2
    head = _headline("accuracy", data)
    assert set(head["phantom"]) == {"contour-unet", "image-unet", "monai-unet"}


@pytest.mark.slow
def test_quick_run_on_a_users_image_folder(tmp_path: Path) -> None:
    folder = _saliency_folder(tmp_path / "mine")
    argv = ["--quick", "--threads", "1", "--dataset", "folder", "--folder", str(folder), "--out",
            str(tmp_path / "out"), "--bootstrap", "50", "--set", "ingest.saliency_crop=24", "--set", "ingest.size=24",
            "--set", "ingest.val_fraction=0.3"]
    assert accuracy.main(argv) == 0
    data = json.loads((tmp_path / "out" / "accuracy_folder_quick.json").read_text())
    assert data["statistics"]["n_cases"] == 3  # each image its own patient: 3 of 10 in val


@pytest.mark.slow
@pytest.mark.realdata
def test_quick_run_on_real_kits19_labels(tmp_path: Path) -> None:
    root = SHARED_DATA / "kits19-interpolated"
    if not root.is_dir():
        pytest.skip(f"{root} absent: the real KiTS19 label volumes are not here")
    argv = ["--quick", "--threads", "1", "--dataset", "kits19", "--out", str(tmp_path), "--bootstrap", "50"]
    assert accuracy.main(argv) == 0
    data = json.loads((tmp_path / "accuracy_kits19_quick.json").read_text())
    assert data["shards"]["splits"]["val"]["items"] == 3 and data["statistics"]["n_cases"] == 3
