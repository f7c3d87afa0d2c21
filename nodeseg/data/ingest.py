"""Raw source → parquet shards: case by case, a bounded worker pool, a patient split, atomic output.

``build_shards`` writes ``<out>/train/part-*.parquet``, ``<out>/val/part-*.parquet`` and
``<out>/manifest.json``. Everything is built in ``<out>.tmp-XXXX`` beside ``out`` and renamed over it at
the end, so a failure leaves no partial output (and an older build stays in place).

KiTS19 slices: the slices that contain any of ``keep_labels`` (default kidney, label 1), windowed and
normalised, resized to ``size``² (image antialiased bilinear, mask by majority vote), φ recomputed on the
resized mask. Saliency images: thresholded mask, placed on a ``saliency_crop``² canvas with a ``valid`` mask.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Literal

import numpy as np
from threadpoolctl import threadpool_limits

from nodeseg.atomic import replace_dir
from nodeseg.config import to_mapping
from nodeseg.data.kits19 import (
    MAX_AXIS,
    MAX_VOXELS,
    foreground,
    kept_slices,
    list_cases,
    normalise_hu,
    open_case,
    take_slices,
)
from nodeseg.data.saliency import SaliencyPair, find_pairs, load_image, load_mask
from nodeseg.data.shardio import MANIFEST_NAME, SCHEMA_VERSION, ShardWriter, SliceRecord
from nodeseg.data.synthetic import PhantomConfig, synthesize_imaging
from nodeseg.data.transforms import fit_canvas, resize_image, resize_mask
from nodeseg.errors import InputError, check_arg
from nodeseg.levelset import signed_distance

__all__ = ["IngestConfig", "build_shards", "resolve_workers", "split_ids"]

log = logging.getLogger(__name__)

SPLIT_RULE = ("sorted ids, permuted by numpy.random.default_rng(seed); the first round(n * val_fraction) "
              "of the permutation form val (at least 1 and at most n - 1 when val_fraction > 0)")


@dataclass(frozen=True)
class IngestConfig:
    """Ingestion parameters (the ``ingest`` section of params.yaml)."""

    size: int = 200  # KiTS19 slices are resized to size × size
    hu_window: tuple[float, float] = (-79.0, 304.0)  # nnU-Net's KiTS19 foreground 0.5 / 99.5 percentiles
    normalisation: Literal["minmax", "zscore"] = "minmax"  # minmax: window → [0, 1]
    zscore_stats: tuple[float, float] = (101.0, 76.9)  # (mean, std) HU for zscore
    foreground_labels: tuple[int, ...] = (1, 2)  # target: kidney ∪ tumour
    keep_labels: tuple[int, ...] = (1,)  # a slice is kept if it holds any of these labels
    val_fraction: float = 0.2
    single_split: Literal["train", "val", "test"] | None = None  # put everything in this split instead
    clip: float = 32.0  # φ clipped to ±clip pixels
    pseudo_ct: bool = False  # synthesise imaging from the labels where imaging.nii.gz is absent
    phantom: PhantomConfig = PhantomConfig()  # appearance of the pseudo-CT
    shard_rows: int = 1000  # rows per parquet file
    row_group_mb: float = 4.0  # row groups of about this many MiB (a random read decodes one)
    saliency_threshold: float = 0.5  # soft ground truth: foreground where value > threshold
    saliency_crop: int = 512  # canvas side for saliency images (zero padded, valid = 0 there)
    saliency_oversize: Literal["shrink", "crop"] = "shrink"  # images larger than the canvas
    require_binary_masks: bool = False
    image_dir: str | None = None  # saliency image folder name (auto-detected when None)
    mask_dir: str | None = None
    max_axis: int = MAX_AXIS  # refuse volumes beyond these, from the header
    max_voxels: int = MAX_VOXELS

    def __post_init__(self) -> None:
        def bad(name: str, expected: str) -> ValueError:
            return ValueError(f"{name} must be {expected}, got {getattr(self, name)!r}")

        if not (isinstance(self.size, int) and 8 <= self.size <= 4096):
            raise bad("size", "an integer in [8, 4096]")
        lo, hi = self.hu_window
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise bad("hu_window", "(low, high) HU with low < high")
        if self.normalisation not in ("minmax", "zscore"):
            raise bad("normalisation", "one of 'minmax', 'zscore'")
        if not (math.isfinite(self.zscore_stats[0]) and math.isfinite(self.zscore_stats[1]) and self.zscore_stats[1] > 0):
            raise bad("zscore_stats", "(mean, std) with std > 0")
        for name in ("foreground_labels", "keep_labels"):
            labels = getattr(self, name)
            if not (labels and len(set(labels)) == len(labels) and all(v in (1, 2) for v in labels)):
                raise bad(name, "a non-empty list of distinct labels from 1 (kidney), 2 (tumour)")
        if not (0.0 <= self.val_fraction < 1.0):
            raise bad("val_fraction", "in [0, 1)")
        if self.single_split not in (None, "train", "val", "test"):
            raise bad("single_split", "null or one of 'train', 'val', 'test'")
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise bad("clip", "a positive number")
        if not isinstance(self.phantom, PhantomConfig):
            raise bad("phantom", "a PhantomConfig")
        if not (isinstance(self.shard_rows, int) and self.shard_rows >= 1):
            raise bad("shard_rows", "a positive integer")
        if not (math.isfinite(self.row_group_mb) and 0 < self.row_group_mb <= 1024):
            raise bad("row_group_mb", "in (0, 1024]")
        if not (0.0 <= self.saliency_threshold < 1.0):
            raise bad("saliency_threshold", "in [0, 1)")
        if not (isinstance(self.saliency_crop, int) and 8 <= self.saliency_crop <= 4096):
            raise bad("saliency_crop", "an integer in [8, 4096]")
        if self.saliency_oversize not in ("shrink", "crop"):
            raise bad("saliency_oversize", "one of 'shrink', 'crop'")
        if not (isinstance(self.max_axis, int) and self.max_axis >= 1):
            raise bad("max_axis", "a positive integer")
        if not (isinstance(self.max_voxels, int) and self.max_voxels >= 1):
            raise bad("max_voxels", "a positive integer")


def split_ids(ids: Sequence[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Deterministic (train, val) split of ids (patients or images); each list sorted.

    Rule: sort the ids, permute them with ``numpy.random.default_rng(seed)``, and put the first
    ``round(n * val_fraction)`` (clamped to [1, n − 1] when ``val_fraction`` > 0 and n ≥ 2) in val.
    210 KiTS19 cases with 0.2 give 168 / 42.
    """
    check_arg(0.0 <= val_fraction < 1.0, "val_fraction", val_fraction, "a number in [0, 1)")
    check_arg(isinstance(seed, int) and seed >= 0, "seed", seed, "a non-negative integer")
    ordered = sorted(ids)
    check_arg(len(set(ordered)) == len(ordered), "ids", "duplicates", "distinct ids")
    n = len(ordered)
    n_val = int(math.floor(n * val_fraction + 0.5))
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    val_idx = set(perm[:n_val].tolist())
    val = [ordered[i] for i in range(n) if i in val_idx]
    train = [ordered[i] for i in range(n) if i not in val_idx]
    return train, val


def resolve_workers(workers: int) -> int:
    """``workers`` processes; 0 means every core this process may use."""
    check_arg(isinstance(workers, int) and workers >= 0, "workers", workers, "an integer >= 0 (0: every core)")
    if workers > 0:
        return workers
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


# --------------------------------------------------------------------------------------------------------
# per-item work (runs in worker processes)


@dataclass
class _ItemResult:
    item_id: str
    records: list[SliceRecord]
    slices_total: int = 0
    empty_masks: int = 0
    skipped: str | None = None
    warnings: list[str] = field(default_factory=list)


def _kits_case(folder: str, cfg: IngestConfig, seed: int) -> _ItemResult:
    case = open_case(folder, require_imaging=not cfg.pseudo_ct, max_axis=cfg.max_axis, max_voxels=cfg.max_voxels)
    seg = case.load_segmentation()
    keep = kept_slices(seg, cfg.keep_labels)
    n_total = int(seg.shape[0])
    if keep.size == 0:
        labels = ", ".join(str(v) for v in cfg.keep_labels)
        reason = f"no slice with label(s) {labels}: the case contributes no rows"
        return _ItemResult(case.case_id, [], n_total, skipped=reason, warnings=[f"{case.folder}: {reason}"])
    seg_k = take_slices(seg, keep)
    del seg
    h, w = seg_k.shape[1:]
    size = (cfg.size, cfg.size)
    spacing = (case.spacing[1] * h / cfg.size, case.spacing[2] * w / cfg.size)
    masks = np.stack([resize_mask(foreground(s, cfg.foreground_labels), size) for s in seg_k])
    if case.has_imaging:
        hu = case.load_imaging(keep)
        image = np.stack([resize_image(p, size) for p in normalise_hu(hu, cfg.hu_window, cfg.normalisation,
                                                                        cfg.zscore_stats, inplace=True)])
        source = "kits19"
    else:
        # the pseudo-CT is rendered at the output grid from the shrunk labels, with the blur and noise
        # that rendering at the source grid and shrinking would leave (synthesize_imaging's source_spacing)
        rng = np.random.default_rng(np.random.SeedSequence([seed, int(case.case_id[5:])]))
        hu = synthesize_imaging(_shrunk_labels(seg_k, masks, cfg.foreground_labels, size), rng,
                                spacing=(case.spacing[0], *spacing), cfg=cfg.phantom, slice_indices=keep,
                                source_spacing=case.spacing[1:])
        image = normalise_hu(hu, cfg.hu_window, cfg.normalisation, cfg.zscore_stats)
        source = "kits19-pseudo-ct"
    del hu
    valid = np.ones(size, dtype=np.uint8)
    records = [
        SliceRecord(
            case_id=case.case_id,
            slice_index=int(s),
            image=image[j][None],
            mask=masks[j],
            phi=signed_distance(masks[j], clip=cfg.clip),
            valid=valid,
            spacing=spacing,
            source=source,
        )
        for j, s in enumerate(keep)
    ]
    empty = int(np.count_nonzero(~masks.any(axis=(1, 2))))
    return _ItemResult(case.case_id, records, n_total, empty_masks=empty)


def _shrunk_labels(seg: np.ndarray, masks: np.ndarray, foreground_labels: Sequence[int],
                   size: tuple[int, int]) -> np.ndarray:
    """Labels (0, 1, 2) of ``seg`` (slices, H, W) at ``size``: kidney ∪ tumour and tumour each by majority
    vote, so the rendered organ outline is the shrunk target's (``masks`` when that is kidney ∪ tumour)."""
    if tuple(sorted(foreground_labels)) == (1, 2):
        organ = masks
    else:
        organ = np.stack([resize_mask(s > 0, size) for s in seg])
    out = organ.copy()
    for j, s in enumerate(seg):
        tumour = s == 2
        if tumour.any():
            out[j][(resize_mask(tumour, size) == 1) & (organ[j] == 1)] = 2
    return out


def _saliency_item(pair: SaliencyPair, cfg: IngestConfig, source: str) -> _ItemResult:
    image = load_image(pair.image)
    mask = load_mask(pair.mask, cfg.saliency_threshold, cfg.require_binary_masks)
    if mask.shape != image.shape[1:]:
        raise InputError(pair.mask, f"mask size {mask.shape[::-1]} (W, H) does not match its image "
                                    f"{pair.image.name} {image.shape[:0:-1]}")
    size = (cfg.saliency_crop, cfg.saliency_crop)
    image, mask, valid, scale = fit_canvas(image, mask, size, cfg.saliency_oversize)
    rec = SliceRecord(
        case_id=pair.stem,
        slice_index=0,
        image=image,
        mask=mask,
        phi=signed_distance(mask, clip=cfg.clip),
        valid=valid,
        spacing=(1.0 / scale, 1.0 / scale),
        source=source,
    )
    return _ItemResult(pair.stem, [rec], 1, empty_masks=int(not mask.any()))


def _run(fn: Callable[..., _ItemResult], args: tuple) -> tuple[str, Any]:
    """Call ``fn`` in a worker; InputError comes back as data (it does not pickle by its args)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = fn(*args)
        except InputError as err:
            return "input_error", (err.path, err.problem)
    result.warnings.extend(str(w.message) for w in caught)
    return "ok", result


_LIMITS: list[object] = []


def _init_worker() -> None:
    """One thread per worker process: the pool already uses every core.

    numpy is imported (and OpenBLAS has started its threads) before this runs, so the environment is too
    late for it; threadpoolctl limits the loaded BLAS/OpenMP pools. Without it the small matrix products
    of the pseudo-CT renderer ran two BLAS threads per worker and made the pool slower than one process.
    Workers do not import torch (``python -X importtime``: a second of each worker's start); were it
    loaded later, it would read the ``OMP_NUM_THREADS`` set here.
    """
    os.environ["OMP_NUM_THREADS"] = "1"
    _LIMITS.append(threadpool_limits(limits=1))


def _results(fn: Callable[..., _ItemResult], tasks: Sequence[tuple], workers: int) -> Iterator[_ItemResult]:
    """Results of ``fn(*task)`` in task order, with at most 2 × workers tasks in flight."""

    def unwrap(out: tuple[str, Any]) -> _ItemResult:
        status, payload = out
        if status == "input_error":
            raise InputError(*payload)
        for message in payload.warnings:
            warnings.warn(message, stacklevel=3)
        return payload

    if workers <= 1 or len(tasks) <= 1:
        for task in tasks:
            yield unwrap(_run(fn, task))
        return
    workers = min(workers, len(tasks))
    ex = ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"), initializer=_init_worker)
    try:
        pending: deque[Future] = deque()
        it = iter(tasks)
        for task in it:
            pending.append(ex.submit(_run, fn, task))
            if len(pending) >= 2 * workers:
                break
        while pending:
            out = pending.popleft().result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(ex.submit(_run, fn, nxt))
            yield unwrap(out)
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------------------------------------


def _prepare_out(out: Path) -> Path:
    if out.exists():
        if not out.is_dir():
            raise InputError(out, "exists and is not a folder: choose another output path")
        if any(out.iterdir()) and not (out / MANIFEST_NAME).exists():
            raise InputError(out, "exists and is not a shard folder (no manifest.json): remove it or choose "
                                  "another output path")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o755)
    return tmp


def build_shards(
    source: Literal["kits19", "saliency"],
    root: str | os.PathLike[str],
    out: str | os.PathLike[str],
    cfg: IngestConfig,
    seed: int,
    workers: int = 0,
) -> dict[str, Any]:
    """Ingest ``root`` into shards under ``out``; returns the manifest (also written to manifest.json).

    Items (KiTS19 cases or saliency images) are split with :func:`split_ids` before any is read, then
    processed by a pool of ``workers`` processes (0: every core; 1: in this process) with at most two
    per worker in flight, and written in sorted id order, so the output does not depend on ``workers``.
    Workers are started with 'spawn' (no forked torch/OpenMP state): a script calling this with
    workers != 1 needs the usual ``if __name__ == "__main__":`` guard.
    """
    check_arg(source in ("kits19", "saliency"), "source", source, "'kits19' or 'saliency'")
    check_arg(isinstance(cfg, IngestConfig), "cfg", type(cfg).__name__, "an IngestConfig")
    check_arg(isinstance(seed, int) and seed >= 0, "seed", seed, "a non-negative integer")
    root, out = Path(root).resolve(), Path(out).resolve()
    n_workers = resolve_workers(workers)
    fn: Callable[..., _ItemResult]
    if source == "kits19":
        items = {f.name: f for f in list_cases(root)}
        fn = _kits_case
        make_task: Callable[[str], tuple] = lambda i: (str(items[i]), cfg, seed)  # noqa: E731
    else:
        pairs = {p.stem: p for p in find_pairs(root, cfg.image_dir, cfg.mask_dir)}
        items = pairs  # type: ignore[assignment]
        fn = _saliency_item
        label = f"saliency:{root.name}"
        make_task = lambda i: (pairs[i], cfg, label)  # noqa: E731
    ids = sorted(items)
    if cfg.single_split is not None:
        assignment = {cfg.single_split: ids}
    else:
        train, val = split_ids(ids, cfg.val_fraction, seed)
        assignment = {"train": train, "val": val}
    split_of = {i: name for name, members in assignment.items() for i in members}

    tmp = _prepare_out(out)
    writers: dict[str, ShardWriter] = {}
    try:
        writers = {
            name: ShardWriter(tmp / name, rows_per_file=cfg.shard_rows,
                              row_group_bytes=max(1, int(cfg.row_group_mb * (1 << 20))))
            for name in assignment
        }
        rows = dict.fromkeys(assignment, 0)
        skipped: dict[str, str] = {}
        slices_total = empty_masks = 0
        for res in _results(fn, [make_task(i) for i in ids], n_workers):
            name = split_of[res.item_id]
            for rec in res.records:
                writers[name].write(rec)
            rows[name] += len(res.records)
            slices_total += res.slices_total
            empty_masks += res.empty_masks
            if res.skipped:
                skipped[res.item_id] = res.skipped
            log.info("%s: %d rows → %s", res.item_id, len(res.records), name)
        if ids and not any(rows.values()):  # every item was skipped: shards without rows train nothing
            labels = ", ".join(str(v) for v in cfg.keep_labels)
            raise InputError(root, f"none of the {len(ids)} cases has a slice with label(s) {labels} "
                                   "(ingest.keep_labels): no rows to write; check the segmentations or keep_labels")
        files = {name: [str(p.relative_to(tmp)) for p in w.close()] for name, w in writers.items()}
        manifest: dict[str, Any] = {
            "format": "nodeseg-shards",
            "schema_version": SCHEMA_VERSION,
            "source": source,
            "root": str(root),
            "seed": seed,
            "split_rule": "single split" if cfg.single_split else SPLIT_RULE,
            "params": to_mapping(cfg),
            "rows": sum(rows.values()),
            "splits": {
                name: {"rows": rows[name], "items": len(assignment[name]), "cases": assignment[name],
                       "files": files[name]}
                for name in assignment
            },
            "items_without_rows": skipped,
            "source_slices": slices_total,
            "empty_masks": empty_masks,
        }
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n")
        replace_dir(tmp, out)
    except BaseException:
        for w in writers.values():
            w.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest
