"""Figure 2 — NFE against atol, and the adjoint against direct backprop in time and peak memory.

    python -m benchmarks.nfe_memory [--quick] [--reps N] [--train-steps N]

**NFE against atol.** Forward and backward evaluations of one training step (dopri5, rtol 0,
first_step 0.5, adjoint with seminorm) at atol 1e-3, 1e-4, 1e-5, for each model at initialisation
(fθ ≡ 0: the flow is the identity) and after a short training on noisy ellipses (``--train-steps``
Adam steps at atol 1e-3).

**Adjoint against direct backprop at equal NFE.** The same step with the fixed-step rk4 (4 evaluations
per step, so both methods make exactly the same NFE forward, and the adjoint as many backward) at 8, 16
and 32 evaluations, and with dopri5 at atol 1e-3. Time: both methods interleaved in this process.
Peak memory: each configuration in a fresh process (``MALLOC_MMAP_THRESHOLD_`` fixed so freed tensors
go back to the system), one warm-up step, then the peak resident set size of one step above the resident
size before it (Linux ``clear_refs``/``VmHWM``); on CUDA ``torch.cuda.max_memory_allocated`` above the
allocation before the step. Goal: adjoint peak ≤ ½ direct peak at equal NFE.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import torch
from torch import nn

from benchmarks import common
from nodeseg.losses import narrow_band_mse
from nodeseg.models.registry import build_model

ATOLS = (1e-3, 1e-4, 1e-5)


def _model(kind: str, preset: str, solver: dict[str, Any], device: torch.device, perturb: bool) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(kind, preset, solver=solver)
    if perturb:
        common.perturb_zero_init(model, std=0.3)
    return model.to(device).train()


def _set_solver(model: nn.Module, **fields: Any) -> None:
    """Replace the solver settings of every ODESolver in ``model`` (fields of SolverConfig)."""
    import dataclasses

    for s in model.solvers:  # type: ignore[attr-defined]
        s.train_config = dataclasses.replace(s.train_config, **fields)


def _step(model: nn.Module, opt: torch.optim.Optimizer | None, image: torch.Tensor, phi: torch.Tensor) -> float:
    if opt is not None:
        opt.zero_grad(set_to_none=True)
    else:
        model.zero_grad(set_to_none=True)
    loss = narrow_band_mse(model(image), phi)
    loss.backward()
    if opt is not None:
        opt.step()
    return float(loss.detach())


def nfe_table(kind: str, preset: str, size: int, batch: int, train_steps: int, device: torch.device
              ) -> list[dict[str, Any]]:
    """NFE forward/backward per atol, at initialisation and after ``train_steps`` Adam steps."""
    dopri = {"method": "dopri5", "atol": 1e-3, "rtol": 0.0, "first_step": 0.5, "adjoint": True}
    model = _model(kind, preset, dopri, device, perturb=False)
    image, phi = (x.to(device) for x in common.blobs(batch, size, seed=123))
    rows = []

    def measure(when: str, loss_hint: float | None) -> None:
        for atol in ATOLS:
            _set_solver(model, atol=atol)
            loss = _step(model, None, image, phi)
            rows.append({"model": f"{kind} {preset}", "size": size, "batch": batch, "when": when, "atol": atol,
                         "nfe_forward": model.nfe_forward, "nfe_backward": model.nfe_backward,  # type: ignore
                         "loss": loss})
        _set_solver(model, atol=1e-3)

    measure("initialisation", None)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    losses = []
    for i in range(train_steps):
        im, ph = (x.to(device) for x in common.blobs(batch, size, seed=i % 8))
        losses.append(_step(model, opt, im, ph))
    measure(f"after {train_steps} steps", None)
    for r in rows:
        r["train_loss_first_last"] = [losses[0], losses[-1]] if losses else []
    return rows


# ------------------------------------------------------------------------------- adjoint vs direct


def _solver_for(setting: str, adjoint: bool) -> dict[str, Any]:
    if setting.startswith("rk4:"):
        nfe = int(setting.split(":")[1])
        return {"method": "rk4", "step_size": 4.0 / nfe, "first_step": None, "adjoint": adjoint}
    return {"method": "dopri5", "atol": 1e-3, "rtol": 0.0, "first_step": 0.5, "adjoint": adjoint}


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """In a fresh process: the peak memory of one training step above the memory before it."""
    device = common.pick_device(spec["device"])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    model = _model(spec["kind"], spec["preset"], _solver_for(spec["setting"], spec["adjoint"]), device, perturb=True)
    image, phi = (x.to(device) for x in common.blobs(spec["batch"], spec["size"], seed=1))
    _step(model, None, image, phi)  # warm-up: allocator, oneDNN primitives, autograd threads
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        _step(model, None, image, phi)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        kind = "cuda max_memory_allocated"
    else:
        before = common.reset_peak_rss()
        _step(model, None, image, phi)
        peak = common.peak_rss() - before
        kind = "peak RSS (VmHWM) above RSS before the step"
    return {"peak_bytes": int(peak), "measure": kind, "nfe_forward": model.nfe_forward,  # type: ignore
            "nfe_backward": model.nfe_backward}  # type: ignore


def adjoint_vs_direct(kind: str, preset: str, size: int, batch: int, settings: list[str], device: torch.device,
                      reps: int, clock: str, threads: int | None) -> list[dict[str, Any]]:
    """Time (interleaved, this process) and peak memory (fresh processes) of adjoint and direct steps."""
    rows = []
    image, phi = (x.to(device) for x in common.blobs(batch, size, seed=1))
    for setting in settings:
        models = {m: _model(kind, preset, _solver_for(setting, m == "adjoint"), device, perturb=True)
                  for m in ("adjoint", "direct")}
        nfe: dict[str, tuple[int, int]] = {}

        def runner(model: nn.Module, name: str, nfe: dict[str, tuple[int, int]] = nfe) -> Any:
            def run() -> None:
                _step(model, None, image, phi)
                nfe[name] = (model.nfe_forward, model.nfe_backward)  # type: ignore

            return run

        times = common.interleaved({m: runner(models[m], m) for m in models}, reps=reps, warmup=1, device=device,
                                   clock=clock)
        mem = {}
        for m in models:
            spec = {"kind": kind, "preset": preset, "size": size, "batch": batch, "setting": setting,
                    "adjoint": m == "adjoint", "device": str(device), "threads": threads}
            mem[m] = common.run_child("benchmarks.nfe_memory", ["--child", json.dumps(spec)],
                                      env={"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"})
        rows.append({
            "model": f"{kind} {preset}", "size": size, "batch": batch, "solver": setting.replace("rk4:", "rk4 NFE "),
            "nfe_forward": nfe["direct"][0], "nfe_backward_adjoint": nfe["adjoint"][1],
            "time_adjoint_s": times["adjoint"]["median"], "time_direct_s": times["direct"]["median"],
            "time_ratio_adjoint_direct": times["adjoint"]["median"] / times["direct"]["median"],
            "peak_adjoint_MiB": mem["adjoint"]["peak_bytes"] / 2**20,
            "peak_direct_MiB": mem["direct"]["peak_bytes"] / 2**20,
            "memory_ratio_adjoint_direct": mem["adjoint"]["peak_bytes"] / max(mem["direct"]["peak_bytes"], 1),
            "memory_measure": mem["direct"]["measure"],
            "load_average": common.load_average(),
        })
        print(f"{setting}: time ratio {rows[-1]['time_ratio_adjoint_direct']:.2f}, memory ratio "
              f"{rows[-1]['memory_ratio_adjoint_direct']:.2f}", file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__)
    p.add_argument("--train-steps", type=int, default=None, help="Adam steps before the second NFE table")
    p.add_argument("--child", help=argparse_hidden())
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    device = common.setup(args)
    reps = args.reps or (1 if args.quick else 5)
    if args.quick:
        nfe_models = [("image", "tiny", 16, 2)]
        mem_model, settings = ("image", "tiny", 16, 2), ["rk4:8"]
        train_steps = args.train_steps or 2
    else:
        nfe_models = [("contour", "tiny", 64, 16), ("image", "nodeunet-tiny", 64, 16)]
        mem_model, settings = ("image", "nodeunet-tiny", 128, 8), ["rk4:8", "rk4:16", "rk4:32", "dopri5"]
        train_steps = args.train_steps or 40
    nfe_rows = []
    for kind, preset, size, batch in nfe_models:
        nfe_rows += nfe_table(kind, preset, size, batch, train_steps, device)
    mem_rows = adjoint_vs_direct(*mem_model, settings, device, reps, args.clock, args.threads)
    print("Figure 2a — NFE (forward / backward, adjoint) against atol\n")
    print(common.table(nfe_rows, ["model", "size", "batch", "when", "atol", "nfe_forward", "nfe_backward", "loss"]))
    print("\nFigure 2b — adjoint against direct backprop at equal NFE; goal: memory ratio ≤ 0.5\n")
    print(common.table(mem_rows, ["model", "size", "batch", "solver", "nfe_forward", "nfe_backward_adjoint",
                                  "time_adjoint_s", "time_direct_s", "time_ratio_adjoint_direct",
                                  "peak_adjoint_MiB", "peak_direct_MiB", "memory_ratio_adjoint_direct"]))
    path = common.write_result(args.out, "nfe_memory", {
        "goal": "adjoint peak memory <= 0.5 x direct backprop's at equal NFE",
        "nfe_vs_atol": nfe_rows, "adjoint_vs_direct": mem_rows}, device, args)
    print(f"\n{path}")
    return 0


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    sys.exit(main())
