"""Raw source → parquet shards: item by item, a bounded worker pool, a patient split, atomic output.

``build_shards`` writes ``<out>/train/part-*.parquet``, ``<out>/val/part-*.parquet`` and
``<out>/manifest.json``. Everything is built in ``<out>.tmp-XXXX`` beside ``out`` and renamed over it at
the end, so a failure leaves no partial output (and an older build stays in place).

What an item is and how it becomes rows is the source's reader (:mod:`nodeseg.data.readers`: KiTS19 cases,
saliency images). This module splits the items and writes them:

- explicit ``train/``, ``val/`` (and ``test/``) subfolders of the root, each in the source's own layout, are
  the split (the DUTS-TR / DUTS-TE habit); with ``train/`` but no ``val/``, val is drawn from train's groups;
- otherwise the items' groups are split by :func:`split_ids`. A group is a patient: with
  ``ingest.group_pattern`` the id its regex takes from the item id (``(.+)_\\d+`` groups ``p07_012.png`` and
  ``p07_013.png`` as ``p07``), without it each item is its own group (a KiTS19 case is one patient);
- a split that would leave train or val empty is refused before anything is read.
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
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from nodeseg.atomic import replace_dir
from nodeseg.config import to_mapping
from nodeseg.data.ingest_config import IngestConfig, group_regex
from nodeseg.data.readers import READERS, ItemResult, Reader, get_reader
from nodeseg.data.shardio import MANIFEST_NAME, SCHEMA_VERSION, ShardWriter
from nodeseg.errors import InputError, check_arg

__all__ = ["SPLIT_DIRS", "IngestConfig", "assign_splits", "build_shards", "group_items", "resolve_workers",
           "split_folders", "split_ids"]

log = logging.getLogger(__name__)

SPLIT_RULE = ("sorted ids, permuted by numpy.random.default_rng(seed); the first round(n * val_fraction) "
              "of the permutation form val (at least 1 and at most n - 1 when val_fraction > 0)")
SPLIT_DIRS = ("train", "val", "test")  # explicit split subfolders of a raw root (matched case-insensitively)


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


def split_folders(root: Path) -> dict[str, Path] | None:
    """The explicit split subfolders of ``root`` (``train``/``val``/``test``, any case), or None if it has none.

    A root that holds split folders and other folders is refused: it is not clear which layout is meant.
    """
    if not root.is_dir():
        return None
    found: dict[str, Path] = {}
    others: list[str] = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        name = entry.name.lower()
        if name in SPLIT_DIRS:
            if name in found:
                raise InputError(entry, f"a second {name}/ folder ({found[name].name} and {entry.name})")
            found[name] = entry
        else:
            others.append(entry.name)
    if not found:
        return None
    if others:
        raise InputError(root, f"holds split folders ({', '.join(p.name + '/' for p in found.values())}) and other "
                               f"folders ({', '.join(repr(o) for o in others[:3])}{', ...' if len(others) > 3 else ''}):"
                               " put every item under train/, val/ or test/, or remove the split folders")
    return {name: found[name] for name in SPLIT_DIRS if name in found}


def group_items(ids: Sequence[str], pattern: str | None, where: Mapping[str, Path] | None = None) -> dict[str, str]:
    """item id → group (patient) id: the regex ``pattern`` matched at the start of the id (its ``patient`` group,
    else its first group); without a pattern each item is its own group. An id it does not match raises
    InputError naming ``where[id]`` (the item's file) when given."""
    if pattern is None:
        return {i: i for i in ids}
    regex = group_regex(pattern)
    key: int | str = "patient" if "patient" in regex.groupindex else 1
    out: dict[str, str] = {}
    for i in ids:
        m = regex.match(i)
        group = m.group(key) if m else None
        if not group:
            path = where[i] if where and i in where else Path(i)
            found = "does not match" if m is None else "matches with an empty patient group"
            raise InputError(path, f"name {i!r} {found} ingest.group_pattern {pattern!r}: the pattern's first "
                                   "group (or (?P<patient>...)) must take the patient id from every name")
        out[i] = group
    return out


def assign_splits(groups: Mapping[str, str], cfg: IngestConfig, seed: int,
                  fixed: Mapping[str, str] | None = None) -> dict[str, list[str]]:
    """split name → sorted item ids, from ``groups`` (item → patient, :func:`group_items`).

    The patients are split by :func:`split_ids` (``cfg.val_fraction``, ``seed``), and each item goes where its
    patient went. ``fixed`` (item → split) gives the items of explicit split folders their split; the items
    of a train/ folder without a val/ folder are left to the patient split, as are all items without
    folders. With ``cfg.single_split`` every item goes to that split.
    """
    fixed = fixed or {}
    if cfg.single_split is not None:
        return {cfg.single_split: sorted(groups)}
    splits: dict[str, list[str]] = {"train": [], "val": []}
    free = sorted(i for i in groups if i not in fixed)
    for i, name in sorted(fixed.items()):
        splits.setdefault(name, []).append(i)
    free_groups = sorted({groups[i] for i in free})
    train_g, val_g = split_ids(free_groups, cfg.val_fraction, seed)
    val_set = set(val_g)
    for i in free:
        splits["val" if groups[i] in val_set else "train"].append(i)
    return {name: sorted(members) for name, members in splits.items()}


def _check_groups_apart(groups: Mapping[str, str], split_of: Mapping[str, str], where: Mapping[str, Path],
                        pattern: str) -> None:
    """With explicit split folders and a group pattern: a patient in two splits is refused."""
    seen: dict[str, tuple[str, str]] = {}
    for i in sorted(groups):
        g = groups[i]
        if g in seen and seen[g][0] != split_of[i]:
            raise InputError(where[i], f"patient {g!r} (ingest.group_pattern {pattern!r}) is in {split_of[i]}/ and "
                                       f"in {seen[g][0]}/ ({seen[g][1]!r}): move its images into one split folder")
        seen.setdefault(g, (split_of[i], i))


def _refuse_empty(root: Path, assignment: Mapping[str, list[str]], groups: Mapping[str, str], reader: Reader,
                  cfg: IngestConfig, folders: Mapping[str, Path] | None) -> None:
    """A train or val split without items cannot train or validate: one line, before anything is read."""
    if cfg.single_split is not None:
        return
    for name in ("train", "val"):
        if assignment.get(name):
            continue
        counts = ", ".join(f"{k} {len(v)}" for k, v in assignment.items())
        n_groups = len(set(groups.values()))
        where = f" from folders {', '.join(p.name + '/' for p in folders.values())}" if folders else ""
        grouped = f" in {n_groups} patient group(s)" if cfg.group_pattern is not None else ""
        raise InputError(root, f"the {name} split would be empty: {len(groups)} {reader.noun}(s){grouped}{where} "
                               f"split as {counts} {reader.noun}(s) with ingest.val_fraction {cfg.val_fraction}; "
                               f"training needs both: give at least 2 {'patients' if grouped else reader.noun + 's'}"
                               f" and val_fraction > 0, or a {name}/ folder, or set ingest.single_split to "
                               "write one split")


# --------------------------------------------------------------------------------------------------------
# per-item work (runs in worker processes)


def _run(fn: Callable[..., ItemResult], args: tuple) -> tuple[str, Any]:
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


def _results(fn: Callable[..., ItemResult], tasks: Sequence[tuple], workers: int) -> Iterator[ItemResult]:
    """Results of ``fn(*task)`` in task order, with at most 2 × workers tasks in flight."""

    def unwrap(out: tuple[str, Any]) -> ItemResult:
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
    source: str,
    root: str | os.PathLike[str],
    out: str | os.PathLike[str],
    cfg: IngestConfig,
    seed: int,
    workers: int = 0,
) -> dict[str, Any]:
    """Ingest ``root`` into shards under ``out``; returns the manifest (also written to manifest.json).

    ``source`` names the reader (``nodeseg.data.readers.READERS``). Items are split (see the module
    docstring) before any is read, then processed by a pool of ``workers`` processes (0: every core; 1: in
    this process) with at most two per worker in flight, and written in sorted id order, so the output does
    not depend on ``workers``. Workers are started with 'spawn' (no forked torch/OpenMP state): a script
    calling this with workers != 1 needs the usual ``if __name__ == "__main__":`` guard.
    """
    check_arg(source in READERS, "source", source, " or ".join(map(repr, READERS)))
    check_arg(isinstance(cfg, IngestConfig), "cfg", type(cfg).__name__, "an IngestConfig")
    check_arg(isinstance(seed, int) and seed >= 0, "seed", seed, "a non-negative integer")
    reader = get_reader(source)
    root, out = Path(root).resolve(), Path(out).resolve()
    n_workers = resolve_workers(workers)
    folders = split_folders(root)
    items: dict[str, Any] = {}
    origin: dict[str, str] = {}  # item → the folder it was listed from
    where: dict[str, Path] = {}  # item → the path messages name
    for name, folder in (folders or {"": root}).items():
        for i, handle in reader.list_items(folder, cfg).items():
            if i in items:
                raise InputError(reader.item_path(handle), f"{reader.noun} {i!r} is also in {origin[i]}/: ids must "
                                                           "be unique across the split folders")
            items[i], origin[i], where[i] = handle, name, reader.item_path(handle)
    # items of explicit split folders keep their split, except train/ without val/: val is drawn from it
    fixed = {i: name for i, name in origin.items() if name and not (name == "train" and "val" not in folders)}
    if folders and "train" not in folders and cfg.single_split is None:
        raise InputError(root, f"split folders {', '.join(p.name + '/' for p in folders.values())} without a "
                               "train/ folder: add train/, or set ingest.single_split to write one split")
    groups = group_items(sorted(items), cfg.group_pattern, where)
    ids = sorted(items)
    assignment = assign_splits(groups, cfg, seed, fixed)
    split_of = {i: name for name, members in assignment.items() for i in members}
    if cfg.group_pattern is not None and cfg.single_split is None:
        _check_groups_apart(groups, split_of, where, cfg.group_pattern)
    _refuse_empty(root, assignment, groups, reader, cfg, folders)
    label = reader.source_label(root)

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
        tasks = [(items[i], cfg, seed, label) for i in ids]
        for res in _results(reader.read_item, tasks, n_workers):
            name = split_of[res.item_id]
            for rec in res.records:
                writers[name].write(rec)
            rows[name] += len(res.records)
            slices_total += res.slices_total
            empty_masks += res.empty_masks
            if res.skipped:
                skipped[res.item_id] = res.skipped
            log.info("%s: %d rows → %s", res.item_id, len(res.records), name)
        labels = ", ".join(str(v) for v in cfg.keep_labels)
        if ids and not any(rows.values()):  # every item was skipped: shards without rows train nothing
            raise InputError(root, f"none of the {len(ids)} {reader.noun}s has a slice with label(s) {labels} "
                                   "(ingest.keep_labels): no rows to write; check the segmentations or keep_labels")
        for name in ("train", "val") if cfg.single_split is None else ():
            if not rows[name]:
                raise InputError(root, f"every {reader.noun} of the {name} split ({len(assignment[name])}: "
                                       f"{', '.join(assignment[name][:3])}{', ...' if len(assignment[name]) > 3 else ''})"
                                       f" lacks a slice with label(s) {labels} (ingest.keep_labels): the {name} "
                                       f"split would be empty (rows: {', '.join(f'{k} {v}' for k, v in rows.items())})")
        files = {name: [str(p.relative_to(tmp)) for p in w.close()] for name, w in writers.items()}
        manifest: dict[str, Any] = {
            "format": "nodeseg-shards",
            "schema_version": SCHEMA_VERSION,
            "source": source,
            "root": str(root),
            "seed": seed,
            "split_rule": _split_rule(cfg, folders),
            "params": to_mapping(cfg),
            "rows": sum(rows.values()),
            "splits": {
                name: {"rows": rows[name], "items": len(assignment[name]), "cases": assignment[name],
                       "groups": len({groups[i] for i in assignment[name]}), "files": files[name]}
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


def _split_rule(cfg: IngestConfig, folders: Mapping[str, Path] | None) -> str:
    """How the items were split, in words (the manifest's ``split_rule``)."""
    if cfg.single_split is not None:
        return "single split"
    by = (f"patient groups (ingest.group_pattern {cfg.group_pattern!r}, matched at the start of each id)"
          if cfg.group_pattern is not None else "ids")
    if folders:
        given = ", ".join(f"{p.name}/" for p in folders.values())
        if "val" in folders:
            return f"explicit split folders {given}"
        return f"explicit split folders {given}; val drawn from train/'s {by}: {SPLIT_RULE}"
    return f"{by}: {SPLIT_RULE}"
