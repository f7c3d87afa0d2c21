"""`nodeseg register`: put evaluated models in the MLflow registry and decide the `champion` alias."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from nodeseg.errors import InputError
from nodeseg.models.spec import input_shape
from nodeseg.params import Params
from nodeseg.tracking import Tracker, configure
from nodeseg.train import checkpoint as ckpt
from nodeseg.train.checkpoint import atomic_write_bytes

log = logging.getLogger(__name__)

CHAMPION = "champion"


def decide(results: dict[str, dict[str, float]], metric: str, min_improvement: float) -> tuple[bool, str]:
    """Whether the refined model (Contour Evolution) takes the champion alias, and why."""
    if "contour" not in results or "unet" not in results:
        return False, "both the UNet and the refined model must be evaluated to compare them"
    refined, base = results["contour"][metric], results["unet"][metric]
    if refined > base + min_improvement:
        return True, f"refined {metric} {refined:.4f} beats the UNet's {base:.4f} by more than {min_improvement}"
    return False, f"refined {metric} {refined:.4f} does not beat the UNet's {base:.4f} by more than {min_improvement}"


def register(eval_dir: Path, params: Params, run_id: str | None = None) -> dict[str, Any]:
    """Register every model listed in ``eval_dir/metrics.json``; move `champion` to the refined one if it wins.

    Writes ``eval_dir/registry.json`` (versions, decision, reason). Runs inside the given MLflow run, or in a
    new `register` run.
    """
    from mlflow import MlflowClient

    cfg = params.evaluate
    eval_dir = Path(eval_dir)
    path = eval_dir / "metrics.json"
    try:
        summary = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError) as err:
        raise InputError(path, f"not a metrics file of `nodeseg evaluate` ({type(err).__name__})") from None
    results = {k: summary[k] for k in summary.get("models", {}) if k in summary}
    promote, reason = decide(results, cfg.champion_metric, cfg.min_improvement)
    configure()
    client = MlflowClient()
    versions: dict[str, str] = {}
    from nodeseg.serving import log_pyfunc

    def _log_all() -> None:
        for name, ckpt_path in summary["models"].items():
            channels, size = input_shape(ckpt.load(Path(ckpt_path))["model_spec"])
            info = log_pyfunc(Path(ckpt_path), name=f"{name}-model", registered_model_name=cfg.model_name,
                              channels=channels, size=size)
            version = str(info.registered_model_version)
            versions[name] = version
            client.set_model_version_tag(cfg.model_name, version, "nodeseg.kind", name)
            for metric, value in results[name].items():
                client.set_model_version_tag(cfg.model_name, version, f"metric.{metric}", f"{value:.6g}")

    if run_id is not None:
        _log_all()
    else:
        with Tracker("register"):
            _log_all()
    if promote:
        client.set_registered_model_alias(cfg.model_name, CHAMPION, versions["contour"])
    if "contour" in versions:
        client.set_model_version_tag(cfg.model_name, versions["contour"], "nodeseg.champion_decision", reason)
    decision = {"model_name": cfg.model_name, "versions": versions, "promoted": promote, "reason": reason,
                "champion_metric": cfg.champion_metric}
    atomic_write_bytes(eval_dir / "registry.json", json.dumps(decision, indent=2).encode())
    log.info("registry: %s", reason)
    return decision
