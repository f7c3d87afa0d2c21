"""Freed memory kept for the next step: glibc's malloc tuned for training loops, once per process.

PyTorch's CPU tensors come from ``malloc``. glibc serves a block above its mmap threshold (128 KiB at
start, raised adaptively) with freshly mapped pages, and gives the free top of its heap back to the system
once that exceeds the trim threshold; a training step that allocates and frees the same activations every
iteration then faults their pages in again every step. :func:`tune_malloc` fixes the mmap threshold at
32 MiB (glibc's largest) and the trim threshold at 1 GiB, so such blocks stay in the heap for the next step:
the default UNet's training step went from 76 to 58 ms on 2 CPU cores, the paper's UNets gain 1.05–1.09×
(benchmarks/README.md, figure 3); NODE steps do not change. Blocks above
32 MiB are still mapped and returned whole; the cost is that up to 1 GiB of freed heap is kept resident.

``NODESEG_MALLOC=system`` keeps glibc's defaults; where the C library is not glibc (macOS, musl) nothing
changes. Every ``nodeseg`` command calls it first; its settings are inherited by forked workers.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys

from nodeseg.errors import ConfigError

__all__ = ["ENV", "MMAP_THRESHOLD", "TRIM_THRESHOLD", "CHOICES", "tune_malloc"]

ENV = "NODESEG_MALLOC"
CHOICES = ("reuse", "system")
MMAP_THRESHOLD = 32 << 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: mallopt refuses more
TRIM_THRESHOLD = 1 << 30
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # from glibc's <malloc.h>

def tune_malloc() -> bool:
    """Apply the thresholds above unless ``$NODESEG_MALLOC`` is 'system'; True when glibc uses them.

    Idempotent (glibc is set once per process). An unknown ``$NODESEG_MALLOC`` raises :class:`ConfigError`.
    """
    choice = os.environ.get(ENV, "reuse") or "reuse"
    if choice not in CHOICES:
        raise ConfigError(f"environment variable {ENV}={choice!r} is not one of {', '.join(CHOICES)}")
    return choice == "reuse" and _mallopt()


@functools.cache
def _mallopt() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)  # the C library this process already runs on
        libc.gnu_get_libc_version  # noqa: B018  (present in glibc only)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
