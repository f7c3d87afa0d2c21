"""nodeseg.malloc: freed blocks are reused without page faults; the switch and its errors."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

# Ten 4 MiB blocks allocated, written and freed, three times after a first round: with glibc's defaults
# the pages of blocks above the (adaptive) mmap threshold or of a trimmed heap top are faulted in anew.
_WORKLOAD = """
import resource, sys
import numpy as np
from nodeseg.malloc import tune_malloc
applied = tune_malloc()
def one_round():
    blocks = [np.ones(1 << 20, np.float32) for _ in range(10)]
    del blocks
one_round()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    one_round()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt thresholds are glibc's")


def _faults(choice: str) -> tuple[bool, int]:
    env = {**os.environ, "NODESEG_MALLOC": choice}
    out = subprocess.run([sys.executable, "-c", _WORKLOAD], env=env, capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied == "True", int(faults)


@glibc
def test_reuse_serves_freed_blocks_again_without_page_faults() -> None:
    applied, tuned = _faults("reuse")
    kept, system = _faults("system")
    assert applied and not kept
    pages = 3 * 10 * (4 << 20) // os.sysconf("SC_PAGE_SIZE")
    assert system > pages // 10, f"glibc's defaults faulted only {system} of {pages} pages: the workload proves nothing"
    assert tuned < pages // 100, f"{tuned} page faults with the tuned thresholds (glibc's defaults: {system})"


def test_unknown_choice_is_refused_with_the_valid_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    from nodeseg.errors import ConfigError
    from nodeseg.malloc import tune_malloc

    monkeypatch.setenv("NODESEG_MALLOC", "jemalloc")
    with pytest.raises(ConfigError, match=r"NODESEG_MALLOC='jemalloc' is not one of reuse, system"):
        tune_malloc()


def test_every_command_tunes_first_and_reports_a_bad_setting_on_one_line(tmp_path: os.PathLike[str]) -> None:
    env = {**os.environ, "NODESEG_MALLOC": "jemalloc"}
    out = subprocess.run([sys.executable, "-m", "nodeseg", "select", "--run", str(tmp_path), "--out",
                          os.path.join(tmp_path, "best.pt")], env=env, capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "nodeseg select: error: environment variable NODESEG_MALLOC='jemalloc' is not one of reuse, system"]
