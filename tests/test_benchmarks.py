"""benchmarks/: every script runs in --quick mode and writes valid JSON (a smoke test; nothing is timed)."""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import pytest

from benchmarks.__main__ import SCRIPTS, _headline
from benchmarks.common import SHARED_DATA

pytestmark = pytest.mark.slow  # the six quick runs take 15–60 s together, depending on the load

KITS19 = SHARED_DATA / "kits19-interpolated"

# what each result must hold: top-level keys, and the keys of the rows under ``rows_key``
EXPECTED = {
    "ode_overhead": ("rows", {"config", "nfe_forward", "nfe_backward", "step_s", "rest_s", "f_s", "f_vjp_s",
                              "f_vjp_y_s", "weight_vjps", "overhead", "overhead_machinery"}),
    "nfe_memory": ("adjoint_vs_direct", {"solver", "nfe_forward", "peak_adjoint_MiB", "peak_direct_MiB",
                                         "memory_ratio_adjoint_direct", "time_ratio_adjoint_direct"}),
    "flops": ("rows", {"config", "variant", "gflop_per_step", "achieved_gflops", "peak_gflops", "ratio_to_peak"}),
    "ingest": ("rows", {"imaging", "cases", "rows", "decode_s", "decode_isal_s", "ingest_s", "ratio",
                        "ratio_isal"}),
    "inference": ("rows", {"model", "slices_per_second", "seconds_per_batch"}),
    "solver_peers": ("rows", {"solver", "ratio_to_torchdiffeq", "nfe_forward", "rms_error_y1"}),
}


def _finite_numbers(obj: object) -> bool:
    if isinstance(obj, float):
        return math.isfinite(obj)
    if isinstance(obj, dict):
        return all(_finite_numbers(v) for v in obj.values())
    if isinstance(obj, list):
        return all(_finite_numbers(v) for v in obj)
    return True


@pytest.mark.parametrize("name", [n for n in SCRIPTS if n not in ("accuracy", "nfe_cost")])  # own tests
def test_quick_run_writes_valid_json(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if name == "ingest" and not KITS19.is_dir():
        pytest.skip(f"{KITS19} absent: the ingest benchmark reads the real KiTS19 labels")
    module = importlib.import_module(f"benchmarks.{name}")
    assert module.main(["--quick", "--threads", "1", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "|---" in printed  # a Markdown table
    data = json.loads((tmp_path / f"{name}.json").read_text())
    assert data["benchmark"] == name and data["quick"] is True
    assert {"device", "cpus", "torch_threads", "load_average_start"} <= set(data["machine"])
    assert data["machine"]["torch_threads"] == 1
    rows_key, row_keys = EXPECTED[name]
    rows = data[rows_key]
    assert rows and all(row_keys <= set(r) for r in rows)
    assert _finite_numbers(rows)
    assert _headline(name, data)  # the runner's summary understands it
    if name == "ingest":  # both ways the image reaches the ingest: rendered, and read from written files
        assert [r["imaging"] for r in rows] == ["render", "files"]
        assert rows[0]["rows"] == rows[1]["rows"] and rows[1]["decoded"] == "imaging+segmentation"
