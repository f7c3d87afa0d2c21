"""Every model preset size: plain dicts of constructor arguments, per kind (no classes, no imports of models).

:mod:`nodeseg.models.registry` builds a module from (kind, preset, overrides); :mod:`nodeseg.models.unet`
re-exports ``UNET_PRESETS``. Both import this module, which imports neither: the presets are the cut that
keeps the imports one way. Parameter counts are the comments, asserted in ``tests/test_models.py``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PRESETS", "UNET_PRESETS"]

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
