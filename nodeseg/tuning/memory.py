"""Peak memory of a block of work (a tuning trial): what the study reports beside NFE and seconds.

* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, less what was allocated at the
  start ("cuda_max_allocated"): the tensors the trial's training added at its peak (direct backprop keeps
  every evaluation's graph, the adjoint about one).
* CPU on Linux: the process's peak resident set (``VmHWM`` in /proc/self/status) after resetting it by
  writing 5 to /proc/self/clear_refs, less the resident set at the start ("rss_peak"): a true peak of this
  trial alone, also when an earlier trial of the same worker peaked higher.
* Elsewhere: the growth of ``resource.getrusage``'s lifetime peak ``ru_maxrss`` ("ru_maxrss_growth"): 0 when
  the trial stayed below an earlier peak of the process, so it is a lower bound.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path
from types import TracebackType

import torch

__all__ = ["PeakMemory"]

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kb(key: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_rss_peak() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def _ru_maxrss_kb() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak  # bytes on macOS, KiB on Linux


class PeakMemory:
    """``with PeakMemory(device) as m: ...`` then ``m.mb`` (MiB added at the peak) and ``m.kind`` (how)."""

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.kind = ""
        self.mb = 0.0
        self._start = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind, self._start = "cuda_max_allocated", torch.cuda.memory_allocated(self.device)
        elif _reset_rss_peak() and _status_kb("VmRSS") is not None:
            self.kind, self._start = "rss_peak", (_status_kb("VmRSS") or 0) * 1024
        else:
            self.kind, self._start = "ru_maxrss_growth", _ru_maxrss_kb() * 1024
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
                 ) -> None:
        if self.kind == "cuda_max_allocated":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.kind == "rss_peak":
            peak = (_status_kb("VmHWM") or 0) * 1024
        else:
            peak = _ru_maxrss_kb() * 1024
        self.mb = max(peak - self._start, 0) / 2**20
