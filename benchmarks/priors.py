"""Ablation of the priors on Contour Evolution's ODE (issue 19 item 4): each prior on and off, same seeds.

For every variant (``none`` = all off, then one prior each) and seed: ``nodeseg refine`` on the given shards and
UNet with ``contour.priors`` overridden, then per validation slice IoU, Dice, HD95 (pixels), boundary F
(tolerance 2 px), the connected-component count error |#pred − #true| and NFE; each variant's paired differences
against ``none`` on the same slices (mean ± 1.96·sd/√n, a normal interval) and the Fig.-1-style strip
(``viz.plot_evolution_strip``) of the first validation slice, with and without each prior.

    python -m benchmarks.priors --shards data/shards --unet outputs/select/model.pt --work /tmp/priors
    python -m benchmarks.priors --quick        # tiny phantoms, UNet and refine built here (a smoke run)

``--set`` passes further params overrides to every variant (e.g. ``refine.epochs=6``). The weights of each
variant are at the top (``VARIANTS``): a starting point, not a tuned choice.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from benchmarks import common
from nodeseg import viz
from nodeseg.data.shards import SliceDataset
from nodeseg.models.spec import load_model
from nodeseg.params import Params, load_params
from nodeseg.stages.refine import refine

REPO = Path(__file__).resolve().parents[1]

VARIANTS: dict[str, tuple[str, ...]] = {
    "none": (),
    "curvature": ("contour.priors.curvature=0.2",),
    "length": ("contour.priors.length=0.05",),
    "reinit": ("contour.priors.reinit=0.05",),
    "area": ("contour.priors.area=10.0",),
    "shape": ("contour.priors.shape=0.05",),
}
QUICK = ["phantom.n_cases=4", "phantom.n_slices=12", "phantom.shape=[48, 48]", "phantom.spacing=[8.0, 8.0, 8.0]",
         "data.workers=1", "ingest.size=32", "ingest.val_fraction=0.25", "pretrain.epochs=1",
         "pretrain.batch_size=4", "pretrain.warmup_steps=2", "refine.epochs=1", "refine.batch_size=4",
         "refine.max_batches_per_epoch=2", "evaluate.register=false", "contour.priors.times=2"]


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def slice_metrics(pred: np.ndarray, true: np.ndarray, tol: float = 2.0) -> dict[str, float]:
    """IoU, Dice, HD95 (pixels; 0 when both are empty, the diagonal when one is), boundary F at ``tol`` px,
    component-count error of two boolean masks."""
    inter, union = float((pred & true).sum()), float((pred | true).sum())
    out = {"iou": inter / union if union else 1.0,
           "dice": 2 * inter / (pred.sum() + true.sum()) if union else 1.0,
           "components": float(abs(ndimage.label(pred)[1] - ndimage.label(true)[1]))}
    sp, st = _surface(pred), _surface(true)
    if not sp.any() and not st.any():
        out["hd95"], out["boundary_f"] = 0.0, 1.0
    elif not sp.any() or not st.any():
        out["hd95"], out["boundary_f"] = float(math.hypot(*pred.shape)), 0.0
    else:
        to_true = ndimage.distance_transform_edt(~st)[sp]
        to_pred = ndimage.distance_transform_edt(~sp)[st]
        out["hd95"] = float(np.percentile(np.concatenate([to_true, to_pred]), 95))
        precision, recall = float((to_true <= tol).mean()), float((to_pred <= tol).mean())
        out["boundary_f"] = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return out


@torch.no_grad()
def score(model_path: Path, shards: Path, batch_size: int = 8) -> tuple[list[dict[str, float]], torch.nn.Module]:
    """Per validation slice metrics (and NFE of its batch) of the refined model at ``model_path``."""
    model, _ = load_model(model_path, expect=("contour",))
    val = SliceDataset(shards, "val")
    rows: list[dict[str, float]] = []
    for start in range(0, len(val), batch_size):
        items = [val[i] for i in range(start, min(start + batch_size, len(val)))]
        image = torch.stack([it["image"] for it in items])
        pred = model(image)
        nfe = float(model.nfe_forward)
        for it, p in zip(items, pred, strict=True):
            row = slice_metrics(p[0].numpy() < 0, it["phi"][0].numpy() < 0)
            rows.append({**row, "nfe": nfe})
    return rows, model


def paired(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Mean of b − a and its 95 % normal interval."""
    d = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    half = 1.96 * float(d.std(ddof=1)) / math.sqrt(len(d)) if len(d) > 1 else float("nan")
    return {"mean": float(d.mean()), "low": float(d.mean()) - half, "high": float(d.mean()) + half}


def _tiny_inputs(work: Path, params: Params) -> tuple[Path, Path]:
    from nodeseg.stages.generate import generate
    from nodeseg.stages.preprocess import preprocess
    from nodeseg.stages.pretrain import pretrain
    from nodeseg.stages.select import select_checkpoint

    generate(work / "raw", params)
    preprocess(work / "raw", work / "shards", params)
    pretrain(work / "shards", work / "pretrain", params)
    select_checkpoint(work / "pretrain", work / "select", params.select)
    return work / "shards", work / "select" / "model.pt"


def run(shards: Path | None, unet: Path | None, work: Path, quick: bool, seeds: Sequence[int],
        overrides: Sequence[str], variants: Sequence[str]) -> dict[str, Any]:
    base = [*(QUICK if quick else []), *overrides]
    if shards is None or unet is None:
        if not quick:
            raise SystemExit("benchmarks.priors: --shards and --unet are required without --quick")
        shards, unet = _tiny_inputs(work, load_params([REPO / "params.yaml"], base))
    per: dict[tuple[str, int], list[dict[str, float]]] = {}
    strips: dict[str, list[np.ndarray]] = {}
    times = torch.linspace(0, 1, 5)
    first = SliceDataset(shards, "val")[0]
    for seed in seeds:
        for name in variants:
            params = load_params([REPO / "params.yaml"], [*base, *VARIANTS[name], f"seed={seed}",
                                                          "device=cpu" if quick else "device=auto"])
            out = work / f"{name}-seed{seed}"
            refine(shards, unet, out, params)
            per[(name, seed)], model = score(out / "model.pt", shards)
            if seed == seeds[0]:
                with torch.no_grad():
                    strips[name] = [t[0, 0].numpy() for t in model(first["image"][None], times=times)]
    rows = []
    keys = ("iou", "dice", "hd95", "boundary_f", "components", "nfe")
    for name in variants:
        mine = [r for s in seeds for r in per[(name, s)]]
        ref = [r for s in seeds for r in per[("none", s)]] if "none" in variants else mine
        row: dict[str, Any] = {"variant": name, "slices": len(mine)}
        for k in keys:
            row[k] = float(np.mean([r[k] for r in mine]))
            if name != "none" and "none" in variants:
                row[f"d_{k}"] = paired([r[k] for r in ref], [r[k] for r in mine])
        rows.append(row)
    strip = viz.plot_evolution_strip(first["image"][0].numpy(), strips, times.tolist(), work / "fig1_priors_strip.png",
                                     gt_phi=first["phi"][0].numpy(), title="φ̂(t) with and without priors")
    return {"rows": rows, "seeds": list(seeds), "strip": str(strip), "overrides": list(base)}


def main(argv: Sequence[str] | None = None) -> int:
    p = common.parser(__doc__)
    p.add_argument("--shards", type=Path, help="the shards (nodeseg preprocess)")
    p.add_argument("--unet", type=Path, help="the selected UNet (outputs/select/model.pt)")
    p.add_argument("--work", type=Path, help="keep the refine runs here (default: a temporary folder)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (quick: 0)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--set", dest="overrides", action="append", default=[], help="a params override key=value")
    args = p.parse_args(argv)
    device = common.setup(args)
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        result = run(args.shards, args.unet, work, args.quick, seeds, args.overrides, args.variants)
        columns = ["variant", "slices", "iou", "dice", "hd95", "boundary_f", "components", "nfe"]
        print(common.table([{k: r[k] for k in columns} for r in result["rows"]], columns))
        for r in result["rows"]:
            if "d_hd95" in r:
                print(f"{r['variant']}: ΔIoU {r['d_iou']['mean']:+.4f} [{r['d_iou']['low']:+.4f}, "
                      f"{r['d_iou']['high']:+.4f}], ΔHD95 {r['d_hd95']['mean']:+.2f} [{r['d_hd95']['low']:+.2f}, "
                      f"{r['d_hd95']['high']:+.2f}] px, Δcomponents {r['d_components']['mean']:+.3f}")
        if args.work is None:
            result["strip"] = None  # the temporary folder goes
        path = common.write_result(args.out, "priors", result, device, args)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
