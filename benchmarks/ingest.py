"""Figure 4 — preprocessing real KiTS19 label volumes into shards, against merely decoding them.

    python -m benchmarks.ingest [--quick] [--cases N] [--size S] [--root DIR] [--reps N]

``build_shards('kits19', ...)`` with ``pseudo_ct: true`` (the CT imaging is synthesised from the labels),
``size`` S (default 200, the paper's), every core (``workers: 0``) — against a pool of the same number of
'spawn' worker processes doing only ``np.asarray(nib.load(f).dataobj)`` on the same segmentation files.
Both include starting their pool. Repetitions alternate decode, ingest, decode, …; the figure is the
median ingest time over the median decode time. Goal: ≤ 1.5. Ingest reads the files through ISA-L
(python-isal), faster than nibabel's stdlib gzip, so a second baseline decodes with that same reader
(``ratio_isal``): the ingest's own work over the fastest decode it could do.

A breakdown of where the ingest's time goes (single process, cProfile cumulative seconds of the
library's functions on a few cases) comes with it. The full run (210 cases) takes minutes: ``--cases``
takes the first N cases.
"""

from __future__ import annotations

import cProfile
import os
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from benchmarks import common
from benchmarks._decode import decode, decode_isal

DEFAULT_ROOT = common.SHARED_DATA / "kits19-interpolated"


def _subset(root: Path, n: int | None, dest: Path) -> Path:
    """A folder holding symlinks to the first ``n`` case folders of ``root`` (all when None)."""
    from nodeseg.data.kits19 import list_cases

    cases = list_cases(root)[: n or None]
    sub = dest / "kits19"
    sub.mkdir()
    for c in cases:
        (sub / c.name).symlink_to(c.resolve(), target_is_directory=True)
    return sub


def time_decode(root: Path, workers: int, fn: Callable[[str], object] = decode) -> float:
    """Seconds to decode every segmentation under ``root`` with ``fn`` in a spawn pool of ``workers``."""
    files = sorted(str(p) for p in root.glob("case_*/segmentation.nii.gz"))
    t0 = time.perf_counter()
    if workers <= 1:
        for f in files:
            fn(f)
    else:
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as ex:
            list(ex.map(fn, files))
    return time.perf_counter() - t0


def time_ingest(root: Path, out: Path, size: int, workers: int) -> tuple[float, dict[str, Any]]:
    """Seconds of ``build_shards`` on ``root`` (pseudo-CT, ``size``²) and its manifest."""
    from nodeseg.data.ingest import IngestConfig, build_shards

    cfg = IngestConfig(pseudo_ct=True, size=size)
    t0 = time.perf_counter()
    manifest = build_shards("kits19", root, out, cfg, seed=0, workers=workers)
    return time.perf_counter() - t0, manifest


def breakdown(root: Path, size: int, n_cases: int) -> dict[str, float]:
    """Cumulative seconds per library step of the ingest of the first ``n_cases`` cases, in this process."""
    from nodeseg.data.ingest import IngestConfig, _kits_case
    from nodeseg.data.kits19 import list_cases

    cfg = IngestConfig(pseudo_ct=True, size=size)
    cases = list_cases(root)[:n_cases]
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    rows = 0
    for c in cases:
        rows += len(_kits_case(str(c), cfg, 0).records)
    prof.disable()
    total = time.perf_counter() - t0
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    wanted = {
        "decode (load_segmentation)": ("kits19.py", "load_segmentation"),
        "pseudo-CT (synthesize_imaging)": ("synthetic.py", "synthesize_imaging"),
        "normalise_hu": ("kits19.py", "normalise_hu"),
        "resize_image": ("transforms.py", "resize_image"),
        "resize_mask": ("transforms.py", "resize_mask"),
        "signed_distance": ("levelset.py", "signed_distance"),
    }
    out = {"cases": float(len(cases)), "rows": float(rows), "total_s": total}
    for label, (file, func) in wanted.items():
        cum = sum(v[3] for (f, _, fn), v in stats.items() if f.endswith(file) and fn == func)
        out[label + " s"] = cum
    return out


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__)
    p.add_argument("--cases", type=int, default=None, help="only the first N cases (default: all)")
    p.add_argument("--size", type=int, default=None, help="ingest.size (default 200; quick 64)")
    p.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="KiTS19 root with case_XXXXX folders")
    p.add_argument("--workers", type=int, default=0, help="processes for both (0: every core; --quick: 1)")
    args = p.parse_args(argv)
    device = common.setup(args)
    from nodeseg.data.ingest import resolve_workers

    if not args.root.is_dir():
        print(f"{args.root}: no KiTS19 labels here; pass --root", file=sys.stderr)
        return 2
    n_cases = args.cases or (1 if args.quick else None)
    size = args.size or (64 if args.quick else 200)
    workers = 1 if args.quick and not args.workers else resolve_workers(args.workers)
    reps = args.reps or 1
    with tempfile.TemporaryDirectory(prefix="nodeseg-bench-ingest-") as tmp:
        tmpd = Path(tmp)
        root = _subset(args.root, n_cases, tmpd)
        n = len(list(root.iterdir()))
        decode_times, isal_times, ingest_times = [time_decode(root, workers)], [], []
        manifest: dict[str, Any] = {}
        for r in range(reps):
            isal_times.append(time_decode(root, workers, decode_isal))
            t, manifest = time_ingest(root, tmpd / f"shards{r}", size, workers)
            ingest_times.append(t)
            shutil.rmtree(tmpd / f"shards{r}", ignore_errors=True)
            decode_times.append(time_decode(root, workers))
        parts = breakdown(root, size, min(n, 1 if args.quick else 4))
    t_dec, t_ing = statistics.median(decode_times), statistics.median(ingest_times)
    t_isal = statistics.median(isal_times)
    row = {"cases": n, "rows": manifest.get("rows"), "size": size, "workers": workers,
           "decode_s": t_dec, "decode_isal_s": t_isal, "ingest_s": t_ing, "ratio": t_ing / t_dec,
           "ratio_isal": t_ing / t_isal, "decode_times": decode_times, "decode_isal_times": isal_times,
           "ingest_times": ingest_times,
           "ms_per_row_ingest": 1000 * t_ing / max(manifest.get("rows") or 1, 1),
           "load_average": common.load_average(), "cpus": os.cpu_count()}
    print("Figure 4 — ingest (pseudo-CT shards) / decode of the same label volumes; goal ≤ 1.5\n")
    print(common.table([row], ["cases", "rows", "size", "workers", "decode_s", "decode_isal_s", "ingest_s",
                               "ratio", "ratio_isal", "ms_per_row_ingest"]))
    share = {k: v / parts["total_s"] for k, v in parts.items() if k.endswith(" s") and parts["total_s"]}
    print(f"\nwhere one process spends the ingest of {int(parts['cases'])} case(s) ({int(parts['rows'])} rows, "
          f"{parts['total_s']:.2f} s):")
    print(common.table([{"step": k[:-2], "seconds": parts[k], "share": share[k]} for k in share]))
    path = common.write_result(args.out, "ingest", {"goal": "ingest / decode <= 1.5", "rows": [row],
                                                    "breakdown": parts}, device, args)
    print(f"\n{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
