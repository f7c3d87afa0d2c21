"""Atomic outputs: a file or a folder appears whole at its path, or not at all.

Writers build beside the target (same folder, so the final ``os.replace`` is a rename on one file system) under
a hidden temporary name, and the target is replaced only when writing succeeded; on an exception the
temporary is removed and an existing target is left as it was.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_dir", "atomic_file", "replace_dir"]


@contextmanager
def atomic_file(path: str | os.PathLike[str], suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (ending in ``suffix``, default ``path``'s, for writers that
    pick the format from it); rename it to ``path`` when the block ends without an exception."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix if suffix is None else suffix
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def replace_dir(tmp: Path, out: Path) -> None:
    """Rename the folder ``tmp`` to ``out``, moving an older ``out`` aside first and deleting it afterwards
    (``out`` is never missing in between, except for the instant of the two renames)."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_dir(out: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``out``; it replaces ``out`` (:func:`replace_dir`) when the block
    ends without an exception, and is removed otherwise."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would carry over to the published folder
    try:
        yield tmp
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
