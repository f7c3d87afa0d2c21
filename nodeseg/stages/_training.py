"""What the training stages share: datasets, seeding, the MLflow run, the final checkpoint."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nodeseg.config import flatten
from nodeseg.data.shards import SliceDataset, read_manifest
from nodeseg.errors import ConfigError, InputError
from nodeseg.params import Params
from nodeseg.stages.select import SelectConfig, select_checkpoint
from nodeseg.tracking import Tracker
from nodeseg.train import checkpoint as ckpt
from nodeseg.train import ddp
from nodeseg.train.loop import FitResult, TrainConfig, fit

log = logging.getLogger(__name__)


def data_info(shards: Path) -> tuple[str, dict[str, Any]]:
    """(an id of the shards, the preprocessing a model needs at inference) from the shards' manifest."""
    try:
        manifest = read_manifest(shards)
    except FileNotFoundError:
        raise InputError(shards, "no manifest.json: not a shards folder (run `nodeseg preprocess`)") from None
    keep = ("size", "hu_window", "normalisation", "zscore_stats", "foreground_labels", "clip", "saliency_crop")
    params = manifest.get("params", {})
    preprocessing = {k: params[k] for k in keep if k in params}
    preprocessing["source"] = manifest.get("source")
    # where the raw data lay does not change what the shards hold: leave it out of the id
    return ckpt.fingerprint({k: v for k, v in manifest.items() if k != "root"}), preprocessing


def datasets(shards: Path, cfg: TrainConfig, seed: int) -> tuple[SliceDataset, SliceDataset]:
    """The training split (augmented when enabled) and the validation split, in their stored order.

    Shards without rows in train or in val (built with ``ingest.single_split``, or by an older preprocess
    that let a one-case folder through) are refused here, before a model is built.
    """
    rows = {name: int(info.get("rows", 0)) for name, info in read_manifest(shards)["splits"].items()}
    for name in ("train", "val"):
        if not rows.get(name):
            counts = ", ".join(f"{k} {v}" for k, v in rows.items()) or "none"
            raise InputError(shards, f"the {name} split is empty (rows: {counts}): training needs train and val "
                                     "rows to fit and to select a checkpoint; rebuild the shards from at least 2 "
                                     "cases with ingest.val_fraction > 0 and ingest.single_split: null")
    augment = cfg.augment if cfg.augment.enabled else None
    train = SliceDataset(shards, "train", augment=augment, seed=seed)
    val = SliceDataset(shards, "val")
    return train, val


def check_head(stage: str, recorded: int, selected: int, n_val: int) -> None:
    """Refuse, before training, a run whose checkpoints would record fewer per-sample validation losses
    (``<stage>.select_samples`` = ``recorded``) than ``select.samples`` (``selected``) will read on a split of
    ``n_val`` samples: select would fail only after the training."""
    need = min(selected, n_val)
    if recorded < need:
        raise ConfigError(f"{stage}.select_samples: {recorded} is below select.samples ({selected}) on a val split "
                          f"of {n_val} samples, so `nodeseg select` would fail after training; set "
                          f"{stage}.select_samples to at least {need}, or lower select.samples")


def image_channels(dataset: SliceDataset) -> int:
    """Channels of the stored images (1 for CT, 3 for RGB saliency images)."""
    return int(dataset[0]["image"].shape[0])


def run_training(
    stage: str,
    shards: Path,
    out: Path,
    params: Params,
    cfg: TrainConfig,
    build: Callable[[int], tuple[nn.Module, dict[str, Any]]],
    *,
    export_best: bool = True,
    select_samples: int | None = None,
    tags: dict[str, str] | None = None,
) -> FitResult:
    """Train the model ``build(in_channels)`` returns (with its spec), optionally export its best checkpoint.

    ``out/checkpoints`` holds a checkpoint per epoch (resumed when the stage restarts). With ``export_best``,
    ``out/model.pt`` is the checkpoint with the lowest validation loss and ``out/selection.json`` says why
    (the UNet is instead chosen by the separate ``select`` stage, with the paper's first-8 rule).
    """
    info = ddp.setup(params.device)
    try:
        data_id, preprocessing = data_info(shards)
        train_set, val_set = datasets(shards, cfg, params.seed)
        if select_samples is not None:
            check_head(stage, cfg.select_samples, select_samples, len(val_set))
        torch.manual_seed(params.seed)  # the same initial weights on every rank and every rerun
        model, spec = build(image_channels(train_set))
        spec = {**spec, "preprocessing": preprocessing}
        with Tracker(stage, enabled=info.is_main, tags=tags) as tracker:
            tracker.log_params({"seed": params.seed, "world_size": info.world_size,
                                **flatten(cfg, f"{stage}."), **flatten(spec, "model.")})
            result = fit(model, train_set, val_set, cfg, out, seed=params.seed, model_spec=spec, data_id=data_id,
                         info=info, tracker=tracker, stage=stage)
            if info.is_main:
                if export_best:
                    choice = select_checkpoint(out, out, SelectConfig(samples=cfg.select_samples, metric="val_loss"),
                                               warn=False)  # fit has warned of a small split
                    tracker.set_tags({"nodeseg.selected_epoch": choice["epoch"],
                                      "nodeseg.selection": choice["reason"]})
                for name in ("train_log.csv", "val_log.csv", "selection.json"):
                    tracker.log_artifact(out / name)
        ddp.barrier(info)
        return result
    finally:
        ddp.teardown()
