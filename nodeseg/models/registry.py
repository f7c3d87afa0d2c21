"""One place that turns (kind, preset, overrides) into a module; the preset sizes are in
:mod:`nodeseg.models.presets`.

Presets are plain dicts of constructor arguments, never classes. Parameter counts (``count_parameters``,
in_channels=1) are asserted in ``tests/test_models.py``; for 'contour' the count is of the trainable part
(the frozen UNet comes from ``unet_preset``).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from torch import nn

from nodeseg.config import from_mapping
from nodeseg.errors import check_arg
from nodeseg.models.evolution import ContourEvolution, ImageEvolution, NodeStack
from nodeseg.models.presets import PRESETS
from nodeseg.models.unet import UNet
from nodeseg.solve import SolverConfig

_CLASSES: dict[str, type[nn.Module]] = {
    "unet": UNet, "contour": ContourEvolution, "image": ImageEvolution, "nodestack": NodeStack,
}
KINDS: tuple[str, ...] = tuple(_CLASSES)
_CONTOUR_EXTRA = ("unet_preset",)


def _valid_keys(kind: str) -> list[str]:
    params = inspect.signature(_CLASSES[kind].__init__).parameters
    keys = [k for k in params if k != "self"]
    return sorted(keys + list(_CONTOUR_EXTRA)) if kind == "contour" else sorted(keys)


def build_model(kind: str, preset: str | None = None, **overrides: Any) -> nn.Module:
    """Build ``kind`` ('unet', 'contour', 'image', 'nodestack') from ``preset`` sizes updated by ``overrides``.

    ``solver`` and ``inference_solver`` may be a ``SolverConfig`` or a mapping of its fields; lists become tuples. For 'contour',
    ``unet_preset`` (default 'unet-tiny') sizes the frozen UNet, or ``unet`` passes a built one (load the
    pretrained weights into ``model.unet`` afterwards).
    """
    check_arg(kind in _CLASSES, "kind", kind, f"one of {', '.join(KINDS)}")
    presets = PRESETS[kind]
    check_arg(preset is None or preset in presets, "preset", preset,
              f"one of {', '.join(presets)} for kind {kind!r}")
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
        unet_preset = sizes.pop("unet_preset", "unet-tiny")
        if sizes.get("unet") is None:
            sizes["unet"] = build_model("unet", unet_preset)
    return _CLASSES[kind](**sizes)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (``sum(p.numel())``), optionally only those with ``requires_grad``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
