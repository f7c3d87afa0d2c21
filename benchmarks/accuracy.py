"""Accuracy with confidence: UNet, Contour Evolution, Image Evolution and MONAI's UNet over seeds and patients.

``python -m benchmarks.accuracy --dataset phantom|kits19|folder [--folder DIR] [--seeds 0,1,2] [--quick]``

For each seed the real stage functions run on one set of shards — ``pretrain`` → ``select`` → ``refine`` →
``image_evolve`` → ``evaluate`` — with ``params.yaml`` (plus the data set's overrides and ``--set``), and
MONAI's ``UNet`` is trained with Dice+CE on the same shards and step budget (``benchmarks/baseline_monai.py``).
Every model is scored by ``nodeseg``'s metric code, image by image (``evaluate``'s ``per_slice.csv``).

Statistics. The unit of resampling is the validation patient (case), never the pixel or the slice. A model's
figure is the mean over seeds of its per-seed value (pooled IoU: TP/(TP+FP+FN) summed over the set; Dice,
HD95, ASD, surface Dice, |Δ components|: means over images); its 95 % interval is the percentile interval of
that seed-mean over ``--bootstrap`` resamples of the patients (the same resample for every seed and model, so
differences are paired). ``Contour − UNet`` and ``Image − UNet`` pair each seed's model with that seed's UNet
(Contour Evolution refines that UNet). The spread over seeds is shown beside (min–max), since the patient
bootstrap does not include it.

Data sets:

- ``phantom``: the default pipeline's data (``nodeseg generate`` with the ``phantom`` section, 64²) and its
  params, unchanged.
- ``kits19``: the 210 real KiTS19 label volumes in ``../shared/data/kits19-interpolated`` with pseudo-CT
  (``ingest.pseudo_ct``) at 200×200, split 168/42 by patient with ``nodeseg preprocess``'s rule (the paper's
  split sizes); the benchmark keeps ``--train-cases`` of the 168 training and ``--val-cases`` of the 42
  validation patients (the first of each, sorted by id), ingests only those, and keeps every ``--stride``-th
  (``--val-stride``-th) kidney slice of each training (validation) case, so that 3 seeds fit 2 CPU cores.
- ``folder``: any image+mask folder (``data.source: saliency``) given by ``--folder``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import sys
import time
import warnings
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.baseline_monai import LR as MONAI_LR
from benchmarks.common import RESULTS, SHARED_DATA, machine, pick_device
from nodeseg.data.ingest import split_ids
from nodeseg.data.kits19 import list_cases
from nodeseg.data.shardio import ShardWriter, read_manifest, read_records, shard_files
from nodeseg.params import Params, load_params

REPO = Path(__file__).resolve().parents[1]
MODELS = ("unet", "contour", "image", "monai")
MONAI_OPTIMIZER = f"Adam lr {MONAI_LR:g}"  # a reused seed whose baseline had another recipe gets it retrained
NAMES = {"unet": "UNet (nodeseg)", "contour": "Contour Evolution", "image": "Image Evolution",
         "monai": "MONAI UNet (Dice+CE)"}
METRICS = ("iou", "dice", "hd95_mm", "asd_mm", "nsd_1px", "nsd_2px", "components_error")
HIGHER_BETTER = {"iou": True, "dice": True, "hd95_mm": False, "asd_mm": False, "nsd_1px": True, "nsd_2px": True,
                 "components_error": False}
#: overrides of each data set on top of params.yaml (and before --set)
DATASET_SETS: dict[str, list[str]] = {
    "phantom": [],
    # real anatomy: the plain narrow-band MSE drives the UNet to an empty prediction here even after balanced
    # first steps (benchmarks/README.md, "Accuracy"), so every model trains on the class-balanced loss
    "kits19": ["ingest.size=200", "ingest.pseudo_ct=true", "data.source=kits19", "pretrain.epochs=12",
               "pretrain.max_batches_per_epoch=40", "refine.epochs=2", "refine.max_batches_per_epoch=20",
               "image_evolve.epochs=8", "image_evolve.max_batches_per_epoch=30",
               "pretrain.class_balance_steps=1000000", "refine.class_balance_steps=1000000",
               "image_evolve.class_balance_steps=1000000"],
    "folder": ["data.source=saliency"],
}
QUICK_SETS = ["phantom.n_cases=6", "phantom.n_slices=12", "phantom.shape=[64,64]", "ingest.size=32",
              "pretrain.epochs=2", "refine.epochs=1", "image_evolve.epochs=1", "pretrain.max_batches_per_epoch=3",
              "refine.max_batches_per_epoch=2", "image_evolve.max_batches_per_epoch=2", "evaluate.figure_samples=0",
              "evaluate.register=false", "select.samples=2", "pretrain.select_samples=2", "refine.select_samples=2",
              "image_evolve.select_samples=2", "pretrain.batch_size=4", "refine.batch_size=4",
              "image_evolve.batch_size=4"]


# ----------------------------------------------------------------------------------------------- the data


def _subset_shards(src: Path, dst: Path, keep: dict[str, set[str]], stride: dict[str, int]) -> dict[str, Any]:
    """Rows of ``src`` (any split) whose case is in ``keep[split]``, every ``stride``-th of a case, as new shards."""
    manifest = read_manifest(src)
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    files = [f for split in manifest["splits"] for f in shard_files(src, split)]
    splits: dict[str, Any] = {}
    for split, cases in keep.items():
        seen: dict[str, int] = defaultdict(int)
        with ShardWriter(tmp / split) as writer:
            for rec in read_records(files):
                if rec.case_id in cases:
                    if seen[rec.case_id] % stride[split] == 0:
                        writer.write(rec)
                    seen[rec.case_id] += 1
            written = writer.close()
        splits[split] = {"rows": writer.rows_written, "items": len(cases), "cases": sorted(cases),
                         "files": [str(f.relative_to(tmp)) for f in written]}
    manifest.update(splits=splits, rows=sum(s["rows"] for s in splits.values()),
                    subset={"stride": stride, "cases": {k: len(v) for k, v in keep.items()}})
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    return manifest


def prepare(dataset: str, work: Path, params: Params, args: argparse.Namespace) -> Path:
    """Build (or reuse) the shards of ``dataset`` under ``work``; returns the shards folder."""
    from nodeseg.stages.generate import generate
    from nodeseg.stages.preprocess import preprocess

    shards = work / "shards"
    if (shards / "manifest.json").is_file() and not args.rebuild:
        return shards
    if dataset == "phantom":
        generate(work / "raw", params)
        preprocess(work / "raw", shards, params)
    elif dataset == "folder":
        preprocess(Path(args.folder), shards, params)
    else:
        root = Path(args.kits_root)
        if not root.is_dir():
            raise SystemExit(f"accuracy: no KiTS19 label volumes at {root} (set --kits-root)")
        # the split of all 210 cases (the paper's 168/42, the rule `nodeseg preprocess` applies), then a subset
        train_ids, val_ids = split_ids([c.name for c in list_cases(root)], params.ingest.val_fraction, params.seed)
        keep = {"train": set(train_ids[: args.train_cases]), "val": set(val_ids[: args.val_cases])}
        raw = work / "raw-subset"
        shutil.rmtree(raw, ignore_errors=True)
        raw.mkdir(parents=True)
        for case in sorted(keep["train"] | keep["val"]):
            (raw / case).symlink_to((root / case).resolve(), target_is_directory=True)
        preprocess(raw, work / "shards-subset", params)
        _subset_shards(work / "shards-subset", shards, keep, {"train": args.stride, "val": args.val_stride})
    return shards


# ----------------------------------------------------------------------------------------------- one seed


def run_seed(shards: Path, out: Path, params_path: str, sets: list[str], seed: int) -> dict[str, Any]:
    """Train and score every model for ``seed`` (params: ``params_path`` + ``sets``); per-slice rows, records."""
    from nodeseg.stages.evaluate import evaluate
    from nodeseg.stages.image_evolve import image_evolve
    from nodeseg.stages.pretrain import pretrain
    from nodeseg.stages.refine import refine
    from nodeseg.stages.select import select_checkpoint

    p = load_params([params_path], [*sets, f"seed={seed}", "evaluate.register=false"])
    times: dict[str, float] = {}

    def timed(name: str, fn: Any, *a: Any) -> Any:
        t0 = time.perf_counter()
        result = fn(*a)
        times[name] = round(time.perf_counter() - t0, 1)
        print(f"  seed {seed}: {name} {times[name]} s", flush=True)
        return result

    timed("pretrain", pretrain, shards, out / "pretrain", p)
    timed("select", select_checkpoint, out / "pretrain", out / "select", p.select)
    timed("refine", refine, shards, out / "select" / "model.pt", out / "refine", p)
    timed("image_evolve", image_evolve, shards, out / "image_evolve", p)
    summary = timed("evaluate", evaluate, shards, {"unet": out / "select" / "model.pt",
                                                  "contour": out / "refine" / "model.pt",
                                                  "image": out / "image_evolve" / "model.pt"}, out / "evaluate", p)
    with (out / "evaluate" / "per_slice.csv").open() as f:
        rows = list(csv.DictReader(f))
    run = {"rows": rows, "summary": {m: summary[m] for m in MODELS if m != "monai"}, "seconds": times}
    return run_monai(shards, p, seed, run)


def run_monai(shards: Path, p: Params, seed: int, run: dict[str, Any]) -> dict[str, Any]:
    """Train and score MONAI's UNet for ``seed`` into ``run`` (its rows, summary, seconds and record replaced)."""
    from benchmarks.baseline_monai import train_monai_baseline
    from nodeseg.data.shards import SliceDataset
    from nodeseg.stages.evaluate import score

    t0 = time.perf_counter()
    monai_model, record = train_monai_baseline(str(shards), p, seed)
    monai_rows: list[dict[str, Any]] = []
    summary = {**run["summary"], "monai": score(monai_model, SliceDataset(shards, "val"), p.evaluate,
                                                per_slice=monai_rows)}
    seconds = {**run["seconds"], "monai": round(time.perf_counter() - t0, 1)}
    print(f"  seed {seed}: monai {seconds['monai']} s", flush=True)
    rows = [r for r in run["rows"] if r.get("model") != "monai"] + [{"model": "monai", **r} for r in monai_rows]
    return {**run, "rows": rows, "summary": {m: summary[m] for m in MODELS}, "seconds": seconds, "monai": record}


# ----------------------------------------------------------------------------------------------- statistics


def _tables(rows: list[dict[str, Any]], cases: list[str],
            models: Sequence[str] = MODELS) -> dict[str, dict[str, np.ndarray]]:
    """Per model, per case arrays: tp, fp, fn sums and per-metric (sum, count) over the case's slices."""
    index = {c: i for i, c in enumerate(cases)}
    out: dict[str, dict[str, np.ndarray]] = {}
    for model in models:
        t = {k: np.zeros(len(cases)) for k in ("tp", "fp", "fn")}
        for m in METRICS[1:]:
            t[m + "_sum"], t[m + "_n"] = np.zeros(len(cases)), np.zeros(len(cases))
        for r in rows:
            if r["model"] != model:
                continue
            i = index[r["case_id"]]
            for k in ("tp", "fp", "fn"):
                t[k][i] += float(r[k])
            for m in METRICS[1:]:
                v = (abs(float(r["components_pred"]) - float(r["components_gt"])) if m == "components_error"
                     else float(r[m]))
                if not math.isnan(v):
                    t[m + "_sum"][i] += v
                    t[m + "_n"][i] += 1
        out[model] = t
    return out


def _stat(t: dict[str, np.ndarray], weights: np.ndarray) -> dict[str, np.ndarray]:
    """Each metric for every resample: ``weights`` (B, n_cases) counts how often each case was drawn."""
    tp, fp, fn = weights @ t["tp"], weights @ t["fp"], weights @ t["fn"]
    res = {"iou": np.divide(tp, tp + fp + fn, out=np.zeros_like(tp), where=(tp + fp + fn) > 0)}
    for m in METRICS[1:]:
        s, n = weights @ t[m + "_sum"], weights @ t[m + "_n"]
        res[m] = np.divide(s, n, out=np.full_like(s, np.nan), where=n > 0)
    return res


def statistics(per_seed: dict[int, list[dict[str, Any]]], n_boot: int, seed: int = 12345,
               models: Sequence[str] = MODELS,
               pairs: Sequence[tuple[str, str]] = (("contour", "unet"), ("image", "unet"), ("monai", "unet")),
               ) -> dict[str, Any]:
    """Point estimates, patient-bootstrap intervals and paired differences (see the module docstring).

    ``models`` are the ``model`` values of the rows; ``pairs`` the (model, baseline) differences, keyed
    ``"model-baseline"``, each seed's model against that seed's baseline.
    """
    cases = sorted({r["case_id"] for rows in per_seed.values() for r in rows})
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(cases), size=(n_boot, len(cases)))
    weights = np.zeros((n_boot + 1, len(cases)))
    weights[0] = 1.0  # row 0: the observed set
    np.add.at(weights[1:], (np.arange(n_boot)[:, None], draws), 1.0)
    stats = {s: {m: _stat(t, weights) for m, t in _tables(rows, cases, models).items()}
             for s, rows in per_seed.items()}
    seeds = sorted(stats)

    def summarise(values: np.ndarray) -> dict[str, Any]:  # (seeds, 1 + n_boot)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a resample without any finite distance: NaN
            mean = np.nanmean(values, axis=0)
            lo, hi = np.nanpercentile(mean[1:], [2.5, 97.5]) if np.isfinite(mean[1:]).any() else (math.nan,) * 2
        return {"mean": float(mean[0]), "ci95": [float(lo), float(hi)],
                "per_seed": [float(v) for v in values[:, 0]]}

    summary = {m: {k: summarise(np.stack([stats[s][m][k] for s in seeds])) for k in METRICS} for m in models}
    diffs = {}
    for other, base in pairs:
        diffs[f"{other}-{base}"] = {k: summarise(np.stack([stats[s][other][k] - stats[s][base][k] for s in seeds]))
                                    for k in METRICS}
    return {"n_cases": len(cases), "n_boot": n_boot, "seeds": seeds, "models": summary, "differences": diffs}


def _cell(s: dict[str, Any], digits: int = 4) -> str:
    if math.isnan(s["mean"]):
        return "n/a"
    return f"{s['mean']:.{digits}f} [{s['ci95'][0]:.{digits}f}, {s['ci95'][1]:.{digits}f}]"


def markdown(result: dict[str, Any]) -> str:
    """The models' table and the paired differences, with intervals."""
    st = result["statistics"]
    head = ("| model | IoU | Dice | HD95 (mm) | ASD (mm) | surface Dice 1 px | surface Dice 2 px | \\|Δ components\\| "
            "| IoU per seed |")
    lines = [f"### {result['dataset']}: {st['n_cases']} validation patients, seeds {st['seeds']}, "
             f"{st['n_boot']} patient bootstraps (mean [95 % interval])", "", head, "|---" * 9 + "|"]
    digits = {"hd95_mm": 2, "asd_mm": 2, "components_error": 2}
    for m in MODELS:
        s = st["models"][m]
        lines.append(f"| {NAMES[m]} | " + " | ".join(_cell(s[k], digits.get(k, 4)) for k in METRICS)
                     + " | " + ", ".join(f"{v:.4f}" for v in s["iou"]["per_seed"]) + " |")
    lines += ["", "| paired difference | " + head.split("| model | ")[1].replace("IoU per seed", "IoU per seed"),
              "|---" * 9 + "|"]
    for key, s in st["differences"].items():
        a, b = key.split("-")
        lines.append(f"| {NAMES[a]} − {NAMES[b]} | " + " | ".join(_cell(s[k], digits.get(k, 4)) for k in METRICS)
                     + " | " + ", ".join(f"{v:+.4f}" for v in s["iou"]["per_seed"]) + " |")
    verdict = []
    for key, label in (("contour-unet", "Contour Evolution beats its UNet"),
                       ("image-unet", "Image Evolution at least matches its UNet")):
        iou = st["differences"][key]["iou"]
        held = iou["ci95"][0] > 0 if key == "contour-unet" else iou["ci95"][0] > -0.005
        verdict.append(f"- {label} (IoU, paired interval {'above 0' if key == 'contour-unet' else 'above −0.005'}): "
                       f"**{'holds' if held else 'does not hold'}** ({_cell(iou)})")
    gap = st["models"]["unet"]["iou"]["mean"] - st["models"]["monai"]["iou"]["mean"]
    verdict.append(f"- nodeseg's UNet against MONAI's: {gap:+.4f} IoU (goal: ≥ −0.02): "
                   f"**{'fair' if gap >= -0.02 else 'weaker'}**")
    return "\n".join(lines + [""] + verdict) + "\n"


# ----------------------------------------------------------------------------------------------- main


def run_dataset(dataset: str, args: argparse.Namespace) -> dict[str, Any]:
    """Shards, every seed's runs and the statistics of ``dataset``; writes accuracy_<dataset>[_quick].{json,md}."""
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if args.quick:
        seeds = seeds[:2]
    sets = [*DATASET_SETS[dataset], *(QUICK_SETS if args.quick else []), *args.set, f"device={args.device}"]
    if dataset == "kits19" and args.quick:
        sets += ["ingest.size=48"]
    name = f"accuracy_{dataset}" + ("_quick" if args.quick else "")
    work = args.work / dataset if args.work else args.out / name
    work.mkdir(parents=True, exist_ok=True)
    data_params = load_params([args.params], [*sets, "seed=0"])
    t0 = time.perf_counter()
    shards = prepare(dataset, work, data_params, args)
    manifest = read_manifest(shards)
    per_seed, records = {}, {}
    for seed in seeds:
        out = work / f"seed-{seed}"
        done = out / "run.json"
        if args.reuse and done.is_file() and json.loads(done.read_text()).get("overrides") == sets:
            print(f"=== {name}: seed {seed} reused from {done}", flush=True)
            run = json.loads(done.read_text())
            if run["monai"].get("optimizer") != MONAI_OPTIMIZER:  # the baseline's recipe changed: retrain it alone
                print(f"  seed {seed}: MONAI's UNet was trained with {run['monai'].get('optimizer')!r}, now "
                      f"{MONAI_OPTIMIZER!r}: retrained", flush=True)
                p = load_params([args.params], [*sets, f"seed={seed}", "evaluate.register=false"])
                run = run_monai(shards, p, seed, run)
                done.write_text(json.dumps(run, default=float))
        else:
            print(f"=== {name}: seed {seed}", flush=True)
            shutil.rmtree(out, ignore_errors=True)  # a fresh run per seed: no resume across settings
            out.mkdir(parents=True)
            (out / "overrides.json").write_text(json.dumps({"overrides": sets}))  # for benchmarks/variants.py
            run = {**run_seed(shards, out, args.params, sets, seed), "overrides": sets}
            done.write_text(json.dumps(run, default=float))
        per_seed[seed] = run["rows"]
        records[seed] = {k: run[k] for k in ("summary", "seconds", "monai")}
    result = {
        "dataset": dataset, "overrides": sets,
        "shards": {"rows": manifest["rows"], "splits": {k: {"rows": v["rows"], "items": v["items"]}
                                                        for k, v in manifest["splits"].items()},
                   "subset": manifest.get("subset")},
        "statistics": statistics(per_seed, args.bootstrap), "runs": records,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    text = markdown(result)
    print(text, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{name}.md").write_text(text)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=("all", *DATASET_SETS), default="all",
                   help="all: phantom, then kits19 where its labels are present (what `python -m benchmarks` runs)")
    p.add_argument("--folder", type=Path, help="--dataset folder: an image+mask folder")
    p.add_argument("--kits-root", type=Path, default=SHARED_DATA / "kits19-interpolated")
    p.add_argument("--train-cases", type=int, default=40)
    p.add_argument("--val-cases", type=int, default=42)
    p.add_argument("--stride", type=int, default=3, help="kits19: every N-th kidney slice of a training case")
    p.add_argument("--val-stride", type=int, default=12, help="kits19: every N-th kidney slice of a validation case")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("--params", default=str(REPO / "params.yaml"))
    p.add_argument("--set", action="append", default=[], help="a params override key=value (repeatable)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, 2 seeds, few patients: prove that it runs")
    p.add_argument("--rebuild", action="store_true", help="rebuild the shards even if present")
    p.add_argument("--reuse", action="store_true",
                   help="take a seed's finished run (<work>/seed-N/run.json, same overrides) instead of rerunning it: "
                        "seeds can run in parallel processes, then one call with every seed writes the statistics")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--work", type=Path, default=None, help="where runs go (default: <out>/accuracy_<dataset>)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--clock", default=None, help="accepted for the runner; unused")
    p.add_argument("--reps", default=None, help="accepted for the runner; unused")
    args = p.parse_args(argv)
    if args.dataset == "folder" and args.folder is None:
        p.error("--dataset folder needs --folder DIR")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.train_cases, args.val_cases, args.stride, args.val_stride = 3, 3, 8, 8
    datasets = [args.dataset] if args.dataset != "all" else ["phantom"] + (["kits19"] if args.kits_root.is_dir() else [])
    results = {d: run_dataset(d, args) for d in datasets}
    if args.dataset == "all":
        summary = {"benchmark": "accuracy", "quick": args.quick, "machine": machine(pick_device(args.device)),
                   "datasets": results}
        (args.out / "accuracy.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
