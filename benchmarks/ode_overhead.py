"""Figure 1 — ODE machinery overhead of a Neural-ODE training step.

    python -m benchmarks.ode_overhead [--quick] [--reps N]

One training step (forward, narrow-band loss, backward, Adam) of a NODE model is timed side by side with
the work it cannot avoid:

* ``rest``: the same step with the ODE solve replaced by the identity (encoder, frozen UNet, head, loss,
  their backward, Adam over every parameter);
* ``f``: one evaluation of the bare tensor fθ at the state's size (batch, channels, H, W) under no_grad —
  what each forward-solve evaluation of the adjoint method costs;
* ``f+vjp``: one evaluation of fθ with grad plus the vector-Jacobian product with respect to the state and
  fθ's parameters (``torch.autograd.grad``) — what each evaluation of the adjoint's backward solve costs,
  and what each evaluation costs in direct backprop (forward with a graph, then one backward through it).

Model, image and state are channels-last, as training runs them (``--layout nchw`` for NCHW).
Denominator (the ideal ODE work): adjoint ``NFE_fwd·f + NFE_bwd·(f+vjp)``; direct ``NFE_fwd·(f+vjp)``.
Figure: ``overhead = (step − rest) / ideal``; the goal is ≤ 1.05. ``step / (rest + ideal)`` is reported
too. The adjoint's backward solve takes the weight gradients only at evaluations whose parameter
integrand is summed (``nodeseg.dopri5.Quadrature``); the others cost ``f+vjp_y`` (the VJP with respect to
the state alone, timed too). ``overhead_machinery`` counts them at that cost in the denominator: the
solver's own excess, with the saving of the skipped weight gradients taken out. What is left over is the
solver's own arithmetic (Runge–Kutta stage sums, error norms, step control, dense output), the adjoint's
augmented state (flattening, zero-filled VJPs, re-integrating y backwards), the tuple-state concatenation
and nodeseg's counting/cap callbacks. fθ's last layer is perturbed from zero
(:func:`benchmarks.common.perturb_zero_init`) so that the flow is not the identity, and Adam runs with
lr 0 so that the weights (and therefore NFE) stay the same in every repetition.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks import common
from nodeseg.losses import narrow_band_mse
from nodeseg.models.odefunc import TupleStateFunc
from nodeseg.models.registry import build_model


class _SkipSolve(nn.Module):
    """Stands in for an ODESolver: returns y(t1) = y(0) as a one-element time series."""

    def forward(self, y0: Tensor | tuple[Tensor, ...], t: Tensor | None = None) -> Tensor | tuple[Tensor, ...]:
        if isinstance(y0, tuple):
            return tuple(y.unsqueeze(0) for y in y0)
        return y0.unsqueeze(0)


def build(kind: str, preset: str, solver: dict[str, Any], device: torch.device, channels_last: bool = False
          ) -> nn.Module:
    """A NODE model with a non-trivial flow (perturbed zero-init layers), on ``device``."""
    torch.manual_seed(0)
    model = build_model(kind, preset, solver=solver)
    common.perturb_zero_init(model, std=0.3)
    model = model.to(device).train()
    return model.to(memory_format=torch.channels_last) if channels_last else model


def initial_state(model: nn.Module, image: Tensor) -> Tensor:
    """The state fθ sees, concatenated to one tensor (B, C, H, W)."""
    with torch.no_grad():
        h0 = model.encoder(image)
        if hasattr(model, "unet"):
            return torch.cat([model.unet(image), h0], dim=1)
        return h0


def bare_func(model: nn.Module) -> nn.Module:
    """The tensor fθ inside the model's solver (without the tuple adapter or the counter)."""
    f = model.solver.func
    return f.func if isinstance(f, TupleStateFunc) else f


def measure(name: str, kind: str, preset: str, size: int, batch: int, solver: dict[str, Any],
            device: torch.device, reps: int, evals_per_call: int = 5, clock: str = "wall",
            channels_last: bool = True) -> dict[str, Any]:
    """Time step, rest, f and f+vjp for one configuration; return the figure and its parts. Model, image
    and state are channels-last unless ``channels_last`` is False (training's default layout)."""
    model = build(kind, preset, solver, device, channels_last)
    image, phi = (x.to(device) for x in common.blobs(batch, size, seed=1))
    if channels_last:
        image = image.contiguous(memory_format=torch.channels_last)
    valid = torch.ones_like(phi)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=0.0)
    ode_params = [p for p in model.solver.parameters() if p.requires_grad]
    real_solver, skip = model.solver, _SkipSolve()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = narrow_band_mse(model(image), phi, valid)
        loss.backward()
        opt.step()

    def rest() -> None:
        model.solver = skip
        try:
            opt.zero_grad(set_to_none=True)
            loss = narrow_band_mse(model(image), phi, valid)
            loss.backward()
            for p in ode_params:  # Adam still updates fθ's parameters in a real step
                p.grad = torch.zeros_like(p)
            opt.step()
        finally:
            model.solver = real_solver

    f = bare_func(model)
    y = initial_state(model, image)
    if channels_last:
        y = y.contiguous(memory_format=torch.channels_last)
    t = torch.tensor(0.5, device=device)
    v = torch.randn_like(y)
    f_params = tuple(p for p in f.parameters() if p.requires_grad)

    def evals_nograd() -> None:
        with torch.no_grad():
            for _ in range(evals_per_call):
                f(t, y)

    def evals_vjp(weights: bool = True) -> None:
        for _ in range(evals_per_call):
            y_ = y.detach().requires_grad_(True)
            out = f(t, y_)
            torch.autograd.grad(out, (y_, *f_params) if weights else (y_,), v, allow_unused=True)

    # how many evaluations of a step compute fθ's weight gradients: a hook on one weight observes them
    weight_vjps = [0]
    hook = f_params[0].register_hook(lambda g: weight_vjps.__setitem__(0, weight_vjps[0] + 1))
    step()  # NFE of this configuration (constant: lr 0)
    hook.remove()
    nfe_f, nfe_b = int(model.nfe_forward), int(model.nfe_backward)
    adjoint = bool(solver.get("adjoint", True))
    # the adjoint: one per backward evaluation that takes them, and one for the gradient handed to the leaf
    n_weight = weight_vjps[0] - 1 if adjoint else nfe_f
    times = common.interleaved({"step": step, "rest": rest, "f": evals_nograd, "f+vjp": evals_vjp,
                                "f+vjp_y": lambda: evals_vjp(weights=False)},
                               reps=reps, warmup=1, device=device, clock=clock)
    assert (model.nfe_forward, model.nfe_backward) == (nfe_f, nfe_b), "NFE changed between repetitions"

    def parts(stat: str) -> tuple[float, float, float, float, float, float]:
        step_, rest_ = times["step"][stat], times["rest"][stat]
        f_, fb_, fy_ = (times[k][stat] / evals_per_call for k in ("f", "f+vjp", "f+vjp_y"))
        if not adjoint:
            return step_, rest_, f_, fb_, nfe_f * fb_, nfe_f * fb_
        return (step_, rest_, f_, fb_, nfe_f * f_ + nfe_b * fb_,
                nfe_f * f_ + n_weight * fb_ + (nfe_b - n_weight) * fy_)

    t_step, t_rest, t_f, t_fb, ideal, ideal_work = parts("median")
    m_step, m_rest, _, _, m_ideal, _ = parts("min")  # the least disturbed repetitions (a busy machine only adds)
    return {
        "config": name, "kind": kind, "preset": preset, "size": size, "batch": batch,
        "layout": "channels_last" if channels_last else "nchw",
        "method": solver.get("method", "dopri5"), "backprop": "adjoint" if adjoint else "direct",
        "nfe_forward": nfe_f, "nfe_backward": nfe_b, "weight_vjps": n_weight,
        "step_s": t_step, "rest_s": t_rest, "f_s": t_f, "f_vjp_s": t_fb,
        "f_vjp_y_s": times["f+vjp_y"]["median"] / evals_per_call, "ideal_ode_s": ideal,
        "overhead": (t_step - t_rest) / ideal, "overhead_of_minima": (m_step - m_rest) / m_ideal,
        "overhead_machinery": (t_step - t_rest) / ideal_work,
        "step_over_ideal_step": t_step / (t_rest + ideal),
        "ode_share_of_step": (t_step - t_rest) / t_step,
        "timings": times,
    }


def configs(quick: bool) -> list[tuple[str, str, str, int, int, dict[str, Any]]]:
    """(name, kind, preset, size, batch, solver) of each measured configuration."""
    dopri = {"method": "dopri5", "atol": 1e-3, "rtol": 0.0, "first_step": 0.5}
    if quick:
        return [("contour-tiny adjoint", "contour", "tiny", 16, 2, dopri),
                ("image-tiny direct", "image", "tiny", 16, 2, {**dopri, "adjoint": False})]
    euler = {"method": "euler", "step_size": 0.25, "first_step": None}
    return [
        ("refine default (contour tiny) adjoint", "contour", "tiny", 64, 16, dopri),
        ("refine default (contour tiny) direct", "contour", "tiny", 64, 16, {**dopri, "adjoint": False}),
        ("image-evolve (nodeunet-tiny) dopri5 adjoint", "image", "nodeunet-tiny", 64, 16, dopri),
        ("image-evolve default (nodeunet-tiny) euler adjoint", "image", "nodeunet-tiny", 64, 16, euler),
        ("image-evolve (nodeunet5m, the paper's fθ) dopri5 adjoint", "image", "nodeunet5m", 64, 4, dopri),
        ("refine (contour nodeunet5m, the paper's fθ) dopri5 adjoint", "contour", "nodeunet5m", 64, 4, dopri),
    ]


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__)
    p.add_argument("--dopri5", choices=("nodeseg", "torchdiffeq"), default="nodeseg",
                   help="which dopri5 the solver runs: nodeseg.dopri5 (shipped) or torchdiffeq's own (the 'before' "
                        "figure); the latter writes ode_overhead_torchdiffeq.json")
    p.add_argument("--adjoint", choices=("nodeseg", "torchdiffeq"), default="nodeseg",
                   help="which adjoint back-propagates: nodeseg.adjoint (shipped) or torchdiffeq's odeint_adjoint "
                        "(the 'before' figure); the latter writes ode_overhead_torchdiffeq_adjoint.json")
    p.add_argument("--layout", choices=("channels_last", "nchw"), default="channels_last",
                   help="memory layout of model, image and state: training's default (channels_last) or NCHW "
                        "(the figures before channels-last training; writes ode_overhead_nchw.json)")
    args = p.parse_args(argv)
    device = common.setup(args)
    from nodeseg import solve

    if args.dopri5 == "torchdiffeq":
        solve._TORCHDIFFEQ_METHOD.clear()  # dopri5 → torchdiffeq's Dopri5Solver
    solve.ADJOINT["impl"] = args.adjoint
    reps = args.reps or (1 if args.quick else 7)
    rows = []
    for name, kind, preset, size, batch, solver in configs(args.quick):
        row = measure(name, kind, preset, size, batch, solver, device, reps, clock=args.clock,
                      channels_last=args.layout == "channels_last")
        row["load_average"] = common.load_average()
        rows.append(row)
        print(f"{name}: overhead {row['overhead']:.3f}", file=sys.stderr, flush=True)
    cols = ["config", "size", "batch", "nfe_forward", "nfe_backward", "weight_vjps", "step_s", "rest_s", "f_s",
            "f_vjp_s", "f_vjp_y_s", "overhead", "overhead_of_minima", "overhead_machinery", "step_over_ideal_step",
            "ode_share_of_step"]
    print("Figure 1 — ODE machinery overhead: (step − rest) / (NFE_fwd·f + NFE_bwd·(f+vjp)); goal ≤ 1.05\n")
    print(common.table(rows, cols))
    name = "ode_overhead"
    if args.dopri5 == "torchdiffeq":
        name += "_torchdiffeq"
    if args.adjoint == "torchdiffeq":
        name += "_torchdiffeq_adjoint"
    if args.layout == "nchw":
        name += "_nchw"
    result = {"goal": "overhead <= 1.05", "dopri5": args.dopri5, "adjoint": args.adjoint, "rows": rows}
    path = common.write_result(args.out, name, result, device, args)
    print(f"\n{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
