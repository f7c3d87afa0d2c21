"""Every model preset size: plain dicts of constructor arguments, per kind (no classes, no imports of models).

:mod:`nodeseg.models.registry` builds a module from (kind, preset, overrides); :mod:`nodeseg.models.unet`
re-exports ``UNET_PRESETS``. Both import this module, which imports neither: the presets are the cut that
keeps the imports one way. Parameter counts are the comments, asserted in ``tests/test_models.py`` (2-D) and
``tests/test_dims.py`` (3-D).

A preset is 2-D unless its dict holds ``spatial_dims=3`` (the ``*3d*`` presets: volumes ``(B, C, D, H, W)``).
The ``-tiny`` 3-D presets fit a 2-core CI runner at 32³–48³; the ``*3d5m`` ones are for a GPU at 96³–128³
(docs/architecture.md, "3-D models", has the measured memory and time).
"""

from __future__ import annotations

from typing import Any

__all__ = ["PRESETS", "UNET_PRESETS", "preset_spatial_dims", "presets_for"]

_NODEUNET5M = dict(hidden_channels=32, func="unet", func_channels=32, func_depth=4, func_max_channels=256,
                   norm_groups=8)
_NODE_TINY = dict(hidden_channels=8, func="conv", func_channels=16, func_layers=3, norm_groups=4)
_NODEUNET_TINY = dict(hidden_channels=8, func="unet", func_channels=8, func_depth=2, norm_groups=4)
_3D = dict(spatial_dims=3)
_NODEUNET3D5M = dict(hidden_channels=16, func="unet", func_channels=16, func_depth=4, func_max_channels=256,
                     norm_groups=8, spatial_dims=3)

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "unet": {
        "unet-tiny": dict(base_channels=12, depth=2, norm_groups=4),  # 66,013
        "unet-small": dict(base_channels=16, depth=3, norm_groups=8),  # 482,449
        "unet5m": dict(base_channels=32, depth=4, norm_groups=8, max_channels=256),  # 5,140,001
        "unet15m": dict(base_channels=44, depth=4, norm_groups=4),  # 14,672,461
        "unet3d-tiny": dict(base_channels=8, depth=2, norm_groups=4, spatial_dims=3),  # 85,177
        "unet3d-small": dict(base_channels=16, depth=3, norm_groups=8, spatial_dims=3),  # 1,401,265
        "unet3d5m": dict(base_channels=16, depth=4, norm_groups=8, max_channels=256, spatial_dims=3),  # 5,646,385
    },
    "contour": {
        "tiny": dict(_NODE_TINY, unet_preset="unet-tiny"),
        "nodeunet-tiny": dict(_NODEUNET_TINY, unet_preset="unet-tiny"),
        "nodeunet5m": dict(_NODEUNET5M, unet_preset="unet5m"),
        # trainable parameters (the frozen UNet of unet_preset not counted)
        "tiny3d": dict(_NODE_TINY, **_3D, unet_preset="unet3d-tiny"),  # 19,138
        "nodeunet3d-tiny": dict(_NODEUNET_TINY, **_3D, unet_preset="unet3d-tiny"),  # 91,138
        "nodeunet3d5m": dict(_NODEUNET3D5M, unet_preset="unet3d5m"),  # 5,668,802
    },
    "image": {
        "tiny": dict(_NODE_TINY),
        "nodeunet-tiny": dict(_NODEUNET_TINY),
        "nodeunet5m": dict(_NODEUNET5M),
        "tiny3d": dict(_NODE_TINY, **_3D),  # 18,057
        "nodeunet3d-tiny": dict(_NODEUNET_TINY, **_3D),  # 90,697
        "nodeunet3d5m": dict(_NODEUNET3D5M),  # 5,667,921
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


def preset_spatial_dims(kind: str, preset: str) -> int:
    """2 or 3: the ``spatial_dims`` a preset builds (2 unless its dict says otherwise)."""
    return int(PRESETS[kind][preset].get("spatial_dims", 2))


def presets_for(kind: str, spatial_dims: int) -> tuple[str, ...]:
    """The presets of ``kind`` that build ``spatial_dims``-D models, in table order."""
    return tuple(p for p in PRESETS[kind] if preset_spatial_dims(kind, p) == spatial_dims)
