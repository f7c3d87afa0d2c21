"""`nodeseg refine`: Contour Evolution on top of the selected, frozen UNet."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from nodeseg.data.shards import SliceDataset
from nodeseg.errors import InputError
from nodeseg.models.spec import build_from_spec, load_model, make_spec
from nodeseg.params import ModelSection, Params
from nodeseg.priors import PriorsConfig, ShapePrior, fit_shape_prior
from nodeseg.stages._training import run_training
from nodeseg.train.loop import FitResult


def shape_prior_from_shards(shards: Path, cfg: PriorsConfig) -> ShapePrior:
    """The shape space of the training split's signed distances (as stored, unaugmented): PCA of at most
    ``cfg.shape_samples`` evenly spaced slices, ``cfg.shape_modes`` modes (``nodeseg.priors``)."""
    train = SliceDataset(shards, "train")
    if len(train) == 0:
        raise InputError(shards, "the train split is empty: no masks to fit the shape prior on")
    n = min(len(train), cfg.shape_samples)
    picks = sorted({(i * len(train)) // n for i in range(n)})
    phis = torch.stack([train[i]["phi"][0] for i in picks])
    return fit_shape_prior(phis, cfg.shape_modes)


def contour_builder(unet_checkpoint: Path, section: ModelSection,  # noqa: ANN201 - a closure, typed below
                    shards: Path | None = None):
    """Load the selected UNet once; return ``build(channels, section=section) -> (model, spec)``.

    ``build`` makes Contour Evolution of ``section`` on a frozen copy of the UNet's weights. It checks that the
    UNet takes the shards' channel count; ``nodeseg tune`` calls it with each trial's solver. With a shape prior
    on (``contour.priors.shape`` > 0) it is fitted on ``shards``' training split once, and put into each model
    (a buffer: saved in every checkpoint).
    """
    fitted: dict[str, ShapePrior] = {}
    unet, payload = load_model(Path(unet_checkpoint), expect=("unet",))
    unet_spec = {k: v for k, v in payload["model_spec"].items() if k != "preprocessing"}

    def build(channels: int, section: ModelSection = section) -> tuple[nn.Module, dict[str, Any]]:
        takes = unet_spec["sizes"].get("in_channels", 1)
        if takes != channels:
            raise InputError(unet_checkpoint, f"the UNet takes {takes} image channels, the shards hold {channels}")
        spec = make_spec("contour", section, unet=unet_spec)
        model = build_from_spec(spec)
        model.unet.load_state_dict(unet.state_dict())
        priors = getattr(section, "priors", None)
        if priors is not None and priors.shape > 0:
            if shards is None:
                raise ValueError("contour.priors.shape > 0 needs the shards to fit the shape prior on")
            if "prior" not in fitted:
                fitted["prior"] = shape_prior_from_shards(Path(shards), priors)
            prior = fitted["prior"]
            model.shape_prior.set(prior.mean, prior.modes, float(prior.scale))
        return model, spec

    return build


def refine(shards: Path, unet_checkpoint: Path, out: Path, params: Params) -> FitResult:
    """Train ``params.contour`` (φ̂ = φ(1) + ψ(γ(1)) from the UNet's φ) with ``params.refine``.

    The UNet's weights come from ``unet_checkpoint`` (the output of ``nodeseg select``) and stay frozen.
    """
    build = contour_builder(Path(unet_checkpoint), params.contour, Path(shards))
    return run_training("refine", Path(shards), Path(out), params, params.refine, build,
                        tags={"nodeseg.unet_checkpoint": str(unet_checkpoint)})
