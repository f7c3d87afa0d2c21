"""UNet: regression of the signed distance map φ from an image, also used as the ODE function fθ.

Sizes live in ``nodeseg.models.presets.PRESETS['unet']`` (re-exported here as ``UNET_PRESETS``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nodeseg.errors import check_arg
from nodeseg.models.blocks import ConvNormAct, check_positive_int, zero_conv
from nodeseg.models.presets import UNET_PRESETS as UNET_PRESETS  # re-exported


class DoubleConv(nn.Sequential):
    """Two 3×3 ConvNormAct layers (GroupNorm: the convolutions are not grouped)."""

    def __init__(self, in_channels: int, out_channels: int, norm_groups: int, activation: str) -> None:
        super().__init__(
            ConvNormAct(in_channels, out_channels, norm_groups=norm_groups, activation=activation),
            ConvNormAct(out_channels, out_channels, norm_groups=norm_groups, activation=activation),
        )


class UNet(nn.Module):
    """Encoder–decoder with skip connections: max-pool down, transposed-conv up, GroupNorm everywhere.

    Level ``i`` has ``min(base_channels * 2**i, max_channels)`` channels, ``i = 0..depth``. Inputs whose
    height or width is not a multiple of ``2**depth`` are padded (replicate) at the bottom/right and the
    output is cropped back, so any ``H, W >= 1`` works. ``zero_init_last`` zeroes the final 1×1 conv
    (used when the UNet is an ODE function fθ, so that the flow starts as the identity).
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
    ) -> None:
        super().__init__()
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
        kw = dict(norm_groups=norm_groups, activation=activation)
        self.stem = DoubleConv(in_channels, chans[0], **kw)
        self.down = nn.ModuleList(DoubleConv(chans[i], chans[i + 1], **kw) for i in range(depth))
        self.up = nn.ModuleList(nn.ConvTranspose2d(chans[i + 1], chans[i], 2, stride=2) for i in range(depth))
        self.dec = nn.ModuleList(DoubleConv(2 * chans[i], chans[i], **kw) for i in range(depth))
        self.head = zero_conv(chans[0], out_channels) if zero_init_last else nn.Conv2d(chans[0], out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, in, H, W) → (B, out, H, W)``."""
        h, w = x.shape[-2:]
        m = 2**self.depth
        pad_h, pad_w = (-h) % m, (-w) % m
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        skips = []
        x = self.stem(x)
        for down in self.down:
            skips.append(x)
            x = down(F.max_pool2d(x, 2))
        for i in reversed(range(self.depth)):
            x = self.dec[i](torch.cat([self.up[i](x), skips[i]], dim=1))
        return self.head(x)[..., :h, :w]

