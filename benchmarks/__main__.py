"""Run every benchmark: ``python -m benchmarks [--quick] [--only NAME,...] [--skip NAME,...]``.

Each script runs in its own process (thread settings and peak memory stay apart), prints its table and
writes ``<out>/<name>.json``; this runner then writes ``<out>/summary.json`` with each figure's headline
against its goal. ``--quick`` runs tiny sizes (a smoke run, about a minute); without it the run takes
long (the ingest of the 210 KiTS19 cases alone takes minutes, and the first run also writes their
pseudo-CT files once: 9 min, 8.7 GB under ``benchmarks/results/cache``; ``--cases N`` shortens both). The pipeline
timing (``pipeline_default``: a whole ``dvc repro``) runs only in the full mode.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, RESULTS, load_average

SCRIPTS = ("ode_overhead", "nfe_memory", "flops", "ingest", "inference", "solver_peers", "accuracy", "nfe_cost")


def _headline(name: str, data: dict[str, Any]) -> dict[str, Any]:
    """The figure of one result file, next to its goal."""
    rows = data.get("rows", [])
    if name == "ode_overhead":
        return {"goal": "overhead <= 1.05", "overhead": {r["config"]: round(r["overhead"], 3) for r in rows},
                "overhead_machinery": {r["config"]: round(r["overhead_machinery"], 3) for r in rows
                                       if "overhead_machinery" in r}}
    if name == "nfe_memory":
        return {"goal": "adjoint/direct peak memory <= 0.5 at equal NFE",
                "memory_ratio": {r["solver"]: round(r["memory_ratio_adjoint_direct"], 3)
                                 for r in data.get("adjoint_vs_direct", [])}}
    if name == "flops":
        return {"goal": "achieved/peak >= 0.5 on CPU",
                "ratio_to_peak": {f"{r['config']} [{r['variant']}]": round(r["ratio_to_peak"], 3)
                                  for r in rows if "ratio_to_peak" in r}}
    if name == "ingest":
        return {"goal": "ingest/decode <= 1.5",
                "ratio": {r.get("imaging", "render"): round(r["ratio"], 3) for r in rows},
                "ratio_isal": {r.get("imaging", "render"): round(r["ratio_isal"], 3) for r in rows}}
    if name == "inference":
        return {"slices_per_second": {r["model"]: round(r["slices_per_second"], 1) for r in rows}}
    if name == "solver_peers":
        return {"goal": "wrapper/torchdiffeq <= 1.05",
                "ratio_to_torchdiffeq": {f"{r['config']} {r['backprop']} [{r['solver']}]":
                                         round(r["ratio_to_torchdiffeq"], 3) for r in rows}}
    if name == "accuracy":
        out = {"goal": "Contour − UNet IoU interval > 0, Image − UNet IoU interval > −0.005, UNet ≥ MONAI − 0.02"}
        for ds, res in data.get("datasets", {}).items():
            st = res["statistics"]
            out[ds] = {key: {"mean": round(d["iou"]["mean"], 4), "ci95": [round(v, 4) for v in d["iou"]["ci95"]]}
                       for key, d in st["differences"].items()}
        return out
    if name == "nfe_cost":
        out = {"goal": "NFE per training step and per inference slice <= 0.25x dopri5 atol 1e-5 (adjoint), "
                       "IoU difference interval > -0.005"}
        for ds, res in data.get("datasets", {}).items():
            out[ds] = {v: {"nfe_ratio": round(r["nfe_per_step"]["mean"], 3),
                           "inference_nfe_ratio": round(r["inference_nfe"]["mean"], 3),
                           "iou_difference_ci95": [round(x, 4) for x in
                                                   res["statistics"]["differences"][f"{v}-reference"]["iou"]["ci95"]],
                           "holds": res["goal"][v]["holds"]} for v, r in res["ratios"].items()}
        return out
    return {}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes: prove that every script runs")
    p.add_argument("--only", default="", help="comma-separated subset of: " + ", ".join(SCRIPTS))
    p.add_argument("--skip", default="", help="comma-separated scripts to leave out")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--clock", choices=("wall", "cpu"), default=None)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--cases", type=int, default=None, help="ingest: only the first N KiTS19 cases")
    p.add_argument("--summarise", action="store_true", help="run nothing: rebuild summary.json from <out>/*.json")
    args = p.parse_args(argv)
    names = [n for n in (args.only.split(",") if args.only else SCRIPTS) if n]
    unknown = sorted(set(names) - set(SCRIPTS) - {"pipeline_default"})
    if unknown:
        p.error(f"unknown benchmark(s) {', '.join(unknown)}: expected some of {', '.join(SCRIPTS)}")
    if not args.quick and not args.only:
        names.append("pipeline_default")
    names = [n for n in names if n not in set(args.skip.split(","))]
    common_args = ["--out", str(args.out), "--device", args.device]
    for flag, value in (("--threads", args.threads), ("--clock", args.clock), ("--reps", args.reps)):
        if value is not None:
            common_args += [flag, str(value)]
    summary: dict[str, Any] = {"quick": args.quick, "load_average_start": load_average(), "benchmarks": {}}
    failed = []
    for name in names:
        if name == "pipeline_default":
            cmd = [sys.executable, str(REPO / "benchmarks" / "pipeline_default.py")]
        else:
            cmd = [sys.executable, "-m", f"benchmarks.{name}", *common_args, *(["--quick"] if args.quick else [])]
            if name == "ingest" and args.cases:
                cmd += ["--cases", str(args.cases)]
        entry: dict[str, Any] = {}
        if args.summarise:
            rc = 0
        else:
            print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
            t0 = time.perf_counter()
            rc = subprocess.run(cmd, cwd=REPO).returncode
            entry = {"seconds": round(time.perf_counter() - t0, 1), "returncode": rc}
        result = (RESULTS if name == "pipeline_default" else args.out) / f"{name}.json"
        if rc == 0 and result.is_file():
            entry.update(_headline(name, json.loads(result.read_text())))
        else:
            failed.append(name)
        summary["benchmarks"][name] = entry
    summary["load_average_end"] = load_average()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nsummary: {args.out / 'summary.json'}" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
