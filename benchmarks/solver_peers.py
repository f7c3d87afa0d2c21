"""Figure 6 — nodeseg's ODESolver against its peers: torchdiffeq called bare, and torchode.

    python -m benchmarks.solver_peers [--quick] [--reps N]

One solve over [0, 1] of a model's fθ from its initial state, then the backward pass of
``loss = Σ y(1)·v`` (v random, scaled by 1/numel like the gradient of a mean loss), timed side by side (interleaved) for:

* ``torchdiffeq``: ``odeint_adjoint`` (or ``odeint``) called bare with the options nodeseg passes
  (dopri5, rtol 0, atol, first_step 0.5, seminorm adjoint);
* ``nodeseg (torchdiffeq dopri5 + adjoint)``: ``ODESolver`` with torchdiffeq's own dopri5 and
  ``odeint_adjoint`` — the wrapper's overhead alone (counting, caps, the adjoint step callback);
* ``nodeseg``: ``ODESolver`` as shipped (dopri5 runs as ``nodeseg.dopri5``, the adjoint as
  ``nodeseg.adjoint``, which takes fewer backward steps: see its docstring);
* ``torchode``: torchode 1.0's Dopri5 with an integral controller (atol, rtol 0, per-sample step sizes
  and error norms), the state flattened per sample, backward by ``AutoDiffAdjoint`` (direct
  backprop through the solver) and, for the adjoint rows, ``BacksolveAdjoint``.

Each row gives the time ratio against bare torchdiffeq, NFE (forward / backward; torchode reports
its forward evaluations per sample, the maximum is the number of batched fθ calls) and the RMS error of
y(1) against a reference solve (torchdiffeq, atol 1e-7). The wrapper's goal is an overhead ≤ 1.05.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torchdiffeq import odeint, odeint_adjoint

import nodeseg.solve as solve
from benchmarks import common
from benchmarks.ode_overhead import build, initial_state
from nodeseg.models.odefunc import ConvODEFunc, TupleStateFunc, UNetODEFunc


class _PerSampleTime(nn.Module):
    """fθ for torchode: state (B, C·H·W), time (B,) → derivative (B, C·H·W); time enters as a channel."""

    def __init__(self, inner: nn.Module, shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.inner = inner
        self.shape = shape

    def forward(self, t: Tensor, y: Tensor) -> Tensor:
        x = y.reshape(-1, *self.shape)
        tt = t.reshape(-1, 1, 1, 1).to(x.dtype).expand(x.shape[0], 1, *self.shape[1:])
        z = torch.cat([x, tt], dim=1)
        if isinstance(self.inner, UNetODEFunc):
            out = self.inner.unet(z)
        elif isinstance(self.inner, ConvODEFunc):
            out = self.inner.out(self.inner.body(z))
        else:
            raise TypeError(type(self.inner).__name__)
        return out.reshape(y.shape)


def _torchode_solver(f: nn.Module, atol: float, adjoint: bool) -> Callable[[Tensor], tuple[Tensor, dict]]:
    import torchode as to

    term = to.ODETerm(f)
    step = to.Dopri5(term=term)
    controller = to.IntegralController(atol=atol, rtol=0.0, term=term)
    solver = to.BacksolveAdjoint(term, step, controller) if adjoint else to.AutoDiffAdjoint(step, controller)

    def run(y0: Tensor) -> tuple[Tensor, dict]:
        b = y0.shape[0]
        t_eval = torch.tensor([0.0, 1.0], dtype=y0.dtype, device=y0.device).expand(b, 2)
        problem = to.InitialValueProblem(y0=y0, t_eval=t_eval)
        sol = solver.solve(problem, dt0=torch.full((b,), 0.5, dtype=y0.dtype, device=y0.device))
        return sol.ys[:, -1], sol.stats

    return run


def measure(name: str, kind: str, preset: str, size: int, batch: int, adjoint: bool, device: torch.device,
            reps: int, clock: str, with_torchode: bool, atol: float = 1e-3) -> list[dict[str, Any]]:
    """Rows of one configuration: each solver's time, ratio, NFE and error."""
    solver_cfg = {"method": "dopri5", "atol": atol, "rtol": 0.0, "first_step": 0.5, "adjoint": adjoint}
    model = build(kind, preset, solver_cfg, device)
    image, _ = (x.to(device) for x in common.blobs(batch, size, seed=1))
    y_cat = initial_state(model, image)
    func = model.solver.func  # TupleStateFunc for contour, the tensor fθ for image
    tuple_state = isinstance(func, TupleStateFunc)
    y0: Tensor | tuple[Tensor, ...] = (y_cat[:, :1].contiguous(), y_cat[:, 1:].contiguous()) if tuple_state else y_cat
    t = torch.tensor([0.0, 1.0], device=device)
    v = torch.randn_like(y_cat) / y_cat.numel()  # the scale of a mean loss's gradient
    params = tuple(p for p in func.parameters() if p.requires_grad)

    def cat(y: Tensor | tuple[Tensor, ...]) -> Tensor:
        return torch.cat(y, dim=1) if isinstance(y, tuple) else y

    def loss_of(y1: Tensor) -> Tensor:
        return (y1 * v).sum()

    nfe: dict[str, tuple[int, int]] = {}
    outs: dict[str, Tensor] = {}

    def bare() -> None:
        calls = [0]

        class Counted(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.f = func

            def forward(self, tt: Tensor, y: Any) -> Any:
                calls[0] += 1
                return self.f(tt, y)

        counted = Counted()
        opts = {"first_step": 0.5}
        if adjoint:
            out = odeint_adjoint(counted, y0, t, rtol=0.0, atol=atol, method="dopri5", options=opts,
                                 adjoint_options={**opts, "norm": "seminorm"}, adjoint_params=params)
        else:
            out = odeint(counted, y0, t, rtol=0.0, atol=atol, method="dopri5", options=opts)
        y1 = cat(tuple(o[-1] for o in out) if isinstance(out, tuple) else out[-1])
        n_fwd = calls[0]
        loss_of(y1).backward()
        nfe["torchdiffeq"] = (n_fwd, calls[0] - n_fwd)
        outs["torchdiffeq"] = y1.detach()

    def wrapped(label: str, original: bool) -> Callable[[], None]:
        def run() -> None:
            saved, saved_adjoint = dict(solve._TORCHDIFFEQ_METHOD), dict(solve.ADJOINT)
            if original:  # before: torchdiffeq's dopri5 and torchdiffeq's odeint_adjoint
                solve._TORCHDIFFEQ_METHOD.clear()
                solve.ADJOINT["impl"] = "torchdiffeq"
            try:
                out = model.solver(y0)
                y1 = cat(tuple(o[-1] for o in out) if isinstance(out, tuple) else out[-1])
                loss_of(y1).backward()
            finally:
                solve._TORCHDIFFEQ_METHOD.update(saved)
                solve.ADJOINT.update(saved_adjoint)
            nfe[label] = (model.solver.nfe_forward, model.solver.nfe_backward)
            outs[label] = y1.detach()

        return run

    fns: dict[str, Callable[[], None]] = {
        "torchdiffeq": bare,
        "nodeseg (torchdiffeq dopri5 + adjoint)": wrapped("nodeseg (torchdiffeq dopri5 + adjoint)", True),
        "nodeseg": wrapped("nodeseg", False),
    }
    torchode_note = ""
    if with_torchode:
        shape = tuple(y_cat.shape[1:])
        ode_f = _PerSampleTime(func.func if tuple_state else func, shape)  # type: ignore[arg-type]
        run_to = _torchode_solver(ode_f, atol, adjoint)
        y_flat = y_cat.reshape(batch, -1)

        def torchode_run() -> None:
            y1, stats = run_to(y_flat)
            loss_of(y1.reshape(y_cat.shape)).backward()
            n = stats.get("n_f_evals")
            nfe["torchode"] = (int(n.max()) if isinstance(n, Tensor) else int(n or 0), None)  # type: ignore[assignment]
            outs["torchode"] = y1.detach().reshape(y_cat.shape)

        try:
            torchode_run()
            fns["torchode"] = torchode_run
        except Exception as err:  # noqa: BLE001 - a peer that cannot run this model is a result too
            torchode_note = f"torchode failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
            print(torchode_note, file=sys.stderr)
        if tuple_state:
            torchode_note = torchode_note or ("torchode: concatenated state (atol binds on the RMS over all "
                                              "channels, not on φ alone)")
    times = common.interleaved(fns, reps=reps, warmup=1, device=device, clock=clock)

    with torch.no_grad():  # reference: torchdiffeq dopri5 at atol 1e-7
        ref = odeint(func, y0, t, rtol=0.0, atol=1e-7, method="dopri5", options={"first_step": 0.05})
        ref1 = cat(tuple(o[-1] for o in ref) if isinstance(ref, tuple) else ref[-1])
    base, base_min = times["torchdiffeq"]["median"], times["torchdiffeq"]["min"]
    rows = []
    for label, tm in times.items():
        err = float((outs[label] - ref1).pow(2).mean().sqrt())
        rows.append({
            "config": name, "backprop": "adjoint" if adjoint else "direct", "solver": label,
            "seconds": tm["median"], "ratio_to_torchdiffeq": tm["median"] / base,
            "ratio_of_minima": tm["min"] / base_min,
            "nfe_forward": nfe[label][0], "nfe_backward": nfe[label][1], "rms_error_y1": err,
            "note": torchode_note if label == "torchode" else "",
            "timing": tm,
        })
    return rows


def configs(quick: bool) -> list[tuple[str, str, str, int, int, bool]]:
    if quick:
        return [("image tiny 16²×2", "image", "tiny", 16, 2, True),
                ("contour tiny 16²×2", "contour", "tiny", 16, 2, False)]
    return [
        ("contour tiny 64²×16", "contour", "tiny", 64, 16, True),
        ("image nodeunet-tiny 64²×16", "image", "nodeunet-tiny", 64, 16, True),
        ("image nodeunet-tiny 64²×16", "image", "nodeunet-tiny", 64, 16, False),
    ]


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__)
    p.add_argument("--no-torchode", action="store_true", help="leave torchode out")
    args = p.parse_args(argv)
    device = common.setup(args)
    reps = args.reps or (2 if args.quick else 5)
    rows: list[dict[str, Any]] = []
    for name, kind, preset, size, batch, adjoint in configs(args.quick):
        got = measure(name, kind, preset, size, batch, adjoint, device, reps, args.clock, not args.no_torchode)
        for r in got:
            r["load_average"] = common.load_average()
        rows += got
        print(f"{name}: " + ", ".join(f"{r['solver']} {r['ratio_to_torchdiffeq']:.3f}" for r in got),
              file=sys.stderr, flush=True)
    print("Figure 6 — solver peers: time of solve + backward relative to bare torchdiffeq (same options)\n")
    print(common.table(rows, ["config", "backprop", "solver", "seconds", "ratio_to_torchdiffeq", "ratio_of_minima",
                              "nfe_forward",
                              "nfe_backward", "rms_error_y1", "note"]))
    path = common.write_result(args.out, "solver_peers", {
        "goal": "nodeseg (torchdiffeq dopri5 + adjoint) / torchdiffeq <= 1.05 (the wrapper's overhead); torchode adopted "
                "only if it is faster at equal error", "rows": rows}, device, args)
    print(f"\n{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
