"""Variants of Contour Evolution over one UNet per seed: what the solver-cost and priors benchmarks share.

For each seed, one UNet (``pretrain`` → ``select``; the accuracy benchmark's ``<work>/<dataset>/seed-N`` is
reused when it ran with the same overrides) and one ``refine`` per variant (a list of params overrides) on the
same shards; each refined model is scored on the validation set by ``evaluate``'s metric code, image by image,
and the accuracy benchmark's statistics give every metric with a patient-bootstrap interval and each variant's
paired difference against the baseline variant (same seed, same UNet, same patients).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics as stats_
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks import accuracy
from benchmarks.common import SHARED_DATA, machine, pick_device
from nodeseg.params import Params, load_params

__all__ = ["add_arguments", "run_variants", "train_costs", "unet_for_seed"]

REPO = Path(__file__).resolve().parents[1]


def add_arguments(p: argparse.ArgumentParser, variants: Sequence[str], seeds: str) -> None:
    """The data set, seed, variant and work arguments (the accuracy benchmark's subset flags included)."""
    p.add_argument("--dataset", choices=("all", "phantom", "kits19"), default="all",
                   help="all: phantom, then kits19 where its labels are present (what `python -m benchmarks` runs)")
    p.add_argument("--kits-root", type=Path, default=SHARED_DATA / "kits19-interpolated")
    p.add_argument("--train-cases", type=int, default=40)
    p.add_argument("--val-cases", type=int, default=42)
    p.add_argument("--stride", type=int, default=3)
    p.add_argument("--val-stride", type=int, default=12)
    p.add_argument("--seeds", default=seeds)
    p.add_argument("--variants", default=",".join(variants), help=f"comma-separated, of: {', '.join(variants)}")
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("--params", default=str(REPO / "params.yaml"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="an override of every stage (the UNet's too)")
    p.add_argument("--refine-set", action="append", default=[], metavar="KEY=VALUE",
                   help="an override of every variant's refine only (e.g. a shorter budget): the seed's UNet is "
                        "still the accuracy benchmark's")
    p.add_argument("--quick", action="store_true", help="tiny data and budgets: a smoke run")
    p.add_argument("--rebuild", action="store_true", help="rebuild the shards")
    p.add_argument("--work", type=Path, help="shards, UNets and runs (default: <out>/<benchmark>); the accuracy "
                   "benchmark's --work is reused (its UNets, where they ran with the same overrides)")
    p.add_argument("--no-reuse", action="store_true", help="refine the baseline here even where the accuracy "
                   "benchmark's refine of the seed (the same params) can be scored")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--clock", default=None, help="accepted for the runner; unused")
    p.add_argument("--reps", default=None, help="accepted for the runner; unused")


def train_costs(run_dir: Path, adjoint: bool) -> dict[str, float]:
    """Mean NFE per training step (direct backprop: twice the forward, the study's rule), seconds per step."""
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

    model = work / f"seed-{seed}" / "select" / "model.pt"
    if model.is_file() and _accuracy_run_matches(work, seed, sets):
        print(f"  seed {seed}: the accuracy benchmark's UNet {model}", flush=True)
        return model
    out = work / "unets" / f"seed-{seed}"
    model = out / "select" / "model.pt"
    if not model.is_file():
        p = load_params([params_path], [*sets, f"seed={seed}", "evaluate.register=false"])
        pretrain(shards, out / "pretrain", p)
        select_checkpoint(out / "pretrain", out / "select", p.select)
    return model


def _accuracy_run_matches(work: Path, seed: int, sets: list[str]) -> bool:
    """Whether the accuracy benchmark's seed folder ran with ``sets``: its run.json, or, while that seed is still
    running (no run.json yet), the overrides it recorded at its start (``overrides.json``)."""
    for name in ("run.json", "overrides.json"):
        path = work / f"seed-{seed}" / name
        if path.is_file():
            return json.loads(path.read_text()).get("overrides") == sets
    return False


def _reused_baseline(work: Path, seed: int, sets: list[str], p: Params) -> dict[str, Any] | None:
    """The accuracy benchmark's own refine of ``seed`` (the baseline variant without overrides is that run)."""
    out = work / f"seed-{seed}" / "refine"
    if not ((out / "model.pt").is_file() and (out / "train_log.csv").is_file()
            and _accuracy_run_matches(work, seed, sets)):
        return None
    return {"refine_seconds": math.nan, "peak_memory_mb": math.nan, "peak_memory_kind": "not measured (reused)",
            "load_average_1m": math.nan, "reused": str(out), **train_costs(out, p.contour.solver.adjoint)}


def _load_1m() -> float:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return math.nan


def run_variant(shards: Path, unet: Path, out: Path, p: Params,
                reused: dict[str, Any] | None = None) -> tuple[dict[str, Any], list[dict[str, Any]], Any]:
    """Refine with ``p`` (peak memory, wall time, costs), score the result image by image; (record, rows, model).

    With ``reused`` (a finished refine's record, its folder under ``"reused"``), that refine is scored instead.
    """
    from nodeseg.data.shards import SliceDataset
    from nodeseg.models.spec import load_model
    from nodeseg.stages.evaluate import score
    from nodeseg.stages.refine import refine
    from nodeseg.tuning.memory import PeakMemory

    if reused is not None:
        record, out = dict(reused), Path(reused["reused"])
    else:
        memory = PeakMemory(pick_device(p.device))
        load = _load_1m()
        t0 = time.perf_counter()
        with memory:
            refine(shards, unet, out, p)
        record = {"refine_seconds": round(time.perf_counter() - t0, 1), "peak_memory_mb": round(memory.mb, 1),
                  "peak_memory_kind": memory.kind, "load_average_1m": load,
                  **train_costs(out, p.contour.solver.adjoint)}
    model, _ = load_model(out / "model.pt", expect=("contour",))
    rows: list[dict[str, Any]] = []
    summary = score(model, SliceDataset(shards, "val"), p.evaluate, per_slice=rows)
    record = {**record, "inference_nfe": summary["mean_nfe"],
              **{f"val_{k}": summary[k] for k in ("iou", "dice", "hd95_mm", "components_error")}}
    return record, rows, model


def run_variants(dataset: str, args: argparse.Namespace, variants: Mapping[str, Sequence[str]], baseline: str,
                 name: str, after_model: Callable[[str, int, Any, Path], None] | None = None) -> dict[str, Any]:
    """Every seed's UNet and ``args.variants`` (names of ``variants``) on ``dataset``: runs and statistics.

    ``after_model(variant, seed, model, shards)`` sees each refined model (e.g. for a figure).
    """
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    chosen = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in variants]
    if unknown or baseline not in chosen or not seeds:
        raise SystemExit(f"{name}: --variants {args.variants!r} --seeds {args.seeds!r}: needs {baseline!r}, names "
                         f"from {', '.join(variants)} and at least one seed")
    chosen = [baseline, *[v for v in chosen if v != baseline]]
    sets = [*accuracy.DATASET_SETS[dataset], *(accuracy.QUICK_SETS if args.quick else []), *args.set,
            f"device={args.device}"]
    if dataset == "kits19" and args.quick:
        sets += ["ingest.size=48"]
    work = args.work / dataset
    work.mkdir(parents=True, exist_ok=True)
    shards = accuracy.prepare(dataset, work, load_params([args.params], [*sets, "seed=0"]), args)
    t0 = time.perf_counter()
    runs: dict[int, dict[str, dict[str, Any]]] = {}
    rows: dict[int, list[dict[str, Any]]] = {}
    for seed in seeds:
        unet = unet_for_seed(shards, work, args.params, sets, seed)
        runs[seed], rows[seed] = {}, []
        # the baseline last: without overrides it is the accuracy benchmark's own refine, which may still be running
        for v in [*chosen[1:], chosen[0]]:
            p = load_params([args.params], [*sets, *args.refine_set, *variants[v], f"seed={seed}",
                                            "evaluate.register=false"])
            plain = not variants[v] and not args.refine_set and not args.no_reuse
            reused = _reused_baseline(work, seed, sets, p) if plain else None
            record, per_slice, model = run_variant(shards, unet, work / name / f"seed-{seed}" / v, p, reused)
            if after_model is not None:
                after_model(v, seed, model, shards)
            runs[seed][v] = record
            rows[seed] += [{"model": v, **r} for r in per_slice]
            print(f"  {name} seed {seed} {v}: " + ", ".join(f"{k} {record[k]:.4g}" for k in
                  ("nfe_per_step", "inference_nfe", "seconds_per_step", "peak_memory_mb", "val_iou", "val_hd95_mm")),
                  flush=True)
        runs[seed] = {v: runs[seed][v] for v in chosen}
    return {"dataset": dataset, "overrides": sets, "refine_overrides": list(args.refine_set), "variants": chosen,
            "variant_overrides": {v: list(variants[v]) for v in chosen},
            "statistics": accuracy.statistics(rows, args.bootstrap, models=chosen,
                                              pairs=[(v, baseline) for v in chosen[1:]]),
            "runs": runs, "seconds": round(time.perf_counter() - t0, 1), "machine": machine(pick_device(args.device))}


def finish_args(args: argparse.Namespace, name: str) -> list[str]:
    """Threads, work folder and the quick subset; the data sets to run."""
    torch.set_num_threads(args.threads or 1)
    args.work = args.work or args.out / name
    args.folder = None
    if args.quick:
        args.train_cases, args.val_cases, args.stride, args.val_stride = 3, 3, 8, 8
    return [args.dataset] if args.dataset != "all" else ["phantom"] + (["kits19"] if args.kits_root.is_dir() else [])
