"""`nodeseg evaluate`: the paper's Table 1 (IoU, adaptive and weighted F-beta, NFE) and its figures."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from nodeseg import viz
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


@torch.no_grad()
def score(model: nn.Module, dataset: SliceDataset, cfg: EvaluateConfig) -> dict[str, float]:
    """The set metrics of ``model`` on ``dataset``, its mean NFE per batch and its throughput."""
    model.eval()
    metrics = SetMetrics(beta2=cfg.beta2, weighted_beta2=cfg.weighted_beta2, empty_gt=cfg.empty_gt)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=False)
    nfe, batches, seconds = 0, 0, 0.0
    for batch in loader:
        t0 = time.perf_counter()
        phi = model(batch["image"])
        seconds += time.perf_counter() - t0
        sal = saliency_from_phi(phi, cfg.saliency_width).numpy()
        metrics.update_batch(sal, batch["mask"].numpy() > 0.5, batch["valid"].numpy() > 0.5)
        nfe += int(getattr(model, "nfe_forward", 0))
        batches += 1
    out = {k: float(v) for k, v in metrics.compute().items()}
    out["mean_nfe"] = nfe / max(batches, 1)
    out["slices_per_second"] = len(dataset) / seconds if seconds > 0 else float("nan")
    return out


def table_markdown(results: dict[str, dict[str, float]]) -> str:
    """Results as a Markdown table in the layout of the paper's Table 1."""
    lines = ["| model | IoU | adaptive Fβ | weighted Fβ | mean NFE |", "|---|---|---|---|---|"]
    for key, r in results.items():
        lines.append(f"| {MODEL_NAMES.get(key, key)} | {r['iou']:.4f} | {r['adaptive_fbeta']:.4f} | "
                     f"{r['weighted_fbeta']:.4f} | {r['mean_nfe']:.1f} |")
    return "\n".join(lines) + "\n"


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
    with Tracker("evaluate") as tracker:
        tracker.log_params({"n_val": len(dataset), **flatten(cfg, "evaluate.")})
        for name, model in loaded.items():
            models[name] = model
            results[name] = score(model, dataset, cfg)
            tracker.log_metrics({f"{name}/{k}": v for k, v in results[name].items()})
            log.info("%s: %s", name, {k: round(v, 4) for k, v in results[name].items()})
        summary = {
            "models": {name: str(path) for name, path in checkpoints.items()},
            "n_val": len(dataset),
            **results,
        }
        atomic_write_bytes(out / "metrics.json", json.dumps(summary, indent=2).encode())
        atomic_write_bytes(out / "table.md", table_markdown(results).encode())
        for p in [out / "metrics.json", out / "table.md", *_figures(models, dataset, cfg, out)]:
            tracker.log_artifact(p)
        if cfg.register:
            from nodeseg.stages.register import register

            summary["registry"] = register(out, params, run_id=tracker.run_id)
        else:
            summary["registry"] = {"promoted": False, "reason": "evaluate.register is false: nothing registered"}
            atomic_write_bytes(out / "registry.json", json.dumps(summary["registry"], indent=2).encode())
    return summary
