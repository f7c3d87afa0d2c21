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
import csv
import json
import math
import os
import statistics as stats_
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import accuracy
from benchmarks.common import RESULTS, SHARED_DATA, machine, pick_device
from nodeseg.params import Params, load_params

REPO = Path(__file__).resolve().parents[1]
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


def train_costs(run_dir: Path, adjoint: bool) -> dict[str, float]:
    """Mean NFE per training step (direct backprop: twice the forward) and mean seconds per step."""
    with (run_dir / "train_log.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    fwd = stats_.fmean(float(r["nfe_forward"]) for r in rows)
    bwd = stats_.fmean(float(r["nfe_backward"]) for r in rows)
    return {"nfe_per_step": fwd + (bwd if adjoint else fwd), "nfe_forward": fwd, "nfe_backward": bwd,
            "seconds_per_step": stats_.fmean(float(r["seconds"]) for r in rows), "steps": len(rows)}


def unet_for_seed(shards: Path, work: Path, params_path: str, sets: list[str], seed: int) -> Path:
    """The seed's selected UNet: the accuracy benchmark's when it ran with ``sets``, else trained here."""
    from nodeseg.stages.pretrain import pretrain
    from nodeseg.stages.select import select_checkpoint

    done = work / f"seed-{seed}" / "run.json"
    model = work / f"seed-{seed}" / "select" / "model.pt"
    if done.is_file() and json.loads(done.read_text()).get("overrides") == sets and model.is_file():
        print(f"  seed {seed}: the accuracy benchmark's UNet {model}", flush=True)
        return model
    out = work / "nfe_cost" / f"seed-{seed}"
    model = out / "select" / "model.pt"
    if not model.is_file():
        p = load_params([params_path], [*sets, f"seed={seed}", "evaluate.register=false"])
        pretrain(shards, out / "pretrain", p)
        select_checkpoint(out / "pretrain", out / "select", p.select)
    return model


def run_variant(shards: Path, unet: Path, out: Path, p: Params) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Refine with ``p`` (peak memory, wall time, costs) and score the result image by image."""
    from nodeseg.data.shards import SliceDataset
    from nodeseg.models.spec import load_model
    from nodeseg.stages.evaluate import score
    from nodeseg.stages.refine import refine
    from nodeseg.tuning.memory import PeakMemory

    memory = PeakMemory(pick_device(p.device))
    load = load_1m()
    t0 = time.perf_counter()
    with memory:
        refine(shards, unet, out, p)
    seconds = time.perf_counter() - t0
    model, _ = load_model(out / "model.pt", expect=("contour",))
    rows: list[dict[str, Any]] = []
    summary = score(model, SliceDataset(shards, "val"), p.evaluate, per_slice=rows)
    record = {"refine_seconds": round(seconds, 1), "peak_memory_mb": round(memory.mb, 1),
              "peak_memory_kind": memory.kind, "load_average_1m": load,
              **train_costs(out, p.contour.solver.adjoint),
              "inference_nfe": summary["mean_nfe"], "val_iou": summary["iou"], "val_hd95_mm": summary["hd95_mm"]}
    return record, rows


def load_1m() -> float:
    """The 1-minute load average at the start of a run (NaN where the platform has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return math.nan


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
             f"{st['n_boot']} patient bootstraps",
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
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or "reference" not in variants:
        raise SystemExit(f"nfe_cost: --variants {args.variants!r}: needs 'reference' and names from "
                         f"{', '.join(VARIANTS)}")
    variants = ["reference", *[v for v in variants if v != "reference"]]
    sets = [*accuracy.DATASET_SETS[dataset], *(accuracy.QUICK_SETS if args.quick else []), *args.set,
            f"device={args.device}"]
    if dataset == "kits19" and args.quick:
        sets += ["ingest.size=48"]
    name = f"nfe_cost_{dataset}" + ("_quick" if args.quick else "")
    work = args.work / dataset
    work.mkdir(parents=True, exist_ok=True)
    shards = accuracy.prepare(dataset, work, load_params([args.params], [*sets, "seed=0"]), args)
    t0 = time.perf_counter()
    runs: dict[int, dict[str, dict[str, Any]]] = {}
    rows: dict[int, list[dict[str, Any]]] = {}
    for seed in seeds:
        unet = unet_for_seed(shards, work, args.params, sets, seed)
        runs[seed], rows[seed] = {}, []
        for v in variants:
            p = load_params([args.params], [*sets, *VARIANTS[v], f"seed={seed}", "evaluate.register=false"])
            record, per_slice = run_variant(shards, unet, work / "nfe_cost" / f"seed-{seed}" / v, p)
            runs[seed][v] = record
            rows[seed] += [{"model": v, **r} for r in per_slice]
            print(f"  seed {seed} {v}: " + ", ".join(f"{k} {record[k]:.4g}" for k in
                  ("nfe_per_step", "inference_nfe", "seconds_per_step", "peak_memory_mb", "val_iou")), flush=True)
    result: dict[str, Any] = {
        "dataset": dataset, "overrides": sets, "variants": variants,
        "variant_overrides": {v: VARIANTS[v] for v in variants},
        "statistics": accuracy.statistics(rows, args.bootstrap, models=variants,
                                          pairs=[(v, "reference") for v in variants[1:]]),
        "runs": runs, "seconds": round(time.perf_counter() - t0, 1), "machine": machine(pick_device(args.device)),
    }
    result["ratios"] = {v: ratios(runs, v) for v in variants[1:]}
    result["goal"] = {v: goal(result, v) for v in variants[1:]}
    text = markdown(result)
    print(text, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    (args.out / f"{name}.md").write_text(text)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=("all", "phantom", "kits19"), default="all",
                   help="all: phantom, then kits19 where its labels are present (what `python -m benchmarks` runs)")
    p.add_argument("--kits-root", default=str(SHARED_DATA / "kits19-interpolated"))
    p.add_argument("--train-cases", type=int, default=40)
    p.add_argument("--val-cases", type=int, default=42)
    p.add_argument("--stride", type=int, default=3)
    p.add_argument("--val-stride", type=int, default=12)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("--params", default=str(REPO / "params.yaml"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--quick", action="store_true", help="tiny data and budgets: a smoke run")
    p.add_argument("--rebuild", action="store_true", help="rebuild the shards")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--work", type=Path, help="shards, UNets and runs (default: <out>/nfe_cost); the accuracy "
                   "benchmark's --work is reused (its UNets, when they ran with the same overrides)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--clock", default=None, help="accepted for the runner; unused")
    p.add_argument("--reps", default=None, help="accepted for the runner; unused")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads or 1)
    args.work = args.work or args.out / "nfe_cost"
    args.folder, args.kits_root = None, Path(args.kits_root)
    if args.quick:
        args.train_cases, args.val_cases, args.stride, args.val_stride = 3, 3, 8, 8
    datasets = [args.dataset] if args.dataset != "all" else ["phantom"] + (["kits19"] if args.kits_root.is_dir() else [])
    results = {d: run_dataset(d, args) for d in datasets}
    if args.dataset == "all":
        summary = {"benchmark": "nfe_cost", "quick": args.quick, "machine": machine(pick_device(args.device)),
                   "datasets": results}
        (args.out / "nfe_cost.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
