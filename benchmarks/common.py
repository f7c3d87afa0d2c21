"""What every benchmark shares: the device, the machine record, interleaved timing, tables, JSON, peak RSS.

Timing rule (the machine is shared): every figure is a ratio of things timed side by side in one run —
each callable is warmed up, then the callables are called in turn, ``reps`` rounds, the order rotating
every round, and each keeps the median of its own times. The load average is recorded with each result.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from nodeseg.malloc import tune_malloc

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
# the shared real data (as tests/conftest.py finds it): $NODESEG_TEST_DATA, else ../shared/data
SHARED_DATA = Path(os.environ.get("NODESEG_TEST_DATA") or REPO.parent / "shared" / "data")


def pick_device(name: str = "auto") -> torch.device:
    """CUDA when present (``auto``), else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def sync(device: torch.device) -> None:
    """Wait for queued kernels (CUDA), so that a wall-clock time covers the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages (empty where the platform has none)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def machine(device: torch.device) -> dict[str, Any]:
    """The facts a reader needs to compare two results: device, cores, threads, versions, load."""
    info: dict[str, Any] = {
        "device": str(device),
        "cpus": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset"),
        "malloc": "reuse" if tune_malloc() else "system",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_start": load_average(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def interleaved(
    fns: Mapping[str, Callable[[], object]], *, reps: int, warmup: int = 1, device: torch.device | None = None,
    clock: str = "wall",
) -> dict[str, dict[str, float]]:
    """Median, min and max seconds of each callable, timed in turn (rotating order) for ``reps`` rounds.

    ``clock='wall'`` times wall-clock seconds; ``clock='cpu'`` this process's CPU seconds, which other
    processes on a shared machine disturb far less (meaningful with one torch thread on the CPU: spinning
    OpenMP threads would count too). Both are recorded; ``median`` is the chosen clock's.
    """
    names = list(fns)
    dev = device or torch.device("cpu")
    for name in names:
        for _ in range(warmup):
            fns[name]()
            sync(dev)
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            sync(dev)
            c0, t0 = time.process_time(), time.perf_counter()
            fns[name]()
            sync(dev)
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    chosen = cpu if clock == "cpu" else wall
    return {
        n: {"median": statistics.median(chosen[n]), "min": min(chosen[n]), "max": max(chosen[n]), "n": reps,
            "wall_median": statistics.median(wall[n]), "cpu_median": statistics.median(cpu[n]), "clock": clock}
        for n in names
    }


def matmul(n: int, device: torch.device, dtype: torch.dtype = torch.float32) -> tuple[Callable[[], object], float]:
    """A callable doing one ``n×n @ n×n`` product, and its FLOPs (2n³): the peak to divide by."""
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device, dtype)
    b = torch.randn(n, n, generator=g).to(device, dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    return (lambda: torch.mm(a, b, out=out)), 2.0 * n**3


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A Markdown table of ``rows`` (floats to 4 significant digits)."""
    if not rows:
        return "(no rows)"
    cols = list(columns) if columns else list(dict.fromkeys(k for r in rows for k in r))

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def parser(description: str | None) -> argparse.ArgumentParser:
    """The arguments every benchmark takes: ``--quick``, ``--device``, ``--out``, ``--reps``, ``--threads``."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes and few repetitions (a smoke run)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON result")
    p.add_argument("--reps", type=int, default=None, help="timed rounds (default: per benchmark)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="time wall-clock seconds, or this process's CPU seconds (robust on a busy machine; "
                        "use with --threads 1)")
    return p


def setup(args: argparse.Namespace) -> torch.device:
    """Tune malloc as every ``nodeseg`` command does (``NODESEG_MALLOC=system`` for glibc's defaults), apply
    ``--threads`` and pick the device."""
    tune_malloc()
    if args.threads:
        torch.set_num_threads(args.threads)
    return pick_device(args.device)


def write_result(out_dir: Path, name: str, result: Mapping[str, Any], device: torch.device,
                 args: argparse.Namespace) -> Path:
    """``<out_dir>/<name>.json``: the result plus the machine, the mode and the load average at the end."""
    payload = {
        "benchmark": name,
        "quick": bool(args.quick),
        "machine": machine(device),
        **result,
        "load_average_end": load_average(),
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")
    os.replace(tmp, path)
    return path


def _jsonable(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.tolist()
    if isinstance(v, Path):
        return str(v)
    raise TypeError(f"not JSON serialisable: {type(v).__name__}")


# ------------------------------------------------------------------------------------------- peak memory


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def reset_peak_rss() -> int:
    """Reset the peak resident set size (Linux ``clear_refs`` 5) and return the current RSS in bytes."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS") * 1024


def peak_rss() -> int:
    """Peak resident set size (bytes) since the last :func:`reset_peak_rss`."""
    return _status_kib("VmHWM") * 1024


def run_child(module: str, argv: Iterable[str], env: Mapping[str, str] | None = None,
              timeout: float | None = None) -> dict[str, Any]:
    """Run ``python -m <module> <argv>`` in a fresh process and parse the JSON line it prints last."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run([sys.executable, "-m", module, *argv], cwd=REPO, env=full_env, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{module} {' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------- models


def perturb_zero_init(model: torch.nn.Module, std: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Give the zero-initialised convolutions (fθ's and ψ's last layers) small random weights, in place.

    At initialisation fθ ≡ 0 and every solve costs the same few evaluations; a perturbed fθ has a real
    flow, so NFE and the solver's step control behave as after some training.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d) and m.weight.requires_grad and not m.weight.any():
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * std)
    return model


def blobs(batch: int, size: int, seed: int = 0, channels: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy images of random ellipses and their signed distance φ (the training target), float32."""
    import numpy as np

    from nodeseg.levelset import signed_distance

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    images = np.empty((batch, channels, size, size), np.float32)
    phis = np.empty((batch, 1, size, size), np.float32)
    for i in range(batch):
        cy, cx = rng.uniform(0.3, 0.7, 2) * size
        a, b = rng.uniform(0.12, 0.3, 2) * size
        mask = ((yy - cy) / a) ** 2 + ((xx - cx) / b) ** 2 <= 1
        img = 0.3 + 0.4 * mask + rng.normal(0, 0.15, (size, size))
        images[i] = img.astype(np.float32)[None]
        phis[i, 0] = signed_distance(mask, clip=32.0)
    return torch.from_numpy(images), torch.from_numpy(phis)
