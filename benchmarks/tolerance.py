"""The tolerance study's chosen solver against dopri5 at atol 1e-5 (the paper's tightest) on the default data.

    python benchmarks/tolerance.py [--work DIR] [--n-trials 12] [--workers 2] [--threads 1]

In ``--work`` (default: a temporary copy of the repository; a folder that already holds a default
``dvc repro``'s data/shards and outputs/select/model.pt is reused) it runs ``dvc repro select`` (a no-op when
up to date), a study (``nodeseg tune``, ``--n-trials`` trials whose first is the reference), then the full
default ``nodeseg refine`` and ``nodeseg evaluate`` once with the reference solver and once with the chosen one.
Reports NFE per training step, seconds per step, refine wall time and the validation IoU of both, their
ratios and the IoU difference, for the study's short trials and for the full refinement. Prints a Markdown
table and writes benchmarks/results/tolerance.json. CPU heavy: about 10 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pipeline_default import copy_repo

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
REFERENCE = {"method": "dopri5", "atol": 1e-5, "rtol": 0.0, "step_size": None, "adjoint": True}


def run(cmd: list[str], cwd: Path, env: dict[str, str]) -> float:
    """Run ``cmd``; its wall time in seconds; its output on failure."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return time.perf_counter() - t0


def solver_sets(solver: dict[str, Any]) -> list[str]:
    """``--set contour.solver.KEY=VALUE`` arguments for a solver."""
    out: list[str] = []
    for key, value in solver.items():
        text = "null" if value is None else (str(value).lower() if isinstance(value, bool) else repr(value))
        out += ["--set", f"contour.solver.{key}={text}"]
    return out


def train_costs(run_dir: Path, adjoint: bool) -> dict[str, float]:
    """Mean NFE per training step (direct backprop counted as in the study) and mean seconds per step."""
    with (run_dir / "train_log.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    fwd = statistics.fmean(float(r["nfe_forward"]) for r in rows)
    bwd = statistics.fmean(float(r["nfe_backward"]) for r in rows)
    return {"nfe_per_step": fwd + (bwd if adjoint else fwd), "nfe_forward": fwd, "nfe_backward": bwd,
            "seconds_per_step": statistics.fmean(float(r["seconds"]) for r in rows), "steps": len(rows)}


def refine_and_evaluate(name: str, solver: dict[str, Any], work: Path, env: dict[str, str]) -> dict[str, Any]:
    """Full default refine + evaluate (contour only) with ``solver``."""
    out, ev = work / "outputs" / "bench" / name, work / "outputs" / "bench" / f"{name}-eval"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(ev, ignore_errors=True)
    load = os.getloadavg()[0]
    seconds = run(["nodeseg", "refine", "--shards", "data/shards", "--unet", "outputs/select/model.pt",
                   "--out", str(out), *solver_sets(solver)], work, env)
    run(["nodeseg", "evaluate", "--shards", "data/shards", "--contour", str(out / "model.pt"), "--out", str(ev),
         "--set", "evaluate.register=false", "--set", "evaluate.figure_samples=0"], work, env)
    metrics = json.loads((ev / "metrics.json").read_text())["contour"]
    return {"solver": solver, "refine_seconds": seconds, "load_average_1m": load,
            **train_costs(out, bool(solver["adjoint"])),
            "val_iou": metrics["iou"], "inference_nfe": metrics["mean_nfe"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, help="run here and keep it (default: a temporary copy)")
    parser.add_argument("--n-trials", type=int, default=12)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every command")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="nodeseg-tolerance-"))
    if not (work / "dvc.yaml").is_file():
        work.mkdir(parents=True, exist_ok=True)
        copy_repo(work)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TQDM_DISABLE": "1",
           "MLFLOW_TRACKING_URI": os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{work / 'mlflow.db'}"}
    t_all = time.perf_counter()
    run(["dvc", "repro", "select"], work, env)
    shutil.rmtree(work / "outputs" / "bench-tune", ignore_errors=True)
    tune_seconds = run(["nodeseg", "tune", "--shards", "data/shards", "--unet", "outputs/select/model.pt",
                        "--out", "outputs/bench-tune", "--workers", str(args.workers), "--n-trials", str(args.n_trials),
                        "--set", "tune.reference_atol=1e-5"], work, env)
    choice = json.loads((work / "outputs" / "bench-tune" / "choice.json").read_text())
    study = {"seconds": tune_seconds, "states": choice["states"], "chosen": choice["chosen"],
             "reference": choice.get("reference"), "vs_reference": choice.get("vs_reference")}
    runs = {"reference": refine_and_evaluate("reference", REFERENCE, work, env),
            "chosen": refine_and_evaluate("chosen", choice["solver"], work, env)}
    ref, cho = runs["reference"], runs["chosen"]
    full = {"nfe_ratio": cho["nfe_per_step"] / ref["nfe_per_step"],
            "seconds_per_step_ratio": cho["seconds_per_step"] / ref["seconds_per_step"],
            "refine_seconds_ratio": cho["refine_seconds"] / ref["refine_seconds"],
            "inference_nfe_ratio": cho["inference_nfe"] / ref["inference_nfe"],
            "val_iou_difference": cho["val_iou"] - ref["val_iou"]}
    result = {"study": study, "full_refine": runs, "full_vs_reference": full,
              "total_seconds": time.perf_counter() - t_all,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "python": platform.python_version(), "omp_num_threads": args.threads,
                          "workers": args.workers, "load_average_end": list(os.getloadavg())}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "tolerance.json").write_text(json.dumps(result, indent=2) + "\n")
    s = study["vs_reference"] or {}
    print(f"study: {args.n_trials} trials in {tune_seconds / 60:.1f} min, states {study['states']}, "
          f"chosen trial {study['chosen']['trial']}: {choice['solver']}")
    print("\n| | NFE/step | s/step | refine s | inference NFE | val IoU |\n|---|---|---|---|---|---|")
    for name, r in runs.items():
        print(f"| {name} | {r['nfe_per_step']:.1f} | {r['seconds_per_step']:.3f} | {r['refine_seconds']:.0f} | "
              f"{r['inference_nfe']:.1f} | {r['val_iou']:.4f} |")
    print(f"| chosen / reference (full refine) | {full['nfe_ratio']:.2f} | {full['seconds_per_step_ratio']:.2f} | "
          f"{full['refine_seconds_ratio']:.2f} | {full['inference_nfe_ratio']:.2f} | "
          f"{full['val_iou_difference']:+.4f} |")
    if s:
        print(f"| chosen / reference (study trials) | {s['nfe_ratio']:.2f} | {s['seconds_ratio']:.2f} | | | "
              f"{s['val_iou_difference']:+.4f} |")
    print(f"\ntotal {result['total_seconds'] / 60:.1f} min; written {RESULTS / 'tolerance.json'}")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
