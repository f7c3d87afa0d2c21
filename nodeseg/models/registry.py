"""One place that turns (kind, preset, overrides) into a module; the preset sizes are in
:mod:`nodeseg.models.presets`.

Presets are plain dicts of constructor arguments, never classes. Parameter counts (``count_parameters``,
in_channels=1) are asserted in ``tests/test_models.py``; for 'contour' the count is of the trainable part
(the frozen UNet comes from ``unet_preset``).

``spatial_dims`` (2 or 3) comes from the preset (2 unless it says 3); asking for other dims than a preset's
(``build_model('unet', 'unet-tiny', spatial_dims=3)``) is refused with one line naming the preset and the
presets that fit.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from torch import nn

from nodeseg.config import from_mapping
from nodeseg.errors import ConfigError, check_arg
from nodeseg.models.blocks import check_spatial_dims
from nodeseg.models.evolution import ContourEvolution, ImageEvolution, NodeStack
from nodeseg.models.presets import PRESETS, preset_spatial_dims, presets_for
from nodeseg.models.unet import UNet
from nodeseg.solve import SolverConfig

__all__ = ["KINDS", "build_model", "check_preset_dims", "count_parameters"]

_CLASSES: dict[str, type[nn.Module]] = {
    "unet": UNet, "contour": ContourEvolution, "image": ImageEvolution, "nodestack": NodeStack,
}
KINDS: tuple[str, ...] = tuple(_CLASSES)
_CONTOUR_EXTRA = ("unet_preset",)


def _valid_keys(kind: str) -> list[str]:
    params = inspect.signature(_CLASSES[kind].__init__).parameters
    keys = [k for k in params if k != "self"]
    return sorted(keys + list(_CONTOUR_EXTRA)) if kind == "contour" else sorted(keys)


def check_preset_dims(kind: str, preset: str, spatial_dims: int, name: str = "preset") -> None:
    """``ConfigError`` (one line: the preset, its dims and the presets that fit) unless ``preset`` of ``kind``
    builds ``spatial_dims``-D models."""
    have = preset_spatial_dims(kind, preset)
    if have != spatial_dims:
        names = presets_for(kind, spatial_dims)
        fits = f"one of {', '.join(names)}" if names else "there is none yet: give sizes without a preset"
        raise ConfigError(f"argument {name!r} must be a {spatial_dims}-D {kind} preset for spatial_dims="
                          f"{spatial_dims} ({fits}), got {preset!r}, a {have}-D preset")


def build_model(kind: str, preset: str | None = None, **overrides: Any) -> nn.Module:
    """Build ``kind`` ('unet', 'contour', 'image', 'nodestack') from ``preset`` sizes updated by ``overrides``.

    ``solver`` and ``inference_solver`` may be a ``SolverConfig`` or a mapping of its fields; lists become tuples. For 'contour',
    ``unet_preset`` (default 'unet-tiny', 'unet3d-tiny' in 3-D) sizes the frozen UNet, or ``unet`` passes a built
    one (load the pretrained weights into ``model.unet`` afterwards). ``spatial_dims`` among the overrides must
    be the preset's (:func:`check_preset_dims`).
    """
    check_arg(kind in _CLASSES, "kind", kind, f"one of {', '.join(KINDS)}")
    presets = PRESETS[kind]
    check_arg(preset is None or preset in presets, "preset", preset,
              f"one of {', '.join(presets)} for kind {kind!r}")
    if "spatial_dims" in overrides:
        check_spatial_dims(overrides["spatial_dims"])
        if preset is not None:
            check_preset_dims(kind, preset, overrides["spatial_dims"])
    sizes = dict(presets[preset]) if preset is not None else {}
    sizes.update(overrides)
    valid = _valid_keys(kind)
    unknown = sorted(set(sizes) - set(valid))
    check_arg(not unknown, "overrides", unknown[0] if unknown else None,
              f"a {kind} size (valid: {', '.join(valid)})")
    sizes = {k: tuple(v) if isinstance(v, list) else v for k, v in sizes.items()}
    for key in ("solver", "inference_solver"):
        if isinstance(sizes.get(key), Mapping):
            sizes[key] = from_mapping(SolverConfig, sizes[key], where=key)
    if kind == "contour":
        dims = sizes.get("spatial_dims", 2)
        unet_preset = sizes.pop("unet_preset", "unet-tiny" if dims == 2 else "unet3d-tiny")
        if sizes.get("unet") is None:
            check_arg(unet_preset in PRESETS["unet"], "unet_preset", unet_preset,
                      f"one of {', '.join(PRESETS['unet'])}")
            check_preset_dims("unet", unet_preset, dims, "unet_preset")
            sizes["unet"] = build_model("unet", unet_preset)
    return _CLASSES[kind](**sizes)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (``sum(p.numel())``), optionally only those with ``requires_grad``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
