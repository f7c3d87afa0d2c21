"""nodeseg.solve: config validation, accuracy on exact solutions, gradients, NFE counters, runaway caps."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from nodeseg.config import from_mapping, to_mapping
from nodeseg.errors import ConfigError, SolverError
from nodeseg.models.odefunc import ConvODEFunc, TupleStateFunc
from nodeseg.solve import ODESolver, SolverConfig, nfe_stats

F64 = torch.float64


class Linear(nn.Module):
    """dy/dt = a·y (per tuple part: a_i·y_i), with a manual call counter."""

    def __init__(self, *rates: float) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(rates, dtype=F64))
        self.calls = 0

    def forward(self, t: torch.Tensor, y):
        self.calls += 1
        if isinstance(y, tuple):
            return tuple(self.a[i] * yi for i, yi in enumerate(y))
        return self.a[0] * y


class Power(nn.Module):
    """dy/dt = sign·y**3 (finite-time blow-up); with ``backward_only`` zero unless grad mode is on."""

    def __init__(self, sign: float = 1.0, backward_only: bool = False) -> None:
        super().__init__()
        self.k = nn.Parameter(torch.tensor(sign, dtype=F64))
        self.backward_only = backward_only

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.backward_only and not torch.is_grad_enabled():
            return 0 * y
        return self.k * y**3


# ---------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("kwargs", "name", "value"),
    [
        (dict(method="rk45"), "method", "rk45"),
        (dict(method="rk4"), "step_size", None),
        (dict(method="euler", step_size=0.0), "step_size", 0.0),
        (dict(method="rk4", step_size=1e-4), "step_size", 1e-4),  # 10000 steps > max_num_steps
        (dict(step_size=0.1), "step_size", 0.1),  # adaptive method takes no step_size
        (dict(atol=0.0), "atol", 0.0),
        (dict(atol=-1e-3), "atol", -1e-3),
        (dict(rtol=-1.0), "rtol", -1.0),
        (dict(first_step=0.0), "first_step", 0.0),
        (dict(max_nfe=0), "max_nfe", 0),
        (dict(max_num_steps=-5), "max_num_steps", -5),
        (dict(t1=0.0), "t1", 0.0),
        (dict(adjoint="yes"), "adjoint", "yes"),
        (dict(method="rk4", steps=0), "steps", 0),
        (dict(method="rk4", steps=2, step_size=0.5), "step_size", 0.5),  # one of the two
        (dict(steps=2), "steps", 2),  # adaptive method takes no steps
        (dict(method="euler", steps=600), "steps", 600),  # > max_num_steps
    ],
)
def test_config_rejects_bad_values(kwargs: dict, name: str, value: object) -> None:
    with pytest.raises(ValueError) as err:
        SolverConfig(**kwargs)
    assert repr(name) in str(err.value) and repr(value) in str(err.value)


def test_config_loads_from_mapping() -> None:
    cfg = from_mapping(SolverConfig, {"method": "rk4", "step_size": 0.25, "atol": "1e-4"})
    assert cfg == SolverConfig(method="rk4", step_size=0.25, atol=1e-4)
    assert from_mapping(SolverConfig, to_mapping(cfg)) == cfg
    with pytest.raises(ConfigError, match="atol"):
        from_mapping(SolverConfig, {"atol": 0})
    with pytest.raises(ConfigError, match="method"):
        from_mapping(SolverConfig, {"method": "rk45"})


# ---------------------------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("method", ["dopri5", "bosh3", "dopri8", "adaptive_heun"])
def test_exact_exponential_tensor_and_tuple(method: str) -> None:
    """y' = a·y at atol 1e-6: local errors ≤ atol add up to a global error of at most 3·atol here."""
    atol, bound = 1e-6, 3e-6
    cfg = SolverConfig(method=method, atol=atol, adjoint=False, max_num_steps=5000, max_nfe=50_000)
    t = torch.linspace(0, 1, 5, dtype=F64)
    y0 = torch.randn(2, 1, 4, 4, dtype=F64)
    out = ODESolver(Linear(-1.5), cfg)(y0, t)
    exact = torch.stack([y0 * math.exp(-1.5 * float(ti)) for ti in t])
    assert out.shape == (5, 2, 1, 4, 4)
    assert (out - exact).abs().max() < bound

    h0 = torch.randn(2, 3, 4, 4, dtype=F64)
    phi_t, h_t = ODESolver(Linear(-1.5, 0.7), cfg)((y0, h0), t)
    for i, ti in enumerate(t.tolist()):
        assert (phi_t[i] - y0 * math.exp(-1.5 * ti)).abs().max() < bound
        assert (h_t[i] - h0 * math.exp(0.7 * ti)).abs().max() < bound


def test_fixed_step_rk4_accuracy() -> None:
    y0 = torch.randn(3, dtype=F64)
    out = ODESolver(Linear(0.8), SolverConfig(method="rk4", step_size=0.05, adjoint=False))(y0)
    assert (out[-1] - y0 * math.exp(0.8)).abs().max() < 1e-7


@pytest.mark.parametrize(("method", "per_step", "gain"), [
    ("euler", 1, lambda z: 1 + z),
    ("midpoint", 2, lambda z: 1 + z + z * z / 2),
    ("rk4", 4, lambda z: 1 + z + z**2 / 2 + z**3 / 6 + z**4 / 24),
])
@pytest.mark.parametrize("steps", [1, 2, 3, 4])
@pytest.mark.parametrize("adjoint", [False, True])
def test_fixed_steps_take_exactly_that_many_equal_steps(method: str, per_step: int, gain, steps: int,
                                                        adjoint: bool) -> None:
    """``steps=k``: k equal steps over [0, t1] (3 steps included, where a step size 1/3 would not be exact):
    on dy/dt = λy the method's amplification factor R(hλ) applied k times, k × stages evaluations each way."""
    func = Linear(-1.3)
    solver = ODESolver(func, SolverConfig(method=method, steps=steps, first_step=None, adjoint=adjoint, t1=0.9))
    y0 = torch.ones(2, dtype=F64, requires_grad=True)
    y = solver(y0)
    assert solver.nfe_forward == per_step * steps
    assert torch.allclose(y[-1], y0 * gain(-1.3 * 0.9 / steps) ** steps, rtol=1e-14)
    y[-1].sum().backward()
    assert solver.nfe_backward == (per_step * steps if adjoint else 0)
    assert y0.grad is not None and torch.allclose(y0.grad, torch.full_like(y0, gain(-1.3 * 0.9 / steps) ** steps),
                                                  rtol=1e-12)


def test_inference_solver_serves_eval_mode() -> None:
    """``inference``: eval mode solves with it (here rk4 in 1 step: 4 evaluations), training with ``config``."""
    func = Linear(-1.0)
    solver = ODESolver(func, SolverConfig(atol=1e-6), inference=SolverConfig(method="rk4", steps=1, first_step=None))
    y0 = torch.ones(2, 1, 3, 3, dtype=F64)
    solver.eval()(y0)
    assert solver.nfe_forward == 4 and solver.config.method == "rk4"
    solver.train()(y0)
    assert solver.nfe_forward > 4 and solver.config.method == "dopri5"
    assert ODESolver(func, SolverConfig()).eval().config == SolverConfig()  # none given: the training solver


# ---------------------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("adjoint", [False, True])
def test_gradcheck_small_solve(adjoint: bool) -> None:
    func = Linear(-0.7, 0.4)
    # dopri5 at a tight atol: the step sequence is locally constant, so the solve is smooth in (y0, a)
    cfg = SolverConfig(atol=1e-9, adjoint=adjoint, max_num_steps=5000, max_nfe=100_000)
    solver = ODESolver(func, cfg)

    def f(phi0: torch.Tensor, h0: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, ...]:
        phi, h = solver((phi0, h0))
        return phi[-1], h[-1]

    phi0 = torch.randn(1, 1, 2, 2, dtype=F64, requires_grad=True)
    h0 = torch.randn(1, 2, 2, 2, dtype=F64, requires_grad=True)
    # `a` is the module's own parameter: gradcheck perturbs it in place, the solve reads it through func
    assert torch.autograd.gradcheck(f, (phi0, h0, func.a), eps=1e-6, atol=1e-6, rtol=1e-4)


def _conv_tuple_problem(seed: int, weight_std: float, size: int) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """A float64 conv fθ over the tuple state (φ: 1 channel, h: 2), its zero-initialised last layer drawn
    from N(0, weight_std) so the flow moves, and a random batch-2 initial state of ``size``²."""
    torch.manual_seed(seed)
    inner = ConvODEFunc(3, 8, 3, norm_groups=4).double()
    with torch.no_grad():
        inner.out.weight.normal_(0, weight_std)
    y0 = (torch.randn(2, 1, size, size, dtype=F64), torch.randn(2, 2, size, size, dtype=F64))
    return TupleStateFunc(inner, (1, 2)), y0


def test_adjoint_matches_direct_backprop_for_a_conv_func() -> None:
    func, y0 = _conv_tuple_problem(seed=1, weight_std=0.1, size=6)
    grads = []
    for adjoint in (False, True):
        cfg = SolverConfig(atol=1e-10, adjoint=adjoint, max_num_steps=5000, max_nfe=100_000)
        solver = ODESolver(func, cfg)
        inputs = tuple(y.clone().requires_grad_(True) for y in y0)
        phi, h = solver(inputs)
        (phi[-1].pow(2).sum() + h[-1].sin().sum()).backward()
        grads.append([p.grad.clone() for p in func.parameters()] + [y.grad for y in inputs])
        func.zero_grad()
    for direct, adj in zip(*grads, strict=True):
        assert torch.allclose(direct, adj, rtol=1e-5, atol=1e-8 * direct.abs().max().item())


# ---------------------------------------------------------------------------------------------- counters


@pytest.mark.parametrize(("method", "per_step"), [("rk4", 4), ("midpoint", 2), ("euler", 1)])
@pytest.mark.parametrize("adjoint", [False, True])
def test_nfe_counts_fixed_step(method: str, per_step: int, adjoint: bool) -> None:
    n = 8
    func = Linear(-1.0)
    solver = ODESolver(func, SolverConfig(method=method, step_size=1.0 / n, adjoint=adjoint))
    y = solver(torch.ones(3, dtype=F64, requires_grad=True))
    assert solver.nfe_forward == func.calls == per_step * n
    y[-1].sum().backward()
    # the adjoint integrates the augmented system back on the same grid: one fθ evaluation per stage;
    # direct backprop never calls fθ, it goes back through the graphs stored by the forward evaluations
    assert solver.nfe_backward == func.calls - per_step * n == (per_step * n if adjoint else 0)


@pytest.mark.parametrize("adjoint", [False, True])
def test_nfe_counts_adaptive_and_totals(adjoint: bool) -> None:
    func = Linear(-2.0, 0.5)
    solver = ODESolver(func, SolverConfig(atol=1e-6, adjoint=adjoint))
    y0 = (torch.ones(2, 1, 3, 3, dtype=F64, requires_grad=True), torch.ones(2, 2, 3, 3, dtype=F64))
    for _ in range(2):
        before = func.calls
        phi, h = solver(y0, torch.linspace(0, 1, 3, dtype=F64))
        assert solver.nfe_forward == func.calls - before > 0
        mid = func.calls
        (phi[-1].sum() + h[-1].sum()).backward()
        assert solver.nfe_backward == func.calls - mid
        assert (solver.nfe_backward > 0) == adjoint
    assert solver.nfe_forward_total + solver.nfe_backward_total == func.calls
    assert nfe_stats(nn.ModuleList([solver]))["nfe_forward"] == solver.nfe_forward
    solver.reset_nfe()
    assert (solver.nfe_forward, solver.nfe_backward, solver.nfe_forward_total) == (0, 0, 0)


class Zero(nn.Module):
    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(y)


@pytest.mark.parametrize(("first_step", "nfe"), [(0.5, 13), (None, 44)])
def test_first_step_for_zero_initialised_func(first_step: float | None, nfe: int) -> None:
    # torchdiffeq's automatic first step collapses to 1e-6 when fθ ≡ 0; 0.5 gives 1 + 2 steps × 6
    solver = ODESolver(Zero(), SolverConfig(first_step=first_step, adjoint=False))
    solver(torch.ones(2, 1, 4, 4))
    assert solver.nfe_forward == nfe


def test_tuple_state_binds_atol_on_phi() -> None:
    """φ (1 channel, fast drift) and h (8 channels, slow): concatenation lets φ's error exceed atol."""
    torch.manual_seed(0)
    channels, atol = 8, 1e-3
    inner = ConvODEFunc(1 + channels, 16, 3, norm_groups=4).double()
    with torch.no_grad():
        inner.out.weight.normal_(0, 0.3)
        inner.out.weight[:1] *= 5.0  # φ moves faster than h
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    phi0 = (((yy - 8) ** 2 + (xx - 8) ** 2).sqrt() - 5).to(F64).expand(2, 1, 16, 16).contiguous()
    h0 = torch.randn(2, channels, 16, 16, dtype=F64)

    ref_cfg = SolverConfig(atol=1e-9, adjoint=False, max_num_steps=5000, max_nfe=100_000)
    ref = ODESolver(TupleStateFunc(inner, (1, channels)), ref_cfg)((phi0, h0))[0][-1]
    cfg = SolverConfig(atol=atol, adjoint=False)
    tupled = ODESolver(TupleStateFunc(inner, (1, channels)), cfg)
    err_tuple = (tupled((phi0, h0))[0][-1] - ref).pow(2).mean().sqrt().item()
    concat = ODESolver(inner, cfg)
    err_concat = (concat(torch.cat([phi0, h0], dim=1))[-1][:, :1] - ref).pow(2).mean().sqrt().item()
    print(
        f"tuple: NFE {tupled.nfe_forward}, RMS φ error {err_tuple:.2g}; "
        f"concat: NFE {concat.nfe_forward}, RMS φ error {err_concat:.2g}"
    )
    assert tupled.nfe_forward > concat.nfe_forward
    assert err_tuple < err_concat / 2


# ---------------------------------------------------------------------------------------------- runaway


def test_nfe_cap_raises_solver_error() -> None:
    solver = ODESolver(Linear(-1e5), SolverConfig(max_nfe=50, adjoint=False))
    with pytest.raises(SolverError, match=r"dopri5 .*forward pass: max_nfe exceeded after 50 .*atol=0.001"):
        solver(torch.ones(3, dtype=F64))
    assert solver.nfe_forward == 50


def test_step_cap_raises_solver_error() -> None:
    solver = ODESolver(Linear(-1e5), SolverConfig(max_num_steps=20, adjoint=False))
    with pytest.raises(SolverError, match=r"max_num_steps exceeded .* after \d+ evaluations .*atol=0.001"):
        solver(torch.ones(3, dtype=F64))


def test_dt_underflow_raises_solver_error() -> None:
    # dy/dt = y³, y(0) = 2 blows up at t = 1/8: the step size shrinks until t + dt == t
    solver = ODESolver(Power(), SolverConfig(max_num_steps=100_000, max_nfe=100_000, adjoint=False))
    with pytest.raises(SolverError, match=r"dopri5 .*underflow in dt .* evaluations \(atol=0.001"):
        solver(torch.full((2,), 2.0, dtype=F64))


@pytest.mark.parametrize(
    ("caps", "pattern"),
    [
        (dict(max_nfe=100), "backward pass: max_nfe exceeded after 100"),
        (dict(max_num_steps=30), "backward pass: max_num_steps exceeded"),
        (dict(), "backward pass: underflow in dt"),
    ],
)
def test_adjoint_backward_runaway_raises_solver_error(caps: dict, pattern: str) -> None:
    # fθ is 0 in the (no-grad) forward solve and -y³ in the adjoint pass, which blows up going back in time
    kw = dict(max_nfe=100_000, max_num_steps=100_000) | caps
    solver = ODESolver(Power(-1.0, backward_only=True), SolverConfig(**kw))
    y = solver(torch.full((2,), 2.0, dtype=F64, requires_grad=True))
    with pytest.raises(SolverError, match=pattern):
        y[-1].sum().backward()


def test_bad_times_and_state() -> None:
    solver = ODESolver(Linear(-1.0), SolverConfig(adjoint=False))
    with pytest.raises(ValueError, match="'t'"):
        solver(torch.ones(2, dtype=F64), torch.tensor([0.0, 1.0, 0.5]))
    with pytest.raises(ValueError, match="'y0'"):
        solver([torch.ones(2)])


def test_adjoint_backward_non_finite_raises_solver_error() -> None:
    class NaNBackward(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.k = nn.Parameter(torch.tensor(1.0, dtype=F64))

        def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.k * y * (float("nan") if torch.is_grad_enabled() else 1.0)

    solver = ODESolver(NaNBackward())
    y = solver(torch.ones(3, dtype=F64, requires_grad=True))
    with pytest.raises(SolverError, match="backward pass: non-finite values"):
        y[-1].sum().backward()


# ---------------------------------------------------------------------------------------------- nodeseg.dopri5


@pytest.mark.parametrize("adjoint", [False, True])
def test_lean_dopri5_matches_torchdiffeq_dopri5(adjoint: bool) -> None:
    """nodeseg's dopri5 (nodeseg/dopri5.py) against torchdiffeq's own, in float64: the same steps and NFE,
    outputs at 5 times (dense output) and gradients equal to 1e-10 relative."""
    from torchdiffeq import odeint, odeint_adjoint

    from nodeseg.dopri5 import METHOD

    func, y0 = _conv_tuple_problem(seed=3, weight_std=0.2, size=8)
    t = torch.linspace(0, 1, 5, dtype=F64)
    results = []
    for method in ("dopri5", METHOD):
        counted_module = _Counted(func)
        inputs = tuple(y.clone().requires_grad_(True) for y in y0)
        solve = odeint_adjoint if adjoint else odeint
        kwargs = {"adjoint_params": tuple(func.parameters())} if adjoint else {}
        phi, h = solve(counted_module, inputs, t, rtol=0.0, atol=1e-7, method=method, **kwargs)
        nfe_f = counted_module.calls
        (phi.pow(2).sum() + h.sin().sum()).backward()
        grads = [p.grad.clone() for p in func.parameters()] + [y.grad for y in inputs]
        func.zero_grad()
        results.append((nfe_f, counted_module.calls - nfe_f, phi.detach(), h.detach(), grads))
    (nf_ref, nb_ref, phi_ref, h_ref, g_ref), (nf, nb, phi, h, g) = results
    assert nf_ref > 20 and (nf, nb) == (nf_ref, nb_ref)
    for ref, got in [(phi_ref, phi), (h_ref, h), *zip(g_ref, g, strict=True)]:
        assert torch.allclose(got, ref, rtol=1e-10, atol=1e-12 * ref.abs().max().item())


def test_stage_sum_gradients_match_finite_differences() -> None:
    """The recorded stage sum (direct backprop through nodeseg's dopri5) against torch's numerical
    gradient in float64: base, the weights (which carry dt, itself a function of the state through the
    step-size control) and every evaluation, a tableau zero passing none."""
    from nodeseg.dopri5 import _StageSum

    torch.manual_seed(0)
    base = torch.randn(6, dtype=F64, requires_grad=True)
    coeff = torch.tensor([0.3, 0.0, -1.2, 0.7], dtype=F64, requires_grad=True)
    fs = [torch.randn(6, dtype=F64, requires_grad=True) for _ in range(4)]
    nonzero = (True, False, True, True)

    def stage_sum(base: torch.Tensor, coeff: torch.Tensor, *fs: torch.Tensor) -> torch.Tensor:
        rows = torch.stack([f.detach() for f in fs])  # the stage storage holds the evaluations' values
        return _StageSum.apply(base, coeff, rows, nonzero, *fs)

    assert torch.autograd.gradcheck(stage_sum, (base, coeff, *fs))
    out = stage_sum(base, coeff, *fs)
    assert torch.equal(out, torch.addmv(base, torch.stack(fs).t(), coeff))
    grads = torch.autograd.grad(out.sum(), fs, allow_unused=True)
    assert grads[1] is None and all(g is not None for i, g in enumerate(grads) if i != 1)


def test_direct_backprop_holds_each_stage_once() -> None:
    """With a graph recorded, each evaluation is copied into the stage storage and freed: while fθ runs, at
    most one of its earlier outputs is alive (the solver's first f0, until the first step ends; the graph
    holds the storage's rows instead), and the gradient is the one of torchdiffeq's own dopri5."""
    import weakref

    from torchdiffeq import odeint

    from nodeseg.dopri5 import METHOD

    class Tracked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1).to(F64)
            self.outputs: list[weakref.ref] = []
            self.most_alive = 0

        def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            self.most_alive = max(self.most_alive, sum(ref() is not None for ref in self.outputs))
            out = torch.tanh(self.conv(y))
            self.outputs.append(weakref.ref(out))
            return out

    torch.manual_seed(0)
    f = Tracked()
    y0 = torch.randn(2, 3, 8, 8, dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    grads = []
    for method in (METHOD, "dopri5"):
        f.outputs.clear()
        f.most_alive = 0
        y1 = odeint(f, y0, t, rtol=0.0, atol=1e-6, method=method, options={"first_step": 0.25})[-1]
        if method == METHOD:
            assert len(f.outputs) > 12 and f.most_alive == 1
        grads.append(torch.autograd.grad(y1.square().sum(), tuple(f.parameters())))
    for got, ref in zip(*grads, strict=True):
        assert torch.allclose(got, ref, rtol=1e-10, atol=1e-12)


class _Counted(nn.Module):
    """``func`` with a call counter (odeint_adjoint needs an nn.Module that owns the parameters)."""

    def __init__(self, func: nn.Module) -> None:
        super().__init__()
        self.func = func
        self.calls = 0

    def forward(self, t: torch.Tensor, y):
        self.calls += 1
        return self.func(t, y)


def test_evaluations_written_into_the_stage_rows_change_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a graph (inference, the adjoint's solves) nodeseg's dopri5 has the tuple-state adapter write
    each evaluation into its row of the stage storage; the solution must be bit-identical to the path that
    copies, which runs when grad mode is on."""
    from torchdiffeq import odeint

    from nodeseg import dopri5

    torch.manual_seed(0)
    f = ConvODEFunc(5, 8, 3, norm_groups=4).to(torch.float64)
    for p in f.out.parameters():
        nn.init.normal_(p, std=0.3)
    func = TupleStateFunc(f, (1, 4)).requires_grad_(False)
    x = torch.randn(2, 5, 12, 12, dtype=torch.float64)
    t = torch.linspace(0, 1, 3, dtype=torch.float64)
    writes: list[bool] = []
    forward = dopri5._LeanTupleFunc.forward

    def spy(self: nn.Module, t: torch.Tensor, y: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        writes.append(out is not None)
        return forward(self, t, y, out)

    monkeypatch.setattr(dopri5._LeanTupleFunc, "forward", spy)

    def solve() -> tuple[torch.Tensor, ...]:
        return odeint(func, (x[:, :1], x[:, 1:]), t, rtol=0.0, atol=1e-6, method=dopri5.METHOD)

    with torch.no_grad():
        direct = solve()
    n_direct, n_written = len(writes), sum(writes)
    copied = solve()  # grad mode on: torchdiffeq's copy into k, which autograd can follow
    assert n_written > 0.8 * n_direct and sum(writes) == n_written  # only the no-grad solve wrote directly
    for a, b in zip(direct, copied, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex64])
def test_all_finite_equals_isfinite_all(dtype: torch.dtype) -> None:
    """The solver's one-reduction finite check agrees with ``isfinite(y).all()`` wherever a NaN or ±inf
    sits (first, last, middle element; strided views; empty tensors)."""
    from nodeseg.dopri5 import all_finite

    gen = torch.Generator().manual_seed(0)
    assert all_finite(torch.empty(0, dtype=dtype))
    for bad in (math.nan, math.inf, -math.inf, None):
        for where in (0, 4999, 2718):
            y = torch.randn(50, 100, generator=gen).to(dtype)
            if bad is not None:
                y.view(-1)[where] = bad
            for view in (y, y.t(), y[:, ::3]):
                assert all_finite(view) == bool(torch.isfinite(view).all()), (bad, where, view.stride())
    # complex: a non-finite imaginary part alone counts
    z = torch.zeros(7, dtype=torch.complex64)
    z[3] = complex(0.0, math.inf)
    assert not all_finite(z)


@pytest.mark.parametrize("adjoint", [True, False])
@pytest.mark.parametrize("tuple_state", [True, False])
def test_a_channels_last_state_is_solved_in_its_own_layout(adjoint: bool, tuple_state: bool,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A channels-last state (training's layout) reaches fθ as channels-last tensors at every evaluation, and
    the solve gives what the same solve over NCHW-ordered storage gives: same NFE, outputs and gradients (to
    float64 rounding: the error norms sum in another order), channels-last outputs."""
    from nodeseg import solve

    func, y0 = _conv_tuple_problem(seed=3, weight_std=0.3, size=7)
    if not tuple_state:
        func, y0 = func.func, torch.cat(y0, dim=1)
    func = func.to(memory_format=torch.channels_last)
    layouts: list[bool] = []
    inner = func.func if tuple_state else func
    inner.register_forward_pre_hook(lambda _m, args: layouts.append(  # h: φ's one channel fits either layout
        (args[1][-1] if isinstance(args[1], tuple) else args[1]).is_contiguous(memory_format=torch.channels_last)))

    channels_last = solve.is_channels_last

    def run(rows: bool) -> tuple[tuple[torch.Tensor, ...], list[torch.Tensor], tuple[int, int], list[bool]]:
        monkeypatch.setattr(solve, "is_channels_last", channels_last if rows else lambda _y: False)
        layouts.clear()
        parts = y0 if tuple_state else (y0,)
        inputs = tuple(p.contiguous(memory_format=torch.channels_last).requires_grad_(True) for p in parts)
        solver = ODESolver(func, SolverConfig(atol=1e-8, adjoint=adjoint, max_num_steps=5000, max_nfe=100_000))
        out = solver(inputs if tuple_state else inputs[0])
        outs = out if tuple_state else (out,)
        sum(o[-1].sin().sum() for o in outs).backward()
        grads = [p.grad.clone() for p in func.parameters()] + [y.grad for y in inputs]
        func.zero_grad()
        return outs, grads, (solver.nfe_forward, solver.nfe_backward), list(layouts)

    ref_out, ref_grads, ref_nfe, ref_layouts = run(rows=False)
    out, grads, nfe, seen = run(rows=True)
    assert not all(ref_layouts), "the NCHW-ordered solve should hand fθ NCHW tensors: the check proves nothing"
    assert all(seen) and len(seen) == sum(nfe)
    assert nfe == ref_nfe
    for a, b in zip(out, ref_out, strict=True):
        assert a[-1].is_contiguous(memory_format=torch.channels_last)
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads, ref_grads, strict=True):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12 * b.abs().max().item())


def test_append_time_keeps_a_channels_last_layout() -> None:
    from nodeseg.models.odefunc import append_time

    cl = torch.channels_last
    parts = (torch.randn(2, 1, 5, 6).contiguous(memory_format=cl), torch.randn(2, 3, 5, 6).contiguous(memory_format=cl))
    got = append_time(tuple(p.requires_grad_(True) for p in parts), torch.tensor(0.25))
    assert got.is_contiguous(memory_format=cl)
    assert torch.equal(got, append_time(tuple(p.detach().contiguous() for p in parts), 0.25))
    (got * torch.arange(5.0).view(1, 5, 1, 1)).sum().backward()
    assert torch.equal(parts[0].grad, torch.zeros(2, 1, 5, 6))
    assert torch.equal(parts[1].grad, torch.arange(1.0, 4.0).view(1, 3, 1, 1).expand(2, 3, 5, 6))
    assert append_time(torch.randn(2, 3, 5, 6), 0.5).is_contiguous()  # NCHW stays NCHW
