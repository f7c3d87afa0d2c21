"""nodeseg.models: shapes, identity at initialisation, adjoint = backprop, NFE counters, presets, norms, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nodeseg.errors import ConfigError
from nodeseg.models import (
    PRESETS,
    ContourEvolution,
    ImageEvolution,
    NodeStack,
    UNet,
    build_model,
    count_parameters,
)
from nodeseg.models.blocks import ConvNormAct
from nodeseg.solve import SolverConfig

F64 = torch.float64


def image(b: int = 2, h: int = 16, w: int = 16, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(b, 1, h, w, dtype=dtype)


# ---------------------------------------------------------------------------------------------- UNet


@pytest.mark.parametrize(("h", "w"), [(16, 16), (13, 7), (1, 5)])
def test_unet_any_size(h: int, w: int) -> None:
    unet = build_model("unet", "unet-tiny")
    assert unet(image(2, h, w)).shape == (2, 1, h, w)


def test_unet_zero_init_last() -> None:
    unet = UNet(3, 2, base_channels=8, depth=2, norm_groups=4, zero_init_last=True)
    assert torch.equal(unet(torch.randn(1, 3, 8, 8)), torch.zeros(1, 2, 8, 8))


# ---------------------------------------------------------------------------------------------- evolutions


@pytest.mark.parametrize("preset", ["tiny", "nodeunet-tiny"])
def test_contour_evolution_is_identity_at_init(preset: str) -> None:
    model = build_model("contour", preset)
    x = image()
    with torch.no_grad():
        phi0 = model.unet(x)
    assert torch.equal(model(x), phi0)
    assert torch.equal(model(x, phi0=phi0), phi0)
    traj = model(x, phi0=phi0, times=torch.linspace(0, 1, 5))
    assert traj.shape == (5, 2, 1, 16, 16)
    # intermediate times are read off dopri5's dense output, whose evaluation rounds: equal to ~ulp(32·φ)
    assert all(torch.allclose(p, phi0, rtol=0, atol=1e-5) for p in traj)


def test_contour_unet_is_frozen() -> None:
    model = build_model("contour", "tiny", solver=SolverConfig(adjoint=False)).train()
    assert not model.unet.training and model.encoder.training
    assert not any(p.requires_grad for p in model.unet.parameters())
    assert count_parameters(model, trainable_only=True) == count_parameters(model) - count_parameters(model.unet)
    model(image()).sum().backward()
    assert all(p.grad is None for p in model.unet.parameters())
    assert model.encoder[0][0].weight.grad is not None


def test_image_evolution_shapes() -> None:
    model = build_model("image", "tiny")
    x = image()
    assert model(x).shape == (2, 1, 16, 16)
    traj = model(x, times=torch.linspace(0, 1, 3))
    assert traj.shape == (3, 2, 1, 16, 16)
    # fθ is zero at init, so h(t) = h(0) and every prediction equals the final one
    assert torch.allclose(traj[0], traj[-1]) and torch.allclose(traj[-1], model(x), atol=1e-6)


def _perturb_zero_layers(model: nn.Module) -> None:
    """Give the zero-initialised last layers of fθ and ψ random weights so gradients are non-trivial."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d) and not module.weight.any():
                module.weight.normal_(0, 0.05)
                module.bias.normal_(0, 0.05)


def _grads(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss = (model(x) - target).pow(2).mean()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(("kind", "preset"), [("contour", "tiny"), ("image", "tiny")])
def test_adjoint_gradients_equal_backprop(kind: str, preset: str) -> None:
    """float64, atol 1e-9: every parameter gradient agrees to rel 1e-5 (of the tensor's max magnitude)."""
    tight = dict(atol=1e-9, max_num_steps=5000, max_nfe=100_000)
    direct = build_model(kind, preset, solver=SolverConfig(adjoint=False, **tight)).double()
    _perturb_zero_layers(direct)
    adjoint = build_model(kind, preset, solver=SolverConfig(adjoint=True, **tight)).double()
    adjoint.load_state_dict(direct.state_dict())
    x, target = image(dtype=F64), image(dtype=F64)
    g_direct, g_adjoint = _grads(direct, x, target), _grads(adjoint, x, target)
    assert adjoint.nfe_backward > 0 and direct.nfe_backward == 0
    assert g_direct.keys() == g_adjoint.keys() and len(g_direct) > 0
    for name, gd in g_direct.items():
        scale = gd.abs().max().item()
        assert scale > 0, name
        assert (g_adjoint[name] - gd).abs().max().item() <= 1e-5 * scale, name


@pytest.mark.parametrize("adjoint", [False, True])
def test_model_nfe_counters_count_calls(adjoint: bool) -> None:
    model = build_model("contour", "tiny", solver=SolverConfig(adjoint=adjoint, atol=1e-4))
    _perturb_zero_layers(model)
    calls = []
    model.solver.func.register_forward_hook(lambda *_: calls.append(1))
    out = model(image())
    assert model.nfe_forward == len(calls) > 0
    n_forward = len(calls)
    out.pow(2).mean().backward()
    assert model.nfe_backward == len(calls) - n_forward
    assert (model.nfe_backward > 0) == adjoint


def test_first_solve_at_init_costs_13_evaluations() -> None:
    model = build_model("image", "tiny")  # dopri5, first_step 0.5, fθ ≡ 0
    model(image()).mean().backward()
    assert (model.nfe_forward, model.nfe_backward) == (13, 13)


def test_nodestack_tiny_forward_and_nfe_sum() -> None:
    model = build_model("nodestack", "nodestack-tiny")
    x = image(2, 20, 12)
    out = model(x)
    assert out.shape == (2, 1, 20, 12)
    assert len(model.solvers) == 2
    assert model.nfe_forward == sum(s.nfe_forward for s in model.solvers) == 26
    out.mean().backward()
    assert model.nfe_backward == sum(s.nfe_backward for s in model.solvers) > 0


# ---------------------------------------------------------------------------------------------- presets


@pytest.mark.parametrize(
    ("kind", "preset", "target", "trainable_only"),
    [
        ("unet", "unet5m", 5e6, False),
        ("unet", "unet15m", 15e6, False),
        ("image", "nodeunet5m", 5e6, False),
        ("contour", "nodeunet5m", 5e6, True),  # the frozen UNet5M is not counted
        ("nodestack", "nodestack41m", 41e6, False),
    ],
)
def test_preset_parameter_counts(kind: str, preset: str, target: float, trainable_only: bool) -> None:
    n = count_parameters(build_model(kind, preset), trainable_only=trainable_only)
    assert abs(n - target) <= 0.1 * target, n


def test_tiny_preset_sizes() -> None:
    assert 30_000 <= count_parameters(build_model("unet", "unet-tiny")) <= 100_000
    assert 300_000 <= count_parameters(build_model("unet", "unet-small")) <= 500_000


@pytest.mark.parametrize(("kind", "preset"), [(k, p) for k, ps in PRESETS.items() for p in ps])
def test_no_batchnorm_and_norm_rule(kind: str, preset: str) -> None:
    model = build_model(kind, preset)
    for module in model.modules():
        assert not isinstance(module, nn.modules.batchnorm._BatchNorm), (preset, module)
        if isinstance(module, ConvNormAct):
            conv, norm = module[0], module[1]
            # LayerNorm (GroupNorm with one group) after grouped convs, GroupNorm after ungrouped ones
            assert isinstance(norm, nn.GroupNorm)
            assert conv.groups == 1 or norm.num_groups == 1


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("build", "name", "value"),
    [
        (lambda: UNet(base_channels=-4), "base_channels", -4),
        (lambda: UNet(in_channels=0), "in_channels", 0),
        (lambda: UNet(depth=0), "depth", 0),
        (lambda: UNet(base_channels=12, norm_groups=8), "norm_groups", 8),
        (lambda: UNet(base_channels=32, max_channels=16), "max_channels", 16),
        (lambda: build_model("resnet"), "kind", "resnet"),
        (lambda: build_model("unet", "unet99"), "preset", "unet99"),
        (lambda: build_model("contour", "unet5m"), "preset", "unet5m"),
        (lambda: build_model("unet", "unet-tiny", widht=3), "overrides", "widht"),
        (lambda: build_model("image", "tiny", func="mlp"), "func", "mlp"),
        (lambda: build_model("image", "tiny", func_layers=1), "func_layers", 1),
        (lambda: build_model("image", "tiny", hidden_channels=-1), "hidden_channels", -1),
        (lambda: ImageEvolution(in_channels=0), "in_channels", 0),
        (lambda: ContourEvolution(nn.Conv2d(1, 1, 1)), "unet", "Conv2d"),
        (lambda: NodeStack(stage_strides=(1, 3)), "stage_strides", (1, 3)),
        (lambda: NodeStack(stage_channels=(64, -8)), "stage_channels", -8),
        (lambda: NodeStack(groups=5), "groups", 5),
        (lambda: build_model("unet", "unet-tiny", activation="gelu"), "activation", "gelu"),
    ],
)
def test_bad_constructor_arguments(build, name: str, value: object) -> None:
    with pytest.raises(ValueError) as err:
        build()
    assert repr(name) in str(err.value) and repr(value) in str(err.value), str(err.value)


def test_build_model_solver_mapping_and_lists() -> None:
    model = build_model("nodestack", "nodestack-tiny", stage_channels=[16, 32], solver={"method": "rk4",
                                                                                      "step_size": 0.5})
    assert all(s.config == SolverConfig(method="rk4", step_size=0.5) for s in model.solvers)
    with pytest.raises(ConfigError, match="step_size"):
        build_model("image", "tiny", solver={"method": "rk4"})


def test_inference_solver_is_recorded_in_the_spec_and_used_in_eval_mode(tmp_path) -> None:
    """The spec records ``inference_solver`` only when set; the model rebuilt from it (what evaluate and
    predict load) solves with it in eval mode and with ``solver`` in training."""
    from nodeseg.models.spec import build_from_spec, load_model, make_spec
    from nodeseg.params import ModelSection
    from nodeseg.train import checkpoint as ckpt

    plain = make_spec("image", ModelSection(preset="tiny", solver=SolverConfig()))
    assert "inference_solver" not in plain and "steps" not in plain["solver"]
    section = ModelSection(preset="tiny", solver=SolverConfig(atol=1e-4),
                           inference_solver=SolverConfig(method="rk4", steps=2, first_step=None))
    spec = make_spec("image", section)
    assert spec["inference_solver"]["steps"] == 2
    torch.manual_seed(0)
    model = build_from_spec(spec)
    ckpt.save(tmp_path / "m.pt", {"model_spec": spec, "model": model.state_dict()})
    loaded, _ = load_model(tmp_path / "m.pt")
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        loaded(x)
    assert loaded.nfe_forward == 8  # eval: rk4, 2 steps
    loaded.train()(x)
    assert loaded.nfe_forward == 13  # training: dopri5 (f ≡ 0: 1 + 2 steps × 6)
