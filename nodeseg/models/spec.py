"""Model specs: the plain-data description stored in every checkpoint, and rebuilding a model from one.

A spec's ``spatial_dims`` is its preset's (2 unless a ``*3d*`` preset) or ``sizes['spatial_dims']``; a 2-D
spec, and so every checkpoint written before 3-D models existed, holds no such key and rebuilds as it was.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from nodeseg.config import to_mapping
from nodeseg.data.readers import READERS
from nodeseg.errors import InputError
from nodeseg.models.presets import PRESETS, preset_spatial_dims
from nodeseg.models.registry import KINDS, build_model
from nodeseg.solve import SolverConfig
from nodeseg.train import checkpoint as ckpt


def make_spec(kind: str, section: Any, in_channels: int = 1, unet: dict[str, Any] | None = None) -> dict[str, Any]:
    """A spec from a params model section (preset, sizes, solver, inference solver) and the data's channel
    count. ``inference_solver`` is recorded only when set: the model rebuilt from the spec (evaluate,
    predict, serving) solves with it in eval mode."""
    spec: dict[str, Any] = {"kind": kind, "preset": section.preset, "sizes": dict(section.sizes)}
    if kind in ("unet", "image", "nodestack"):
        spec["sizes"].setdefault("in_channels", in_channels)
    if kind != "unet":
        spec["solver"] = solver_mapping(section.solver)
        if section.inference_solver is not None:  # absent when none: the specs of earlier runs are unchanged
            spec["inference_solver"] = solver_mapping(section.inference_solver)
    if kind == "contour":
        if unet is None:
            raise ValueError("argument 'unet' must be the spec of the pretrained UNet for kind 'contour'")
        spec["unet"] = unet
        priors = getattr(section, "priors", None)
        if priors is not None and priors.enabled:  # all off: the spec (and the resume fingerprint) as before
            spec["priors"] = to_mapping(priors)
    return spec


def solver_mapping(solver: SolverConfig) -> dict[str, Any]:
    """A solver's fields for a spec; ``steps`` (added later) only when set, so that a spec, and the resume
    fingerprint made from it, stay what they were for the solvers earlier runs could have."""
    data = to_mapping(solver)
    if data.get("steps") is None:
        data.pop("steps", None)
    return data


def input_shape(spec: dict[str, Any]) -> tuple[int, int]:
    """(channels, side) of the images a model of ``spec`` was trained on (its preprocessing)."""
    sizes = spec["unet"]["sizes"] if spec["kind"] == "contour" else spec.get("sizes", {})
    prep = spec.get("preprocessing", {})
    reader = READERS.get(prep.get("source") or "kits19", READERS["kits19"])()
    return int(sizes.get("in_channels", 1)), reader.input_side(prep)


def spec_spatial_dims(spec: dict[str, Any]) -> int:
    """2 or 3: the dims of the images the model of ``spec`` takes (``(B, C, H, W)`` or ``(B, C, D, H, W)``)."""
    sizes = spec.get("sizes", {})
    if "spatial_dims" in sizes:
        return int(sizes["spatial_dims"])
    preset = spec.get("preset")
    if preset is not None and preset in PRESETS.get(spec.get("kind", ""), {}):
        return preset_spatial_dims(spec["kind"], preset)
    return 2


def build_from_spec(spec: dict[str, Any]) -> nn.Module:
    """Build the (untrained) module a spec describes."""
    kind = spec["kind"]
    if kind not in KINDS:
        raise ValueError(f"model spec kind must be one of {', '.join(KINDS)}, got {kind!r}")
    kwargs = dict(spec.get("sizes", {}))
    for key in ("solver", "inference_solver"):
        if key in spec:
            kwargs[key] = spec[key]
    if kind == "contour":
        kwargs["unet"] = build_from_spec(spec["unet"])
        if "priors" in spec:
            kwargs["priors"] = spec["priors"]
    return build_model(kind, spec.get("preset"), **kwargs)


def load_model(path: Path, expect: tuple[str, ...] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild and load the model of a checkpoint; a checkpoint of another kind gives a one-line ``InputError``."""
    payload = ckpt.load(path)
    spec = payload.get("model_spec")
    if not isinstance(spec, dict) or "kind" not in spec:
        raise InputError(path, "checkpoint has no model spec")
    if expect is not None and spec["kind"] not in expect:
        raise InputError(path, f"checkpoint holds a {spec['kind']!r} model, expected {' or '.join(map(repr, expect))}")
    try:
        model = build_from_spec(spec)
        model.load_state_dict(payload["model"])
    except (RuntimeError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0][:160]
        raise InputError(path, f"weights do not fit the model spec ({first})") from None
    model.eval()
    return model, payload
