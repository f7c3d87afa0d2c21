"""nodeseg.atomic: outputs appear whole or not at all; an existing output survives a failed write."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from nodeseg.atomic import atomic_dir, atomic_file


def test_atomic_dir_replaces_only_on_success(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("1")
        assert not out.exists()  # nothing visible while writing
    assert (out / "a.txt").read_text() == "1"
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    with pytest.raises(RuntimeError, match="boom"), atomic_dir(out) as tmp:
        (tmp / "b.txt").write_text("2")
        raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary left behind
    assert sorted(p.name for p in out.iterdir()) == ["a.txt"]  # the old output is intact
    with atomic_dir(out) as tmp:
        (tmp / "c.txt").write_text("3")
    assert sorted(p.name for p in out.iterdir()) == ["c.txt"]  # replaced whole, not merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the old copy is gone too


def test_atomic_file_keeps_the_suffix_and_the_old_file_on_failure(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "image.nii.gz"
    with atomic_file(path, suffix=".nii.gz") as tmp:
        assert tmp.parent == path.parent and tmp.name.endswith(".nii.gz") and tmp.name.startswith(".")
        tmp.write_bytes(b"new")
    assert path.read_bytes() == b"new"
    with pytest.raises(ValueError), atomic_file(path) as tmp:
        tmp.write_bytes(b"half")
        raise ValueError
    assert path.read_bytes() == b"new" and sorted(p.name for p in path.parent.iterdir()) == ["image.nii.gz"]
