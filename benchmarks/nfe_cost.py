"""Solver cost (issue 18): cheap solvers of Contour Evolution against dopri5 at atol 1e-5 with the adjoint.

``python -m benchmarks.nfe_cost --dataset phantom|kits19 [--seeds 0,1] [--variants reference,chosen] [--quick]``

For each seed, one UNet (``pretrain`` → ``select``; the accuracy benchmark's ``<work>/<dataset>/seed-N`` is
reused when it ran with the same overrides) and one ``refine`` per solver variant on the same shards, then
every variant's Contour Evolution is scored on the validation set by ``evaluate``'s metric code, image by
image. Reported per variant: NFE per training step (forward + backward; direct backprop counted as twice the
forward, the study's rule), NFE per inference slice (evaluate's mean NFE per batch: each fθ evaluation
serves the whole batch), seconds per training step, refine wall time, the peak memory the refine added
(``nodeseg.tuning.memory.PeakMemory``: CUDA allocator peak or the process's peak RSS), validation IoU and
HD95, and the paired differences against ``reference`` with a bootstrap interval over validation patients
(the accuracy benchmark's statistics). Ratios are taken per seed, within one process, variants run one after
another on the same machine (the load average is recorded).

Variants (``VARIANTS``; ``--set`` adds overrides to all):

- ``reference``: dopri5, rtol 0, atol 1e-5 (the paper's tightest), adjoint, for training and inference;
- ``chosen``: one midpoint step (2 NFE) with direct backprop for training and inference, the kinetic-energy
  regulariser (RNODE) at 0.01 to keep the dynamics easy to integrate in one step;
- ``adaptive-few``: today's training solver (dopri5, atol 1e-3, adjoint), inference with one midpoint step
  (the "train adaptive, infer with k steps" choice).

The goal (issue 18): NFE per training step and per inference slice ≤ 0.25× the reference, with the IoU
interval's lower end above −0.005. The table says per variant whether it holds.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics as stats_
from pathlib import Path
from typing import Any

from benchmarks import accuracy, variants
from benchmarks.common import RESULTS, machine, pick_device

#: solver overrides of each variant, on top of params.yaml + the data set's overrides
VARIANTS: dict[str, list[str]] = {
    "reference": ["contour.solver.method=dopri5", "contour.solver.rtol=0.0", "contour.solver.atol=1e-5",
                  "contour.solver.adjoint=true", "contour.solver.first_step=0.5", "contour.inference_solver=null"],
    "chosen": ["contour.solver.method=midpoint", "contour.solver.steps=1", "contour.solver.first_step=null",
               "contour.solver.adjoint=false", "contour.inference_solver=null", "refine.kinetic_energy=0.01"],
    "adaptive-few": ["contour.solver.method=dopri5", "contour.solver.rtol=0.0", "contour.solver.atol=1e-3",
                     "contour.solver.adjoint=true", "contour.solver.first_step=0.5",
                     "contour.inference_solver={method: midpoint, steps: 1, first_step: null}"],
}
GOAL_NFE_RATIO = 0.25
GOAL_IOU_LOWER = -0.005


def ratios(runs: dict[int, dict[str, dict[str, Any]]], variant: str) -> dict[str, dict[str, Any]]:
    """Per-seed ratios variant / reference of each cost, their mean and min–max over seeds."""
    out: dict[str, dict[str, Any]] = {}
    for key in ("nfe_per_step", "inference_nfe", "seconds_per_step", "refine_seconds", "peak_memory_mb"):
        values = [r[variant][key] / r["reference"][key] for r in runs.values() if r["reference"][key]]
        out[key] = {"mean": stats_.fmean(values) if values else math.nan, "per_seed": values}
    return out


def markdown(result: dict[str, Any]) -> str:
    """The cost and accuracy table of one data set."""
    st, names = result["statistics"], result["variants"]
    lines = [f"### {result['dataset']}: {st['n_cases']} validation patients, seeds {st['seeds']}, "
             f"{st['n_boot']} patient bootstraps"
             + (f"; every refine with {', '.join(result['refine_overrides'])}" if result.get("refine_overrides") else ""),
             "",
             "| variant | NFE / train step | NFE / inference slice | s / step | refine s | peak MiB | IoU | HD95 (mm) |",
             "|---|---|---|---|---|---|---|---|"]
    for v in names:
        rs = [r[v] for r in result["runs"].values()]

        def mean(key: str, rs: list[dict[str, Any]] = rs) -> float:
            return stats_.fmean(r[key] for r in rs)
        lines.append(f"| {v} | {mean('nfe_per_step'):.1f} | {mean('inference_nfe'):.1f} | "
                     f"{mean('seconds_per_step'):.3f} | {mean('refine_seconds'):.0f} | {mean('peak_memory_mb'):.0f} | "
                     f"{accuracy._cell(st['models'][v]['iou'])} | {accuracy._cell(st['models'][v]['hd95_mm'], 2)} |")
    lines += ["", "| variant / reference | NFE / train step | NFE / inference slice | s / step | refine s | peak memory "
              "| IoU difference | HD95 difference (mm) | goal |", "|---|---|---|---|---|---|---|---|---|"]
    for v in names:
        if v == "reference":
            continue
        r, d = result["ratios"][v], st["differences"][f"{v}-reference"]
        goal = result["goal"][v]
        verdict = "**holds**" if goal["holds"] else "does not hold: " + "; ".join(goal["why"])
        lines.append(f"| {v} | {r['nfe_per_step']['mean']:.2f}× | {r['inference_nfe']['mean']:.2f}× | "
                     f"{r['seconds_per_step']['mean']:.2f}× | {r['refine_seconds']['mean']:.2f}× | "
                     f"{r['peak_memory_mb']['mean']:.2f}× | {accuracy._cell(d['iou'])} | "
                     f"{accuracy._cell(d['hd95_mm'], 2)} | {verdict} |")
    lines += ["", f"Goal: NFE per training step and per inference slice ≤ {GOAL_NFE_RATIO}× the reference "
              f"(dopri5, atol 1e-5, adjoint), IoU difference's interval above {GOAL_IOU_LOWER}. Ratios are "
              "means of per-seed ratios; peak memory is what the refine added to the process.", ""]
    return "\n".join(lines)


def goal(result: dict[str, Any], variant: str) -> dict[str, Any]:
    """Whether ``variant`` meets the issue's goal, and why not."""
    r, d = result["ratios"][variant], result["statistics"]["differences"][f"{variant}-reference"]["iou"]
    why = []
    if not r["nfe_per_step"]["mean"] <= GOAL_NFE_RATIO:
        why.append(f"train NFE {r['nfe_per_step']['mean']:.2f}× > {GOAL_NFE_RATIO}×")
    if not r["inference_nfe"]["mean"] <= GOAL_NFE_RATIO:
        why.append(f"inference NFE {r['inference_nfe']['mean']:.2f}× > {GOAL_NFE_RATIO}×")
    if not d["ci95"][0] > GOAL_IOU_LOWER:
        why.append(f"IoU interval's lower end {d['ci95'][0]:+.4f} ≤ {GOAL_IOU_LOWER}")
    return {"holds": not why, "why": why}


def run_dataset(dataset: str, args: argparse.Namespace) -> dict[str, Any]:
    """Every seed's UNet and variants on ``dataset``; writes nfe_cost_<dataset>[_quick].{json,md}."""
    result = variants.run_variants(dataset, args, VARIANTS, "reference", "nfe_cost")
    names = result["variants"]
    result["ratios"] = {v: ratios(result["runs"], v) for v in names[1:]}
    result["goal"] = {v: goal(result, v) for v in names[1:]}
    text = markdown(result)
    print(text, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"nfe_cost_{dataset}" + ("_quick" if args.quick else "")
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    (args.out / f"{name}.md").write_text(text)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    variants.add_arguments(p, list(VARIANTS), seeds="0,1")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    results = {d: run_dataset(d, args) for d in variants.finish_args(args, "nfe_cost")}
    if args.dataset == "all":
        summary = {"benchmark": "nfe_cost", "quick": args.quick, "machine": machine(pick_device(args.device)),
                   "datasets": results}
        (args.out / "nfe_cost.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
