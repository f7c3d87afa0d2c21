"""The adjoint method over one flat augmented state: how ``nodeseg.solve`` back-propagates a solve.

The mathematics of torchdiffeq 0.2.5's ``odeint_adjoint`` (``tests/test_adjoint.py`` compares the two): the
forward solve runs torchdiffeq's ``odeint`` under ``no_grad``; the backward pass integrates the state y,
its adjoint a = ∂L/∂y and the parameter adjoint g = ∂L/∂θ from each output time to the one before, with
the same method, tolerances and options, under the seminorm (y and a in the error norm, g not) or the full
mixed norm. What differs is what is carried along:

* **No time adjoint.** torchdiffeq also integrates ∂L/∂t as a fourth part of the state and puts it in the
  error norm, even when t does not require grad: its dynamics mean to evaluate fθ at a detached t, but
  ``t_ = t.detach(); t = t_.requires_grad_(True)`` makes both names the same tensor, so the VJP with
  respect to t is computed anyway. For a time-conditioned fθ (every fθ here) that scalar sums the
  gradient of a whole input channel, is large, and dominates the step-size control of a quantity that is
  thrown away. Leaving it out takes 25–40 % fewer backward evaluations at the same gradient accuracy
  (measured against a float64 reference solved at atol 1e-12; ``tests/test_adjoint.py``).
* **One flat state, no tuple juggling.** torchdiffeq integrates the tuple (∂L/∂t, y, a, *g) and flattens
  the tuple its dynamics return at every evaluation (a pass over y, a and every parameter), after the
  tuple-state wrapper inside has concatenated fθ's output once already. Here the state is one tensor
  [y; a; g] and each evaluation writes −fθ and the vector-Jacobian products straight into one buffer.
* **Time reversed inside the dynamics.** torchdiffeq solves over decreasing t by wrapping the dynamics in a
  function that multiplies every derivative by −1 (another pass over the augmented state). Here the
  backward problem is posed over s = −t with the sign folded in: the buffer receives −fθ, and the VJP is
  taken against +a instead of −a.

* **The parameter adjoint as a quadrature** (dopri5 under the seminorm, the default). g does not feed back
  into the dynamics and is outside the error norm, so integrating it is a weighted sum of each accepted
  step's ∂L/∂θ contributions: the solver keeps [y; a] as its state and sums g beside it
  (``nodeseg.dopri5.Quadrature``) instead of carrying every parameter through every stage sum, error
  estimate and copy. Each backward interval then ends exactly on its output time (a last step shortened
  to land on it, where an overshooting step would have been interpolated back). The same gradients to
  rounding (``tests/test_adjoint.py``); for NodeUNet5m's 5 M parameters the stage sums over g were most
  of the backward solve's arithmetic. And fθ's weight gradients are taken only at the evaluations whose
  integrand the quadrature sums: not at dopri5's second stage (solution weight 0), an initial-step probe,
  or the last stage of a step that ends the interval; there the VJP is with respect to y alone (the
  same gradients bit for bit; NodeUNet5m's training step 6 % faster).

With fixed-step methods (euler, midpoint, rk4) the gradients equal torchdiffeq's bit for bit. A time ``t``
that requires grad, an event function or a method outside :data:`SUPPORTED` are not handled here;
``nodeseg.solve`` sends those to torchdiffeq's ``odeint_adjoint``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchdiffeq import odeint

from nodeseg.dopri5 import METHOD as DOPRI5
from nodeseg.dopri5 import Quadrature, all_finite

__all__ = ["SUPPORTED", "lean_odeint_adjoint"]

SUPPORTED: tuple[str, ...] = (DOPRI5, "bosh3", "adaptive_heun", "dopri8", "rk4", "euler", "midpoint")

State = Tensor | tuple[Tensor, ...]
StepCallback = Callable[[Tensor, Tensor, Tensor], None]


class _AugmentedDynamics(nn.Module):
    """d[y; a; g]/ds at s = −t for the adjoint of dy/dt = func(t, y), written into one flat buffer.

    ``func`` takes and returns the forward state's structure (a tensor or a tuple of tensors of ``shapes``).
    """

    def __init__(self, func: Callable[..., State], shapes: Sequence[torch.Size], is_tuple: bool,
                 params: Sequence[Tensor], callback: StepCallback | None, quadrature: Quadrature | None = None
                 ) -> None:
        super().__init__()
        self.base = func
        self.shapes = list(shapes)
        self.sizes = [math.prod(s) for s in shapes]
        self.n = sum(self.sizes)
        self.is_tuple = is_tuple
        self.params = tuple(params)
        self.n_params = sum(p.numel() for p in self.params)
        self._callback = callback
        self.quadrature = quadrature  # when set, g is not in the state: d g/ds goes to quadrature.stash

    def split(self, flat: Tensor) -> list[Tensor]:
        """Views of the parts of one flat forward-sized vector."""
        return [v.view(s) for v, s in zip(flat.split(self.sizes), self.shapes, strict=True)]

    def callback_step(self, s0: Tensor, z0: Tensor, ds: Tensor) -> None:
        if self._callback is not None:
            self._callback(s0, z0[: 2 * self.n], ds)

    accepts_out = True  # nodeseg.dopri5 may hand it the stage row to write into

    def forward(self, s: Tensor, z: Tensor, out: Tensor | None = None) -> Tensor:
        n = self.n
        t = -s
        q = self.quadrature
        # g's integrand at this evaluation: always in the state, and with the quadrature when the solver uses it
        params = self.params if q is None or q.asked() else ()
        with torch.enable_grad():
            ys = [y.detach().requires_grad_(True) for y in self.split(z[:n])]
            fx = self.base(t, tuple(ys) if self.is_tuple else ys[0])
            outs = list(fx) if self.is_tuple else [fx]
            # d a/ds = +aᵀ ∂f/∂y and d g/ds = +aᵀ ∂f/∂θ (dt = −ds): the VJP against +a
            vjps = torch.autograd.grad(outs, (*ys, *params), self.split(z[n: 2 * n]), allow_unused=True)
        buf = out if out is not None else torch.empty(z.shape, dtype=z.dtype, device=z.device)
        offset = 0
        for o, size in zip(outs, self.sizes, strict=True):  # d y/ds = −f(t, y)
            torch.neg(o, out=buf[offset: offset + size].view(o.shape))
            offset += size
        for y, v, size in zip(ys, vjps[: len(ys)], self.sizes, strict=True):
            dst = buf[offset: offset + size]
            if v is None:
                dst.zero_()
            else:
                dst.view(y.shape).copy_(v)
            offset += size
        if q is not None:
            q.stash.append(vjps[len(ys):] if params else None)
        elif self.params:
            torch.cat([(torch.zeros_like(p) if v is None else v).reshape(-1)
                       for p, v in zip(self.params, vjps[len(ys):], strict=True)], out=buf[offset:])
        return buf


def _rms(x: Tensor) -> Tensor:
    """The RMS ``‖x‖₂ / √n`` (torchdiffeq's ``sqrt(mean(|x|²))`` in one pass); 0 for an empty part."""
    if x.numel() == 0:
        return x.new_zeros(())
    return torch.linalg.vector_norm(x) / math.sqrt(x.numel())


def _adjoint_norm(sizes: Sequence[int], param_sizes: Sequence[int], seminorm: bool,
                  normed_parts: int | None = None) -> Callable[[Tensor], Tensor]:
    """torchdiffeq's adjoint norm on the flat [y; a; g]: max RMS over y's and a's parts (and g's, if not semi);
    with ``normed_parts``, over the first that many parts of y and of a only."""
    parts = list(sizes) * 2 + ([] if seminorm else list(param_sizes))
    total = sum(parts)
    k = len(sizes) if normed_parts is None else normed_parts
    keep = [i for i in range(len(parts)) if i % len(sizes) < k or i >= 2 * len(sizes)] if sizes else []

    def norm(x: Tensor) -> Tensor:
        split = x[:total].split(parts)
        return torch.stack([_rms(split[i]) for i in keep]).max()

    return norm


class _LeanAdjointMethod(torch.autograd.Function):
    """Forward: torchdiffeq's ``odeint`` under no_grad. Backward: the flat augmented system over s = −t."""

    @staticmethod
    def forward(ctx: Any, spec: dict[str, Any], t: Tensor, *inputs: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        n_y = spec["n_y"]
        y0, params = inputs[:n_y], inputs[n_y:]
        with torch.no_grad():
            sol = odeint(spec["func"], tuple(y0) if spec["is_tuple"] else y0[0], t, rtol=spec["rtol"],
                         atol=spec["atol"], method=spec["method"], options=spec["options"])
        sols = tuple(sol) if spec["is_tuple"] else (sol,)
        ctx.spec = spec
        ctx.save_for_backward(t, *sols, *params)
        return sols

    @staticmethod
    def backward(ctx: Any, *grad_sols: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        spec = ctx.spec
        n_y = spec["n_y"]
        t, *saved = ctx.saved_tensors
        sols, params = saved[:n_y], saved[n_y:]
        steps = len(t)
        with torch.no_grad():
            ys = torch.cat([s.reshape(steps, -1) for s in sols], 1)
            gys = torch.cat([(torch.zeros_like(s) if g is None else g).reshape(steps, -1)
                             for g, s in zip(grad_sols, sols, strict=True)], 1)
            shapes = [s.shape[1:] for s in sols]
            options = dict(spec["adjoint_options"])
            n_params = sum(p.numel() for p in params)
            use_quad = params and spec["quadrature"] and spec["seminorm"] and spec["method"] == DOPRI5 \
                and "jump_t" not in options
            quad, g_flat = None, ys.new_zeros(n_params if use_quad else 0)
            if use_quad:
                quad = Quadrature([g.view_as(p) for g, p in zip(g_flat.split([p.numel() for p in params]), params,
                                                                strict=True)])
            dyn = _AugmentedDynamics(spec["func"], shapes, spec["is_tuple"], params, spec["callback"], quad)
            n = dyn.n
            z = torch.cat([ys[-1], gys[-1]] + ([] if quad is not None else [ys.new_zeros(n_params)]))
            options["norm"] = _adjoint_norm(dyn.sizes, [p.numel() for p in params], spec["seminorm"],
                                            spec["normed_parts"])
            if quad is not None:
                options["quadrature"] = quad
            for i in range(steps - 1, 0, -1):
                s_span = torch.stack([-t[i], -t[i - 1]])
                if "step_t" in options or quad is not None:  # land on the output time: g is not interpolated
                    options["step_t"] = s_span[1:]
                try:
                    z = odeint(dyn, z, s_span, rtol=spec["rtol"], atol=spec["atol"], method=spec["method"],
                               options=options)[1]
                except AssertionError as err:  # torchdiffeq's runaway checks (steps, dt underflow, non-finite)
                    if spec["on_assertion"] is None:
                        raise
                    raise spec["on_assertion"](err) from None
                z[:n] = ys[i - 1]  # restart from the forward solve's state (as torchdiffeq does)
                z[n: 2 * n] += gys[i - 1]
            adj_y = dyn.split(z[n: 2 * n])
            g_all = z[2 * n:] if quad is None else g_flat
            if quad is not None and not all_finite(g_all):
                err = AssertionError("non-finite values in the parameter adjoint (the gradient of fθ's weights)")
                if spec["on_assertion"] is None:
                    raise err
                raise spec["on_assertion"](err) from None
            adj_params = [g.view_as(p) for g, p in zip(g_all.split([p.numel() for p in params]), params,
                                                        strict=True)]
        return (None, None, *adj_y, *adj_params)


def lean_odeint_adjoint(
    func: Callable[..., State], y0: State, t: Tensor, *, rtol: float, atol: float, method: str,
    options: dict[str, Any], adjoint_options: dict[str, Any], params: Sequence[Tensor], seminorm: bool = True,
    step_callback: StepCallback | None = None, on_assertion: Callable[[AssertionError], Exception] | None = None,
    quadrature: bool = True, normed_parts: int | None = None,
) -> State:
    """``odeint`` forward, the adjoint backward (see the module docstring); returns y at ``t`` like ``odeint``.

    ``params`` are the tensors the gradient flows to (fθ's parameters that require grad); ``adjoint_options``
    the torchdiffeq options of the backward solve (``norm`` is set here: the seminorm when ``seminorm``).
    ``step_callback(t0, [y; a], dt)`` is called before each step of the backward solve with the real time
    t0 (decreasing) and the flat state and adjoint; ``on_assertion(err)`` gives the exception to raise
    instead of an ``AssertionError`` of torchdiffeq's solver in the backward solve (it would otherwise
    surface from ``loss.backward()`` as a bare assertion). ``quadrature`` sums the parameter adjoint beside
    the state where it can (dopri5 and the seminorm; see the module docstring); False carries it in the state.
    ``normed_parts`` keeps only the first that many parts of a tuple state (and of its adjoint) in the
    backward solve's error norm (``nodeseg.regularisers``: the integrals riding along are not step-controlled).
    """
    if method not in SUPPORTED:
        raise ValueError(f"method {method!r} is not supported by the lean adjoint; expected one of {SUPPORTED}")
    if t.requires_grad:
        raise ValueError("the lean adjoint does not differentiate with respect to t; use torchdiffeq's odeint_adjoint")
    is_tuple = isinstance(y0, tuple)
    parts = tuple(y0) if is_tuple else (y0,)

    def callback(s0: Tensor, za: Tensor, ds: Tensor) -> None:
        if step_callback is not None:
            step_callback(-s0, za, ds)

    spec = {"func": func, "is_tuple": is_tuple, "n_y": len(parts), "rtol": rtol, "atol": atol, "method": method,
            "options": options, "adjoint_options": {k: v for k, v in adjoint_options.items() if k != "norm"},
            "seminorm": seminorm, "callback": callback, "on_assertion": on_assertion, "quadrature": quadrature,
            "normed_parts": normed_parts}
    params = tuple(p for p in params if p.requires_grad)
    out = _LeanAdjointMethod.apply(spec, t, *parts, *params)
    return tuple(out) if is_tuple else out[0]
