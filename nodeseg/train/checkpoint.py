"""Checkpoints: written atomically, loaded with ``weights_only=True``, found again for resume."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import random
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nodeseg.errors import InputError

log = logging.getLogger(__name__)

FORMAT = "nodeseg-checkpoint/1"
_NAME = re.compile(r"^epoch-(\d{4,})\.pt$")


def checkpoint_path(directory: Path, epoch: int) -> Path:
    """The file of the checkpoint written after ``epoch`` completed epochs."""
    return Path(directory) / f"epoch-{epoch:04d}.pt"


def list_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """Every ``epoch-NNNN.pt`` in ``directory`` as (epoch, path), oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        m = _NAME.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable parts (configs), to tell whether a resume is valid."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, fsync, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save(path: Path, payload: dict[str, Any]) -> None:
    """``torch.save`` ``payload`` (plus the format tag) atomically to ``path``."""
    import io

    buf = io.BytesIO()
    torch.save({"format": FORMAT, **payload}, buf)
    atomic_write_bytes(Path(path), buf.getvalue())


def load(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``); a foreign or corrupt file gives ``InputError``."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "checkpoint not found")
    # torch.save writes a zip archive with a CRC-32 per record, which torch.load does not check: a cut-off copy
    # loses the archive's directory, and flipped bytes would otherwise load as silently corrupted weights
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, EOFError, OSError):
        raise InputError(path, "not a readable checkpoint: not a torch.save archive (truncated, corrupt or another "
                               "format); copy or export it again") from None
    if bad is not None:
        raise InputError(path, f"not a readable checkpoint: record {bad} fails its CRC-32 check (corrupted on disk "
                               "or in transfer); copy or export it again")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:  # weights_only=True met a Python object: never in a nodeseg checkpoint
        found = re.search(r"GLOBAL (\S+)", str(err))
        what = f" {found.group(1)}" if found else ""
        raise InputError(path, f"not a readable checkpoint: the safe loader (weights_only=True) refuses the Python "
                               f"object{what} in it; nodeseg checkpoints hold only tensors and plain values") from None
    except Exception as err:  # torch raises many types for corrupt archives
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip()
        first = text.split(". ")[0].splitlines()[0] if text else type(err).__name__
        raise InputError(path, f"not a readable checkpoint ({first[:160]}); copy or export it again") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise InputError(path, f"not a nodeseg checkpoint (expected format {FORMAT!r})")
    return payload


def latest(directory: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint in ``directory`` that loads, or None; unreadable ones are skipped with a warning."""
    for _, path in reversed(list_checkpoints(directory)):
        try:
            return path, load(path)
        except InputError as err:
            log.warning("skipping unreadable checkpoint: %s", err)
    return None


def remove_partial_writes(directory: Path) -> list[Path]:
    """Delete temporary files that a killed :func:`atomic_write_bytes` left (``.<name>.*.tmp``); return them.

    Only the process that writes checkpoints may call it (rank 0), before it writes any.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    torn = [p for p in directory.glob(".*.tmp") if p.is_file()]
    for p in torn:
        p.unlink(missing_ok=True)
    return torn


def supersede(directory: Path, old_fingerprint: str) -> Path:
    """Move the checkpoints of another run into ``directory/superseded/<fingerprint>/`` (nothing is deleted)."""
    directory = Path(directory)
    dest = directory / "superseded" / old_fingerprint
    dest.mkdir(parents=True, exist_ok=True)
    for _, path in list_checkpoints(directory):
        os.replace(path, dest / path.name)
    return dest


def rng_state() -> dict[str, Any]:
    """Every RNG state as tensors and plain values (loadable with ``weights_only=True``)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached": float(np_state[4]),
        },
        "python": list(random.getstate()[1]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"])
    )
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
