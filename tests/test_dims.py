"""The dimension seam (issue 20, steps 0 and 2): 3-D models, 3-D signed distance and loss, 2-D unchanged.

2-D bit-identity of the outputs is checked against a git ref by ``python -m benchmarks.same_2d --ref REF``
(it passes against 024460c, the commit before the seam): bit-identity holds on one machine, not across
them. What a test can hold on any machine is here: the 2-D presets' state_dict keys and shapes (old
checkpoints load) as hashes of the lists the code before the seam produced.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from torch import nn

from nodeseg.errors import ConfigError
from nodeseg.levelset import signed_distance, signed_distance_batch
from nodeseg.losses import narrow_band_mse, narrow_band_sums
from nodeseg.models import PRESETS, ContourEvolution, UNet, build_model, count_parameters
from nodeseg.models.blocks import (
    ConvNormAct,
    adaptive_avg_pool,
    channels_last_format,
    conv_transpose_type,
    conv_type,
    interpolate_mode,
    max_pool,
)
from nodeseg.models.odefunc import ConvODEFunc, TupleStateFunc, append_time
from nodeseg.models.presets import preset_spatial_dims, presets_for
from nodeseg.models.spec import spec_spatial_dims
from nodeseg.solve import ODESolver, SolverConfig

F64 = torch.float64


def volume(b: int = 1, d: int = 8, h: int = 8, w: int = 8, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(b, 1, d, h, w, dtype=dtype)


# ---------------------------------------------------------------------------------------------- factories


@pytest.mark.parametrize(
    ("dims", "conv", "up", "pool", "avg", "mode", "fmt"),
    [
        (2, nn.Conv2d, nn.ConvTranspose2d, torch.nn.functional.max_pool2d, torch.nn.functional.adaptive_avg_pool2d,
         "bilinear", torch.channels_last),
        (3, nn.Conv3d, nn.ConvTranspose3d, torch.nn.functional.max_pool3d, torch.nn.functional.adaptive_avg_pool3d,
         "trilinear", torch.channels_last_3d),
    ],
)
def test_factories_by_spatial_dims(dims, conv, up, pool, avg, mode, fmt) -> None:
    assert conv_type(dims) is conv and conv_transpose_type(dims) is up
    assert max_pool(dims) is pool and adaptive_avg_pool(dims) is avg
    assert interpolate_mode(dims) == mode and channels_last_format(dims) == fmt
    assert isinstance(ConvNormAct(4, 8, norm_groups=4, spatial_dims=dims)[0], conv)


@pytest.mark.parametrize("bad", [1, 4, True, "3", 3.0])
def test_bad_spatial_dims_is_refused_by_name(bad: object) -> None:
    with pytest.raises(ValueError, match="'spatial_dims'"):
        conv_type(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'spatial_dims'"):
        UNet(spatial_dims=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'spatial_dims'"):
        signed_distance(np.eye(3, dtype=bool), spatial_dims=bad)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- 2-D unchanged

# sha256 (16 hex) of "name:shape" lines of each 2-D preset's state_dict, as the code before the seam built it
STATE_DICT_HASHES = {
    ("unet", "unet-tiny"): "389b5975afa5a1e4",
    ("unet", "unet-small"): "d663ab9d7efc84b1",
    ("unet", "unet5m"): "c1d4880602fb4f3d",
    ("unet", "unet15m"): "83a487b4560c5565",
    ("contour", "tiny"): "bf6673507920479f",
    ("contour", "nodeunet-tiny"): "5e480bc9593f8c11",
    ("contour", "nodeunet5m"): "a8d0ad69123fee4f",
    ("image", "tiny"): "0df96e811f39a7dd",
    ("image", "nodeunet-tiny"): "7af8357f943785fd",
    ("image", "nodeunet5m"): "3f7fbd05cac8763e",
    ("nodestack", "nodestack-tiny"): "fe0338d073b36ab6",
    ("nodestack", "nodestack41m"): "c63ba9fe639ed71e",
}


def test_2d_presets_are_the_2d_presets_of_before() -> None:
    assert {(k, p) for k in PRESETS for p in presets_for(k, 2)} == set(STATE_DICT_HASHES)


@pytest.mark.parametrize(("kind", "preset"), sorted(STATE_DICT_HASHES))
def test_2d_state_dict_keys_and_shapes_unchanged(kind: str, preset: str) -> None:
    model = build_model(kind, preset)
    text = "\n".join(f"{n}:{tuple(t.shape)}" for n, t in model.state_dict().items())
    assert hashlib.sha256(text.encode()).hexdigest()[:16] == STATE_DICT_HASHES[(kind, preset)]
    assert getattr(model, "spatial_dims", 2) == 2


# ---------------------------------------------------------------------------------------------- signed distance


def _ball(shape: tuple[int, int, int], spacing: tuple[float, float, float], r: float) -> tuple[np.ndarray, np.ndarray]:
    """The analytic signed distance |x − c| − r on the voxel centres (c off the grid) and the voxelised ball."""
    axes = [np.arange(n) * d for n, d in zip(shape, spacing, strict=True)]
    c = np.array([n * d / 2 - 0.3 for n, d in zip(shape, spacing, strict=True)])
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
    exact = np.linalg.norm(grid - c, axis=-1) - r
    return exact, exact < 0


@pytest.mark.parametrize(("shape", "spacing"), [((40, 40, 40), None), ((32, 40, 44), (2.0, 1.0, 0.8))])
def test_3d_signed_distance_of_a_ball_is_the_analytic_distance(shape, spacing) -> None:
    """|φ − (|x − c| − r)| ≤ √3/2 voxel at unit spacing (the nearest voxel centre of the other class lies within
    half a voxel diagonal of the sphere; φ's boundary sits half a voxel out), ≤ the largest spacing with
    spacing (2, 1, 0.8); mean error under 0.3 in both. Measured: max 0.50 / 1.60, mean 0.28 / 0.21."""
    sp = (1.0, 1.0, 1.0) if spacing is None else spacing
    exact, mask = _ball(shape, sp, r=10.3)
    phi = signed_distance(mask, spacing=spacing, clip=100.0, spatial_dims=3)
    assert phi.shape == shape and phi.dtype == np.float32
    np.testing.assert_array_equal(phi < 0, mask)
    err = np.abs(phi - exact)
    bound = np.sqrt(3) / 2 if spacing is None else max(sp)
    assert err.max() <= bound and err.mean() < 0.3, (err.max(), err.mean())


def test_3d_signed_distance_clip_empty_full_and_batch() -> None:
    _, mask = _ball((20, 20, 20), (1.0, 1.0, 1.0), r=4.0)
    phi = signed_distance(mask, clip=3.0, spatial_dims=3)
    assert phi.min() >= -3.0 and phi.max() == 3.0
    # the window the transforms run on gives the values of the whole volume
    full = signed_distance(np.pad(mask, 30), clip=3.0, spatial_dims=3)[30:-30, 30:-30, 30:-30]
    np.testing.assert_array_equal(phi, full)
    assert (signed_distance(np.zeros((3, 4, 5), bool), clip=2.0, spatial_dims=3) == 2.0).all()
    assert (signed_distance(np.ones((3, 4, 5), bool), clip=2.0, spatial_dims=3) == -2.0).all()
    stack = np.stack([mask, ~mask])[:, None]
    out = signed_distance_batch(stack, spacing=(1.0, 2.0, 1.0), clip=5.0, spatial_dims=3)
    assert out.shape == stack.shape
    np.testing.assert_array_equal(out[1, 0], signed_distance(~mask, spacing=(1.0, 2.0, 1.0), clip=5.0, spatial_dims=3))
    with pytest.raises(ValueError, match="'spacing'"):
        signed_distance(mask, spacing=(1.0, 1.0), spatial_dims=3)
    with pytest.raises(ValueError, match="'mask'"):
        signed_distance(mask[0], spatial_dims=3)
    with pytest.raises(ValueError, match="'masks'"):
        signed_distance_batch(mask, spatial_dims=3)


# ---------------------------------------------------------------------------------------------- loss


def test_narrow_band_loss_on_volumes() -> None:
    torch.manual_seed(0)
    pred, true = volume(2, 3, 4, 5), volume(2, 3, 4, 5)
    valid = torch.rand(2, 1, 3, 4, 5) > 0.3
    sq = (torch.tanh(pred) - torch.tanh(true)) ** 2
    assert torch.allclose(narrow_band_mse(pred, true), sq.mean())
    assert torch.allclose(narrow_band_mse(pred, true, reduction="none"), sq.flatten(1).mean(1))
    assert torch.allclose(narrow_band_mse(pred, true, valid), sq[valid].mean())
    assert narrow_band_mse(pred, true, balance=True, reduction="none").shape == (2,)
    s_in, s_out, n_in, n_out = narrow_band_sums(pred, true, valid)
    assert float(n_in + n_out) == float(valid.sum())
    with pytest.raises(ValueError, match="'phi_pred'"):
        narrow_band_mse(pred[:, :, 0, 0], true[:, :, 0, 0])


# ---------------------------------------------------------------------------------------------- 3-D models


@pytest.mark.parametrize("size", [(8, 8, 8), (5, 7, 9), (1, 3, 2)])
def test_unet3d_any_size(size: tuple[int, int, int]) -> None:
    unet = build_model("unet", "unet3d-tiny")
    assert unet.spatial_dims == 3 and isinstance(unet.head, nn.Conv3d)
    assert unet(volume(2, *size)).shape == (2, 1, *size)


def test_unet3d_zero_init_last() -> None:
    unet = UNet(3, 2, base_channels=8, depth=2, norm_groups=4, zero_init_last=True, spatial_dims=3)
    assert torch.equal(unet(torch.randn(1, 3, 4, 8, 8)), torch.zeros(1, 2, 4, 8, 8))


@pytest.mark.parametrize("preset", ["tiny3d", "nodeunet3d-tiny"])
def test_contour_evolution_3d_is_identity_at_init(preset: str) -> None:
    """The 3-D mirror of the 2-D identity test: fθ's and ψ's last layers are zero, so φ̂ = φ(0) = unet(image)."""
    model = build_model("contour", preset)
    assert model.spatial_dims == 3 and model.unet.spatial_dims == 3
    x = volume(2, 8, 12, 8)
    with torch.no_grad():
        phi0 = model.unet(x)
    assert torch.equal(model(x), phi0)
    assert torch.equal(model(x, phi0=phi0), phi0)
    traj = model(x, phi0=phi0, times=torch.linspace(0, 1, 5))
    assert traj.shape == (5, 2, 1, 8, 12, 8)
    assert all(torch.allclose(p, phi0, rtol=0, atol=1e-5) for p in traj)


@pytest.mark.parametrize("preset", ["tiny3d", "nodeunet3d-tiny"])
def test_image_evolution_3d_shapes_and_identity_flow(preset: str) -> None:
    model = build_model("image", preset)
    x = volume(2, 4, 8, 8)
    assert model(x).shape == (2, 1, 4, 8, 8)
    traj = model(x, times=torch.linspace(0, 1, 3))
    assert traj.shape == (3, 2, 1, 4, 8, 8)
    assert torch.allclose(traj[0], traj[-1]) and torch.allclose(traj[-1], model(x), atol=1e-6)


def test_nodestack_3d_forward() -> None:
    sizes = dict(PRESETS["nodestack"]["nodestack-tiny"], stage_channels=(16, 16), stem_channels=8, aspp_channels=8)
    model = build_model("nodestack", None, spatial_dims=3, **sizes)
    assert model(volume(1, 8, 8, 12)).shape == (1, 1, 8, 8, 12)


def _perturb_zero_layers(model: nn.Module) -> None:
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv3d) and not module.weight.any():
                module.weight.normal_(0, 0.05)
                module.bias.normal_(0, 0.05)


def _grads(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    (model(x) - target).pow(2).mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(("kind", "preset"), [("contour", "tiny3d"), ("image", "tiny3d")])
def test_adjoint_gradients_equal_backprop_3d(kind: str, preset: str) -> None:
    """The 3-D mirror of the 2-D test: float64, atol 1e-9, every parameter gradient to rel 1e-5 (of the
    tensor's max magnitude)."""
    torch.manual_seed(0)
    tight = dict(atol=1e-9, max_num_steps=5000, max_nfe=100_000)
    direct = build_model(kind, preset, solver=SolverConfig(adjoint=False, **tight)).double()
    _perturb_zero_layers(direct)
    adjoint = build_model(kind, preset, solver=SolverConfig(adjoint=True, **tight)).double()
    adjoint.load_state_dict(direct.state_dict())
    x, target = volume(2, 6, 6, 6, dtype=F64), volume(2, 6, 6, 6, dtype=F64)
    g_direct, g_adjoint = _grads(direct, x, target), _grads(adjoint, x, target)
    assert adjoint.nfe_backward > 0 and direct.nfe_backward == 0
    assert g_direct.keys() == g_adjoint.keys() and len(g_direct) > 0
    for name, gd in g_direct.items():
        scale = gd.abs().max().item()
        assert scale > 0, name
        assert (g_adjoint[name] - gd).abs().max().item() <= 1e-5 * scale, name


@pytest.mark.parametrize("adjoint", [True, False])
def test_a_channels_last_3d_state_is_solved_in_its_own_layout(adjoint: bool) -> None:
    """A (φ, h) state in ``channels_last_3d`` memory is solved as (N, D, H, W, C) rows: fθ sees channels-last
    tensors, and the outputs and gradients are those of the NCDHW solve (to float64 rounding)."""
    cl = torch.channels_last_3d
    torch.manual_seed(3)
    f = ConvODEFunc(5, 8, 3, norm_groups=4, spatial_dims=3).double()
    for p in f.out.parameters():
        nn.init.normal_(p, std=0.3)
    func = TupleStateFunc(f, (1, 4))
    y0 = torch.randn(2, 5, 5, 6, 7, dtype=F64)
    seen: list[bool] = []
    f.register_forward_pre_hook(lambda _m, args: seen.append(args[1][-1].is_contiguous(memory_format=cl)))

    def run(layout: torch.memory_format) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        seen.clear()
        parts = tuple(p.contiguous(memory_format=layout).requires_grad_(True) for p in (y0[:, :1], y0[:, 1:]))
        solver = ODESolver(func, SolverConfig(atol=1e-8, adjoint=adjoint, max_num_steps=5000, max_nfe=100_000))
        out = solver(parts)
        sum(o[-1].sin().sum() for o in out).backward()
        grads = [p.grad.clone() for p in f.parameters()] + [p.grad for p in parts]
        f.zero_grad()
        return list(out), grads

    ref_out, ref_grads = run(torch.contiguous_format)
    assert not all(seen)
    out, grads = run(cl)
    assert all(seen)
    assert out[1][-1].is_contiguous(memory_format=cl)
    for a, b in zip(out, ref_out, strict=True):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads, ref_grads, strict=True):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12 * b.abs().max().item())


def test_append_time_keeps_a_channels_last_3d_layout() -> None:
    cl = torch.channels_last_3d
    parts = (torch.randn(2, 1, 3, 5, 6).contiguous(memory_format=cl), torch.randn(2, 3, 3, 5, 6).contiguous(memory_format=cl))
    got = append_time(parts, 0.25)
    assert got.shape == (2, 5, 3, 5, 6) and got.is_contiguous(memory_format=cl)
    assert torch.equal(got, append_time(tuple(p.contiguous() for p in parts), 0.25))
    assert torch.equal(got[:, 4], torch.full((2, 3, 5, 6), 0.25))


# ---------------------------------------------------------------------------------------------- presets

PARAMS_3D = {
    ("unet", "unet3d-tiny"): 85_177,
    ("unet", "unet3d-small"): 1_401_265,
    ("unet", "unet3d5m"): 5_646_385,
    ("contour", "tiny3d"): 19_138,
    ("contour", "nodeunet3d-tiny"): 91_138,
    ("contour", "nodeunet3d5m"): 5_668_802,
    ("image", "tiny3d"): 18_057,
    ("image", "nodeunet3d-tiny"): 90_697,
    ("image", "nodeunet3d5m"): 5_667_921,
}


def test_3d_presets_are_listed() -> None:
    assert {(k, p) for k in PRESETS for p in presets_for(k, 3)} == set(PARAMS_3D)


@pytest.mark.parametrize(("kind", "preset"), sorted(PARAMS_3D))
def test_3d_preset_parameter_counts(kind: str, preset: str) -> None:
    """Exact counts (docs/architecture.md, "3-D models"); for 'contour' the trainable part only."""
    model = build_model(kind, preset)
    assert model.spatial_dims == 3 and preset_spatial_dims(kind, preset) == 3
    assert count_parameters(model, trainable_only=kind == "contour") == PARAMS_3D[(kind, preset)]
    assert not any(isinstance(m, nn.Conv2d | nn.ConvTranspose2d) for m in model.modules())


@pytest.mark.parametrize(
    ("kind", "preset", "dims", "fits"),
    [
        ("unet", "unet-tiny", 3, "unet3d-tiny, unet3d-small, unet3d5m"),
        ("contour", "tiny", 3, "tiny3d, nodeunet3d-tiny, nodeunet3d5m"),
        ("image", "nodeunet5m", 3, "tiny3d, nodeunet3d-tiny, nodeunet3d5m"),
        ("unet", "unet3d-tiny", 2, "unet-tiny, unet-small, unet5m, unet15m"),
        ("nodestack", "nodestack-tiny", 3, None),
    ],
)
def test_a_preset_of_other_dims_is_refused_in_one_line(kind: str, preset: str, dims: int, fits: str | None) -> None:
    with pytest.raises(ConfigError) as err:
        build_model(kind, preset, spatial_dims=dims)
    msg = str(err.value)
    want = f"(one of {fits})" if fits else "(there is none yet: give sizes without a preset)"
    assert "\n" not in msg and repr(preset) in msg and want in msg, msg
    assert f"a {dims}-D {kind} preset for spatial_dims={dims}" in msg, msg


def test_contour_dims_must_match_its_unet() -> None:
    with pytest.raises(ConfigError, match="'unet_preset'.*'unet-tiny', a 2-D preset"):
        build_model("contour", "tiny3d", unet_preset="unet-tiny")
    with pytest.raises(ValueError, match="'unet' must be a 3-D UNet"):
        ContourEvolution(build_model("unet", "unet-tiny"), spatial_dims=3)
    with pytest.raises(ValueError, match="'unet' must be a 2-D UNet"):
        ContourEvolution(build_model("unet", "unet3d-tiny"))
    with pytest.raises(ValueError, match="'priors'"):
        build_model("contour", "tiny3d", priors={"curvature": 0.1})
    assert build_model("contour", None, spatial_dims=3).unet.spatial_dims == 3  # unet3d-tiny by default


def test_spec_spatial_dims() -> None:
    assert spec_spatial_dims({"kind": "unet", "preset": "unet-tiny", "sizes": {}}) == 2
    assert spec_spatial_dims({"kind": "contour", "preset": "tiny3d", "sizes": {}}) == 3
    assert spec_spatial_dims({"kind": "image", "preset": None, "sizes": {"spatial_dims": 3}}) == 3
    assert spec_spatial_dims({"kind": "unet"}) == 2
