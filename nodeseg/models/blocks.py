"""Building blocks: norms, conv-norm-activation, zero-initialised convs, squeeze-and-excitation, ASPP.

Norm rule (never BatchNorm: the number of function evaluations differs between DDP ranks, so running
statistics would desynchronise): ``GroupNorm`` after ungrouped convolutions, a channel LayerNorm
(``GroupNorm`` with one group: mean and variance over C, H, W, per-channel affine) after grouped ones.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nodeseg.errors import check_arg

Activation = Literal["relu", "silu"]
ACTIVATIONS: tuple[str, ...] = ("relu", "silu")


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


def zero_conv(in_channels: int, out_channels: int, kernel_size: int = 1, groups: int = 1) -> nn.Conv2d:
    """A convolution whose weight and bias start at zero (the last layer of fθ and ψ)."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, groups=groups)
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
    ) -> None:
        check_positive_int("in_channels", in_channels)
        check_positive_int("out_channels", out_channels)
        check_positive_int("groups", groups)
        check_arg(
            in_channels % groups == 0 and out_channels % groups == 0,
            "groups", groups, f"a divisor of both {in_channels} and {out_channels} channels",
        )
        padding = dilation * (kernel_size // 2)
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=groups, bias=False)
        norm = group_norm(out_channels, norm_groups) if groups == 1 else layer_norm(out_channels)
        super().__init__(conv, norm, make_activation(activation))


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation: channel gates from global average pooling through a bottleneck MLP."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        check_positive_int("channels", channels)
        check_positive_int("se_reduction", reduction)
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
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
    ) -> None:
        super().__init__()
        check_arg(len(rates) > 0 and all(isinstance(r, int) and r > 0 for r in rates),
                  "aspp_rates", rates, "a non-empty tuple of ints > 0")
        kw = dict(norm_groups=norm_groups, activation=activation)
        self.branches = nn.ModuleList([ConvNormAct(in_channels, out_channels, 1, **kw)])
        self.branches.extend(ConvNormAct(in_channels, out_channels, 3, dilation=r, **kw) for r in rates)
        self.pool = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1), make_activation(activation))
        self.project = ConvNormAct((len(rates) + 2) * out_channels, out_channels, 1, **kw)

    def forward(self, x: Tensor) -> Tensor:
        feats = [b(x) for b in self.branches]
        pooled = self.pool(F.adaptive_avg_pool2d(x, 1))
        feats.append(pooled.expand(-1, -1, x.shape[-2], x.shape[-1]))
        return self.project(torch.cat(feats, dim=1))
