"""Building blocks: norms, conv-norm-activation, zero-initialised convs, squeeze-and-excitation, ASPP.

**The dimension seam.** Every block takes ``spatial_dims`` (2: ``(B, C, H, W)``, the default; 3:
``(B, C, D, H, W)``) and gets its layer types from the factories here, as MONAI's ``Conv[Conv.CONV,
spatial_dims]`` does: ``conv_type``, ``conv_transpose_type``, ``max_pool``, ``adaptive_avg_pool``,
``interpolate_mode``. 2-D builds the same layers in the same order as before the seam (same initial
weights at a seed, same state_dict keys: old checkpoints load).

Norm rule (never BatchNorm: the number of function evaluations differs between DDP ranks, so running
statistics would desynchronise): ``GroupNorm`` after ungrouped convolutions, a channel LayerNorm
(``GroupNorm`` with one group: mean and variance over C, H, W, per-channel affine) after grouped ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nodeseg.errors import check_arg

__all__ = [
    "ACTIVATIONS",
    "ASPP",
    "SPATIAL_DIMS",
    "ConvNormAct",
    "SqueezeExcite",
    "adaptive_avg_pool",
    "channels_last_format",
    "check_positive_int",
    "check_spatial_dims",
    "conv_transpose_type",
    "conv_type",
    "group_norm",
    "interpolate_mode",
    "layer_norm",
    "make_activation",
    "max_pool",
    "zero_conv",
]

Activation = Literal["relu", "silu"]
ACTIVATIONS: tuple[str, ...] = ("relu", "silu")
SpatialDims = Literal[2, 3]
SPATIAL_DIMS: tuple[int, ...] = (2, 3)

_CONV: dict[int, type[nn.Conv2d | nn.Conv3d]] = {2: nn.Conv2d, 3: nn.Conv3d}
_CONV_T: dict[int, type[nn.ConvTranspose2d | nn.ConvTranspose3d]] = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_MAX_POOL: dict[int, Callable[..., Tensor]] = {2: F.max_pool2d, 3: F.max_pool3d}
_AVG_POOL: dict[int, Callable[..., Tensor]] = {2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}
_INTERPOLATE: dict[int, str] = {2: "bilinear", 3: "trilinear"}
_CHANNELS_LAST: dict[int, torch.memory_format] = {2: torch.channels_last, 3: torch.channels_last_3d}


def check_spatial_dims(value: object) -> int:
    """``value`` if it is 2 or 3 (an ``int``, ``bool`` refused); ``ValueError`` naming ``spatial_dims`` otherwise."""
    check_arg(isinstance(value, int) and not isinstance(value, bool) and value in SPATIAL_DIMS,
              "spatial_dims", value, "2 (images) or 3 (volumes)")
    return int(value)  # type: ignore[arg-type]


def conv_type(spatial_dims: int) -> type[nn.Conv2d | nn.Conv3d]:
    """``nn.Conv2d`` or ``nn.Conv3d``."""
    return _CONV[check_spatial_dims(spatial_dims)]


def conv_transpose_type(spatial_dims: int) -> type[nn.ConvTranspose2d | nn.ConvTranspose3d]:
    """``nn.ConvTranspose2d`` or ``nn.ConvTranspose3d``."""
    return _CONV_T[check_spatial_dims(spatial_dims)]


def max_pool(spatial_dims: int) -> Callable[..., Tensor]:
    """``F.max_pool2d`` or ``F.max_pool3d``."""
    return _MAX_POOL[check_spatial_dims(spatial_dims)]


def adaptive_avg_pool(spatial_dims: int) -> Callable[..., Tensor]:
    """``F.adaptive_avg_pool2d`` or ``F.adaptive_avg_pool3d``."""
    return _AVG_POOL[check_spatial_dims(spatial_dims)]


def interpolate_mode(spatial_dims: int) -> str:
    """The linear ``F.interpolate`` mode: 'bilinear' or 'trilinear'."""
    return _INTERPOLATE[check_spatial_dims(spatial_dims)]


def channels_last_format(spatial_dims: int) -> torch.memory_format:
    """``torch.channels_last`` (4-D tensors) or ``torch.channels_last_3d`` (5-D)."""
    return _CHANNELS_LAST[check_spatial_dims(spatial_dims)]


def check_positive_int(name: str, value: object) -> None:
    """``check_arg`` for a strictly positive ``int`` (``bool`` refused)."""
    check_arg(isinstance(value, int) and not isinstance(value, bool) and value > 0, name, value, "an int > 0")


def make_activation(name: str) -> nn.Module:
    """``nn.ReLU`` or ``nn.SiLU`` by name."""
    check_arg(name in ACTIVATIONS, "activation", name, f"one of {', '.join(ACTIVATIONS)}")
    return nn.ReLU(inplace=False) if name == "relu" else nn.SiLU()


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    """GroupNorm with ``groups`` groups; ``channels`` must be a multiple of ``groups``."""
    check_positive_int("norm_groups", groups)
    check_arg(channels % groups == 0, "norm_groups", groups, f"a divisor of the channel count {channels}")
    return nn.GroupNorm(groups, channels)


def layer_norm(channels: int) -> nn.GroupNorm:
    """Channel LayerNorm for feature maps (the norm used after grouped convolutions)."""
    return nn.GroupNorm(1, channels)


def zero_conv(
    in_channels: int, out_channels: int, kernel_size: int = 1, groups: int = 1, spatial_dims: int = 2
) -> nn.Conv2d | nn.Conv3d:
    """A convolution whose weight and bias start at zero (the last layer of fθ and ψ)."""
    conv = conv_type(spatial_dims)(in_channels, out_channels, kernel_size, padding=kernel_size // 2, groups=groups)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class ConvNormAct(nn.Sequential):
    """Conv (no bias) → GroupNorm (ungrouped conv) or LayerNorm (grouped conv) → activation."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        *,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        norm_groups: int = 8,
        activation: str = "relu",
        spatial_dims: int = 2,
    ) -> None:
        check_positive_int("in_channels", in_channels)
        check_positive_int("out_channels", out_channels)
        check_positive_int("groups", groups)
        check_arg(
            in_channels % groups == 0 and out_channels % groups == 0,
            "groups", groups, f"a divisor of both {in_channels} and {out_channels} channels",
        )
        padding = dilation * (kernel_size // 2)
        conv = conv_type(spatial_dims)(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                                       dilation=dilation, groups=groups, bias=False)
        norm = group_norm(out_channels, norm_groups) if groups == 1 else layer_norm(out_channels)
        super().__init__(conv, norm, make_activation(activation))


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation: channel gates from global average pooling through a bottleneck MLP."""

    def __init__(self, channels: int, reduction: int = 16, spatial_dims: int = 2) -> None:
        super().__init__()
        check_positive_int("channels", channels)
        check_positive_int("se_reduction", reduction)
        hidden = max(1, channels // reduction)
        conv = conv_type(spatial_dims)
        self.fc1 = conv(channels, hidden, 1)
        self.fc2 = conv(hidden, channels, 1)
        self.spatial_dims = spatial_dims

    def forward(self, x: Tensor) -> Tensor:
        s = adaptive_avg_pool(self.spatial_dims)(x, 1)
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(s))))
        return x * s


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (DeepLabv3): 1×1, dilated 3×3 branches, image pooling, 1×1 projection.

    The image-pooling branch has no norm (GroupNorm over a 1×1 map is degenerate); the others use GroupNorm.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int = 256,
        rates: tuple[int, ...] = (6, 12, 18),
        *,
        norm_groups: int = 8,
        activation: str = "relu",
        spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        check_arg(len(rates) > 0 and all(isinstance(r, int) and r > 0 for r in rates),
                  "aspp_rates", rates, "a non-empty tuple of ints > 0")
        kw = dict(norm_groups=norm_groups, activation=activation, spatial_dims=spatial_dims)
        self.branches = nn.ModuleList([ConvNormAct(in_channels, out_channels, 1, **kw)])
        self.branches.extend(ConvNormAct(in_channels, out_channels, 3, dilation=r, **kw) for r in rates)
        self.pool = nn.Sequential(conv_type(spatial_dims)(in_channels, out_channels, 1), make_activation(activation))
        self.project = ConvNormAct((len(rates) + 2) * out_channels, out_channels, 1, **kw)
        self.spatial_dims = spatial_dims

    def forward(self, x: Tensor) -> Tensor:
        feats = [b(x) for b in self.branches]
        pooled = self.pool(adaptive_avg_pool(self.spatial_dims)(x, 1))
        feats.append(pooled.expand(-1, -1, *x.shape[2:]))
        return self.project(torch.cat(feats, dim=1))
