"""`nodeseg evaluate`: the paper's Table 1 (IoU, adaptive and weighted F-beta, NFE), boundary metrics, figures.

Besides the set metrics, every validation image is scored one by one (its TP/FP/FN and the boundary metrics
of :mod:`nodeseg.boundary`) into ``per_slice.csv``, so that intervals can be bootstrapped over patients
(``benchmarks/accuracy.py`` does).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from nodeseg import viz
from nodeseg.boundary import BOUNDARY_KEYS, boundary_scores, summarise_boundary
from nodeseg.config import flatten
from nodeseg.data.shards import SliceDataset
from nodeseg.levelset import saliency_from_phi
from nodeseg.metrics import SetMetrics
from nodeseg.models.spec import load_model
from nodeseg.params import EvaluateConfig, Params
from nodeseg.tracking import Tracker
from nodeseg.train.checkpoint import atomic_write_bytes

log = logging.getLogger(__name__)

MODEL_NAMES = {"unet": "UNet", "contour": "Contour Evolution", "image": "Image Evolution"}
_METRICS = ("iou", "adaptive_fbeta", "weighted_fbeta")
#: the columns of ``per_slice.csv``
SLICE_COLUMNS = ("model", "case_id", "slice_index", "tp", "fp", "fn", *BOUNDARY_KEYS)


def _valid_box(valid: np.ndarray) -> tuple[slice, slice]:
    rows, cols = np.flatnonzero(valid.any(axis=1)), np.flatnonzero(valid.any(axis=0))
    return slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1)


def slice_scores(saliency: np.ndarray, gt: np.ndarray, valid: np.ndarray, spacing: np.ndarray) -> dict[str, float]:
    """One image's TP/FP/FN at saliency > 0.5 and its boundary metrics, on its valid rectangle (H, W arrays)."""
    box = _valid_box(valid)
    pred, fg = saliency[box] > 0.5, gt[box]
    tp = int(np.count_nonzero(pred & fg))
    return {"tp": tp, "fp": int(np.count_nonzero(pred)) - tp, "fn": int(np.count_nonzero(fg)) - tp,
            **boundary_scores(pred, fg, tuple(float(s) for s in spacing))}


@torch.no_grad()
def score(model: nn.Module, dataset: SliceDataset, cfg: EvaluateConfig,
          per_slice: list[dict[str, Any]] | None = None) -> dict[str, float]:
    """The set and boundary metrics of ``model`` on ``dataset``, its mean NFE per batch and its throughput.

    With ``per_slice``, each image's scores (:func:`slice_scores`, with ``case_id`` and ``slice_index``)
    are appended to it.
    """
    model.eval()
    metrics = SetMetrics(beta2=cfg.beta2, weighted_beta2=cfg.weighted_beta2, empty_gt=cfg.empty_gt)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=False)
    nfe, batches, seconds = 0, 0, 0.0
    rows: list[dict[str, Any]] = []
    for batch in loader:
        t0 = time.perf_counter()
        phi = model(batch["image"])
        seconds += time.perf_counter() - t0
        sal = saliency_from_phi(phi, cfg.saliency_width).numpy()
        gt, valid = batch["mask"].numpy() > 0.5, batch["valid"].numpy() > 0.5
        metrics.update_batch(sal, gt, valid)
        for i in range(sal.shape[0]):
            rows.append({"case_id": batch["case_id"][i], "slice_index": int(batch["slice_index"][i]),
                         **slice_scores(sal[i, 0], gt[i, 0], valid[i, 0], batch["spacing"][i].numpy())})
        nfe += int(getattr(model, "nfe_forward", 0))
        batches += 1
    out = {k: float(v) for k, v in metrics.compute().items()}
    out.update(summarise_boundary(rows))
    out["mean_nfe"] = nfe / max(batches, 1)
    out["slices_per_second"] = len(dataset) / seconds if seconds > 0 else float("nan")
    if per_slice is not None:
        per_slice.extend(rows)
    return out


def _fmt(value: float, digits: int = 4) -> str:
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


def table_markdown(results: dict[str, dict[str, float]]) -> str:
    """Results as a Markdown table in the layout of the paper's Table 1, then the boundary metrics.

    An adaptive Fβ of exactly 0 is flagged: where the object covers most of the image the adaptive
    threshold 2·mean(saliency) is capped at 1 and no pixel reaches it (the standard definition, kept).
    """
    lines = ["| model | IoU | Dice | HD95 (mm) | ASD (mm) | surface Dice 1 px | surface Dice 2 px | "
             "\\|Δ components\\| | adaptive Fβ | weighted Fβ | mean NFE |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    capped = False
    for key, r in results.items():
        afb = _fmt(r["adaptive_fbeta"])
        if r["adaptive_fbeta"] == 0.0:
            afb, capped = "0 †", True
        lines.append(f"| {MODEL_NAMES.get(key, key)} | {r['iou']:.4f} | {_fmt(r['dice'])} | {_fmt(r['hd95_mm'], 2)} | "
                     f"{_fmt(r['asd_mm'], 2)} | {_fmt(r['nsd_1px'])} | {_fmt(r['nsd_2px'])} | "
                     f"{_fmt(r['components_error'], 2)} | {afb} | {r['weighted_fbeta']:.4f} | {r['mean_nfe']:.1f} |")
    text = "\n".join(lines) + "\n"
    text += ("\nDice, HD95, ASD, surface Dice: means over images (MONAI; HD95/ASD of an image whose prediction is "
             "empty count as the image diagonal); |Δ components|: mean |connected components of the prediction − "
             "of the ground truth|.\n")
    if capped:
        text += ("\n† adaptive Fβ is 0: the adaptive threshold 2·mean(saliency) is capped at 1 where the object "
                 "covers most of the image, and no pixel reaches it (the standard definition, kept).\n")
    return text


def per_slice_csv(rows: list[dict[str, Any]]) -> str:
    """``rows`` (each with the :data:`SLICE_COLUMNS`) as CSV text."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=SLICE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _figures(models: dict[str, nn.Module], dataset: SliceDataset, cfg: EvaluateConfig, out: Path) -> list[Path]:
    """Fig. 1 (contours at intermediate ODE times) and Fig. 3 (true vs predicted contours) as PNG files."""
    n = min(cfg.figure_samples, len(dataset))
    if n == 0:
        return []
    # evenly spread samples, so the figure does not show n neighbouring slices of one case
    idx = np.linspace(0, len(dataset) - 1, n).round().astype(int).tolist()
    items = [dataset[i] for i in idx]
    image = torch.stack([it["image"] for it in items])
    shown = [it["image"][0].numpy() for it in items]
    gts = [it["phi"][0].numpy() for it in items]
    titles = [f"{it['case_id']} / {it['slice_index']}" for it in items]
    paths = []
    with torch.no_grad():
        preds = {name: [p[0].numpy() for p in m(image)] for name, m in models.items()}
        paths.append(viz.plot_predictions(shown, gts, preds, out / "fig3_predictions.png", titles))
        for name in ("contour", "image"):
            if name not in models:
                continue
            times = torch.linspace(0, 1, cfg.figure_times)
            traj = models[name](image[:1], times=times)  # (T, 1, 1, H, W)
            paths.append(viz.plot_evolution(
                shown[0], [t[0, 0].numpy() for t in traj], times.tolist(), out / f"fig1_{name}_evolution.png",
                gt_phi=gts[0], title=f"{MODEL_NAMES[name]}: zero level set over t ({titles[0]})",
            ))
    return paths


def evaluate(shards: Path, checkpoints: dict[str, Path], out: Path, params: Params) -> dict[str, Any]:
    """Score every model on the validation split; write metrics.json, table.md and the figures into ``out``.

    ``checkpoints`` maps 'unet', 'contour', 'image' to checkpoint files (any subset). With
    ``params.evaluate.register`` the models are registered in MLflow and the champion alias is decided.
    """
    cfg = params.evaluate
    out = Path(out)
    # every input is checked before anything is written: a wrong checkpoint or shards folder leaves no output
    loaded = {name: load_model(Path(path), expect=(name,))[0] for name, path in checkpoints.items()}
    dataset = SliceDataset(shards, "val")
    out.mkdir(parents=True, exist_ok=True)
    models: dict[str, nn.Module] = {}
    results: dict[str, dict[str, float]] = {}
    per_slice: list[dict[str, Any]] = []
    with Tracker("evaluate") as tracker:
        tracker.log_params({"n_val": len(dataset), **flatten(cfg, "evaluate.")})
        for name, model in loaded.items():
            models[name] = model
            rows: list[dict[str, Any]] = []
            results[name] = score(model, dataset, cfg, per_slice=rows)
            per_slice.extend({"model": name, **r} for r in rows)
            tracker.log_metrics({f"{name}/{k}": v for k, v in results[name].items()})
            log.info("%s: %s", name, {k: round(v, 4) for k, v in results[name].items()})
        summary = {
            "models": {name: str(path) for name, path in checkpoints.items()},
            "n_val": len(dataset),
            **results,
        }
        atomic_write_bytes(out / "metrics.json", json.dumps(summary, indent=2).encode())
        atomic_write_bytes(out / "table.md", table_markdown(results).encode())
        atomic_write_bytes(out / "per_slice.csv", per_slice_csv(per_slice).encode())
        for p in [out / "metrics.json", out / "table.md", out / "per_slice.csv", *_figures(models, dataset, cfg, out)]:
            tracker.log_artifact(p)
        if cfg.register:
            from nodeseg.stages.register import register

            summary["registry"] = register(out, params, run_id=tracker.run_id)
        else:
            summary["registry"] = {"promoted": False, "reason": "evaluate.register is false: nothing registered"}
            atomic_write_bytes(out / "registry.json", json.dumps(summary["registry"], indent=2).encode())
    return summary
