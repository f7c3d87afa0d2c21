"""Where a study lives: an RDB URL (sqlite by default, PostgreSQL on clusters) or an Optuna journal file.

Accepted forms: ``sqlite:///path/study.db``, ``postgresql://user:pass@host/db`` (any SQLAlchemy URL), a path
ending in ``.db`` / ``.sqlite`` (sqlite), ``journal:PATH`` or a path ending in ``.log`` / ``.journal``
(``JournalStorage`` over ``JournalFileBackend``). sqlite waits up to ``SQLITE_TIMEOUT_S`` for a lock, so
several worker processes can share one file.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage, JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial

from nodeseg.errors import ConfigError

SQLITE_TIMEOUT_S = 300
FORMS = ("sqlite:///PATH", "postgresql://USER:PASSWORD@HOST/DB (any SQLAlchemy URL)", "PATH.db", "PATH.sqlite",
         "journal:PATH", "PATH.log", "PATH.journal")


def default_storage(out: Path) -> str:
    """The default: ``sqlite:///<out>/study.db``."""
    return f"sqlite:///{(Path(out) / 'study.db').resolve()}"


def _normalise(spec: str) -> tuple[str, str]:
    """(``'rdb'`` or ``'journal'``, the URL or the file path)."""
    spec = spec.strip()
    if spec.startswith("journal:"):
        path = spec[len("journal:"):]
        if path:
            return "journal", str(Path(path).expanduser().resolve())
    elif "://" in spec:
        return "rdb", spec
    elif spec.endswith((".log", ".journal")):
        return "journal", str(Path(spec).expanduser().resolve())
    elif spec.endswith((".db", ".sqlite")):
        return "rdb", f"sqlite:///{Path(spec).expanduser().resolve()}"
    raise ConfigError(f"--storage {spec!r}: not a storage; expected one of {', '.join(FORMS)}")


def open_storage(spec: str, *, heartbeat_s: int | None = None, retries: int = 0) -> BaseStorage:
    """The Optuna storage ``spec`` names (see the module docstring); a sqlite or journal folder is created.

    With ``heartbeat_s`` (RDB storages; Optuna's journal storage has no heartbeat) the trials a worker runs
    beat that often, and a worker starting a trial marks a RUNNING trial silent for twice as long FAIL (its
    worker was killed) and queues it again with the same parameters, at most ``retries`` times.
    """
    kind, target = _normalise(spec)
    if kind == "journal":
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(target))
    beat: dict[str, Any] = {}
    if heartbeat_s is not None:
        beat = {"heartbeat_interval": heartbeat_s, "grace_period": 2 * heartbeat_s,
                "heartbeat_stale_trial_callback": retry_callback(retries) if retries > 0 else None}
    engine_kwargs: dict[str, object] = {"pool_pre_ping": True}
    if target.startswith("sqlite:"):
        db = target.split(":///", 1)[-1]
        if db and db != ":memory:":
            Path(db).parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}}
    try:
        with warnings.catch_warnings():  # the heartbeat arguments are "experimental" (since Optuna 2.9)
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = RDBStorage(target, engine_kwargs=engine_kwargs, **beat)
    except ImportError as err:
        raise ConfigError(f"--storage {redact(target)!r}: no database driver ({err}); for PostgreSQL install "
                          "the kube extra (psycopg2-binary)") from None
    if target.startswith("sqlite:"):
        _begin_immediate(storage.engine)
    return storage


def retry_callback(retries: int) -> Callable[[optuna.Study, FrozenTrial], None]:
    """Optuna's ``RetryHeartbeatStaleTrialCallback``: queue a trial again (WAITING, same parameters and user
    attributes, ``failed_trial``/``retry_history`` in its system attributes) unless it was retried
    ``retries`` times already."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RetryHeartbeatStaleTrialCallback(max_retry=retries)


def _begin_immediate(engine: Any) -> None:
    """Make every sqlite transaction ``BEGIN IMMEDIATE`` (SQLAlchemy's recipe for pysqlite).

    Optuna hands an enqueued (WAITING) trial to one worker by reading its state and setting it to RUNNING
    in one transaction with ``SELECT ... FOR UPDATE``, which sqlite ignores; pysqlite also opens the
    transaction only at the UPDATE. Two workers then both read WAITING and both run the trial (seen:
    "Cannot tell a COMPLETE trial" in the second). Taking the write lock at BEGIN serialises the
    read-and-set; the other workers wait (up to ``SQLITE_TIMEOUT_S``).
    """
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _no_pysqlite_begin(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # pysqlite must not open transactions on its own

    @event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections opened before the listeners were attached are dropped


def redact(spec: str) -> str:
    """``spec`` with a URL's password hidden (safe to log, tag and print)."""
    if "://" not in spec:
        return spec
    try:
        from sqlalchemy.engine import make_url

        return make_url(spec).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a SQLAlchemy URL: drop everything before the host
        scheme, rest = spec.split("://", 1)
        return f"{scheme}://***@{rest.rsplit('@', 1)[-1]}" if "@" in rest else spec


def load_study(spec: str | BaseStorage, name: str, **kwargs: object) -> optuna.Study:
    """``optuna.load_study`` with a one-line error naming the study, the storage and what exists there."""
    storage = open_storage(spec) if isinstance(spec, str) else spec
    try:
        return optuna.load_study(study_name=name, storage=storage, **kwargs)  # type: ignore[arg-type]
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        where = redact(spec) if isinstance(spec, str) else type(spec).__name__
        raise ConfigError(f"study {name!r} not found in {where} (studies there: {', '.join(names) or 'none'}); "
                          "create it first (nodeseg tune --phase create)") from None
