"""`nodeseg select`: the paper's checkpoint selection (lowest validation loss on the first 8 samples)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from nodeseg.errors import InputError, check_arg
from nodeseg.train import checkpoint as ckpt
from nodeseg.train.loop import small_val_warning

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SelectConfig:
    """How the checkpoint is chosen."""

    samples: int = 8  # the mean loss on the first N validation samples decides (the paper: 8)
    metric: Literal["first_n", "val_loss"] = "first_n"  # first_n: the paper's rule; val_loss: the whole split

    def __post_init__(self) -> None:
        check_arg(self.samples >= 1, "samples", self.samples, ">= 1")
        check_arg(self.metric in ("first_n", "val_loss"), "metric", self.metric, "'first_n' or 'val_loss'")


def choose(records: list[dict[str, Any]], key: str) -> tuple[dict[str, Any], str]:
    """The record with the lowest ``key`` (the earliest on ties) and a sentence saying why."""
    usable = [r for r in records if key in r]
    if not usable:
        raise ValueError(f"no checkpoint records the metric {key!r}")
    best = min(usable, key=lambda r: (r[key], r["epoch"]))
    last = usable[-1]
    trend = ""
    if last["epoch"] != best["epoch"]:
        trend = (f"; it rose to {last[key]:.6g} by epoch {last['epoch']}, so later checkpoints are past the onset "
                 "of overfitting on these samples")
    reason = (f"epoch {best['epoch']} has the lowest {key} ({best[key]:.6g}) of {len(usable)} checkpoints"
              f"{trend}")
    return best, reason


def _val_samples(payload: dict[str, Any]) -> int | None:
    """How many samples the run's validation split had (None when the checkpoint does not say)."""
    if "val_samples" in payload:
        return int(payload["val_samples"])
    head, trained = len(payload.get("val_head", [])), payload.get("train_config", {}).get("select_samples")
    return head if trained is not None and head < int(trained) else None  # a short head: the split was smaller


def select_checkpoint(run_dir: Path, out_dir: Path, cfg: SelectConfig, *, warn: bool = True) -> dict[str, Any]:
    """Read every checkpoint of a training run, keep the best one as ``out_dir/model.pt``, explain the choice.

    The output checkpoint carries the model spec, the weights and the metrics of its epoch (no optimiser
    state); ``out_dir/selection.json`` records the candidates, the choice and the reason. A validation split
    smaller than ``cfg.samples`` is used whole: ``selection.json`` records the count and a warning, which is
    also logged unless ``warn`` is false (a training stage has logged it already).
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    found = ckpt.list_checkpoints(run_dir / "checkpoints")
    if not found:
        raise InputError(run_dir / "checkpoints", "no epoch-NNNN.pt checkpoints found: run `nodeseg pretrain` first")
    records, paths, fingerprints = [], {}, set()
    samples, notes = cfg.samples, []
    for epoch, path in found:  # one checkpoint in memory at a time: large models have large optimiser states
        payload = ckpt.load(path)
        head = payload.get("val_head", [])
        n_val = _val_samples(payload)
        if n_val is not None and n_val < samples:
            samples = n_val
            notes = [small_val_warning(n_val, cfg.samples, "select.samples")]
        if len(head) < samples:
            raise InputError(path, f"records validation losses of {len(head)} samples, but select.samples is "
                                   f"{cfg.samples}: raise the training section's select_samples")
        paths[epoch] = path
        fingerprints.add(payload["fingerprint"])
        records.append({"epoch": epoch, "checkpoint": path.name, "val_loss": payload["metrics"]["val_loss"],
                        f"val_loss_first{samples}": sum(head[:samples]) / samples})
        del payload
    if len(fingerprints) > 1:
        raise InputError(run_dir / "checkpoints", f"checkpoints from {len(fingerprints)} different runs are mixed")
    first_key = f"val_loss_first{samples}"
    key = first_key if cfg.metric == "first_n" else "val_loss"
    best, reason = choose(records, key)
    path = paths[best["epoch"]]
    payload = ckpt.load(path)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt.save(
        out_dir / "model.pt",
        {
            "stage": "select",
            "source_stage": payload["stage"],
            "fingerprint": payload["fingerprint"],
            "model_spec": payload["model_spec"],
            "data_id": payload["data_id"],
            "seed": payload["seed"],
            "epoch": payload["epoch"],
            "model": payload["model"],
            "metrics": payload["metrics"],
        },
    )
    summary = {
        "chosen": path.name,
        "epoch": best["epoch"],
        "metric": key,
        "value": best[key],
        "reason": reason,
        "samples": samples,
        "warnings": notes,
        "candidates": records,
    }
    ckpt.atomic_write_bytes(out_dir / "selection.json", json.dumps(summary, indent=2).encode())
    if warn:
        for note in notes:
            log.warning("%s", note)
    log.info("selected %s: %s", path.name, reason)
    return summary
