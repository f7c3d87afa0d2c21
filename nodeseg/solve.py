"""The one wrapper over torchdiffeq: ``SolverConfig``, ``ODESolver``, NFE counters and runaway caps.

**Counting.** ``ODESolver`` wraps fθ in a counter. ``nfe_forward`` is the number of fθ evaluations in the
last forward solve (the initial derivative, the initial-step probe when ``first_step`` is None, and every
stage of every accepted or rejected step). ``nfe_backward`` is the number of fθ evaluations made while
back-propagating through that solve: with the adjoint each one is an evaluation plus a vector-Jacobian
product inside the backward ODE; with direct backprop it is 0, because autograd goes back through the
stored graphs of the ``nfe_forward`` evaluations (memory grows with NFE × batch × pixels; the adjoint keeps
about one graph of fθ). Both are reset at the start of each forward solve; ``nfe_*_total`` accumulate until
``reset_nfe()``. Evaluations made after a forward solve (the adjoint backward) are attributed to it, so call
backward before the next forward of the same solver if the counts matter.

**Adjoint.** With ``adjoint`` the backward pass is ``nodeseg.adjoint`` (one flat augmented state, no
time adjoint, the parameter gradient summed as a quadrature beside [y; a] with dopri5, backward intervals
that land on their output times: 25–60 % fewer backward evaluations than torchdiffeq's ``odeint_adjoint``
at the same gradient accuracy, see that module); torchdiffeq's serves where the times require grad. ``ADJOINT["impl"]``
selects torchdiffeq's for comparisons (benchmarks).

**Caps.** Every evaluation beyond ``max_nfe`` (in either pass) raises ``SolverError`` from inside the
counter. torchdiffeq's ``max_num_steps exceeded`` / ``underflow in dt`` / non-finite-state assertions are
re-raised as ``SolverError``, in the forward solve and in ``nodeseg.adjoint``'s backward solve; a step
callback also raises it at more than ``max_num_steps × intervals`` step attempts in the whole backward pass
and when a NaN error estimate collapses the step size. (Inside torchdiffeq's own adjoint an assertion
cannot be caught — it would surface from ``loss.backward()`` — so there the callback checks the step, its
size and the state and adjoint for non-finite values first.)

**Tuple state, not concatenation.** With ``rtol = 0`` a step is accepted when err/atol ≤ 1 under
torchdiffeq's norm: the RMS over all elements of a tensor state, the max over per-tensor RMS norms
(``_mixed_norm``) of a tuple state. Concatenating (φ, h) dilutes φ's single channel among the C embedding
channels, so atol no longer bounds φ's error; passing the tuple makes atol bind on φ itself. Measured
(``tests/test_solve.py::test_tuple_state_binds_atol_on_phi``: a random conv fθ moving φ 5× faster than 8
embedding channels, 16×16, batch 2, float64, dopri5, first_step 0.5; RMS error of φ(1) against atol 1e-9):

    atol    tuple (φ, h): NFE, φ error    concat [φ; h]: NFE, φ error
    1e-3         31        2.1e-2              25        5.9e-2
    1e-4         49        5.8e-4              43        2.0e-3
    1e-5         67        3.3e-5              55        1.0e-4

(atol bounds the local error per step; these are global errors). The tuple costs more evaluations
exactly because it honours atol on φ, and its φ is 3–4× more accurate. Models pass tuples.

**Output times.** dopri5 and adaptive_heun step past t1 and read φ(t1) off their dense output, which is
accurate. torchdiffeq's dopri8 and bosh3 interpolants are not (measured 50× and 160× atol off at t1 on
dy/dt = −1.5y, atol 1e-6, first_step 0.5), so for those two the steps are made to land on the requested
times (torchdiffeq's ``step_t``). Not for dopri5: evaluating its interpolant exactly at a step end adds a
rounding error of ~32 ulp(φ), which would break "identity at initialisation" (bit-exact φ(0)).

**dopri5 runs as** ``nodeseg.dopri5``: torchdiffeq's method, tableau, error norm and step control, with
the stage sums as one ``addmv`` and the dense output fitted only for the step an output time falls in
(benchmarks/README.md, figures 1 and 6: the solver's arithmetic costs a third of a narrow fθ's evaluations).
Results agree with torchdiffeq's dopri5 to rounding (the table above is unchanged); a step decided by a
hair may flip, so an NFE count can differ by a step on a hard solve.

**first_step.** With fθ zero-initialised, dopri5's automatic first-step selection collapses to 1e-6 and the
first solve costs 44 evaluations at any atol; ``first_step=0.5`` brings it to 13 (1 + 2 steps × 6). The
default is 0.5; None restores torchdiffeq's selection. Fixed-step methods ignore it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torchdiffeq import odeint, odeint_adjoint

from nodeseg import adjoint as _adjoint
from nodeseg import dopri5 as _dopri5
from nodeseg.errors import SolverError, check_arg
from nodeseg.regularisers import REGULARISERS, RegularisedFunc, leading_norm, rademacher_like

Method = Literal["dopri5", "bosh3", "adaptive_heun", "dopri8", "rk4", "euler", "midpoint"]
ADAPTIVE_METHODS: tuple[str, ...] = ("dopri5", "bosh3", "adaptive_heun", "dopri8")
FIXED_STEP_METHODS: tuple[str, ...] = ("rk4", "euler", "midpoint")
METHODS: tuple[str, ...] = ADAPTIVE_METHODS + FIXED_STEP_METHODS
State = Tensor | tuple[Tensor, ...]

_LAND_ON_OUTPUT_TIMES = ("bosh3", "dopri8")
# torchdiffeq solver table keys: dopri5 runs as nodeseg.dopri5's leaner arithmetic (same method and control)
_TORCHDIFFEQ_METHOD = {"dopri5": _dopri5.METHOD}
# which adjoint implementation back-propagates: nodeseg.adjoint (one flat augmented state) or torchdiffeq's
# odeint_adjoint (the benchmarks' "before"); the lean one falls back to torchdiffeq's where it cannot serve
ADJOINT = {"impl": "nodeseg"}
_RUNAWAY_ASSERTIONS = ("max_num_steps exceeded", "underflow in dt", "non-finite values in state")


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class SolverConfig:
    """How to integrate fθ over [0, t1]: method, tolerances, adjoint, caps (the ``solver`` params section).

    ``max_num_steps`` caps adaptive step attempts (accepted + rejected) per output interval;
    ``max_nfe`` caps fθ evaluations per pass. The fixed-step methods take ``step_size`` (steps from 0 by
    that size, the last one shortened to land on t1) or ``steps`` (that many equal steps over each solve:
    1, 2, 3 or 4 steps for a cheap solver, where a step size like 1/3 does not survive a params file);
    exactly one of the two, and neither for the adaptive methods.
    """

    method: Method = "dopri5"
    rtol: float = 0.0
    atol: float = 1e-3
    adjoint: bool = True
    adjoint_seminorm: bool = True
    step_size: float | None = None
    steps: int | None = None
    first_step: float | None = 0.5
    max_num_steps: int = 500
    max_nfe: int = 3000
    t1: float = 1.0

    def __post_init__(self) -> None:
        check_arg(self.method in METHODS, "method", self.method, f"one of {', '.join(METHODS)}")
        check_arg(_is_number(self.rtol) and self.rtol >= 0, "rtol", self.rtol, "a number >= 0")
        check_arg(_is_number(self.atol) and self.atol > 0, "atol", self.atol, "a number > 0")
        check_arg(isinstance(self.adjoint, bool), "adjoint", self.adjoint, "true or false")
        check_arg(isinstance(self.adjoint_seminorm, bool), "adjoint_seminorm", self.adjoint_seminorm,
                  "true or false")
        check_arg(_is_number(self.t1) and self.t1 > 0, "t1", self.t1, "a number > 0")
        check_arg(_is_int(self.max_num_steps) and self.max_num_steps > 0, "max_num_steps",
                  self.max_num_steps, "an int > 0")
        check_arg(_is_int(self.max_nfe) and self.max_nfe > 0, "max_nfe", self.max_nfe, "an int > 0")
        check_arg(self.first_step is None or (_is_number(self.first_step) and self.first_step > 0),
                  "first_step", self.first_step, "null or a number > 0")
        check_arg(self.steps is None or (_is_int(self.steps) and self.steps >= 1), "steps", self.steps,
                  "null or an int >= 1")
        if self.method in FIXED_STEP_METHODS and self.steps is not None:
            check_arg(self.step_size is None, "step_size", self.step_size,
                      f"null when steps is given ({self.steps}): a fixed-step method takes one of the two")
            check_arg(self.steps <= self.max_num_steps, "steps", self.steps,
                      f"at most max_num_steps={self.max_num_steps}")
        elif self.method in FIXED_STEP_METHODS:
            check_arg(self.step_size is not None, "step_size", self.step_size,
                      f"a number in (0, t1] for the fixed-step method {self.method!r} (or give steps)")
            check_arg(_is_number(self.step_size) and 0 < self.step_size <= self.t1, "step_size",
                      self.step_size, f"a number in (0, t1={self.t1}]")
            steps = math.ceil(self.t1 / self.step_size - 1e-9)
            check_arg(steps <= self.max_num_steps, "step_size", self.step_size,
                      f"at most max_num_steps={self.max_num_steps} steps over t1={self.t1} ({steps} needed)")
        else:
            check_arg(self.step_size is None, "step_size", self.step_size,
                      f"null for the adaptive method {self.method!r} (only {', '.join(FIXED_STEP_METHODS)} "
                      "take a step_size)")
            check_arg(self.steps is None, "steps", self.steps,
                      f"null for the adaptive method {self.method!r} (only {', '.join(FIXED_STEP_METHODS)} "
                      "take steps)")

    @property
    def fixed_step(self) -> bool:
        """True for euler, midpoint and rk4."""
        return self.method in FIXED_STEP_METHODS

    def options(self) -> dict[str, object]:
        """torchdiffeq ``options`` for the forward solve."""
        if self.fixed_step:
            if self.steps is not None:
                return {"grid_constructor": UniformGrid(self.steps)}
            return {"step_size": self.step_size}
        opts: dict[str, object] = {"max_num_steps": self.max_num_steps}
        if self.first_step is not None:
            opts["first_step"] = self.first_step
        return opts


class UniformGrid:
    """torchdiffeq's ``grid_constructor`` for ``steps`` equal steps over [t[0], t[-1]] (``SolverConfig.steps``)."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def __call__(self, func: object, y0: Tensor, t: Tensor) -> Tensor:
        return torch.linspace(float(t[0]), float(t[-1]), self.steps + 1, dtype=t.dtype, device=t.device)


class _CountingFunc(nn.Module):
    """fθ with a call counter per pass, the NFE cap and the adjoint step callback."""

    def __init__(self, func: nn.Module, config: SolverConfig) -> None:
        super().__init__()
        self.func = func
        self.config = config
        self.phase = "forward"
        self.nfe = {"forward": 0, "backward": 0}
        self.totals = {"forward": 0, "backward": 0}
        self.backward_steps = 0
        self.backward_step_cap = config.max_num_steps

    def begin_forward(self, intervals: int) -> None:
        self.phase = "forward"
        self.nfe["forward"] = self.nfe["backward"] = 0
        self.backward_steps = 0
        self.backward_step_cap = self.config.max_num_steps * intervals

    def error(self, what: str) -> SolverError:
        c = self.config
        return SolverError(
            f"{c.method} solve ran away in the {self.phase} pass: {what} after {self.nfe[self.phase]} "
            f"evaluations (atol={c.atol:g}, rtol={c.rtol:g}, max_nfe={c.max_nfe}, "
            f"max_num_steps={c.max_num_steps}); raise atol or the caps, or lower the learning rate"
        )

    def forward(self, t: Tensor, y: State) -> State:
        phase = self.phase
        if self.nfe[phase] >= self.config.max_nfe:
            raise self.error("max_nfe exceeded")
        self.nfe[phase] += 1
        self.totals[phase] += 1
        return self.func(t, y)

    def _backward_step(self, t0: Tensor, dt: Tensor) -> None:
        """Count one backward step attempt; the step cap and dt underflow as ``SolverError``."""
        self.backward_steps += 1
        if self.backward_steps > self.backward_step_cap:
            raise self.error(f"max_num_steps exceeded ({self.backward_steps} step attempts)")
        if not (t0 - dt < t0):
            raise self.error(f"underflow in dt {float(dt):.3g} at t={float(t0):.6g}")

    def _check_finite(self, t0: Tensor, parts: tuple[Tensor, ...]) -> None:
        if not all(_dopri5.all_finite(p) for p in parts):
            raise self.error(f"non-finite values in the state or its adjoint at t={float(t0):.6g}")

    def count_backward_step(self, t0: Tensor, ya: Tensor, dt: Tensor) -> None:
        """Called by ``nodeseg.adjoint`` before each step of the backward solve: the step cap, dt, and for
        fixed-step methods (adaptive ones assert it themselves) a finite state and adjoint."""
        if self.config.fixed_step:
            self._check_finite(t0, (ya,))
        if not bool(dt > 0):  # the error ratio was NaN: the step size collapses to min_step = 0
            raise self.error(f"non-finite values in the derivative of the state or its adjoint at t={float(t0):.6g}")
        self._backward_step(t0, dt)

    def runaway(self, err: AssertionError) -> Exception:
        """A torchdiffeq runaway assertion as ``SolverError``; any other assertion unchanged."""
        msg = str(err)
        return self.error(msg.split(":")[0]) if msg.startswith(_RUNAWAY_ASSERTIONS) else err

    def callback_step_adjoint(self, t0: Tensor, y0: object, dt: Tensor) -> None:
        """Called by torchdiffeq's own adjoint before each step (time runs backwards there)."""
        self._backward_step(t0, dt)
        # (t, y, adj_y, *adj_params): check y, adj_y
        self._check_finite(t0, tuple(y0[1:3]) if isinstance(y0, tuple) else (y0,))  # type: ignore[arg-type]


_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def is_channels_last(y: State) -> bool:
    """Every part a 4-D tensor in channels-last memory (5-D: ``channels_last_3d``), all of one rank, and not
    all of them NCHW-contiguous too (a tensor with one channel or one pixel is both)."""
    parts = y if isinstance(y, tuple) else (y,)
    fmt = _CHANNELS_LAST.get(parts[0].dim()) if parts else None
    return fmt is not None and all(
        p.dim() == parts[0].dim() and p.is_contiguous(memory_format=fmt) for p in parts) and not all(
        p.is_contiguous() for p in parts)


def _rows(y: State) -> State:
    """(N, C, *S) channels-last → its memory as a contiguous (N, *S, C) view (each part of a tuple); S is
    (H, W) or (D, H, W)."""
    def rows(p: Tensor) -> Tensor:
        return p.permute(0, *range(2, p.dim()), 1)

    return tuple(rows(p) for p in y) if isinstance(y, tuple) else rows(y)


def _unrows(y: State, spatial_dims: int = 2) -> State:
    """The inverse of :func:`_rows` for (…, N, *S, C) tensors with ``spatial_dims`` axes in S: (…, N, C, *S)
    channels-last views."""
    def back(p: Tensor) -> Tensor:
        lead = p.dim() - spatial_dims - 2
        return p.permute(*range(lead), lead, p.dim() - 1, *range(lead + 1, p.dim() - 1))

    return tuple(back(p) for p in y) if isinstance(y, tuple) else back(y)


class _RowsFunc(nn.Module):
    """fθ for a solver that holds a channels-last state as (N, H, W, C) rows ((N, D, H, W, C) in 3-D).

    torchdiffeq flattens a state with ``reshape(-1)``, which copies a channels-last tensor into NCHW
    order; fθ's channels-last convolutions then convert every evaluation's input back and its output
    is copied into NCHW-ordered stage storage: two transposing copies of the state per evaluation
    (0.3 ms each for 16×9×64² floats on 2 cores, where a plain copy takes 0.03). Presented as rows,
    the state flattens as a view and fθ sees channels-last views: the same arithmetic on the same
    values (the error norms sum them in another order: NFE and results agree to rounding).
    """

    def __init__(self, func: nn.Module, spatial_dims: int = 2) -> None:
        super().__init__()
        self.func = func
        self.spatial_dims = spatial_dims

    def forward(self, t: Tensor, y: State) -> State:
        return _rows(self.func(t, _unrows(y, self.spatial_dims)))


class ODESolver(nn.Module):
    """Integrates ``dy/dt = func(t, y)`` with torchdiffeq per ``config``; counts and caps evaluations.

    ``forward(y0, t)`` takes a tensor or a tuple of tensors and returns the same structure stacked over
    ``t`` (default ``[0, config.t1]``). Back-propagates with the adjoint (``nodeseg.adjoint``; gradients to
    func's parameters, seminorm when ``adjoint_seminorm``) when ``config.adjoint`` and grad mode is on, and
    through torchdiffeq's ``odeint`` (direct backprop) otherwise.
    """

    def __init__(self, func: nn.Module, config: SolverConfig | None = None,
                 inference: SolverConfig | None = None) -> None:
        super().__init__()
        check_arg(isinstance(func, nn.Module), "func", func, "an nn.Module with forward(t, y)")
        config = SolverConfig() if config is None else config
        check_arg(isinstance(config, SolverConfig), "config", config, "a SolverConfig")
        check_arg(inference is None or isinstance(inference, SolverConfig), "inference", inference,
                  "null or a SolverConfig")
        self.train_config = config
        self.inference_config = inference
        self.counter = _CountingFunc(func, config)
        self.regularise: tuple[str, ...] = ()  # names from REGULARISERS, integrated in training solves
        self.end_time_jitter = 0.0
        self.regularisers: dict[str, Tensor] = {}  # per-sample integrals of the last regularised solve

    @property
    def config(self) -> SolverConfig:
        """The settings the next solve uses: ``inference`` in eval mode when given, else the training ones."""
        if self.training or self.inference_config is None:
            return self.train_config
        return self.inference_config

    def set_regularisation(self, names: tuple[str, ...] = (), end_time_jitter: float = 0.0) -> None:
        """Integrate the regularisers ``names`` (see ``nodeseg.regularisers``) along every solve made in
        training mode with grad enabled, their per-sample integrals left in ``regularisers``; and draw each
        such solve's end time uniformly from [t1 − jitter, t1 + jitter] (STEER, Ghosh et al. 2020; default
        times only). ``()`` and 0 turn both off: the solve is then exactly the unregularised one."""
        unknown = [n for n in names if n not in REGULARISERS]
        check_arg(not unknown, "names", unknown[0] if unknown else None, f"one of {', '.join(REGULARISERS)}")
        t1 = self.train_config.t1
        check_arg(_is_number(end_time_jitter) and 0 <= end_time_jitter < t1, "end_time_jitter", end_time_jitter,
                  f"a number in [0, t1={t1:g})")
        self.regularise = tuple(n for n in REGULARISERS if n in names)
        self.end_time_jitter = float(end_time_jitter)
        self.regularisers = {}

    @property
    def func(self) -> nn.Module:
        """The wrapped ODE function fθ."""
        return self.counter.func

    @property
    def nfe_forward(self) -> int:
        """fθ evaluations in the last forward solve."""
        return self.counter.nfe["forward"]

    @property
    def nfe_backward(self) -> int:
        """fθ evaluations while back-propagating the last forward solve (0 with direct backprop)."""
        return self.counter.nfe["backward"]

    @property
    def nfe_forward_total(self) -> int:
        return self.counter.totals["forward"]

    @property
    def nfe_backward_total(self) -> int:
        return self.counter.totals["backward"]

    def reset_nfe(self) -> None:
        """Zero the per-solve counters and the totals."""
        self.counter.nfe = {"forward": 0, "backward": 0}
        self.counter.totals = {"forward": 0, "backward": 0}

    def default_times(self, like: Tensor) -> Tensor:
        """``[0, t1]`` in the dtype and on the device of ``like``."""
        return torch.tensor([0.0, self.config.t1], dtype=like.dtype, device=like.device)

    def forward(self, y0: State, t: Tensor | None = None) -> State:
        check_arg(isinstance(y0, Tensor) or (isinstance(y0, tuple) and len(y0) > 0
                                              and all(isinstance(y, Tensor) for y in y0)),
                  "y0", type(y0).__name__, "a tensor or a non-empty tuple of tensors")
        first = y0 if isinstance(y0, Tensor) else y0[0]
        c = self.config
        self.counter.config = c  # the counter enforces the caps of the solver in use
        training = self.training and torch.is_grad_enabled()
        if t is None:
            t = self.default_times(first)
            if training and self.end_time_jitter > 0:  # STEER: a random end time per training solve
                t = t.clone()
                t[1] += (2 * float(torch.rand(())) - 1) * self.end_time_jitter
        else:
            check_arg(isinstance(t, Tensor) and t.ndim == 1 and t.numel() >= 2 and bool((t[1:] > t[:-1]).all()),
                      "t", t, "a 1-D tensor of at least 2 strictly increasing times")
            t = t.to(dtype=first.dtype, device=first.device)
        names = self.regularise if training else ()
        if not names:
            return self._solve(self.counter, y0, t, c, parts=None)
        parts = tuple(y0) if isinstance(y0, tuple) else (y0,)
        probe = tuple(rademacher_like(p) for p in parts) if "jacobian_frobenius" in names else None
        func = RegularisedFunc(self.counter, len(parts), isinstance(y0, tuple), names, probe)
        extra = tuple(first.new_zeros(first.shape[0], 1, 1, 1) for _ in names)
        out = self._solve(func, (*parts, *extra), t, c, parts=len(parts))
        self.regularisers = {n: r[-1].reshape(-1) for n, r in zip(names, out[len(parts):], strict=True)}
        return tuple(out[: len(parts)]) if isinstance(y0, tuple) else out[0]

    def _solve(self, func0: nn.Module, y0: State, t: Tensor, c: SolverConfig, parts: int | None) -> State:
        """One solve of ``func0`` (the counter, or a :class:`RegularisedFunc` around it whose state's first
        ``parts`` parts are y: only those are in the error norms)."""
        method = _TORCHDIFFEQ_METHOD.get(c.method, c.method)
        options = c.options()
        if c.method in _LAND_ON_OUTPUT_TIMES:  # their dense output is poor: step onto the output times
            options["step_t"] = t[1:]
        if parts is not None and not c.fixed_step:
            options["norm"] = leading_norm(parts)
        self.counter.begin_forward(len(t) - 1)
        rows = is_channels_last(y0)
        spatial = (y0[0] if isinstance(y0, tuple) else y0).dim() - 2
        func, y = (_RowsFunc(func0, spatial), _rows(y0)) if rows else (func0, y0)
        try:
            if c.adjoint and torch.is_grad_enabled():
                adjoint_options = dict(options)
                adjoint_options.pop("norm", None)
                if c.adjoint_seminorm:
                    adjoint_options["norm"] = "seminorm"
                if not c.fixed_step:  # the step callback caps the adjoint pass first (see module docstring)
                    adjoint_options["max_num_steps"] = c.max_num_steps * (len(t) - 1) + 1
                if not (ADJOINT["impl"] == "nodeseg" and method in _adjoint.SUPPORTED and not t.requires_grad):
                    if parts is not None:
                        raise ValueError("the regularisers need nodeseg's adjoint (ADJOINT['impl'] = 'nodeseg' "
                                         f"and times that do not require grad), got impl {ADJOINT['impl']!r}")
                    # torchdiffeq's adjoint reads its step callback off the counter itself
                    return odeint_adjoint(
                        self.counter, y0, t, rtol=c.rtol, atol=c.atol, method=method, options=options,
                        adjoint_options=adjoint_options, adjoint_params=tuple(self.counter.parameters()),
                    )
                out = _adjoint.lean_odeint_adjoint(
                    func, y, t, rtol=c.rtol, atol=c.atol, method=method, options=options,
                    adjoint_options=adjoint_options, params=tuple(self.counter.parameters()),
                    seminorm=c.adjoint_seminorm, step_callback=self.counter.count_backward_step,
                    on_assertion=self.counter.runaway, normed_parts=parts,
                )
            else:
                out = odeint(func, y, t, rtol=c.rtol, atol=c.atol, method=method, options=options)
            return _unrows(out, spatial) if rows else out
        except AssertionError as err:
            exc = self.counter.runaway(err)
            if exc is err:
                raise
            raise exc from None
        finally:
            self.counter.phase = "backward"


def ode_solvers(module: nn.Module) -> list[ODESolver]:
    """Every ``ODESolver`` inside ``module`` (in registration order)."""
    return [m for m in module.modules() if isinstance(m, ODESolver)]


def set_regularisation(module: nn.Module, names: tuple[str, ...] = (), end_time_jitter: float = 0.0) -> None:
    """:meth:`ODESolver.set_regularisation` on every solver in ``module``; a module without one refuses
    anything but off."""
    solvers = ode_solvers(module)
    check_arg(solvers or (not names and end_time_jitter == 0), "module", type(module).__name__,
              "a Neural-ODE model (it has no ODE solver to regularise)")
    for s in solvers:
        s.set_regularisation(names, end_time_jitter)


def regulariser_values(module: nn.Module) -> dict[str, Tensor]:
    """Each regulariser of the last training solves, averaged over the batch and summed over the solvers
    of ``module`` (a differentiable scalar per name; empty when none is on)."""
    out: dict[str, Tensor] = {}
    for s in ode_solvers(module):
        for name, value in s.regularisers.items():
            out[name] = out[name] + value.mean() if name in out else value.mean()
    return out


def nfe_stats(module: nn.Module) -> dict[str, int]:
    """NFE counters summed over every ``ODESolver`` in ``module`` (0 for a model without one)."""
    solvers = ode_solvers(module)
    return {
        "nfe_forward": sum(s.nfe_forward for s in solvers),
        "nfe_backward": sum(s.nfe_backward for s in solvers),
        "nfe_forward_total": sum(s.nfe_forward_total for s in solvers),
        "nfe_backward_total": sum(s.nfe_backward_total for s in solvers),
    }
