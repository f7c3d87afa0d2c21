"""benchmarks/nfe_cost.py: the cost counts of a known solver, the goal rule, and a quick run end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import nfe_cost
from benchmarks.__main__ import _headline


def _result(nfe: float, inference: float, lower: float) -> dict:
    ratio = {"nfe_per_step": {"mean": nfe}, "inference_nfe": {"mean": inference}}
    return {"ratios": {"v": ratio},
            "statistics": {"differences": {"v-reference": {"iou": {"mean": 0.0, "ci95": [lower, 0.01]}}}}}


def test_the_goal_needs_both_nfe_ratios_and_the_iou_interval() -> None:
    assert nfe_cost.goal(_result(0.25, 0.2, -0.004), "v") == {"holds": True, "why": []}
    why = nfe_cost.goal(_result(0.3, 0.2, -0.004), "v")["why"]
    assert why == ["train NFE 0.30× > 0.25×"]
    why = nfe_cost.goal(_result(0.2, 0.26, -0.006), "v")["why"]
    assert len(why) == 2 and "inference NFE 0.26×" in why[0] and "-0.0060" in why[1]


def test_ratios_are_means_of_per_seed_ratios() -> None:
    keys = ("nfe_per_step", "inference_nfe", "seconds_per_step", "refine_seconds", "peak_memory_mb")
    runs = {0: {"reference": dict.fromkeys(keys, 10.0), "v": dict.fromkeys(keys, 2.0)},
            1: {"reference": dict.fromkeys(keys, 10.0), "v": dict.fromkeys(keys, 4.0)}}
    r = nfe_cost.ratios(runs, "v")
    assert r["nfe_per_step"]["mean"] == pytest.approx(0.3) and r["nfe_per_step"]["per_seed"] == [0.2, 0.4]


def test_quick_run_counts_the_solvers_nfe_exactly(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["--quick", "--dataset", "phantom", "--seeds", "0", "--variants", "reference,chosen", "--threads", "1",
            "--bootstrap", "50", "--out", str(tmp_path)]
    assert nfe_cost.main(argv) == 0
    assert "| variant / reference |" in capsys.readouterr().out
    data = json.loads((tmp_path / "nfe_cost_phantom_quick.json").read_text())
    ref, cho = data["runs"]["0"]["reference"], data["runs"]["0"]["chosen"]
    # one midpoint step: 2 evaluations forward; direct backprop is counted as the forward again; inference: 2
    assert cho["nfe_forward"] == 2.0 and cho["nfe_backward"] == 0.0 and cho["nfe_per_step"] == 4.0
    assert cho["inference_nfe"] == 2.0
    # dopri5 with the adjoint: at least one accepted step (7 evaluations, FSAL) forward, and a backward solve
    assert ref["nfe_forward"] >= 7 and ref["nfe_backward"] >= 7
    assert ref["nfe_per_step"] == ref["nfe_forward"] + ref["nfe_backward"]
    assert data["ratios"]["chosen"]["nfe_per_step"]["per_seed"] == [pytest.approx(4.0 / ref["nfe_per_step"])]
    assert set(data["statistics"]["differences"]) == {"chosen-reference"}
    assert data["goal"]["chosen"]["holds"] in (True, False)
    summary = {"datasets": {"phantom": data}}
    assert _headline("nfe_cost", summary)["phantom"]["chosen"]["nfe_ratio"] == round(4.0 / ref["nfe_per_step"], 3)
