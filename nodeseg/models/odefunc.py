"""ODE functions fθ(t, state): conv stack, UNet, grouped-conv+SE block; time conditioning; zero-init output.

Every fθ here is **time-conditioned**: ``t`` enters as one constant extra input channel (as in torchdiffeq's
``ConcatConv2d`` examples), which costs one input channel of the first convolution. Every fθ has its last
layer zero-initialised, so at initialisation dstate/dt ≡ 0 and the flow is the identity.

The functions work on one tensor ``(B, C, H, W)`` (``(B, C, D, H, W)`` with ``spatial_dims=3``: the same
layers from the factories of ``nodeseg.models.blocks``); ``TupleStateFunc`` adapts one to a tuple state such as
(φ, h): it concatenates the parts along channels, evaluates, and splits the derivative back. The state stays
a tuple for the solver so that the error norm binds on φ on its own (see ``nodeseg.solve``).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from nodeseg.errors import check_arg
from nodeseg.models.blocks import (
    ConvNormAct,
    SqueezeExcite,
    check_positive_int,
    check_spatial_dims,
    conv_type,
    group_norm,
    make_activation,
    zero_conv,
)
from nodeseg.models.unet import UNet
from nodeseg.solve import is_channels_last

__all__ = [
    "FUNC_KINDS",
    "ConvODEFunc",
    "StackODEFunc",
    "TupleStateFunc",
    "UNetODEFunc",
    "append_time",
    "build_odefunc",
]

FuncKind = Literal["conv", "unet"]
FUNC_KINDS: tuple[str, ...] = ("conv", "unet")


def append_time(x: Tensor | tuple[Tensor, ...], t: Tensor | float) -> Tensor:
    """Concatenate a constant channel holding ``t`` to ``x`` ``(B, C, *S) → (B, C+1, *S)``, S = (H, W) or
    (D, H, W).

    ``x`` may be a tuple of ``(B, Cᵢ, *S)`` parts (a tuple state): they and the time channel are
    concatenated in one copy. Channels-last parts give a channels-last result.
    """
    parts = list(x) if isinstance(x, tuple) else [x]
    ref = parts[0]
    n = ref.dim()
    t = torch.as_tensor(t, dtype=ref.dtype, device=ref.device).reshape((1,) * n)
    if is_channels_last(tuple(parts)):
        # torch.cat would return NCHW (the expanded time channel has no layout), which the channels-last
        # convolution after it converts back: concatenate the (B, *S, C) memory instead (same values)
        to_rows, from_rows = (0, *range(2, n), 1), (0, n - 1, *range(1, n - 1))
        rows = [p.permute(*to_rows) for p in parts] + [t.expand(ref.shape[0], *ref.shape[2:], 1)]
        return torch.cat(rows, dim=n - 1).permute(*from_rows)
    return torch.cat([*parts, t.expand(ref.shape[0], 1, *ref.shape[2:])], dim=1)


class ConvODEFunc(nn.Module):
    """fθ as a plain conv stack: [t] → (conv3×3-GN-act) × (layers−1) → zero-init conv3×3 back to C."""

    def __init__(
        self, channels: int, hidden_channels: int = 32, layers: int = 3, norm_groups: int = 8,
        activation: str = "silu", spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        check_spatial_dims(spatial_dims)
        check_positive_int("channels", channels)
        check_positive_int("func_channels", hidden_channels)
        check_arg(isinstance(layers, int) and layers >= 2, "func_layers", layers, "an int >= 2")
        kw = dict(norm_groups=norm_groups, activation=activation, spatial_dims=spatial_dims)
        body = [ConvNormAct(channels + 1, hidden_channels, **kw)]
        body += [ConvNormAct(hidden_channels, hidden_channels, **kw) for _ in range(layers - 2)]
        self.body = nn.Sequential(*body)
        self.out = zero_conv(hidden_channels, channels, 3, spatial_dims=spatial_dims)

    def forward(self, t: Tensor, x: Tensor | tuple[Tensor, ...]) -> Tensor:
        return self.out(self.body(append_time(x, t)))


class UNetODEFunc(nn.Module):
    """fθ as a UNet over the state (plus the time channel), last 1×1 conv zero-initialised."""

    def __init__(
        self, channels: int, base_channels: int = 32, depth: int = 2, norm_groups: int = 8,
        activation: str = "silu", max_channels: int | None = None, spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        check_positive_int("channels", channels)
        self.unet = UNet(channels + 1, channels, base_channels, depth, norm_groups, activation,
                         max_channels=max_channels, zero_init_last=True, spatial_dims=spatial_dims)

    def forward(self, t: Tensor, x: Tensor | tuple[Tensor, ...]) -> Tensor:
        return self.unet(append_time(x, t))


class StackODEFunc(nn.Module):
    """fθ of a NodeStack block (ResNeXt/SE style), channels C, inner width W:

    [t] → 1×1 conv C+1→W, GroupNorm, act → grouped 3×3 W→W, LayerNorm, act → grouped 3×3 W→W, LayerNorm,
    act → squeeze-and-excitation → zero-init 1×1 conv W→C.
    """

    def __init__(
        self, channels: int, width: int, groups: int = 32, se_reduction: int = 16, norm_groups: int = 32,
        activation: str = "silu", spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        check_spatial_dims(spatial_dims)
        check_positive_int("channels", channels)
        check_positive_int("width", width)
        check_positive_int("groups", groups)
        check_arg(width % groups == 0, "groups", groups, f"a divisor of the block width {width}")
        self.inp = nn.Sequential(conv_type(spatial_dims)(channels + 1, width, 1, bias=False),
                                 group_norm(width, norm_groups), make_activation(activation))
        kw = dict(groups=groups, activation=activation, spatial_dims=spatial_dims)
        self.body = nn.Sequential(
            ConvNormAct(width, width, 3, **kw),
            ConvNormAct(width, width, 3, **kw),
            SqueezeExcite(width, se_reduction, spatial_dims),
        )
        self.out = zero_conv(width, channels, 1, spatial_dims=spatial_dims)

    def forward(self, t: Tensor, x: Tensor | tuple[Tensor, ...]) -> Tensor:
        return self.out(self.body(self.inp(append_time(x, t))))


class TupleStateFunc(nn.Module):
    """Adapt a tensor fθ to a tuple state: ``(t, (a, b, ...)) → (da, db, ...)`` via channel concat/split."""

    def __init__(self, func: nn.Module, split: tuple[int, ...]) -> None:
        super().__init__()
        check_arg(len(split) > 0 and all(isinstance(c, int) and c > 0 for c in split),
                  "split", split, "a non-empty tuple of ints > 0")
        self.func = func
        self.split = tuple(split)

    def forward(self, t: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        # the fθ here take the tuple as it is (one concatenation with the time channel); others get a tensor
        x = tuple(state) if isinstance(self.func, _TUPLE_AWARE) else torch.cat(state, dim=1)
        return torch.split(self.func(t, x), self.split, dim=1)


_TUPLE_AWARE = (ConvODEFunc, UNetODEFunc, StackODEFunc)  # their forward starts with append_time(x, t)


def build_odefunc(
    kind: str, channels: int, *, func_channels: int, func_layers: int, func_depth: int, norm_groups: int,
    func_max_channels: int | None = None, activation: str = "silu", spatial_dims: int = 2,
) -> nn.Module:
    """The tensor fθ named by ``kind`` ('conv' uses ``func_layers``; 'unet' ``func_depth``, ``func_max_channels``)."""
    check_arg(kind in FUNC_KINDS, "func", kind, f"one of {', '.join(FUNC_KINDS)}")
    if kind == "conv":
        return ConvODEFunc(channels, func_channels, func_layers, norm_groups, activation, spatial_dims)
    return UNetODEFunc(channels, func_channels, func_depth, norm_groups, activation, func_max_channels,
                       spatial_dims)
