"""nodeseg.adjoint against torchdiffeq's odeint_adjoint and against an accurate direct-backprop reference."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from nodeseg import solve
from nodeseg.adjoint import lean_odeint_adjoint
from nodeseg.dopri5 import METHOD as DOPRI5
from nodeseg.models.odefunc import ConvODEFunc, TupleStateFunc
from nodeseg.solve import ODESolver, SolverConfig

F64 = torch.float64


def _flow() -> ConvODEFunc:
    """A time-conditioned conv fθ (float64, 5 channels) with a non-trivial flow: last layer σ 0.3, seed 0."""
    torch.manual_seed(0)
    f = ConvODEFunc(5, 8, 3, norm_groups=4).to(F64)
    for p in f.out.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return f


def _loss(ys: Tensor) -> Tensor:
    """A loss with a gradient at every output time after the first."""
    return (ys[1:] ** 2).sum() + (ys[-1] * torch.sin(ys[-1])).sum()


def _flat_grad(x: Tensor, f: torch.nn.Module) -> Tensor:
    """∂L/∂x and ∂L/∂θ, flattened into one vector."""
    return torch.cat([x.grad.reshape(-1)] + [p.grad.reshape(-1) for p in f.parameters()])


def _gradients(impl: str, *, method: str = "dopri5", atol: float = 1e-6, adjoint: bool = True,
               tuple_state: bool = True, n_times: int = 2, monkeypatch: pytest.MonkeyPatch
               ) -> tuple[Tensor, int, int]:
    """∂L/∂(y0, θ) of a time-conditioned conv fθ (float64, 2×5×12×12, non-trivial flow); (grad, NFE fwd, bwd)."""
    monkeypatch.setitem(solve.ADJOINT, "impl", impl)
    f = _flow()
    fixed = {"step_size": 0.25, "first_step": None} if method in solve.FIXED_STEP_METHODS else {}
    cfg = SolverConfig(method=method, atol=atol, adjoint=adjoint, max_num_steps=5000, max_nfe=10**6, **fixed)
    solver = ODESolver(TupleStateFunc(f, (1, 4)) if tuple_state else f, cfg)
    x = torch.randn(2, 5, 12, 12, dtype=F64, requires_grad=True)
    t = torch.linspace(0, 1, n_times, dtype=F64)
    out = solver((x[:, :1], x[:, 1:]), t) if tuple_state else solver(x, t)
    _loss(torch.cat(out, 2) if tuple_state else out).backward()
    return _flat_grad(x, f), solver.nfe_forward, solver.nfe_backward


@pytest.mark.parametrize("method", ["euler", "midpoint", "rk4"])
@pytest.mark.parametrize("tuple_state", [True, False])
def test_fixed_step_gradients_equal_torchdiffeq_bit_for_bit(method: str, tuple_state: bool,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    ours, *nfe_ours = _gradients("nodeseg", method=method, tuple_state=tuple_state, n_times=3,
                                 monkeypatch=monkeypatch)
    theirs, *nfe_theirs = _gradients("torchdiffeq", method=method, tuple_state=tuple_state, n_times=3,
                                     monkeypatch=monkeypatch)
    assert nfe_ours == nfe_theirs
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("method", ["dopri5", "bosh3"])
@pytest.mark.parametrize("atol", [1e-4, 1e-6])
def test_adaptive_gradients_as_accurate_as_torchdiffeq_with_fewer_backward_evaluations(
        method: str, atol: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """Against direct backprop at atol 1e-12: the same error as torchdiffeq's adjoint (within 10 %), and
    fewer backward evaluations, because the unused time adjoint no longer drives the step size."""
    ref, _, _ = _gradients("nodeseg", method="dopri5", atol=1e-12, adjoint=False, n_times=3,
                           monkeypatch=monkeypatch)
    ours, nf_ours, nb_ours = _gradients("nodeseg", method=method, atol=atol, n_times=3, monkeypatch=monkeypatch)
    theirs, nf_theirs, nb_theirs = _gradients("torchdiffeq", method=method, atol=atol, n_times=3,
                                              monkeypatch=monkeypatch)
    err_ours = float((ours - ref).norm() / ref.norm())
    err_theirs = float((theirs - ref).norm() / ref.norm())
    assert nf_ours == nf_theirs  # the same forward solve
    assert err_ours <= 1.1 * err_theirs + 1e-12, (err_ours, err_theirs)
    assert err_ours < 50 * atol
    assert nb_ours < nb_theirs, (nb_ours, nb_theirs)


def test_tensor_and_tuple_state_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same fθ over a tensor state and a tuple split of it: equal gradients to solver tolerance."""
    a, _, _ = _gradients("nodeseg", tuple_state=True, atol=1e-9, monkeypatch=monkeypatch)
    b, _, _ = _gradients("nodeseg", tuple_state=False, atol=1e-9, monkeypatch=monkeypatch)
    assert float((a - b).norm() / b.norm()) < 1e-6


def test_linear_ode_matches_the_exact_gradient() -> None:
    """dy/dt = k·y: y(1) = y0·e^k, so ∂y(1)/∂y0 = e^k and ∂y(1)/∂k = y0·e^k (rk4 on a fine grid)."""

    class Linear(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.k = torch.nn.Parameter(torch.tensor(-0.7, dtype=F64))

        def forward(self, t: Tensor, y: Tensor) -> Tensor:
            return self.k * y

    f = Linear()
    y0 = torch.tensor([1.5, -2.0], dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    y = lean_odeint_adjoint(f, y0, t, rtol=0.0, atol=1e-9, method="rk4", options={"step_size": 1e-3},
                            adjoint_options={"step_size": 1e-3}, params=tuple(f.parameters()))
    y[-1].sum().backward()
    e = torch.exp(f.k.detach())
    torch.testing.assert_close(y0.grad, torch.full_like(y0, float(e)), rtol=1e-10, atol=0)
    torch.testing.assert_close(f.k.grad, (y0.detach() * e).sum(), rtol=1e-10, atol=0)


def test_time_requiring_grad_falls_back_to_torchdiffeq() -> None:
    f = ConvODEFunc(2, 4, 2, norm_groups=2).to(F64)
    solver = ODESolver(f, SolverConfig(method="rk4", step_size=0.5, first_step=None))
    t = torch.tensor([0.0, 1.0], dtype=F64, requires_grad=True)
    y = solver(torch.randn(1, 2, 4, 4, dtype=F64), t)
    y[-1].sum().backward()
    assert t.grad is not None  # torchdiffeq's adjoint differentiates with respect to the times


def test_unsupported_method_is_refused_with_the_choices() -> None:
    f = ConvODEFunc(2, 4, 2, norm_groups=2)
    with pytest.raises(ValueError, match=r"method 'heun3' is not supported .* expected one of"):
        lean_odeint_adjoint(f, torch.zeros(1, 2, 4, 4), torch.tensor([0.0, 1.0]), rtol=0.0, atol=1e-3,
                            method="heun3", options={}, adjoint_options={}, params=())


class _Counting(torch.nn.Module):
    """fθ with a count of its evaluations."""

    def __init__(self, func: torch.nn.Module) -> None:
        super().__init__()
        self.func, self.calls = func, 0

    def forward(self, t: Tensor, y: Tensor) -> Tensor:
        self.calls += 1
        return self.func(t, y)


def _lean_gradients(quadrature: bool, seminorm: bool = True, weight_vjps: list[int] | None = None
                    ) -> tuple[Tensor, int]:
    """∂L/∂(y0, θ) through lean_odeint_adjoint with dopri5 (float64, three output times); backward NFE.
    ``weight_vjps`` (a one-element list) counts the evaluations that computed fθ's weight gradients."""
    f = _flow()
    if weight_vjps is not None:
        f.out.weight.register_hook(lambda g: weight_vjps.__setitem__(0, weight_vjps[0] + 1))
    func = _Counting(f)
    y0 = torch.randn(2, 5, 12, 12, dtype=F64, requires_grad=True)
    t = torch.linspace(0, 1, 3, dtype=F64)
    # step_t (any value: it is replaced by each interval's end) lands the in-state path on the output
    # times too, so both take the same steps
    ys = lean_odeint_adjoint(func, y0, t, rtol=0.0, atol=1e-6, method=DOPRI5, options={},
                             adjoint_options={"step_t": t[:1]}, params=tuple(f.parameters()),
                             seminorm=seminorm, quadrature=quadrature)
    n_forward = func.calls
    _loss(ys).backward()
    return _flat_grad(y0, f), func.calls - n_forward


def test_parameter_quadrature_equals_carrying_the_parameters_in_the_state() -> None:
    """Under the seminorm the parameter adjoint summed beside the state (accepted steps, solution weights)
    is the sum the Runge–Kutta state computes for it: the same gradients to float64 rounding, the same steps."""
    quad, nb_quad = _lean_gradients(quadrature=True)
    state, nb_state = _lean_gradients(quadrature=False)
    assert nb_quad == nb_state
    n_y = 2 * 5 * 12 * 12
    torch.testing.assert_close(quad[:n_y], state[:n_y], rtol=1e-12, atol=0)  # ∂L/∂y0: the same solve
    torch.testing.assert_close(quad[n_y:], state[n_y:], rtol=1e-11, atol=1e-14)  # ∂L/∂θ: a different sum order
    assert float(quad[n_y:].abs().max()) > 1e-3  # the parameters do get a gradient
    # the full norm keeps g in the error control, so the parameters stay in the state there
    full, nb_full = _lean_gradients(quadrature=True, seminorm=False)
    assert nb_full > nb_state


def test_the_quadrature_computes_weight_gradients_only_where_they_are_summed() -> None:
    """dopri5's second stage has solution weight 0, the initial-step probe's integrand is not summed, and a
    step that ends a backward interval leaves its last stage's (first-same-as-last) integrand unused: those
    evaluations take the VJP with respect to the state alone. Carrying g in the state computes it everywhere.
    The gradients are the same (the test above); here, how many weight gradients each path computes."""
    counted_quad, counted_state = [0], [0]
    _, nb_quad = _lean_gradients(quadrature=True, weight_vjps=counted_quad)
    _, nb_state = _lean_gradients(quadrature=False, weight_vjps=counted_state)
    counted_quad[0] -= 1  # the hook also sees the final gradient handed to the leaf
    counted_state[0] -= 1
    assert counted_state[0] == nb_state  # in the state: every evaluation
    # 2 intervals, each: f0, the initial-step probe, then 6 evaluations per attempted step
    steps, rest = divmod(nb_quad - 2 * 2, 6)
    assert rest == 0 and steps >= 4
    # summed: each interval's f0, stages 3–6 of every step, and stage 7 except where a step lands on an
    # interval's end (at least once per interval)
    assert 2 + 4 * steps <= counted_quad[0] <= 2 + 5 * steps - 2
