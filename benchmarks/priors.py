"""Ablation of the priors on Contour Evolution's ODE (issue 19 item 4): each prior on and off, same seeds.

``python -m benchmarks.priors --dataset phantom|kits19 [--seeds 0,1,2] [--variants none,curvature,...] [--quick]``

Per seed one UNet (the accuracy benchmark's, reused from its ``--work`` where it ran with the same overrides)
and one ``refine`` per variant (``none`` = every prior off, then one prior each) on the same shards; every
refined model is scored by ``evaluate``'s metric code image by image (IoU, Dice, HD95 and ASD in mm from MONAI,
surface Dice, |Δ components|) with NFE, and each variant's paired difference against ``none`` has a bootstrap
interval over validation patients (the accuracy benchmark's statistics). A Fig.-1-style strip
(``viz.plot_evolution_strip``: φ̂(t) over the ODE time of the first validation slice, one row per variant) is
written beside the JSON.

Goal (issue 19): a prior that reduces HD95 by ≥ 10 % (the mean difference over the ``none`` mean) and the
component-count error (difference interval below 0), at no IoU loss (the IoU difference's interval above
−0.005), on the real-anatomy set. The weights of each variant (``VARIANTS``) are a starting point, not a
tuned choice; ``--set`` adds overrides to all.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import accuracy, variants
from benchmarks.common import RESULTS, machine, pick_device
from nodeseg import viz
from nodeseg.data.shards import SliceDataset

VARIANTS: dict[str, list[str]] = {
    "none": [],
    "curvature": ["contour.priors.curvature=0.2"],
    "length": ["contour.priors.length=0.05"],
    "reinit": ["contour.priors.reinit=0.05"],
    "area": ["contour.priors.area=10.0"],
    "shape": ["contour.priors.shape=0.05"],
}
GOAL_HD95 = -0.10
GOAL_IOU_LOWER = -0.005
TIMES = 5


def goal(result: dict[str, Any], variant: str) -> dict[str, Any]:
    """Whether ``variant`` meets the issue's goal against ``none``, and why not."""
    st = result["statistics"]
    d = st["differences"][f"{variant}-none"]
    base = st["models"]["none"]["hd95_mm"]["mean"]
    rel = d["hd95_mm"]["mean"] / base if base else float("nan")
    why = []
    if not rel <= GOAL_HD95:
        why.append(f"HD95 {100 * rel:+.1f} % (goal ≤ {100 * GOAL_HD95:.0f} %)")
    if not d["components_error"]["ci95"][1] < 0:
        why.append(f"|Δ components| difference {accuracy._cell(d['components_error'], 2)} not below 0")
    if not d["iou"]["ci95"][0] > GOAL_IOU_LOWER:
        why.append(f"IoU interval's lower end {d['iou']['ci95'][0]:+.4f} ≤ {GOAL_IOU_LOWER}")
    return {"holds": not why, "why": why, "hd95_relative": rel}


def markdown(result: dict[str, Any]) -> str:
    """Per variant: metrics with intervals, NFE, and the paired differences against ``none``."""
    st, names = result["statistics"], result["variants"]
    keys = ("iou", "dice", "hd95_mm", "asd_mm", "nsd_2px", "components_error")
    head = "| IoU | Dice | HD95 (mm) | ASD (mm) | surface Dice 2 px | \\|Δ components\\| |"
    lines = [f"### {result['dataset']}: {st['n_cases']} validation patients, seeds {st['seeds']}, "
             f"{st['n_boot']} patient bootstraps (mean [95 % interval])"
             + (f"; every refine with {', '.join(result['refine_overrides'])}" if result.get("refine_overrides") else ""),
             "",
             "| variant " + head + " NFE / inference slice |", "|---" * (len(keys) + 2) + "|"]
    for v in names:
        nfe = float(np.mean([r[v]["inference_nfe"] for r in result["runs"].values()]))
        cells = [accuracy._cell(st["models"][v][k], 2 if k.endswith("mm") or k == "components_error" else 4)
                 for k in keys]
        lines.append(f"| {v} | " + " | ".join(cells) + f" | {nfe:.1f} |")
    lines += ["", "| variant − none " + head + " goal |", "|---" * (len(keys) + 2) + "|"]
    for v in names[1:]:
        d = st["differences"][f"{v}-none"]
        cells = [accuracy._cell(d[k], 2 if k.endswith("mm") or k == "components_error" else 4) for k in keys]
        g = result["goal"][v]
        lines.append(f"| {v} | " + " | ".join(cells) + " | " +
                     ("**holds**" if g["holds"] else "does not hold: " + "; ".join(g["why"])) + " |")
    lines += ["", f"Goal: HD95 reduced by ≥ {-100 * GOAL_HD95:.0f} % and |Δ components| (interval below 0) at no "
              f"IoU loss (interval above {GOAL_IOU_LOWER}). Strip: {result.get('strip')}", ""]
    return "\n".join(lines)


def run_dataset(dataset: str, args: argparse.Namespace) -> dict[str, Any]:
    """The ablation on ``dataset``; writes priors_<dataset>[_quick].{json,md} and the strip."""
    name = f"priors_{dataset}" + ("_quick" if args.quick else "")
    strips: dict[str, list[np.ndarray]] = {}
    times = torch.linspace(0, 1, TIMES)
    first_seed = int(args.seeds.split(",")[0])

    def keep_strip(variant: str, seed: int, model: Any, shards: Path) -> None:
        if seed == first_seed:
            with torch.no_grad():
                first = SliceDataset(shards, "val")[0]
                strips[variant] = [t[0, 0].numpy() for t in model(first["image"][None], times=times)]
                strips.setdefault("_image", [first["image"][0].numpy(), first["phi"][0].numpy()])

    result = variants.run_variants(dataset, args, VARIANTS, "none", "priors", after_model=keep_strip)
    result["goal"] = {v: goal(result, v) for v in result["variants"][1:]}
    args.out.mkdir(parents=True, exist_ok=True)
    image, gt_phi = strips.pop("_image")
    result["strip"] = str(viz.plot_evolution_strip(image, strips, times.tolist(), args.out / f"{name}_strip.png",
                                                   gt_phi=gt_phi, title="φ̂(t) with and without priors"))
    text = markdown(result)
    print(text, flush=True)
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    (args.out / f"{name}.md").write_text(text)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    variants.add_arguments(p, list(VARIANTS), seeds="0,1,2")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    results = {d: run_dataset(d, args) for d in variants.finish_args(args, "priors")}
    if args.dataset == "all":
        summary = {"benchmark": "priors", "quick": args.quick, "machine": machine(pick_device(args.device)),
                   "datasets": results}
        (args.out / "priors.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
