"""UNet: regression of the signed distance map φ from an image, also used as the ODE function fθ.

Sizes live in ``nodeseg.models.presets.PRESETS['unet']`` (re-exported here as ``UNET_PRESETS``); the 3-D
presets (``unet3d-*``) are the same class with ``spatial_dims=3``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nodeseg.errors import check_arg
from nodeseg.models.blocks import (
    ConvNormAct,
    check_positive_int,
    check_spatial_dims,
    conv_transpose_type,
    conv_type,
    max_pool,
    zero_conv,
)
from nodeseg.models.presets import UNET_PRESETS as UNET_PRESETS  # re-exported

__all__ = ["UNET_PRESETS", "DoubleConv", "UNet"]


class DoubleConv(nn.Sequential):
    """Two 3×3 (3×3×3) ConvNormAct layers (GroupNorm: the convolutions are not grouped)."""

    def __init__(
        self, in_channels: int, out_channels: int, norm_groups: int, activation: str, spatial_dims: int = 2
    ) -> None:
        kw = dict(norm_groups=norm_groups, activation=activation, spatial_dims=spatial_dims)
        super().__init__(
            ConvNormAct(in_channels, out_channels, **kw),
            ConvNormAct(out_channels, out_channels, **kw),
        )


class UNet(nn.Module):
    """Encoder–decoder with skip connections: max-pool down, transposed-conv up, GroupNorm everywhere.

    Level ``i`` has ``min(base_channels * 2**i, max_channels)`` channels, ``i = 0..depth``. Inputs whose
    sides are not multiples of ``2**depth`` are padded (replicate) at the far end of each axis and the
    output is cropped back, so any ``H, W >= 1`` (``D, H, W`` in 3-D) works. ``zero_init_last`` zeroes the
    final 1×1 conv (used when the UNet is an ODE function fθ, so that the flow starts as the identity).
    ``spatial_dims`` 2 maps ``(B, C, H, W)``, 3 maps ``(B, C, D, H, W)`` with Conv3d, the same layers.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        base_channels: int = 32,
        depth: int = 4,
        norm_groups: int = 8,
        activation: str = "relu",
        max_channels: int | None = None,
        zero_init_last: bool = False,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        check_spatial_dims(spatial_dims)
        check_positive_int("in_channels", in_channels)
        check_positive_int("out_channels", out_channels)
        check_positive_int("base_channels", base_channels)
        check_positive_int("depth", depth)
        check_positive_int("norm_groups", norm_groups)
        if max_channels is not None:
            check_positive_int("max_channels", max_channels)
            check_arg(max_channels >= base_channels, "max_channels", max_channels,
                      f">= base_channels ({base_channels})")
        check_arg(base_channels % norm_groups == 0 and (max_channels or norm_groups) % norm_groups == 0,
                  "norm_groups", norm_groups, "a divisor of base_channels and max_channels")
        chans = [base_channels * 2**i for i in range(depth + 1)]
        if max_channels is not None:
            chans = [min(c, max_channels) for c in chans]
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.depth = depth
        self.channels = tuple(chans)
        self.spatial_dims = spatial_dims
        kw = dict(norm_groups=norm_groups, activation=activation, spatial_dims=spatial_dims)
        up = conv_transpose_type(spatial_dims)
        self.stem = DoubleConv(in_channels, chans[0], **kw)
        self.down = nn.ModuleList(DoubleConv(chans[i], chans[i + 1], **kw) for i in range(depth))
        self.up = nn.ModuleList(up(chans[i + 1], chans[i], 2, stride=2) for i in range(depth))
        self.dec = nn.ModuleList(DoubleConv(2 * chans[i], chans[i], **kw) for i in range(depth))
        self.head = (zero_conv(chans[0], out_channels, spatial_dims=spatial_dims) if zero_init_last
                     else conv_type(spatial_dims)(chans[0], out_channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        """``(B, in, H, W) → (B, out, H, W)`` (``(B, in, D, H, W) → (B, out, D, H, W)`` in 3-D)."""
        size = x.shape[-self.spatial_dims:]
        m = 2**self.depth
        pads = [(-s) % m for s in size]
        if any(pads):  # F.pad lists the last axis first: (0, pad_w, 0, pad_h[, 0, pad_d])
            x = F.pad(x, tuple(v for p in reversed(pads) for v in (0, p)), mode="replicate")
        pool = max_pool(self.spatial_dims)
        skips = []
        x = self.stem(x)
        for down in self.down:
            skips.append(x)
            x = down(pool(x, 2))
        for i in reversed(range(self.depth)):
            x = self.dec[i](torch.cat([self.up[i](x), skips[i]], dim=1))
        return self.head(x)[(..., *(slice(0, s) for s in size))]

