"""Regularisers of the dynamics (RNODE, Finlay et al. 2020): kinetic energy and Jacobian Frobenius norm.

For a solve of dy/dt = fθ(t, y) over [0, T] and each sample b of the batch (D state elements per sample):

* kinetic energy ``K_b = ∫₀ᵀ ‖f(t, y_b)‖² / D dt``;
* Jacobian Frobenius ``J_b = ∫₀ᵀ ‖εᵀ ∂f/∂y (t, y_b)‖² / D dt``, Hutchinson's estimate of ∫‖∂f/∂y‖_F² / D dt:
  ε is one Rademacher probe (±1, the shape of the state), drawn once per solve (one per training step) and
  held fixed over it, so E_ε[‖εᵀA‖²] = ‖A‖_F² and the integrand is a smooth function of t.

(RNODE's code averages over the state's elements as well, which makes a weight independent of the image
size, as the narrow-band loss is a mean over pixels.)

**Integrated as extra state**, as RNODE's code does: :class:`RegularisedFunc` returns the two integrands as
extra parts of a tuple state, one scalar per sample each (shaped ``(B, 1, 1, 1)`` so that the solver's
channels-last handling takes them as it takes φ), and the solver integrates them with the same method and
steps as y. Chosen over the quadrature that ``nodeseg.adjoint`` and ``nodeseg.dopri5`` have because:

* it serves every method (euler, midpoint, rk4 and the adaptive ones) and both backward modes; the
  quadrature exists only for dopri5, and only inside the adjoint's backward pass (direct backprop and the
  forward solve have none);
* the gradient needs no new mathematics: the adjoint of each extra part is the constant ∂L/∂K_b, and the
  regulariser's own gradients (∂r/∂y into the state adjoint, ∂r/∂θ into the weight gradient) come from the
  vector-Jacobian product of the augmented fθ that ``nodeseg.adjoint`` already takes — a quadrature would
  need a source term added to the adjoint ODE by hand;
* the cost is 2 × B scalars of state, against B × D for y.

The extra parts are kept out of the step-size control (:func:`leading_norm`, and ``nodeseg.adjoint``'s
``normed_parts`` for the backward solve), as RNODE's code does by giving them a tolerance of 1e20: y's
steps are then the unregularised solve's steps, and its values equal it (tests/test_regularisers.py).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torchdiffeq._impl.misc import _mixed_norm

__all__ = ["REGULARISERS", "RegularisedFunc", "leading_norm", "rademacher_like"]

#: the regularisers, in the order their parts follow y in the augmented state
REGULARISERS: tuple[str, ...] = ("kinetic_energy", "jacobian_frobenius")


def rademacher_like(x: Tensor) -> Tensor:
    """A tensor of ±1 (each with probability 1/2) of the shape, dtype and device of ``x``."""
    return torch.randint(0, 2, x.shape, device=x.device).to(x.dtype).mul_(2).sub_(1)


def leading_norm(parts: int) -> Callable[[Sequence[Tensor]], Tensor]:
    """torchdiffeq's mixed norm (max of per-part RMS) over the first ``parts`` parts of a tuple state only."""

    def norm(state: Sequence[Tensor]) -> Tensor:
        return _mixed_norm(tuple(state[:parts]))

    return norm


class RegularisedFunc(nn.Module):
    """fθ on the augmented state ``(*y, *r)``: returns ``(*f, *dr/dt)`` with one ``(B, 1, 1, 1)`` rate per
    regulariser in ``names`` (a subset of :data:`REGULARISERS`, in that order).

    ``probe`` is the Rademacher ε (one tensor per part of y) for ``jacobian_frobenius``. The VJP εᵀ∂f/∂y is
    taken with ``create_graph`` when grad mode is on (direct backprop, and the adjoint's backward pass,
    which differentiates it again); in a forward solve under ``no_grad`` its graph is local to the
    evaluation and the outputs are detached. ``func`` is held, not registered: its parameters stay its
    owner's.
    """

    def __init__(self, func: Callable[..., Tensor | tuple[Tensor, ...]], parts: int, is_tuple: bool,
                 names: Sequence[str], probe: Sequence[Tensor] | None = None) -> None:
        super().__init__()
        unknown = [n for n in names if n not in REGULARISERS]
        if unknown or not names:
            raise ValueError(f"argument 'names' must be a non-empty subset of {REGULARISERS}, got {list(names)}")
        if "jacobian_frobenius" in names and (probe is None or len(probe) != parts):
            raise ValueError(f"argument 'probe' must hold one tensor per part of the state ({parts}) for "
                             "'jacobian_frobenius'")
        self.__dict__["base"] = func  # not a submodule
        self.parts = parts
        self.is_tuple = is_tuple
        self.names = tuple(n for n in REGULARISERS if n in names)
        self.probe = tuple(probe) if probe is not None else None

    def forward(self, t: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        ys = tuple(state[: self.parts])
        batch = ys[0].shape[0]
        per_sample = sum(math.prod(y.shape[1:]) for y in ys)
        jacobian = "jacobian_frobenius" in self.names
        create = torch.is_grad_enabled()
        with torch.enable_grad() if jacobian else contextlib.nullcontext():
            if jacobian:  # a part outside any graph (φ(0) of the frozen UNet) gets one, to be differentiated
                ys = tuple(y if y.requires_grad else y.detach().requires_grad_(True) for y in ys)
            f = self.base(t, ys if self.is_tuple else ys[0])
            fs = tuple(f) if self.is_tuple else (f,)
            rates = []
            if "kinetic_energy" in self.names:
                rates.append(sum((fi.pow(2).reshape(batch, -1).sum(1) for fi in fs), fs[0].new_zeros(batch)) / per_sample)
            if jacobian:
                assert self.probe is not None
                vjp = torch.autograd.grad(fs, ys, self.probe, create_graph=create, allow_unused=True)
                rates.append(sum((v.pow(2).reshape(batch, -1).sum(1) for v in vjp if v is not None),
                                 fs[0].new_zeros(batch)) / per_sample)
        if not create:
            fs, rates = tuple(fi.detach() for fi in fs), [r.detach() for r in rates]
        return (*fs, *(r.view(batch, 1, 1, 1).to(fs[0].dtype) for r in rates))
