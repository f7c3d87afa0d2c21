"""One place that turns (kind, preset, overrides) into a module; every preset size lives here.

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
from nodeseg.models.unet import UNet
from nodeseg.solve import SolverConfig

_NODEUNET5M = dict(hidden_channels=32, func="unet", func_channels=32, func_depth=4, func_max_channels=256,
                   norm_groups=8)
_NODE_TINY = dict(hidden_channels=8, func="conv", func_channels=16, func_layers=3, norm_groups=4)
_NODEUNET_TINY = dict(hidden_channels=8, func="unet", func_channels=8, func_depth=2, norm_groups=4)

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "unet": {
        "unet-tiny": dict(base_channels=12, depth=2, norm_groups=4),  # 66,013
        "unet-small": dict(base_channels=16, depth=3, norm_groups=8),  # 482,449
        "unet5m": dict(base_channels=32, depth=4, norm_groups=8, max_channels=256),  # 5,140,001
        "unet15m": dict(base_channels=44, depth=4, norm_groups=4),  # 14,672,461
    },
    "contour": {
        "tiny": dict(_NODE_TINY, unet_preset="unet-tiny"),
        "nodeunet-tiny": dict(_NODEUNET_TINY, unet_preset="unet-tiny"),
        "nodeunet5m": dict(_NODEUNET5M, unet_preset="unet5m"),
    },
    "image": {
        "tiny": dict(_NODE_TINY),
        "nodeunet-tiny": dict(_NODEUNET_TINY),
        "nodeunet5m": dict(_NODEUNET5M),
    },
    "nodestack": {
        "nodestack-tiny": dict(stem_channels=16, stage_channels=(32, 64), stage_strides=(1, 2), width_ratio=1.0,
                               groups=8, se_reduction=8, aspp_channels=16, aspp_rates=(1, 2, 3), norm_groups=8),
        "nodestack41m": dict(stem_channels=64, stage_channels=(256, 512, 1024, 2048), stage_strides=(1, 2, 2, 1),
                             width_ratio=1.0, groups=32, se_reduction=16, aspp_channels=288,
                             aspp_rates=(6, 12, 18), norm_groups=32),
    },
}
UNET_PRESETS = PRESETS["unet"]

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
