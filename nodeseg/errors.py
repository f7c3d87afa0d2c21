"""Errors that reach the user as one line: what is wrong, where, and how to fix it."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

__all__ = [
    "ConfigError",
    "InputError",
    "NodesegError",
    "SolverError",
    "StorageError",
    "Terminated",
    "TrainingDiverged",
    "check_arg",
    "shown",
    "sigterm_raises",
]


def shown(text: object) -> str:
    """``text`` safe to print on a terminal: every non-printable character (newline, ESC of an ANSI sequence,
    a bidi override) as its Python escape (``\\n``, ``\\x1b``, ``\\u202e``); printable text unchanged.

    A file or folder name can hold any character but ``/`` and NUL: a crafted name echoed raw could forge
    terminal output. Every path or name that reaches the user goes through here (or ``{!r}``).
    """
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in str(text))


class NodesegError(Exception):
    """Base class: the CLI prints ``str(err)`` on one line and exits non-zero."""

    exit_code = 2


class InputError(NodesegError, ValueError):
    """A file or folder given by the user is malformed."""

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{shown(self.path)}: {problem}")


class ConfigError(NodesegError, ValueError):
    """params.yaml (or a stage argument) holds an unknown key or a bad value."""


class SolverError(NodesegError, RuntimeError):
    """An ODE solve ran away: step cap, NFE cap or step-size underflow."""

    exit_code = 3


class TrainingDiverged(NodesegError, RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""

    exit_code = 3


class StorageError(NodesegError, OSError):
    """Reading or writing a local path or an s3:// URL failed after retries."""

    exit_code = 4


class Terminated(KeyboardInterrupt):
    """The process was asked to stop (SIGTERM: a deleted, evicted or preempted pod, ``kill``).

    Raised by the CLI's signal handler so that the stage unwinds as it would on Ctrl-C: the MLflow run is
    ended as KILLED, temporary files are removed, a training output on S3 uploads its checkpoints; the CLI
    then exits with 128 + the signal number.
    """

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated(signum)


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block SIGTERM raises :class:`Terminated` (instead of ending the process on the spot, or being
    ignored where the process is a container's PID 1), so that the work unwinds as on Ctrl-C. Outside the
    main thread, where Python cannot set handlers, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def check_arg(ok: bool, name: str, value: object, expected: str) -> None:
    """Raise ``ValueError`` naming the argument, the bad value and what was expected."""
    if not ok:
        raise ValueError(f"argument {name!r} must be {expected}, got {value!r}")
