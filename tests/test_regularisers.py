"""Regularisers of the dynamics (nodeseg.regularisers): closed forms on a linear fθ, zero for f ≡ 0, their
gradients (adjoint = direct backprop in float64), and a solve with them off exactly as before."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.integrate
import scipy.linalg
import torch
from torch import Tensor, nn

from nodeseg import solve
from nodeseg.models.odefunc import ConvODEFunc, TupleStateFunc
from nodeseg.regularisers import REGULARISERS, RegularisedFunc, rademacher_like
from nodeseg.solve import ODESolver, SolverConfig, regulariser_values, set_regularisation

F64 = torch.float64
BOTH = ("kinetic_energy", "jacobian_frobenius")
A = np.array([[-0.7, 0.4, 0.1], [0.3, -0.2, 0.9], [-0.5, 0.6, 0.2]])


class Linear(nn.Module):
    """f(t, y) = A y on a (B, n, 1, 1) state."""

    def __init__(self, a: np.ndarray) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a, dtype=F64))

    def forward(self, t: Tensor, y: Tensor) -> Tensor:
        return torch.einsum("ij,bjhw->bihw", self.a, y)


def _solver(func: nn.Module, names: tuple[str, ...] = BOTH, **cfg: object) -> ODESolver:
    settings = {"method": "dopri5", "atol": 1e-11, "max_num_steps": 10**4, "max_nfe": 10**6, **cfg}
    s = ODESolver(func, SolverConfig(**settings))  # type: ignore[arg-type]
    s.set_regularisation(names)
    return s.train()


def _kinetic_reference(y0: np.ndarray) -> float:
    """∫₀¹ ‖A e^{At} y0‖² / n dt by scipy's quadrature (float64)."""
    def integrand(t: float) -> float:
        return float(np.sum((A @ scipy.linalg.expm(A * t) @ y0) ** 2)) / len(y0)

    value, _ = scipy.integrate.quad(integrand, 0.0, 1.0, epsabs=1e-13, epsrel=1e-12)
    return value


@pytest.mark.parametrize("adjoint", [True, False])
def test_kinetic_energy_matches_the_closed_form_of_a_linear_flow(adjoint: bool) -> None:
    torch.manual_seed(0)
    y0 = torch.randn(4, 3, 1, 1, dtype=F64)
    s = _solver(Linear(A), ("kinetic_energy",), adjoint=adjoint)
    out = s(y0)
    expected = [_kinetic_reference(y0[b, :, 0, 0].numpy()) for b in range(4)]
    np.testing.assert_allclose(s.regularisers["kinetic_energy"].detach().numpy(), expected, rtol=1e-8)
    np.testing.assert_allclose(out[-1][:, :, 0, 0].detach().numpy(),
                               (scipy.linalg.expm(A) @ y0[:, :, 0, 0].numpy().T).T, rtol=1e-8, atol=1e-10)


def test_jacobian_frobenius_is_exact_for_each_probe_and_in_expectation(monkeypatch: pytest.MonkeyPatch) -> None:
    """A linear fθ has ∂f/∂y = A at every t: for probe ε the estimate is ‖εᵀA‖² / n over [0, 1]; the average
    over all 2ⁿ sign vectors (one per sample here) is ‖A‖_F² / n exactly."""
    n = A.shape[0]
    probes = torch.tensor(list(itertools.product((-1.0, 1.0), repeat=n)), dtype=F64).view(2 ** n, n, 1, 1)
    monkeypatch.setattr(solve, "rademacher_like", lambda x: probes.clone())
    torch.manual_seed(1)
    s = _solver(Linear(A), ("jacobian_frobenius",), method="rk4", steps=3)
    s(torch.randn(2 ** n, n, 1, 1, dtype=F64))
    value = s.regularisers["jacobian_frobenius"].detach().numpy()
    per_probe = [float(np.sum((e @ A) ** 2)) / n for e in probes[:, :, 0, 0].numpy()]
    np.testing.assert_allclose(value, per_probe, rtol=1e-13)
    assert value.mean() == pytest.approx(float(np.sum(A ** 2)) / n, rel=1e-13)


def test_rademacher_probe_is_plus_or_minus_one() -> None:
    torch.manual_seed(0)
    e = rademacher_like(torch.empty(64, 8, dtype=F64))
    assert set(e.unique().tolist()) == {-1.0, 1.0}
    assert abs(float(e.mean())) < 0.1


@pytest.mark.parametrize("method", ["dopri5", "euler"])
def test_both_regularisers_are_zero_for_a_zero_flow(method: str) -> None:
    """fθ with its zero-initialised last layer is f ≡ 0: both integrals are exactly 0 (gradients flow)."""
    torch.manual_seed(0)
    f = ConvODEFunc(5, 8, 3, norm_groups=4).to(F64)
    extra = {"steps": 2, "first_step": None} if method == "euler" else {"atol": 1e-6}
    s = _solver(TupleStateFunc(f, (1, 4)), method=method, **extra)
    x = torch.randn(2, 5, 8, 8, dtype=F64)
    s((x[:, :1], x[:, 1:]))
    for name in REGULARISERS:
        assert torch.equal(s.regularisers[name], torch.zeros(2, dtype=F64)), name
    sum(regulariser_values(s).values()).backward()
    assert f.out.weight.grad is not None


def _flow() -> ConvODEFunc:
    torch.manual_seed(0)
    f = ConvODEFunc(5, 8, 3, norm_groups=4).to(F64)
    for p in f.out.parameters():
        nn.init.normal_(p, std=0.3)
    return f


def _regularised_gradients(adjoint: bool, method: str = "dopri5") -> tuple[Tensor, Tensor, Tensor]:
    """∂(data loss + K + J)/∂(y0, θ) of a conv fθ (float64, tuple state); and K, J."""
    f = _flow()
    extra = {"atol": 1e-10} if method == "dopri5" else {"steps": 16, "first_step": None}
    s = _solver(TupleStateFunc(f, (1, 4)), method=method, adjoint=adjoint, **extra)
    torch.manual_seed(3)
    x = torch.randn(2, 5, 8, 8, dtype=F64, requires_grad=True)
    torch.manual_seed(4)  # the probe
    phi, h = s((x[:, :1], x[:, 1:]))
    reg = regulariser_values(s)
    loss = (phi[-1] ** 2).mean() + (h[-1] ** 2).mean() + 0.5 * reg["kinetic_energy"] + 2.0 * reg["jacobian_frobenius"]
    loss.backward()
    grad = torch.cat([x.grad.reshape(-1)] + [p.grad.reshape(-1) for p in f.parameters()])
    return grad, reg["kinetic_energy"].detach(), reg["jacobian_frobenius"].detach()


@pytest.mark.parametrize("method", ["dopri5", "rk4"])
def test_regulariser_gradients_adjoint_equal_direct_backprop(method: str) -> None:
    direct, k_direct, j_direct = _regularised_gradients(adjoint=False, method=method)
    adj, k_adj, j_adj = _regularised_gradients(adjoint=True, method=method)
    assert float(k_direct) > 0 and float(j_direct) > 0
    torch.testing.assert_close(k_adj, k_direct, rtol=1e-12, atol=0)
    torch.testing.assert_close(j_adj, j_direct, rtol=1e-12, atol=0)
    # rk4 in 16 steps: the adjoint differentiates the ODE, not the steps (their difference is O(h⁴))
    tol = 1e-7 if method == "dopri5" else 1e-4
    assert float((adj - direct).norm() / direct.norm()) < tol


def test_regulariser_gradient_is_the_gradient_of_the_integral() -> None:
    """The gradient of K alone (the adjoint) against central finite differences of K in one weight."""
    f = _flow()
    s = _solver(TupleStateFunc(f, (1, 4)), ("kinetic_energy",), adjoint=True, atol=1e-12)
    torch.manual_seed(3)
    x = torch.randn(2, 5, 8, 8, dtype=F64)

    def kinetic() -> Tensor:
        s((x[:, :1], x[:, 1:]))
        return regulariser_values(s)["kinetic_energy"]

    w = f.out.weight
    kinetic().backward()
    g = float(w.grad[0, 0, 1, 1])
    eps = 1e-5
    with torch.no_grad():
        w[0, 0, 1, 1] += eps
    with torch.enable_grad():
        up = float(kinetic().detach())
    with torch.no_grad():
        w[0, 0, 1, 1] -= 2 * eps
    with torch.enable_grad():
        down = float(kinetic().detach())
    assert g == pytest.approx((up - down) / (2 * eps), rel=1e-5)


@pytest.mark.parametrize("adjoint", [True, False])
def test_the_riding_integrals_leave_the_solve_of_y_unchanged(adjoint: bool) -> None:
    """Out of the error norm, the extra parts leave y's steps as they were: the same NFE, the same φ(1)."""
    results = []
    for names in ((), BOTH):
        f = _flow()
        s = _solver(TupleStateFunc(f, (1, 4)), names, adjoint=adjoint, atol=1e-5, max_num_steps=500)
        torch.manual_seed(3)
        x = torch.randn(2, 5, 8, 8, dtype=F64)
        phi, _ = s((x[:, :1], x[:, 1:]))
        (phi[-1] ** 2).sum().backward()
        results.append((phi[-1].detach(), s.nfe_forward, s.nfe_backward))
    (phi0, nf0, nb0), (phi1, nf1, nb1) = results
    assert (nf0, nb0) == (nf1, nb1)
    torch.testing.assert_close(phi1, phi0, rtol=1e-13, atol=1e-13)


def test_off_is_the_unregularised_solve_bit_for_bit() -> None:
    """Off (the default, or set back to off) draws no probe and gives the same outputs and gradients."""
    outs = []
    for turn_off in (False, True):
        f = _flow()
        s = ODESolver(TupleStateFunc(f, (1, 4)), SolverConfig(atol=1e-4)).train()
        if turn_off:
            s.set_regularisation(BOTH, end_time_jitter=0.3)
            s.set_regularisation((), end_time_jitter=0.0)
        torch.manual_seed(3)
        x = torch.randn(2, 5, 8, 8, dtype=F64, requires_grad=True)
        rng = torch.get_rng_state()
        phi, h = s((x[:, :1], x[:, 1:]))
        ((phi[-1] ** 2).sum() + h[-1].sum()).backward()
        assert torch.equal(torch.get_rng_state(), rng)
        outs.append(torch.cat([phi[-1].reshape(-1), x.grad.reshape(-1), *(p.grad.reshape(-1) for p in f.parameters())]))
        assert s.regularisers == {}
    assert torch.equal(outs[0], outs[1])


def test_regularisers_only_in_training_solves() -> None:
    s = _solver(Linear(A))
    y0 = torch.ones(2, 3, 1, 1, dtype=F64)
    with torch.no_grad():
        s(y0)
    assert s.regularisers == {}
    s.eval()(y0)
    assert s.regularisers == {}


def test_end_time_jitter_draws_the_end_time_in_training_only() -> None:
    """STEER: dy/dt = 1 reaches y(T) = T; in training T lies in [t1 − b, t1 + b] and varies, in eval T = t1."""
    class One(nn.Module):
        def forward(self, t: Tensor, y: Tensor) -> Tensor:
            return torch.ones_like(y)

    s = ODESolver(One(), SolverConfig(method="euler", steps=1, first_step=None))
    s.set_regularisation((), end_time_jitter=0.25)
    y0 = torch.zeros(1, 1, 1, 1, dtype=F64, requires_grad=True)
    torch.manual_seed(0)
    ends = [float(s.train()(y0)[-1]) for _ in range(20)]
    assert all(0.75 <= e <= 1.25 for e in ends) and max(ends) - min(ends) > 0.1
    assert float(s.eval()(y0)[-1]) == 1.0
    with pytest.raises(ValueError, match="end_time_jitter"):
        s.set_regularisation((), end_time_jitter=1.0)


def test_bad_regularisation_is_refused() -> None:
    s = _solver(Linear(A), ())
    with pytest.raises(ValueError, match="names"):
        s.set_regularisation(("taylor",))
    with pytest.raises(ValueError, match="no ODE solver"):
        set_regularisation(nn.Conv2d(1, 1, 1), ("kinetic_energy",))
    set_regularisation(nn.Conv2d(1, 1, 1), ())  # off is fine for any model
    with pytest.raises(ValueError, match="probe"):
        RegularisedFunc(Linear(A), 1, False, ("jacobian_frobenius",))


def test_regularisers_need_nodesegs_adjoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(solve.ADJOINT, "impl", "torchdiffeq")
    s = _solver(Linear(A), adjoint=True)
    with pytest.raises(ValueError, match="nodeseg's adjoint"):
        s(torch.ones(2, 3, 1, 1, dtype=F64))
