"""Figure 3 — achieved FLOP/s of UNet and NodeUNet training steps against the machine's matmul peak.

    python -m benchmarks.flops [--quick] [--reps N] [--no-compile]

FLOPs of one training step (forward, narrow-band loss, backward; convolutions and matrix products as
counted by ``torch.utils.flop_counter.FlopCounterMode``; norms and activations count nothing) divided by
its median time, then by the float32 matmul peak (an n×n product, 2n³ FLOPs) timed in the same
interleaved run at the same thread count. Goal: ≥ 0.5 on CPU.

For the training default (channels_last) on CPU one more profiled step gives ``kernel_share``, the part of
its time spent inside the operators whose FLOPs are counted, and ``kernels_only_ratio``, the figure if
those operators were all the step did: the ceiling that no saving elsewhere can lift.

Variants: eager NCHW (the default), ``channels_last``, ``torch.compile`` (inductor; of fθ only for the
NODE models), one torch thread against the machine's (the peak is then also measured at one thread: the
``per_thread`` column), and on CUDA TF32 and bf16 autocast. Adam runs with lr 0 so that the NODE's NFE (and
therefore its FLOPs) stays the same in every repetition.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import common
from nodeseg.losses import narrow_band_mse
from nodeseg.models.registry import build_model


def _model(kind: str, preset: str, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    solver = {"method": "dopri5", "atol": 1e-3, "rtol": 0.0, "first_step": 0.5} if kind != "unet" else None
    model = build_model(kind, preset, **({"solver": solver} if solver else {}))
    common.perturb_zero_init(model, std=0.3)
    return model.to(device).train()


def _step_fn(model: nn.Module, image: torch.Tensor, phi: torch.Tensor,
             autocast: torch.dtype | None = None) -> Callable[[], None]:
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.0)
    dev = image.device.type

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        ctx = torch.autocast(dev, dtype=autocast) if autocast else contextlib.nullcontext()
        with ctx:
            pred = model(image)
        loss = narrow_band_mse(pred.float(), phi)
        loss.backward()
        opt.step()

    return step


class _GlobalOnly:
    """Stands in for FlopCounterMode's module tracker, whose backward hooks break ``autograd.grad`` (the
    adjoint's vector-Jacobian products): every FLOP is counted under 'Global' only."""

    parents = ("Global",)

    def __enter__(self) -> _GlobalOnly:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def count_flops(step: Callable[[], None]) -> int:
    """FLOPs of one call of ``step`` (forward and backward)."""
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _GlobalOnly()  # type: ignore[assignment]
    with counter:
        step()
    return int(counter.get_total_flops())


_KERNELS = ("convolution", "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def kernel_seconds(step: Callable[[], None]) -> tuple[float, float]:
    """(seconds inside the operators FLOPs are counted for, wall seconds) of one profiled call of ``step``
    (CPU): convolutions forward and backward and matrix products, each operator's own time."""
    from torch.profiler import ProfilerActivity, profile

    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    wall = time.perf_counter() - start
    self_us = sum(e.self_cpu_time_total for e in prof.key_averages()
                  if any(k in e.key for k in _KERNELS))
    return self_us / 1e6, wall


def _variants(kind: str, preset: str, size: int, batch: int, device: torch.device, compile_: bool
              ) -> dict[str, Callable[[], None]]:
    """name → a step callable (each with its own model copy, same weights)."""
    image, phi = (x.to(device) for x in common.blobs(batch, size, seed=1))
    out: dict[str, Callable[[], None]] = {}
    out["eager"] = _step_fn(_model(kind, preset, device), image, phi)
    cl = _model(kind, preset, device).to(memory_format=torch.channels_last)
    out["channels_last"] = _step_fn(cl, image.contiguous(memory_format=torch.channels_last), phi)
    if compile_:
        m = _model(kind, preset, device)
        if kind == "unet":
            m = torch.compile(m, dynamic=False)
        else:  # the solver's loop stays in Python: compile fθ, which it calls NFE times
            m.solver.counter.func = torch.compile(m.solver.counter.func, dynamic=False)
        out["compile"] = _step_fn(m, image, phi)
    if device.type == "cuda":
        tf32 = _model(kind, preset, device)
        base = _step_fn(tf32, image, phi)

        def with_tf32() -> None:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
            try:
                base()
            finally:
                torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

        out["tf32"] = with_tf32
        out["bf16 autocast"] = _step_fn(_model(kind, preset, device), image, phi, autocast=torch.bfloat16)
    return out


def measure(name: str, kind: str, preset: str, size: int, batch: int, device: torch.device, reps: int,
            clock: str, compile_: bool, matmul_n: int, one_thread: bool = True) -> list[dict[str, Any]]:
    """Rows (one per variant) with FLOP/s and the ratio to the matmul peak measured alongside."""
    variants = _variants(kind, preset, size, batch, device, compile_)
    flops = count_flops(variants["eager"])
    mm, mm_flops = common.matmul(matmul_n, device)
    fns: dict[str, Callable[[], None]] = {"matmul peak": mm}
    notes: dict[str, str] = {}
    for v, fn in variants.items():
        try:
            fn()  # compile happens here, outside the timing
            fns[v] = fn
        except Exception as err:  # noqa: BLE001 - a variant that cannot run here is a result too
            # the cause as well: inductor's first line is only "backend='inductor' raised:"
            lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
            notes[v] = f"{type(err).__name__}: {' '.join(lines[:2])[:240]}"
    threads = torch.get_num_threads()
    times = common.interleaved(fns, reps=reps, warmup=1, device=device, clock=clock)
    # one thread: the eager step and the peak again (the figure per core)
    one: dict[str, dict[str, float]] = {}
    if one_thread and device.type == "cpu" and threads > 1:
        torch.set_num_threads(1)
        try:
            one = common.interleaved({"matmul peak": mm, "eager": variants["eager"]}, reps=max(1, reps // 2),
                                     warmup=1, device=device, clock=clock)
        finally:
            torch.set_num_threads(threads)
    peak = mm_flops / times["matmul peak"]["median"]
    # the ceiling: the training default's ratio if its counted operators were all the step did
    kernels = kernel_seconds(variants["channels_last"]) if device.type == "cpu" and "channels_last" in fns else None
    rows = []
    for v in variants:
        row: dict[str, Any] = {"config": name, "variant": v, "threads": threads, "gflop_per_step": flops / 1e9}
        if v in times:
            achieved = flops / times[v]["median"]
            row.update({"step_s": times[v]["median"], "achieved_gflops": achieved / 1e9,
                        "peak_gflops": peak / 1e9, "ratio_to_peak": achieved / peak})
            if v == "channels_last" and kernels:
                row.update({"kernel_share": kernels[0] / kernels[1],
                            "kernels_only_ratio": flops / kernels[0] / peak})
        else:
            row["note"] = notes.get(v, "")
        rows.append(row)
    if one:
        peak1 = mm_flops / one["matmul peak"]["median"]
        achieved1 = flops / one["eager"]["median"]
        rows.append({"config": name, "variant": "eager, 1 thread", "threads": 1, "gflop_per_step": flops / 1e9,
                     "step_s": one["eager"]["median"], "achieved_gflops": achieved1 / 1e9,
                     "peak_gflops": peak1 / 1e9, "ratio_to_peak": achieved1 / peak,
                     "note": f"per_thread ratio (to the 1-thread peak) {achieved1 / peak1:.3f}"})
    for r in rows:
        r["load_average"] = common.load_average()
        r["timing"] = times.get(r["variant"]) or one.get("eager")
    return rows


def configs(quick: bool) -> list[tuple[str, str, str, int, int]]:
    if quick:
        return [("UNet tiny 16²×2", "unet", "unet-tiny", 16, 2), ("Image Evolution tiny 16²×2", "image", "tiny", 16, 2)]
    return [
        ("UNet tiny 64²×16 (pretrain default)", "unet", "unet-tiny", 64, 16),
        ("UNet5m 200²×8 (paper)", "unet", "unet5m", 200, 8),
        ("UNet15m 200²×8 (paper)", "unet", "unet15m", 200, 8),
        ("NodeUNet tiny 64²×16 (image-evolve default)", "image", "nodeunet-tiny", 64, 16),
        ("NodeUNet5m 64²×4", "image", "nodeunet5m", 64, 4),
    ]


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__)
    p.add_argument("--no-compile", action="store_true", help="leave torch.compile out (it compiles for minutes)")
    p.add_argument("--matmul", type=int, default=None, help="side of the peak matmul (default 2048; quick 512)")
    args = p.parse_args(argv)
    device = common.setup(args)
    reps = args.reps or (1 if args.quick else 5)
    n = args.matmul or (512 if args.quick else 2048)
    rows: list[dict[str, Any]] = []
    for name, kind, preset, size, batch in configs(args.quick):
        got = measure(name, kind, preset, size, batch, device, reps, args.clock,
                      compile_=not args.no_compile and not args.quick, matmul_n=n, one_thread=not args.quick)
        rows += got
        print(f"{name}: " + ", ".join(f"{r['variant']} {r.get('ratio_to_peak', float('nan')):.3f}" for r in got),
              file=sys.stderr, flush=True)
    print("Figure 3 — achieved FLOP/s of a training step / float32 matmul peak (same run); goal ≥ 0.5 on CPU\n")
    print(common.table(rows, ["config", "variant", "threads", "gflop_per_step", "step_s", "achieved_gflops",
                              "peak_gflops", "ratio_to_peak", "kernel_share", "kernels_only_ratio", "note"]))
    path = common.write_result(args.out, "flops", {"goal": "achieved / matmul peak >= 0.5 on CPU", "matmul_n": n,
                                                   "rows": rows}, device, args)
    print(f"\n{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
