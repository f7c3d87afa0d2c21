"""Priors and constraints on the intermediate states of Contour Evolution's ODE (issue 19).

Three kinds, each switched by ``contour.priors`` in params.yaml (``PriorsConfig``; all off by default, and
then the model, its spec and its outputs are bit-identical to the model without priors):

**Curvature motion in the dynamics.** dφ/dt = fθ(γ, t)_φ + ε·κ·|∇φ| with κ = div(∇φ/|∇φ|), expanded by
the product rule and discretised by central differences (compact 3×3 stencils)::

    κ|∇φ| = (φxx φy² − 2 φx φy φxy + φyy φx²) / (φx² + φy² + δ²)

δ (``grad_floor``) floors |∇φ|: the term stays bounded by |D²φ| where φ is flat (the clipped far field),
so no 1/δ² amplification, and it is smooth (float64 gradcheck). The image border is padded by linear
extrapolation (φ₋₁ = 2φ₀ − φ₁), so a plane has κ = 0 up to the border. φ is in pixels (h = 1). ε is fixed
(``curvature``) or learned (``learn_curvature``: ε = min(softplus(ρ), cap), ρ initialised so that ε starts at
``curvature``). **CFL cap**: explicit curvature flow linearises to ε·Δφ at worst, whose 5-point stencil has
eigenvalues down to −4d/h² (d = 2); forward Euler is stable for dt ≤ h²/(2·d·ε), i.e. ε ≤ h²/(2·d·dt) =
1/(4·dt). ``cfl_limit`` takes dt = the fixed step size (euler, midpoint, rk4; there the limit is a stability
requirement) or, for adaptive methods, the first step (0.5 by default: ε ≤ 0.5), or t1 where first_step is
null. A fixed ε above it is refused; a learned one is clamped to it. What the adaptive step-size control does
with a stiffer ε: it shrinks the steps to the stability region of dopri5 (about 3.3/|λ|), so NFE grows
linearly in ε past the limit (13 evaluations up to ε = 0.5, 25 at 1, 109 at 10: ``CurvatureFlow``).

**Penalties on intermediate states** φ(t_k), t_k = k·t1/K (k = 1..K, ``times`` = K), read from the solver's
dense output (one solve with K+1 output times instead of 2: the same steps, the adjoint then restarts at each
t_k). Each is a mean over pixels (the scale of the narrow-band MSE), averaged over k and the batch:

- ``length``: the smooth perimeter ∫δ_w(φ)|∇φ| / (H·W), δ_w(x) = sech²(x/w)/(2w) = H_w'(x);
- ``reinit``: (|∇φ| − 1)² on the narrow band |φ| < ``band`` (the band taken without gradient), / (H·W);
- ``area``: the squared change of the smoothed inside area fraction mean(H_w(−φ)) between consecutive
  t_k (t_0 = 0 included), H_w(x) = (1 + tanh(x/w))/2;
- ``shape``: the squared distance of φ(t_k) to the shape space (Tsai et al. 2003: PCA of the training
  masks' signed distances), the projection residual ‖(I − P)(φ − μ)‖² / (H·W·s²), s the largest |φ| of the
  fit (the clip), so that it is dimensionless.

The shape space is fitted at refine start from the training shards (``fit_shape_prior``) and lives in the
model as buffers (``ShapePrior``), so it is saved with every checkpoint. **As is, not aligned**: the CT
slices share one scanner geometry (kidneys sit at similar places) and a slice usually holds both kidneys, whose
joint centroid/scale would not align either of them; unaligned, the residual is a linear projection of φ in
the image's own coordinates (no pose estimate or resampling of φ(t_k) per step, exact gradients). **As a
penalty, not a conditioning input**: a penalty leaves fθ's inputs as they are (the model without priors is
untouched, a trained fθ can be fine-tuned with it), costs K projections per training step and nothing at
inference, whereas conditioning needs a projection at every evaluation of fθ, forward and adjoint.
(The ablation that would give evidence between the two is issue 19 item 4, not run here.)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nodeseg.config import from_mapping
from nodeseg.errors import check_arg

__all__ = [
    "PENALTIES",
    "CurvatureFlow",
    "PriorsConfig",
    "ShapePrior",
    "area_change",
    "cfl_limit",
    "curvature",
    "curvature_speed",
    "fit_shape_prior",
    "gradient_norm",
    "loss_terms",
    "priors_config",
    "reinit_penalty",
    "smooth_length",
    "state_penalties",
]

PENALTIES: tuple[str, ...] = ("length", "reinit", "area", "shape")


def _number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class PriorsConfig:
    """``contour.priors``: curvature motion in fθ's φ-derivative and penalties on φ(t_k); 0 weights = off."""

    curvature: float = 0.0  # ε of ε·κ|∇φ| (pixels² per unit ODE time); 0 = off
    learn_curvature: bool = False  # learn ε (softplus, starting at `curvature`, clamped to the CFL limit)
    grad_floor: float = 1e-2  # δ: |∇φ| is taken as sqrt(|∇φ|² + δ²)
    times: int = 4  # K: the penalties are evaluated at t_k = k·t1/K, k = 1..K
    length: float = 0.0  # weight of the smooth perimeter of the zero level set
    reinit: float = 0.0  # weight of (|∇φ| − 1)² in the narrow band
    area: float = 0.0  # weight of the change of the smoothed inside area between t_k
    shape: float = 0.0  # weight of the distance to the training masks' shape space
    heaviside_width: float = 1.0  # w of H_w and δ_w (pixels)
    band: float = 3.0  # the re-initialisation band |φ| < band (pixels)
    shape_modes: int = 8  # principal modes of the shape space
    shape_samples: int = 2000  # at most this many training slices (evenly spaced) fit it

    def __post_init__(self) -> None:
        for name in ("curvature", *PENALTIES):
            v = getattr(self, name)
            check_arg(_number(v) and v >= 0, name, v, "a number >= 0 (0 = off)")
        check_arg(isinstance(self.learn_curvature, bool), "learn_curvature", self.learn_curvature, "true or false")
        check_arg(not self.learn_curvature or self.curvature > 0, "curvature", self.curvature,
                  "a small number > 0 to start from when learn_curvature is true (e.g. 0.01)")
        for name in ("grad_floor", "heaviside_width", "band"):
            v = getattr(self, name)
            check_arg(_number(v) and v > 0, name, v, "a number > 0")
        for name in ("times", "shape_modes", "shape_samples"):
            v = getattr(self, name)
            check_arg(isinstance(v, int) and not isinstance(v, bool) and v >= 1, name, v, "an int >= 1")

    @property
    def curvature_on(self) -> bool:
        return self.curvature > 0

    @property
    def penalised(self) -> bool:
        """Any penalty weight above 0."""
        return any(getattr(self, n) > 0 for n in PENALTIES)

    @property
    def enabled(self) -> bool:
        return self.curvature_on or self.penalised


def priors_config(priors: PriorsConfig | Mapping[str, Any] | None) -> PriorsConfig:
    """A ``PriorsConfig`` from itself, a mapping of its fields (a model spec), or None (all off)."""
    if priors is None:
        return PriorsConfig()
    if isinstance(priors, PriorsConfig):
        return priors
    return from_mapping(PriorsConfig, priors, where="priors")


# ---- finite differences -------------------------------------------------------------------------------

def _pad_linear(phi: Tensor) -> Tensor:
    """Pad the last two dims by one pixel with linear extrapolation (exact for planes)."""
    check_arg(phi.shape[-1] >= 2 and phi.shape[-2] >= 2, "phi", tuple(phi.shape), "at least 2×2 pixels")
    x = torch.cat([2 * phi[..., :1, :] - phi[..., 1:2, :], phi, 2 * phi[..., -1:, :] - phi[..., -2:-1, :]], dim=-2)
    return torch.cat([2 * x[..., :1] - x[..., 1:2], x, 2 * x[..., -1:] - x[..., -2:-1]], dim=-1)


def _derivatives(phi: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(φx, φy, φxx, φyy, φxy) by central differences, x along the last dim, h = 1."""
    p = _pad_linear(phi)
    c = p[..., 1:-1, 1:-1]
    east, west = p[..., 1:-1, 2:], p[..., 1:-1, :-2]
    south, north = p[..., 2:, 1:-1], p[..., :-2, 1:-1]
    px, py = (east - west) / 2, (south - north) / 2
    pxx, pyy = east - 2 * c + west, south - 2 * c + north
    pxy = (p[..., 2:, 2:] - p[..., 2:, :-2] - p[..., :-2, 2:] + p[..., :-2, :-2]) / 4
    return px, py, pxx, pyy, pxy


def _curvature_parts(phi: Tensor, floor: float) -> tuple[Tensor, Tensor]:
    """(numerator φxx φy² − 2 φx φy φxy + φyy φx², |∇φ|² + δ²)."""
    px, py, pxx, pyy, pxy = _derivatives(phi)
    num = pxx * py * py - 2 * px * py * pxy + pyy * px * px
    return num, px * px + py * py + floor * floor


def curvature(phi: Tensor, floor: float = 1e-2) -> Tensor:
    """κ = div(∇φ/|∇φ|) of ``(…, H, W)`` φ by central differences, |∇φ| floored as sqrt(|∇φ|² + δ²)."""
    num, g2 = _curvature_parts(phi, floor)
    return num / g2.pow(1.5)


def curvature_speed(phi: Tensor, floor: float = 1e-2) -> Tensor:
    """κ·|∇φ| (the curvature-motion speed), bounded by |D²φ| where |∇φ| → 0."""
    num, g2 = _curvature_parts(phi, floor)
    return num / g2


def gradient_norm(phi: Tensor, floor: float = 1e-2) -> Tensor:
    """sqrt(φx² + φy² + δ²) by central differences."""
    px, py, _, _, _ = _derivatives(phi)
    return (px * px + py * py + floor * floor).sqrt()


# ---- penalties ------------------------------------------------------------------------------------------

def smooth_length(phi: Tensor, width: float = 1.0, floor: float = 1e-2) -> Tensor:
    """Mean over the batch of ∫δ_w(φ)|∇φ| / (H·W) for ``(…, H, W)`` φ; 2πr/(H·W) for a disc of radius r."""
    delta = (1 - torch.tanh(phi / width) ** 2) / (2 * width)
    return (delta * gradient_norm(phi, floor)).mean()


def reinit_penalty(phi: Tensor, band: float = 3.0, floor: float = 1e-2) -> Tensor:
    """Mean over pixels of (|∇φ| − 1)² where |φ| < ``band`` (0 elsewhere; the band carries no gradient)."""
    inside = (phi.detach().abs() < band).to(phi.dtype)
    return (inside * (gradient_norm(phi, floor) - 1) ** 2).mean()


def area_change(phis: Tensor, width: float = 1.0) -> Tensor:
    """Mean squared change of the smoothed inside-area fraction mean(H_w(−φ)) between consecutive states of
    ``phis`` ``(T, …, H, W)``, T ≥ 2."""
    check_arg(phis.ndim >= 3 and phis.shape[0] >= 2, "phis", tuple(phis.shape), "(T >= 2, ..., H, W)")
    area = ((1 - torch.tanh(phis / width)) / 2).mean(dim=(-2, -1))
    return ((area[1:] - area[:-1]) ** 2).mean()


class ShapePrior(nn.Module):
    """A linear shape space of signed distances: mean μ ``(H, W)``, orthonormal modes ``(K, H, W)``, scale s.

    Empty until fitted (``fit_shape_prior``) or loaded: loading a state dict takes the stored sizes.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(0, 0))
        self.register_buffer("modes", torch.zeros(0, 0, 0))
        self.register_buffer("scale", torch.ones(()))

    @property
    def fitted(self) -> bool:
        return self.mean.numel() > 0

    def set(self, mean: Tensor, modes: Tensor, scale: float) -> None:
        check_arg(mean.ndim == 2 and modes.ndim == 3 and modes.shape[1:] == mean.shape, "modes",
                  tuple(modes.shape), f"(K, {tuple(mean.shape)}) modes for a mean of shape {tuple(mean.shape)}")
        self.mean = mean.detach().clone()
        self.modes = modes.detach().clone()
        self.scale = torch.as_tensor(float(scale), dtype=mean.dtype)

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        for name in ("mean", "modes"):
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name], device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[arg-type]

    def residual(self, phi: Tensor) -> Tensor:
        """Mean over the batch of ‖(I − P)(φ − μ)‖² / (H·W·s²) for ``(…, H, W)`` φ."""
        check_arg(self.fitted, "shape prior", "not fitted", "a prior fitted on the training shards")
        check_arg(tuple(phi.shape[-2:]) == tuple(self.mean.shape), "phi", tuple(phi.shape),
                  f"images of the shape prior's size {tuple(self.mean.shape)}")
        r = (phi - self.mean.to(phi.dtype)).flatten(-2)
        basis = self.modes.to(phi.dtype).flatten(1)  # (K, HW)
        res = r - (r @ basis.T) @ basis
        return (res * res).mean() / (self.scale.to(phi.dtype) ** 2)


@torch.no_grad()
def fit_shape_prior(phis: Tensor, modes: int) -> ShapePrior:
    """PCA of the signed distances ``phis`` ``(N, H, W)`` as they are (no alignment), in float64.

    At most ``modes`` modes, fewer where the data has lower rank (eigenvalues below 1e-10 of the largest
    dropped), from the N×N Gram matrix (N ≤ H·W in practice) — deterministic, no random projections.
    """
    check_arg(phis.ndim == 3 and phis.shape[0] >= 1, "phis", tuple(phis.shape), "(N >= 1, H, W)")
    check_arg(isinstance(modes, int) and modes >= 1, "modes", modes, "an int >= 1")
    x = phis.double().flatten(1)
    mean = x.mean(0)
    xc = x - mean
    vals, vecs = torch.linalg.eigh(xc @ xc.T)  # ascending
    vals, vecs = vals.flip(0), vecs.flip(1)
    keep = int(((vals > 1e-10 * vals[0].clamp(min=1e-300)) & (vals > 0)).sum().clamp(max=modes))
    basis = (vecs[:, :keep].T @ xc) / vals[:keep].sqrt()[:, None]
    basis, _ = torch.linalg.qr(basis.T)  # re-orthonormalise against rounding
    prior = ShapePrior()
    h, w = phis.shape[1:]
    prior.set(mean.reshape(h, w).float(), basis.T.reshape(keep, h, w).float(), float(phis.abs().max().clamp(min=1)))
    return prior


def state_penalties(phis: Tensor, cfg: PriorsConfig, shape: ShapePrior | None = None) -> dict[str, Tensor]:
    """The penalties with a weight > 0 on the states ``phis`` ``(K+1, B, 1, H, W)`` at t_0 = 0, t_1, …, t_K
    (each averaged over t_1..t_K; ``area`` over the K intervals from t_0)."""
    later = phis[1:]
    out: dict[str, Tensor] = {}
    if cfg.length > 0:
        out["length"] = smooth_length(later, cfg.heaviside_width, cfg.grad_floor)
    if cfg.reinit > 0:
        out["reinit"] = reinit_penalty(later, cfg.band, cfg.grad_floor)
    if cfg.area > 0:
        out["area"] = area_change(phis, cfg.heaviside_width)
    if cfg.shape > 0:
        check_arg(shape is not None and shape.fitted, "shape prior", "not fitted",
                  "a shape prior fitted on the training shards (nodeseg refine fits it when contour.priors.shape > 0)")
        out["shape"] = shape.residual(later)  # type: ignore[union-attr]
    return out


def loss_terms(model: nn.Module) -> tuple[Tensor | None, dict[str, float]]:
    """(Σ weight·penalty of the model's last forward or None, what to log per step) — and clears them.

    Models without priors (or with all off) give (None, {}), so the loss stays exactly what it was.
    """
    cfg = getattr(model, "priors", None)
    if not isinstance(cfg, PriorsConfig):
        return None, {}
    penalties: dict[str, Tensor] = getattr(model, "prior_penalties", {})
    model.prior_penalties = {}  # type: ignore[assignment]
    total: Tensor | None = None
    log: dict[str, float] = {}
    for name, value in penalties.items():
        term = getattr(cfg, name) * value
        total = term if total is None else total + term
        log[f"prior_{name}"] = float(value.detach())
    flows = [m for m in model.modules() if isinstance(m, CurvatureFlow)]
    if flows and cfg.learn_curvature:
        log["prior_curvature_eps"] = float(flows[0].epsilon().detach())
    return total, log


# ---- curvature motion in the dynamics -------------------------------------------------------------------

def cfl_limit(method_fixed_step: bool, step_size: float | None, first_step: float | None, t1: float) -> float:
    """The largest ε of explicit curvature flow at step dt: h²/(2·d·dt) = 1/(4·dt) (h = 1 pixel, d = 2);
    dt = the fixed step size, else the adaptive first step, else t1."""
    dt = step_size if method_fixed_step else (first_step if first_step is not None else t1)
    return 1.0 / (4.0 * float(dt))  # type: ignore[arg-type]


def _inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


class CurvatureFlow(nn.Module):
    """Wrap a tuple-state fθ ``(t, (φ, h, …)) → (dφ, dh, …)``: dφ += ε·κ|∇φ|.

    ε is a float, or with ``learn`` min(softplus(ρ), cap) with ρ a parameter starting at softplus⁻¹(eps).
    Measured (``tests/test_priors.py::test_curvature_nfe_grows_with_eps_beyond_the_cfl_limit``: zero fθ, a disc's
    signed distance with noise of 0.5 px (what a UNet gives) at 32², dopri5, atol 1e-3, first step 0.5, t1 = 1):
    NFE 13 at ε = 0, 0.1 and 0.5 (the CFL limit), 25 at ε = 1, 37 at 2, 73 at 5, 109 at 10 (without the noise:
    13 up to ε = 2, 55 at 5, 97 at 10). Beyond the limit the step control shrinks the steps to dopri5's
    stability region (dt ≈ 3.3/|λ|, |λ| ≤ 8ε): NFE grows linearly in ε, and atol no longer matters (pure
    curvature flow over t = 30 took the same 450 evaluations at atol 1e-3 and 1e-4) — a stiff term, not a
    runaway. (With first_step null the automatic first step no longer collapses: 14 instead of 44.)
    """

    def __init__(self, func: nn.Module, eps: float, *, learn: bool = False, cap: float = math.inf,
                 floor: float = 1e-2) -> None:
        super().__init__()
        check_arg(_number(eps) and eps > 0, "curvature", eps, "a number > 0")
        check_arg(learn or eps <= cap, "curvature", eps,
                  f"at most the CFL limit {cap:.4g} = h²/(2·d·dt) of the solver's step (lower it, or the step)")
        self.func = func
        self.cap = float(cap)
        self.floor = float(floor)
        self.eps = float(eps)
        self.rho = nn.Parameter(torch.tensor(_inverse_softplus(min(eps, cap)))) if learn else None

    def epsilon(self) -> Tensor | float:
        if self.rho is None:
            return self.eps
        return F.softplus(self.rho).clamp(max=self.cap)

    def forward(self, t: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        d = self.func(t, state)
        eps = self.epsilon()
        if isinstance(eps, Tensor):
            eps = eps.to(state[0].dtype)
        return (d[0] + eps * curvature_speed(state[0], self.floor), *d[1:])
