"""Priors on Contour Evolution's ODE (nodeseg.priors): curvature against exact solutions, each penalty 0 where it
should be, float64 gradcheck, all off → today's model bit for bit, and the penalties in the training loop."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from pipeline_params import tiny_params
from torch import nn
from torch.utils.data import Dataset

from nodeseg.data.transforms import AugmentConfig
from nodeseg.errors import ConfigError
from nodeseg.levelset import signed_distance
from nodeseg.models.registry import build_model
from nodeseg.models.spec import build_from_spec, load_model, make_spec
from nodeseg.params import ContourSection, load_params
from nodeseg.priors import (
    CurvatureFlow,
    PriorsConfig,
    ShapePrior,
    area_change,
    cfl_limit,
    curvature,
    curvature_speed,
    fit_shape_prior,
    loss_terms,
    reinit_penalty,
    smooth_length,
)
from nodeseg.solve import ODESolver, SolverConfig
from nodeseg.stages.refine import refine, shape_prior_from_shards
from nodeseg.tracking import Tracker
from nodeseg.train import checkpoint as ckpt
from nodeseg.train.ddp import DistInfo
from nodeseg.train.loop import TrainConfig, fit

REPO = Path(__file__).resolve().parents[1]


def _grid(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.meshgrid(torch.arange(n, dtype=torch.float64), torch.arange(n, dtype=torch.float64), indexing="ij")


def _disc_sdf(n: int, r: float, c: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(φ = |x − c| − r, |x − c|), both (1, 1, n, n) float64."""
    y, x = _grid(n)
    d = ((x - c[1]) ** 2 + (y - c[0]) ** 2).sqrt()[None, None]
    return d - r, d


# ---- curvature ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("r", [4.0, 8.0, 16.0])
def test_curvature_of_a_disc_is_one_over_r(r: float) -> None:
    """On the pixels next to the zero level set (|φ| < 1), κ equals the exact 1/|x − c| to a relative
    discretisation error of 0.5 h²/r² (central differences are second order; measured 0.33/r²); averaged
    over the zero level set (weights sech²(φ), whose continuum mean is exactly 1/r) κ is 1/r to 0.1 h²/r²
    relative (measured 0.047/r² at r = 4, 0.044/r² at 8, 0.07/r² at 16)."""
    phi, d = _disc_sdf(48, r, (23.3, 24.1))
    k = curvature(phi)
    near = phi.abs() < 1
    assert near.sum() > 10
    assert float((k[near] * d[near] - 1).abs().max()) <= 0.5 / r**2
    w = 1 - torch.tanh(phi) ** 2
    assert abs(float((w * k).sum() / w.sum()) * r - 1) <= 0.1 / r**2


def test_curvature_of_a_plane_is_zero_up_to_the_border() -> None:
    y, x = _grid(20)
    for a, b, c in [(1.0, 0.0, -3.0), (0.6, -0.8, 2.0), (-0.3, 0.95, 0.5)]:
        phi = (a * x + b * y + c)[None, None]
        assert float(curvature(phi).abs().max()) < 1e-12
        assert float(curvature_speed(phi).abs().max()) < 1e-12


def test_curvature_speed_stays_bounded_where_phi_is_flat() -> None:
    """Where |∇φ| → 0 (the clipped far field, a noisy plateau) κ|∇φ| is bounded by |D²φ|, not amplified 1/δ²."""
    g = torch.Generator().manual_seed(0)
    phi = 32.0 + 1e-4 * torch.randn(1, 1, 16, 16, generator=g, dtype=torch.float64)
    assert float(curvature_speed(phi, 1e-2).abs().max()) < 8 * 1e-4 * 5


class _Flow(nn.Module):
    def forward(self, t: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
        return curvature_speed(phi)


def _radius(phi: torch.Tensor, c: int) -> float:
    """The zero crossing along the row through the centre (c − ½, c + ½ averaged), linearly interpolated."""
    row = (phi[0, 0, c - 1] + phi[0, 0, c]) / 2
    out = []
    for seq in (row[c:], row[:c].flip(0)):
        i = int((seq > 0).nonzero()[0])
        a, b = float(seq[i - 1]), float(seq[i])
        out.append(i - 1 + a / (a - b) + 0.5)
    return sum(out) / 2


def test_pure_curvature_motion_shrinks_a_circle_as_r2_minus_2t() -> None:
    """dφ/dt = κ|∇φ| with the project's solver (dopri5, atol 1e-3): r(t)² = r0² − 2t. The radius is read by
    interpolating the zero crossing, whose bias at t = 0 (−0.25 px²) is taken off; the rest stays within
    0.05 px² up to t = 30 (r from 12 to 9.2; measured 0.011)."""
    n, r0 = 48, 12.0
    phi0, _ = _disc_sdf(n, r0, (23.5, 23.5))
    solver = ODESolver(_Flow(), SolverConfig(adjoint=False, max_nfe=5000, max_num_steps=2000, t1=30.0))
    ts = torch.tensor([0.0, 10.0, 20.0, 30.0], dtype=torch.float64)
    with torch.no_grad():
        out = solver(phi0, ts)
    bias = _radius(out[0], 24) ** 2 - r0**2
    for t, phi in zip(ts.tolist(), out, strict=True):
        assert abs(_radius(phi, 24) ** 2 - bias - (r0**2 - 2 * t)) < 0.05, t
    # the step size is set by stability, not accuracy: dt ≈ 0.7 (dopri5's region ≈ 3.3 / |λ|max, λ ≈ −5)
    assert solver.nfe_forward > 6 * 30 / 1.5


class _Zero(nn.Module):
    def forward(self, t: torch.Tensor, state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return tuple(torch.zeros_like(p) for p in state)


def _nfe_with(eps: float) -> int:
    g = torch.Generator().manual_seed(0)
    phi, _ = _disc_sdf(32, 8.0, (15.5, 15.5))
    phi = (phi + 0.5 * torch.randn(phi.shape, generator=g, dtype=torch.float64)).float()
    func = _Zero() if eps == 0 else CurvatureFlow(_Zero(), eps, cap=math.inf)
    solver = ODESolver(func, SolverConfig(adjoint=False))
    with torch.no_grad():
        solver((phi, torch.zeros(1, 2, 32, 32)))
    return solver.nfe_forward


def test_curvature_nfe_grows_with_eps_beyond_the_cfl_limit() -> None:
    """A noisy disc (what a UNet gives), dopri5, atol 1e-3, first step 0.5: up to the CFL limit 1/(4·0.5) the
    curvature term leaves the step sizes alone (13 evaluations, as with ε = 0); beyond it the step control
    shrinks the steps (measured 25 at ε = 1, 37 at 2, 73 at 5, 109 at 10)."""
    cap = cfl_limit(False, None, 0.5, 1.0)
    assert cap == 0.5
    base = _nfe_with(0.0)
    assert _nfe_with(0.1) == base
    assert _nfe_with(cap) == base
    assert _nfe_with(5.0) > 3 * base


def test_fixed_curvature_above_the_cfl_limit_is_refused_and_a_learned_one_clamped() -> None:
    euler = SolverConfig(method="euler", step_size=0.25, first_step=None)
    assert cfl_limit(True, 0.25, None, 1.0) == 1.0
    with pytest.raises(ValueError, match="CFL limit 1"):
        build_model("contour", "tiny", solver=euler, priors=PriorsConfig(curvature=1.5))
    model = build_model("contour", "tiny", solver=euler, priors=PriorsConfig(curvature=0.9, learn_curvature=True))
    flow = model.solver.func
    assert isinstance(flow, CurvatureFlow)
    assert float(flow.epsilon().detach()) == pytest.approx(0.9, rel=1e-6)
    with torch.no_grad():
        flow.rho.fill_(10.0)
    assert float(flow.epsilon().detach()) == 1.0


def test_priors_config_refuses_bad_values() -> None:
    with pytest.raises(ValueError, match="curvature"):
        PriorsConfig(learn_curvature=True)  # learning needs a small ε > 0 to start from
    with pytest.raises(ValueError, match="length"):
        PriorsConfig(length=-1.0)
    with pytest.raises(ValueError, match="times"):
        PriorsConfig(times=0)
    bad = REPO / "params.yaml"
    with pytest.raises(ConfigError, match="contour.priors.lenght"):
        load_params([bad], ["contour.priors.lenght=1.0"])


# ---- penalties ------------------------------------------------------------------------------------------

def test_reinit_penalty_is_zero_for_a_signed_distance_away_from_the_medial_axis() -> None:
    mask = np.zeros((40, 40), bool)
    yy, xx = np.mgrid[:40, :40]
    mask[(yy - 19.5) ** 2 + (xx - 20.2) ** 2 < 10.0**2] = True
    phi = torch.from_numpy(signed_distance(mask)).double()[None, None]
    band = float((phi.abs() < 3.0).double().mean())
    # the pixel EDT's staircase: |∇φ| − 1 of 7 % RMS on the band (measured 0.0054 mean square there)
    assert float(reinit_penalty(phi, band=3.0)) / band < 0.01
    exact, _ = _disc_sdf(40, 10.0, (19.5, 20.2))
    assert float(reinit_penalty(exact, band=3.0)) < 1e-5
    # the medial axis (the centre, |∇φ| → 0) is what the band leaves out; taken in, the penalty is not 0
    assert float(reinit_penalty(exact, band=100.0)) > 10 * float(reinit_penalty(exact, band=3.0))
    assert float(reinit_penalty(2 * exact, band=3.0)) > 0.01  # not a distance: |∇φ| = 2


def test_area_change_is_zero_for_a_constant_evolution_and_length_is_the_perimeter() -> None:
    phi, _ = _disc_sdf(48, 10.0, (23.5, 24.0))
    assert float(area_change(phi.expand(5, -1, -1, -1, -1))) == 0.0
    assert float(area_change(torch.stack([phi, phi - 1.0]))) > 0  # a contour moved out by a pixel
    length = float(smooth_length(phi, width=1.0)) * 48 * 48
    assert length == pytest.approx(2 * math.pi * 10.0, rel=0.02)
    assert float(smooth_length(torch.full((1, 1, 16, 16), 32.0, dtype=torch.float64))) < 1e-20  # no contour


def _shapes(n: int = 6, size: int = 20) -> torch.Tensor:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    out = []
    for _ in range(n):
        cy, cx = rng.uniform(7, 13, 2)
        ry, rx = rng.uniform(3, 6, 2)
        out.append(signed_distance(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1, clip=8.0))
    return torch.from_numpy(np.stack(out))


def test_shape_residual_is_zero_for_training_and_mean_shapes_and_not_for_others() -> None:
    phis = _shapes()
    prior = fit_shape_prior(phis, modes=len(phis))  # N shapes span N − 1 modes around their mean
    assert prior.modes.shape[0] == len(phis) - 1
    for phi in [*phis, phis.mean(0)]:
        assert float(prior.residual(phi.float()[None, None])) < 1e-10
    small = fit_shape_prior(phis, modes=2)
    assert float(small.residual(phis[:1].float()[None])) > 1e-4  # two modes do not span six shapes
    square = torch.from_numpy(signed_distance(np.pad(np.ones((8, 8), bool), 6), clip=8.0)).float()
    assert float(prior.residual(square[None, None])) > 1e-3


def test_shape_prior_travels_in_the_state_dict() -> None:
    model = build_model("contour", "tiny", priors=PriorsConfig(shape=1.0))
    fitted = fit_shape_prior(_shapes(), modes=3)
    model.shape_prior.set(fitted.mean, fitted.modes, float(fitted.scale))
    fresh = build_model("contour", "tiny", priors=PriorsConfig(shape=1.0))
    assert not fresh.shape_prior.fitted
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh.shape_prior.modes, fitted.modes) and float(fresh.shape_prior.scale) == 8.0


def test_each_penalty_passes_float64_gradcheck() -> None:
    g = torch.Generator().manual_seed(0)
    phi, _ = _disc_sdf(8, 2.5, (3.6, 3.4))
    phi = (phi + 0.2 * torch.randn(phi.shape, generator=g, dtype=torch.float64)).requires_grad_()
    seq = torch.stack([phi.detach(), phi.detach() + 0.3]).requires_grad_()
    prior = ShapePrior()
    shapes = _shapes(4, 8).double()
    fitted = fit_shape_prior(shapes, modes=2)
    prior.set(fitted.mean.double(), fitted.modes.double(), float(fitted.scale))
    for f, x in [
        (curvature, phi),
        (curvature_speed, phi),
        (lambda p: smooth_length(p, 1.0), phi),
        (lambda p: reinit_penalty(p, 3.0), phi),
        (lambda p: area_change(p, 1.0), seq),
        (prior.residual, phi),
    ]:
        assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-6)


def test_learned_curvature_passes_gradcheck_through_its_parameter() -> None:
    """dφ/dt of CurvatureFlow as a function of ρ (ε = softplus(ρ), below the cap) in float64."""
    phi, _ = _disc_sdf(8, 2.5, (3.6, 3.4))
    flow = CurvatureFlow(_Zero(), 0.05, learn=True, cap=1.0).double()
    state = (phi, phi)

    rho = flow.rho.detach().clone().reshape(1).requires_grad_()
    assert torch.autograd.gradcheck(lambda r: torch.func.functional_call(
        flow, {"rho": r.reshape(())}, (torch.zeros((), dtype=torch.float64), state))[0], (rho,))
    out = flow(torch.zeros(()), state)[0]
    out.sum().backward()
    assert flow.rho.grad is not None and float(flow.rho.grad.abs()) > 0


# ---- the model ------------------------------------------------------------------------------------------

def test_all_off_is_todays_model_bit_for_bit() -> None:
    image = torch.randn(2, 1, 16, 16)
    torch.manual_seed(0)
    today = build_model("contour", "tiny")
    torch.manual_seed(0)
    off = build_model("contour", "tiny", priors=PriorsConfig())
    assert list(today.state_dict()) == list(off.state_dict())
    for p in today.parameters():
        if p.requires_grad:
            nn.init.normal_(p, std=0.05)  # leave the identity at initialisation: a real flow
    off.load_state_dict(today.state_dict())
    outs = []
    for m in (today, off):
        m.train()
        out = m(image)
        out.square().sum().backward()
        outs.append((out.detach(), [p.grad.clone() for p in m.parameters() if p.requires_grad]))
        assert loss_terms(m) == (None, {})
    assert torch.equal(outs[0][0], outs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(outs[0][1], outs[1][1], strict=True))
    # and the spec (hence the resume fingerprint) is today's
    section = load_params([REPO / "params.yaml"]).contour
    assert isinstance(section, ContourSection) and not section.priors.enabled
    assert "priors" not in make_spec("contour", section, unet={"kind": "unet", "preset": "unet-tiny", "sizes": {}})


def test_penalised_forward_gives_the_same_prediction_and_the_penalties() -> None:
    torch.manual_seed(0)
    cfg = PriorsConfig(length=1.0, reinit=1.0, area=1.0, times=3)
    model = build_model("contour", "tiny", priors=cfg)
    for p in model.parameters():
        if p.requires_grad:
            nn.init.normal_(p, std=0.05)
    image = torch.randn(2, 1, 16, 16)
    model.eval()
    with torch.no_grad():
        plain = model(image)
    model.train()
    pred = model(image)
    total, log = loss_terms(model)
    assert set(log) == {"prior_length", "prior_reinit", "prior_area"}
    assert total is not None and torch.isfinite(total) and total.requires_grad
    assert model.prior_penalties == {}  # consumed
    # the K intermediate output times do not change the steps: φ(t1) is the same (eval mode: GroupNorm only)
    assert torch.allclose(pred.detach(), plain, atol=1e-6)


def test_spec_round_trip_keeps_the_priors() -> None:
    section = ContourSection(preset="tiny", priors=PriorsConfig(curvature=0.2, length=0.5))
    spec = make_spec("contour", section, unet={"kind": "unet", "preset": "unet-tiny", "sizes": {}})
    model = build_from_spec(spec)
    assert model.priors == section.priors and isinstance(model.solver.func, CurvatureFlow)


class _Discs(Dataset):
    def __init__(self, n: int, size: int = 16, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        yy, xx = np.mgrid[:size, :size]
        self.items = []
        for _ in range(n):
            cy, cx, r = rng.uniform(5, size - 5), rng.uniform(5, size - 5), rng.uniform(2.5, 4.5)
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
            self.items.append({
                "image": torch.tensor(mask + rng.normal(0, 0.3, mask.shape), dtype=torch.float32)[None],
                "phi": torch.from_numpy(signed_distance(mask))[None],
                "valid": torch.ones(1, size, size),
            })

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.items[i]


CFG = TrainConfig(epochs=1, batch_size=4, lr=3e-3, warmup_steps=0, val_batch_size=4, channels_last=True,
                  augment=AugmentConfig(enabled=False))


def _fit(out: Path, priors: PriorsConfig | None) -> tuple[nn.Module, Path]:
    torch.manual_seed(0)
    model = build_model("contour", "tiny") if priors is None else build_model("contour", "tiny", priors=priors)
    train = _Discs(8)
    if priors is not None and priors.shape > 0:
        fitted = fit_shape_prior(torch.stack([train[i]["phi"][0] for i in range(8)]), priors.shape_modes)
        model.shape_prior.set(fitted.mean, fitted.modes, float(fitted.scale))
    fit(model, train, _Discs(4, seed=1), CFG, out, seed=0, model_spec={"kind": "contour"}, data_id="discs",
        info=DistInfo(), tracker=Tracker("test", enabled=False), stage="test")
    return model, out / "train_log.csv"


def test_training_with_priors_logs_each_penalty_and_all_off_trains_as_today(tmp_path: Path) -> None:
    today, log_today = _fit(tmp_path / "today", None)
    off, _ = _fit(tmp_path / "off", PriorsConfig())
    assert all(torch.equal(a, b) for a, b in zip(today.state_dict().values(), off.state_dict().values(), strict=True))
    on_cfg = PriorsConfig(curvature=0.1, learn_curvature=True, length=1.0, reinit=1.0, area=10.0, shape=1.0,
                          times=2, shape_modes=3)
    on, log_on = _fit(tmp_path / "on", on_cfg)
    rows = list(csv.DictReader(log_on.open()))
    assert len(rows) == 2
    for key in ("prior_length", "prior_reinit", "prior_area", "prior_shape", "prior_curvature_eps"):
        assert all(math.isfinite(float(r[key])) for r in rows), key
    assert float(rows[-1]["prior_curvature_eps"]) != pytest.approx(0.1, abs=1e-9)  # ε learned
    assert "prior_length" not in next(csv.DictReader(log_today.open()))
    # the penalties changed the training: the weights of fθ differ from the run without them
    w_today = dict(today.named_parameters())["encoder.0.0.weight"]
    w_on = dict(on.named_parameters())["encoder.0.0.weight"]
    assert not torch.equal(w_today, w_on)


def test_refine_fits_the_shape_prior_and_saves_it_with_the_model(run: dict[str, Path], tmp_path: Path) -> None:
    params = tiny_params("contour.priors.shape=1.0", "contour.priors.shape_modes=4", "contour.priors.length=0.5",
                         "contour.priors.curvature=0.05", "contour.priors.times=2")
    refine(run["shards"], run["select"] / "model.pt", tmp_path, params)
    payload = ckpt.load(tmp_path / "model.pt")
    assert payload["model_spec"]["priors"]["shape"] == 1.0
    expected = shape_prior_from_shards(run["shards"], params.contour.priors)
    assert torch.equal(payload["model"]["shape_prior.modes"], expected.modes)
    assert expected.modes.shape == (4, 32, 32)
    model, _ = load_model(tmp_path / "model.pt", expect=("contour",))
    assert model.shape_prior.fitted and isinstance(model.solver.func, CurvatureFlow)
    header = (tmp_path / "train_log.csv").read_text().splitlines()[0].split(",")
    assert {"prior_shape", "prior_length"} <= set(header) and "prior_area" not in header


def test_evolution_strip_draws_one_row_per_model(tmp_path: Path) -> None:
    from nodeseg import viz

    phi, _ = _disc_sdf(24, 6.0, (11.5, 11.5))
    phis = [phi[0, 0].numpy() + s for s in (0.0, -1.0, -2.0)]
    path = viz.plot_evolution_strip(np.zeros((24, 24)), {"no prior": phis, "curvature": phis[::-1]},
                                    [0.0, 0.5, 1.0], tmp_path / "strip.png", gt_phi=phis[0])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="one map per time"):
        viz.plot_evolution_strip(np.zeros((24, 24)), {"a": phis[:2]}, [0.0, 0.5, 1.0], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
