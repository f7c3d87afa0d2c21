"""benchmarks/priors.py: the goal rule against known numbers, and a quick ablation end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import priors


def _stat(mean: float, lo: float, hi: float) -> dict:
    return {"mean": mean, "ci95": [lo, hi], "per_seed": [mean]}


def _result(hd95_diff: float, comp_hi: float, iou_lo: float) -> dict:
    return {"statistics": {"models": {"none": {"hd95_mm": _stat(20.0, 18.0, 22.0)}},
                           "differences": {"v-none": {"hd95_mm": _stat(hd95_diff, hd95_diff - 1, hd95_diff + 1),
                                                      "components_error": _stat(comp_hi - 0.1, comp_hi - 0.2, comp_hi),
                                                      "iou": _stat(0.0, iou_lo, 0.01)}}}}


def test_the_goal_needs_a_tenth_off_hd95_fewer_components_and_no_iou_loss() -> None:
    ok = priors.goal(_result(-2.0, -0.05, -0.004), "v")
    assert ok["holds"] and ok["hd95_relative"] == pytest.approx(-0.1)
    why = priors.goal(_result(-1.9, -0.05, -0.004), "v")["why"]
    assert len(why) == 1 and why[0].startswith("HD95 -9.5 %")
    why = priors.goal(_result(-4.0, 0.1, -0.01), "v")["why"]
    assert len(why) == 2 and "components" in why[0] and "-0.0100" in why[1]


def test_quick_ablation_writes_the_table_json_and_strip(tmp_path: Path) -> None:
    argv = ["--quick", "--dataset", "phantom", "--seeds", "0", "--variants", "none,curvature", "--bootstrap", "50",
            "--out", str(tmp_path)]
    assert priors.main(argv) == 0
    data = json.loads((tmp_path / "priors_phantom_quick.json").read_text())
    assert data["variants"] == ["none", "curvature"]
    assert data["variant_overrides"]["curvature"] == ["contour.priors.curvature=0.2"]
    assert set(data["statistics"]["differences"]) == {"curvature-none"}
    assert set(data["goal"]) == {"curvature"}
    assert Path(data["strip"]).is_file() and Path(data["strip"]).stat().st_size > 1000
    text = (tmp_path / "priors_phantom_quick.md").read_text()
    assert "| curvature |" in text and "HD95 (mm)" in text
