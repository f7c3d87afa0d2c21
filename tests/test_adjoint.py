"""nodeseg.adjoint against torchdiffeq's odeint_adjoint and against an accurate direct-backprop reference."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from nodeseg import solve
from nodeseg.adjoint import lean_odeint_adjoint
from nodeseg.models.odefunc import ConvODEFunc, TupleStateFunc
from nodeseg.solve import ODESolver, SolverConfig

F64 = torch.float64


def _gradients(impl: str, *, method: str = "dopri5", atol: float = 1e-6, adjoint: bool = True,
               tuple_state: bool = True, n_times: int = 2, monkeypatch: pytest.MonkeyPatch
               ) -> tuple[Tensor, int, int]:
    """∂L/∂(y0, θ) of a time-conditioned conv fθ (float64, 2×5×12×12, non-trivial flow); (grad, NFE fwd, bwd)."""
    monkeypatch.setitem(solve.ADJOINT, "impl", impl)
    torch.manual_seed(0)
    f = ConvODEFunc(5, 8, 3, norm_groups=4).to(F64)
    for p in f.out.parameters():
        torch.nn.init.normal_(p, std=0.3)
    fixed = {"step_size": 0.25, "first_step": None} if method in solve.FIXED_STEP_METHODS else {}
    cfg = SolverConfig(method=method, atol=atol, adjoint=adjoint, max_num_steps=5000, max_nfe=10**6, **fixed)
    solver = ODESolver(TupleStateFunc(f, (1, 4)) if tuple_state else f, cfg)
    x = torch.randn(2, 5, 12, 12, dtype=F64, requires_grad=True)
    t = torch.linspace(0, 1, n_times, dtype=F64)
    out = solver((x[:, :1], x[:, 1:]), t) if tuple_state else solver(x, t)
    ys = torch.cat(out, 2) if tuple_state else out
    loss = (ys[1:] ** 2).sum() + (ys[-1] * torch.sin(ys[-1])).sum()  # a gradient at every output time
    loss.backward()
    grad = torch.cat([x.grad.reshape(-1)] + [p.grad.reshape(-1) for p in f.parameters()])
    return grad, solver.nfe_forward, solver.nfe_backward


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
