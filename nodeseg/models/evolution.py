"""The Neural-ODE segmentation models: ``ContourEvolution``, ``ImageEvolution``, ``NodeStack``.

All three expose ``solvers`` (their ``ODESolver`` modules) and ``nfe_forward`` / ``nfe_backward`` summed over
them, so training can log NFE per step. Each takes ``solver`` (training, and inference unless overridden) and
``inference_solver`` (used in eval mode: validation, evaluate, predict; e.g. train with dopri5, infer with
rk4 in 2 steps). Each takes ``spatial_dims`` (2: images ``(B, C, H, W)``; 3: volumes ``(B, C, D, H, W)``,
the same modules built from Conv3d by the factories of ``nodeseg.models.blocks``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nodeseg.errors import check_arg
from nodeseg.models.blocks import (
    ASPP,
    ConvNormAct,
    check_positive_int,
    check_spatial_dims,
    conv_type,
    interpolate_mode,
    zero_conv,
)
from nodeseg.models.odefunc import FuncKind, StackODEFunc, TupleStateFunc, build_odefunc
from nodeseg.models.unet import UNet
from nodeseg.priors import CurvatureFlow, PriorsConfig, ShapePrior, cfl_limit, priors_config, state_penalties
from nodeseg.solve import ODESolver, SolverConfig, nfe_stats, ode_solvers

__all__ = ["ContourEvolution", "ImageEvolution", "NodeStack"]


class _NFEMixin:
    """NFE counters summed over every ``ODESolver`` of the model."""

    @property
    def solvers(self) -> list[ODESolver]:
        return ode_solvers(self)  # type: ignore[arg-type]

    @property
    def nfe_forward(self) -> int:
        return nfe_stats(self)["nfe_forward"]  # type: ignore[arg-type]

    @property
    def nfe_backward(self) -> int:
        return nfe_stats(self)["nfe_backward"]  # type: ignore[arg-type]

    def reset_nfe(self) -> None:
        for s in self.solvers:
            s.reset_nfe()


def _check_times(times: Tensor) -> None:
    check_arg(isinstance(times, Tensor) and times.ndim == 1 and times.numel() >= 2 and float(times[0]) == 0.0,
              "times", times, "a 1-D tensor of increasing times starting at 0")


def _encoder(in_channels: int, hidden_channels: int, norm_groups: int, spatial_dims: int = 2) -> nn.Sequential:
    """λ: two 3×3 ConvNormAct layers at full resolution, image → embedding h(0)."""
    kw = dict(norm_groups=norm_groups, spatial_dims=spatial_dims)
    return nn.Sequential(
        ConvNormAct(in_channels, hidden_channels, **kw),
        ConvNormAct(hidden_channels, hidden_channels, **kw),
    )


def _head(in_channels: int, hidden_channels: int, norm_groups: int, zero_init: bool,
          spatial_dims: int = 2) -> nn.Sequential:
    """ψ: 3×3 ConvNormAct then a 1×1 conv to one channel (zero-initialised when ``zero_init``)."""
    last = (zero_conv(hidden_channels, 1, spatial_dims=spatial_dims) if zero_init
            else conv_type(spatial_dims)(hidden_channels, 1, 1))
    return nn.Sequential(ConvNormAct(in_channels, hidden_channels, norm_groups=norm_groups,
                                     spatial_dims=spatial_dims), last)


class ContourEvolution(_NFEMixin, nn.Module):
    """Evolve the contour of a frozen, pretrained UNet: γ = (φ, h), dγ/dt = fθ(γ, t), φ̂ = φ(1) + ψ(γ(1)).

    φ(0) = unet(image) (the UNet has ``requires_grad=False`` and stays in eval mode), h(0) = λ(image).
    The state is passed to the solver as the tuple (φ, h) so that atol binds on φ. fθ's and ψ's last
    layers are zero-initialised: at initialisation the output equals φ(0) exactly.

    ``priors`` (``nodeseg.priors``; all off by default, and then nothing of them is built): curvature motion
    adds ε·κ|∇φ| to dφ/dt inside the solve; with a penalty weight above 0, a training forward solves at
    t_k = k·t1/K and leaves the penalties on φ(t_k) in ``prior_penalties`` for the loop
    (``nodeseg.priors.loss_terms``); ``shape_prior`` holds the fitted shape space (a buffer: saved with the
    weights). The priors are 2-D: with ``spatial_dims=3`` they must stay off. ``spatial_dims`` must be the
    UNet's.
    """

    def __init__(
        self,
        unet: UNet,
        hidden_channels: int = 16,
        func: FuncKind = "conv",
        func_channels: int = 32,
        func_layers: int = 3,
        func_depth: int = 2,
        func_max_channels: int | None = None,
        norm_groups: int = 8,
        solver: SolverConfig | None = None,
        inference_solver: SolverConfig | None = None,
        priors: PriorsConfig | Mapping[str, Any] | None = None,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        check_spatial_dims(spatial_dims)
        self.priors = priors_config(priors)
        check_arg(isinstance(unet, UNet), "unet", type(unet).__name__, "a nodeseg UNet")
        check_arg(unet.spatial_dims == spatial_dims, "unet", f"a {unet.spatial_dims}-D UNet",
                  f"a {spatial_dims}-D UNet (spatial_dims={spatial_dims})")
        check_arg(spatial_dims == 2 or not self.priors.enabled, "priors", "enabled",
                  "all off with spatial_dims=3 (curvature and the penalties are 2-D)")
        check_positive_int("hidden_channels", hidden_channels)
        self.spatial_dims = spatial_dims
        self.unet = unet.requires_grad_(False).eval()
        check_arg(unet.out_channels == 1, "unet", f"a UNet with out_channels={unet.out_channels}",
                  "a UNet with out_channels=1 (it predicts φ)")
        self.encoder = _encoder(unet.in_channels, hidden_channels, norm_groups, spatial_dims)
        inner = build_odefunc(func, 1 + hidden_channels, func_channels=func_channels, func_layers=func_layers,
                              func_depth=func_depth, func_max_channels=func_max_channels,
                              norm_groups=norm_groups, spatial_dims=spatial_dims)
        func: nn.Module = TupleStateFunc(inner, (1, hidden_channels))
        pri = self.priors
        if pri.curvature_on:
            cfg = solver if solver is not None else SolverConfig()
            cap = cfl_limit(cfg.fixed_step, cfg.step_size, cfg.first_step, cfg.t1)
            func = CurvatureFlow(func, pri.curvature, learn=pri.learn_curvature, cap=cap, floor=pri.grad_floor)
        self.solver = ODESolver(func, solver, inference_solver)
        self.head = _head(1 + hidden_channels, hidden_channels, norm_groups, zero_init=True,
                          spatial_dims=spatial_dims)
        if pri.shape > 0:
            self.shape_prior = ShapePrior()
        self.prior_penalties: dict[str, Tensor] = {}

    def train(self, mode: bool = True) -> ContourEvolution:
        super().train(mode)
        self.unet.eval()
        return self

    def forward(self, image: Tensor, phi0: Tensor | None = None, times: Tensor | None = None) -> Tensor:
        """φ̂ ``(B, 1, *S)``, S = (H, W) or (D, H, W); with ``times`` the predictions φ(t) + ψ(γ(t))
        stacked ``(T, B, 1, *S)``."""
        if phi0 is None:
            with torch.no_grad():
                phi0 = self.unet(image)
        check_arg(phi0.shape == (image.shape[0], 1, *image.shape[2:]), "phi0", tuple(phi0.shape),
                  f"shape {(image.shape[0], 1, *image.shape[2:])}")
        h0 = self.encoder(image)
        if times is not None:
            _check_times(times)
        elif self.training and self.priors.penalised and torch.is_grad_enabled():
            return self._penalised_forward(phi0.to(h0.dtype), h0)
        phi_t, h_t = self.solver((phi0.to(h0.dtype), h0), times)
        if times is None:
            return phi_t[-1] + self.head(torch.cat([phi_t[-1], h_t[-1]], dim=1))
        T, B = phi_t.shape[:2]
        gamma = torch.cat([phi_t, h_t], dim=2).flatten(0, 1)
        return phi_t + self.head(gamma).unflatten(0, (T, B))

    def _penalised_forward(self, phi0: Tensor, h0: Tensor) -> Tensor:
        """φ̂ as ``forward`` gives it, solving at t_0 = 0, t_1, …, t_K = t1; the penalties on φ(t_k) are kept."""
        k, t1 = self.priors.times, self.solver.config.t1
        times = torch.tensor([t1 * i / k for i in range(k)] + [t1], dtype=h0.dtype, device=h0.device)
        phi_t, h_t = self.solver((phi0, h0), times)
        self.prior_penalties = state_penalties(phi_t, self.priors, getattr(self, "shape_prior", None))
        return phi_t[-1] + self.head(torch.cat([phi_t[-1], h_t[-1]], dim=1))


class ImageEvolution(_NFEMixin, nn.Module):
    """Evolve an image embedding: h(0) = λ(image), dh/dt = fθ(h, t), φ̂ = ψ(h(1)).

    fθ's last layer is zero-initialised (h(1) = h(0) at initialisation); ψ's last layer is not, so that
    gradients reach λ and fθ from the first step.
    """

    def __init__(
        self,
        in_channels: int = 1,
        hidden_channels: int = 16,
        func: FuncKind = "conv",
        func_channels: int = 32,
        func_layers: int = 3,
        func_depth: int = 2,
        func_max_channels: int | None = None,
        norm_groups: int = 8,
        solver: SolverConfig | None = None,
        inference_solver: SolverConfig | None = None,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        check_spatial_dims(spatial_dims)
        check_positive_int("in_channels", in_channels)
        check_positive_int("hidden_channels", hidden_channels)
        self.spatial_dims = spatial_dims
        self.encoder = _encoder(in_channels, hidden_channels, norm_groups, spatial_dims)
        inner = build_odefunc(func, hidden_channels, func_channels=func_channels, func_layers=func_layers,
                              func_depth=func_depth, func_max_channels=func_max_channels,
                              norm_groups=norm_groups, spatial_dims=spatial_dims)
        self.solver = ODESolver(inner, solver, inference_solver)
        self.head = _head(hidden_channels, hidden_channels, norm_groups, zero_init=False, spatial_dims=spatial_dims)

    def forward(self, image: Tensor, times: Tensor | None = None) -> Tensor:
        """φ̂ ``(B, 1, *S)``; with ``times`` the predictions ψ(h(t)) stacked ``(T, B, 1, *S)``."""
        if times is not None:
            _check_times(times)
        h_t = self.solver(self.encoder(image), times)
        if times is None:
            return self.head(h_t[-1])
        return self.head(h_t.flatten(0, 1)).unflatten(0, h_t.shape[:2])


class NodeStack(_NFEMixin, nn.Module):
    """Stacked NODE blocks for dense prediction (Image-Evolution style, DeepLab-like):

    λ (stem: two stride-2 3×3 ConvNormAct, output stride 4) → for each stage i: a transition (ConvNormAct,
    3×3 stride 2 when ``stage_strides[i]`` is 2, else 1×1; identity when channels and stride are unchanged) and one
    NODE block whose fθ is ``StackODEFunc`` (grouped convs + LayerNorm + SE, time-conditioned, zero-init
    output) → ASPP → ψ (3×3 ConvNormAct, 1×1 conv) → bilinear (3-D: trilinear) upsampling to the input size.
    """

    def __init__(
        self,
        in_channels: int = 1,
        stem_channels: int = 32,
        stage_channels: tuple[int, ...] = (64, 128),
        stage_strides: tuple[int, ...] = (1, 2),
        width_ratio: float = 0.5,
        groups: int = 8,
        se_reduction: int = 16,
        aspp_channels: int = 32,
        aspp_rates: tuple[int, ...] = (2, 4, 6),
        norm_groups: int = 8,
        solver: SolverConfig | None = None,
        inference_solver: SolverConfig | None = None,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        check_spatial_dims(spatial_dims)
        check_positive_int("in_channels", in_channels)
        check_positive_int("stem_channels", stem_channels)
        check_arg(len(stage_channels) > 0, "stage_channels", stage_channels, "a non-empty tuple of ints > 0")
        for c in stage_channels:
            check_positive_int("stage_channels", c)
        check_arg(len(stage_strides) == len(stage_channels) and all(s in (1, 2) for s in stage_strides),
                  "stage_strides", stage_strides, f"{len(stage_channels)} values, each 1 or 2")
        check_arg(isinstance(width_ratio, (int, float)) and width_ratio > 0, "width_ratio", width_ratio,
                  "a number > 0")
        check_positive_int("aspp_channels", aspp_channels)
        self.spatial_dims = spatial_dims
        kw = dict(norm_groups=norm_groups, spatial_dims=spatial_dims)
        self.stem = nn.Sequential(
            ConvNormAct(in_channels, stem_channels, stride=2, **kw),
            ConvNormAct(stem_channels, stem_channels, stride=2, **kw),
        )
        self.transitions = nn.ModuleList()
        self.blocks = nn.ModuleList()
        prev = stem_channels
        for c, s in zip(stage_channels, stage_strides, strict=True):
            same = c == prev and s == 1
            k = 3 if s == 2 else 1
            self.transitions.append(nn.Identity() if same else ConvNormAct(prev, c, k, stride=s, **kw))
            width = int(round(c * width_ratio))
            func = StackODEFunc(c, width, groups=groups, se_reduction=se_reduction, norm_groups=norm_groups,
                                spatial_dims=spatial_dims)
            self.blocks.append(ODESolver(func, solver, inference_solver))
            prev = c
        self.aspp = ASPP(prev, aspp_channels, tuple(aspp_rates), **kw)
        self.head = _head(aspp_channels, aspp_channels, norm_groups, zero_init=False, spatial_dims=spatial_dims)

    def forward(self, image: Tensor) -> Tensor:
        """φ̂ ``(B, 1, *S)``."""
        x = self.stem(image)
        for transition, block in zip(self.transitions, self.blocks, strict=True):
            x = block(transition(x))[-1]
        out = self.head(self.aspp(x))
        return F.interpolate(out, size=image.shape[-self.spatial_dims:], mode=interpolate_mode(self.spatial_dims),
                             align_corners=False)
