"""Figure 4 — preprocessing real KiTS19 label volumes into shards, against merely decoding them.

    python -m benchmarks.ingest [--quick] [--cases N] [--size S] [--root DIR] [--reps N]
                                [--imaging render,files] [--imaging-cache DIR]

``build_shards('kits19', ...)`` at ``size`` S (default 200, the paper's) with every core (``workers: 0``),
against a pool of the same number of 'spawn' worker processes doing only ``np.asarray(nib.load(f).dataobj)``
on the same files. Both include starting their pool. Repetitions alternate decode, ingest, decode, …; the
figure is the median ingest time over the median decode time. Goal: ≤ 1.5. Ingest reads the files through
ISA-L (python-isal), faster than nibabel's stdlib gzip, so a second baseline decodes with that same reader
(``ratio_isal``): the ingest's own work over the fastest decode it could do.

Two rows, one per way the pseudo-CT reaches the ingest (``--imaging``):

- ``render``: only the labels are on disk; ``pseudo_ct: true`` renders the image inside the ingest, and the
  baseline decodes the segmentation files.
- ``files``: the path real CT takes. ``write_pseudo_ct_cases`` first writes a full-size int16
  ``imaging.nii.gz`` beside each segmentation (once, into ``--imaging-cache``, in parallel; 9 min for the
  210 cases on 2 cores, 8.7 GB; a later run reuses the finished case folders), then ``build_shards`` reads
  both files like real KiTS19, and the baseline decodes both files of every case.

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
DEFAULT_CACHE = common.RESULTS / "cache" / "kits19-pseudo-ct-seed0"
MODES = ("render", "files")


def _subset(root: Path, n: int | None, dest: Path) -> Path:
    """A folder holding symlinks to the first ``n`` case folders of ``root`` (all when None)."""
    from nodeseg.data.kits19 import list_cases

    cases = list_cases(root)[: n or None]
    sub = dest / "kits19"
    sub.mkdir()
    for c in cases:
        (sub / c.name).symlink_to(c.resolve(), target_is_directory=True)
    return sub


def _write_one(labels_root: str, cache: str, case_id: str) -> str:
    """Worker: write one pseudo-CT case folder."""
    from nodeseg.data.synthetic import write_pseudo_ct_cases

    write_pseudo_ct_cases(labels_root, cache, seed=0, case_ids=[case_id])
    return case_id


def prepare_imaging(labels: Path, cache: Path, workers: int) -> tuple[int, float]:
    """Make ``cache`` hold every case of ``labels`` with a pseudo-CT ``imaging.nii.gz`` beside its labels.

    Case folders appear atomically, so one that exists with both files is finished and is reused when its
    segmentation has the size of the source's. Returns (cases written now, seconds spent writing them).
    """
    from nodeseg.data.kits19 import IMAGING, SEGMENTATION, list_cases

    cache.mkdir(parents=True, exist_ok=True)
    todo = []
    for c in list_cases(labels):
        done = cache / c.name
        ok = (done / IMAGING).is_file() and (done / SEGMENTATION).is_file()
        if ok and (done / SEGMENTATION).stat().st_size == (c / SEGMENTATION).stat().st_size:
            continue
        if done.exists():
            shutil.rmtree(done)
        todo.append(c.name)
    t0 = time.perf_counter()
    if todo:
        print(f"writing pseudo-CT imaging for {len(todo)} case(s) into {cache} ...", file=sys.stderr, flush=True)
        src = str(labels.resolve())
        if workers <= 1:
            for cid in todo:
                _write_one(src, str(cache), cid)
        else:
            from nodeseg.data.ingest import _init_worker  # one BLAS thread each: the pool uses every core

            with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"),
                                     initializer=_init_worker) as ex:
                list(ex.map(_write_one, [src] * len(todo), [str(cache)] * len(todo), todo))
    return len(todo), time.perf_counter() - t0


def time_decode(root: Path, workers: int, fn: Callable[[str], object] = decode,
                names: tuple[str, ...] = ("segmentation.nii.gz",)) -> float:
    """Seconds to decode the files ``names`` of every case under ``root`` with ``fn`` in a spawn pool of
    ``workers``."""
    files = sorted(str(p) for name in names for p in root.glob(f"case_*/{name}"))
    t0 = time.perf_counter()
    if workers <= 1:
        for f in files:
            fn(f)
    else:
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as ex:
            list(ex.map(fn, files))
    return time.perf_counter() - t0


def time_ingest(root: Path, out: Path, size: int, workers: int, pseudo_ct: bool = True
                ) -> tuple[float, dict[str, Any]]:
    """Seconds of ``build_shards`` on ``root`` (``size``²; the image rendered when ``pseudo_ct``, else read
    from ``imaging.nii.gz``) and its manifest."""
    from nodeseg.data.ingest import IngestConfig, build_shards

    cfg = IngestConfig(pseudo_ct=pseudo_ct, size=size)
    t0 = time.perf_counter()
    manifest = build_shards("kits19", root, out, cfg, seed=0, workers=workers)
    return time.perf_counter() - t0, manifest


def breakdown(root: Path, size: int, n_cases: int, pseudo_ct: bool = True) -> dict[str, float]:
    """Cumulative seconds per library step of the ingest of the first ``n_cases`` cases, in this process."""
    from nodeseg.data.ingest import IngestConfig
    from nodeseg.data.kits19 import list_cases
    from nodeseg.data.readers.kits19 import read_case

    cfg = IngestConfig(pseudo_ct=pseudo_ct, size=size)
    cases = list_cases(root)[:n_cases]
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    rows = 0
    for c in cases:
        rows += len(read_case(str(c), cfg, 0).records)
    prof.disable()
    total = time.perf_counter() - t0
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    wanted = {
        "decode (load_segmentation)": ("kits19.py", "load_segmentation"),
        "decode (load_imaging)": ("kits19.py", "load_imaging"),
        "pseudo-CT (synthesize_imaging)": ("render.py", "synthesize_imaging"),
        "normalise_hu": ("kits19.py", "normalise_hu"),
        "resize_image": ("transforms.py", "resize_image"),
        "resize_mask": ("transforms.py", "resize_mask"),
        "signed_distance": ("levelset.py", "signed_distance"),
    }
    out = {"cases": float(len(cases)), "rows": float(rows), "total_s": total}
    for label, (file, func) in wanted.items():
        cum = sum(v[3] for (f, _, fn), v in stats.items() if f.endswith(file) and fn == func)
        if cum:  # a step the mode does not take (drawing the image, or reading it) is left out
            out[label + " s"] = cum
    return out


def measure(mode: str, root: Path, tmpd: Path, size: int, workers: int, reps: int, quick: bool
            ) -> tuple[dict[str, Any], dict[str, float]]:
    """One figure-4 row for ``mode`` (render or files): decode, ISA-L decode and ingest times, interleaved."""
    names = ("segmentation.nii.gz",) if mode == "render" else ("imaging.nii.gz", "segmentation.nii.gz")
    pseudo = mode == "render"
    n = len(list(root.iterdir()))
    decode_times, isal_times, ingest_times = [time_decode(root, workers, names=names)], [], []
    manifest: dict[str, Any] = {}
    for r in range(reps):
        isal_times.append(time_decode(root, workers, decode_isal, names=names))
        t, manifest = time_ingest(root, tmpd / f"shards-{mode}{r}", size, workers, pseudo_ct=pseudo)
        ingest_times.append(t)
        shutil.rmtree(tmpd / f"shards-{mode}{r}", ignore_errors=True)
        decode_times.append(time_decode(root, workers, names=names))
    parts = breakdown(root, size, min(n, 1 if quick else 4), pseudo_ct=pseudo)
    t_dec, t_ing = statistics.median(decode_times), statistics.median(ingest_times)
    t_isal = statistics.median(isal_times)
    row = {"imaging": mode, "cases": n, "rows": manifest.get("rows"), "size": size, "workers": workers,
           "decoded": "+".join(x.split(".")[0] for x in names),
           "decode_s": t_dec, "decode_isal_s": t_isal, "ingest_s": t_ing, "ratio": t_ing / t_dec,
           "ratio_isal": t_ing / t_isal, "decode_times": decode_times, "decode_isal_times": isal_times,
           "ingest_times": ingest_times,
           "ms_per_row_ingest": 1000 * t_ing / max(manifest.get("rows") or 1, 1),
           "load_average": common.load_average(), "cpus": os.cpu_count()}
    return row, parts


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__)
    p.add_argument("--cases", type=int, default=None, help="only the first N cases (default: all)")
    p.add_argument("--size", type=int, default=None, help="ingest.size (default 200; quick 64)")
    p.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="KiTS19 root with case_XXXXX folders")
    p.add_argument("--workers", type=int, default=0, help="processes for both (0: every core; --quick: 1)")
    p.add_argument("--imaging", default=",".join(MODES),
                   help=f"comma-separated rows among {', '.join(MODES)} (default: both)")
    p.add_argument("--imaging-cache", type=Path, default=None,
                   help=f"where the files row keeps its pseudo-CT cases (default {DEFAULT_CACHE}; --quick: a "
                        "temporary folder)")
    args = p.parse_args(argv)
    device = common.setup(args)
    from nodeseg.data.ingest import resolve_workers

    if not args.root.is_dir():
        print(f"{args.root}: no KiTS19 labels here; pass --root", file=sys.stderr)
        return 2
    modes = [m.strip() for m in args.imaging.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        print(f"--imaging {args.imaging!r}: expected a comma-separated subset of {', '.join(MODES)}",
              file=sys.stderr)
        return 2
    n_cases = args.cases or (2 if args.quick else None)  # 2: a split needs a case in train and in val
    size = args.size or (64 if args.quick else 200)
    workers = 1 if args.quick and not args.workers else resolve_workers(args.workers)
    reps = args.reps or 1
    rows, parts_by_mode, prepared = [], {}, None
    with tempfile.TemporaryDirectory(prefix="nodeseg-bench-ingest-") as tmp:
        tmpd = Path(tmp)
        labels = _subset(args.root, n_cases, tmpd)
        for mode in modes:
            root = labels
            if mode == "files":
                cache = args.imaging_cache or (tmpd / "pseudo-ct" if args.quick else DEFAULT_CACHE)
                written, secs = prepare_imaging(labels, cache, resolve_workers(args.workers))
                prepared = {"cache": str(cache), "cases_written": written, "write_s": secs}
                root = tmpd / "kits19-files"
                root.mkdir()
                for c in labels.iterdir():
                    (root / c.name).symlink_to((cache / c.name).resolve(), target_is_directory=True)
            row, parts_by_mode[mode] = measure(mode, root, tmpd, size, workers, reps, args.quick)
            rows.append(row)
    print("Figure 4 — ingest into shards / decode of the same files; goal ≤ 1.5\n")
    print(common.table(rows, ["imaging", "cases", "rows", "size", "workers", "decoded", "decode_s",
                              "decode_isal_s", "ingest_s", "ratio", "ratio_isal", "ms_per_row_ingest"]))
    if prepared and prepared["cases_written"]:
        print(f"\n(pseudo-CT imaging written for {prepared['cases_written']} case(s) in "
              f"{prepared['write_s']:.1f} s, into {prepared['cache']})")
    for mode, parts in parts_by_mode.items():
        share = {k: v / parts["total_s"] for k, v in parts.items() if k.endswith(" s") and parts["total_s"]}
        print(f"\n{mode}: where one process spends the ingest of {int(parts['cases'])} case(s) "
              f"({int(parts['rows'])} rows, {parts['total_s']:.2f} s):")
        print(common.table([{"step": k[:-2], "seconds": parts[k], "share": share[k]} for k in share]))
    result = {"goal": "ingest / decode <= 1.5", "rows": rows, "breakdown": parts_by_mode.get(modes[0]),
              "breakdowns": parts_by_mode, "imaging_files": prepared}
    path = common.write_result(args.out, "ingest", result, device, args)
    print(f"\n{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
