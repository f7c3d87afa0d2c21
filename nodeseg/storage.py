"""Local paths and ``s3://bucket/prefix`` URLs for stage inputs and outputs.

Stage functions only see local paths; the CLI wraps each argument in :func:`staged_input` or
:func:`staged_output`, which download an ``s3://`` input to a local folder and upload an output when the stage
succeeded. Credentials, region and endpoint come only from the standard AWS environment variables and config
files (boto3 reads them itself), never from arguments or params.

Nothing partial is ever visible on S3: a single PUT is atomic, a multipart upload is invisible until it is
completed and is aborted when it fails, and a folder is published by writing the marker object
``<prefix>/_SUCCESS`` (a JSON list of the files and their sizes) after every file; :func:`download` refuses a
prefix without a marker and reads exactly the files the marker lists.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import random
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

from nodeseg.errors import ConfigError, InputError, NodesegError, StorageError, check_arg

log = logging.getLogger(__name__)

MiB = 1024 * 1024
MARKER = "_SUCCESS"
"""Name of the completion marker written last under an uploaded prefix."""
MARKER_FORMAT = "nodeseg-prefix/1"
CACHE_ENV = "NODESEG_CACHE"

_BUCKET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,61}[A-Za-z0-9]$")
_TRANSIENT_CODES = frozenset(
    {
        "RequestTimeout",
        "RequestTimeoutException",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "SlowDown",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "InternalError",
        "ServiceUnavailable",
        "BadDigest",
    }
)
_CREDENTIAL_CODES = frozenset(
    {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "TokenRefreshRequired"}
)
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
_jitter = random.SystemRandom()  # backoff jitter must differ between processes: deliberately unseeded

T = TypeVar("T")


@dataclass(frozen=True)
class S3Settings:
    """Retry, timeout and transfer settings (never credentials); :meth:`from_env` reads overrides."""

    retry_mode: str = "standard"
    """botocore retry mode per request: ``standard`` or ``adaptive`` (client-side rate limiting)."""
    max_attempts: int = 5
    """botocore attempts per request, the first try included (like ``AWS_MAX_ATTEMPTS``)."""
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    multipart_threshold: int = 64 * MiB
    """Files at least this large are uploaded (and downloaded) in parts."""
    multipart_chunksize: int = 16 * MiB
    max_concurrency: int = 4
    transfer_attempts: int = 3
    """Whole-transfer attempts, on top of botocore's per-request retries, for transient failures."""
    backoff_base: float = 1.0
    """Seconds; the k-th transfer retry waits uniform(0, min(backoff_max, backoff_base * 2**(k-1)))."""
    backoff_max: float = 30.0

    def __post_init__(self) -> None:
        check_arg(
            self.retry_mode in ("standard", "adaptive"),
            "retry_mode",
            self.retry_mode,
            "'standard' or 'adaptive'",
        )
        check_arg(self.max_attempts >= 1, "max_attempts", self.max_attempts, ">= 1")
        check_arg(self.connect_timeout > 0, "connect_timeout", self.connect_timeout, "> 0")
        check_arg(self.read_timeout > 0, "read_timeout", self.read_timeout, "> 0")
        check_arg(self.multipart_threshold >= 1, "multipart_threshold", self.multipart_threshold, ">= 1 byte")
        check_arg(
            self.multipart_chunksize >= 5 * MiB,
            "multipart_chunksize",
            self.multipart_chunksize,
            ">= 5 MiB (the S3 minimum part size)",
        )
        check_arg(self.max_concurrency >= 1, "max_concurrency", self.max_concurrency, ">= 1")
        check_arg(self.transfer_attempts >= 1, "transfer_attempts", self.transfer_attempts, ">= 1")
        check_arg(self.backoff_base >= 0, "backoff_base", self.backoff_base, ">= 0")
        check_arg(self.backoff_max >= 0, "backoff_max", self.backoff_max, ">= 0")

    @classmethod
    def from_env(cls) -> S3Settings:
        """Defaults overridden by ``AWS_RETRY_MODE``, ``AWS_MAX_ATTEMPTS`` and ``NODESEG_S3_<FIELD>`` variables."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            names = [f"NODESEG_S3_{f.name.upper()}"]
            if f.name in ("retry_mode", "max_attempts"):
                names.append(f"AWS_{f.name.upper()}")
            for name in names:
                raw = os.environ.get(name, "").strip()
                if not raw:
                    continue
                kind = type(getattr(cls, f.name))
                try:
                    values[f.name] = kind(raw)
                except ValueError:
                    raise ConfigError(
                        f"environment variable {name}={raw!r} must be a {kind.__name__}"
                    ) from None
                break
        try:
            return cls(**values)
        except ValueError as err:
            raise ConfigError(f"S3 settings from the environment: {err}") from None


# ----------------------------------------------------------------------------------------------- URLs


def is_s3(uri: str | os.PathLike[str]) -> bool:
    """True for ``s3:`` URLs (any case), including malformed ones that :func:`parse_s3` then refuses."""
    return str(uri)[:3].lower() == "s3:"


def parse_s3(uri: str | os.PathLike[str]) -> tuple[str, str]:
    """``s3://bucket/some/key`` → ``("bucket", "some/key")``; the key may be empty or end with ``/``."""
    text = str(uri)
    if not is_s3(text):
        raise InputError(text, "not an s3:// URL")
    if not text.startswith("s3://"):
        hint = " (was it turned into a filesystem path?)" if text.startswith("s3:/") else ""
        raise InputError(text, f"malformed S3 URL: expected s3://bucket/key{hint}")
    bucket, _, key = text[5:].partition("/")
    if not bucket:
        raise InputError(text, "malformed S3 URL: no bucket name (expected s3://bucket/key)")
    if not _BUCKET_RE.match(bucket) or ".." in bucket:
        raise InputError(
            text, f"malformed S3 URL: invalid bucket name {bucket!r} (3-63 letters, digits, '.', '-')"
        )
    if key:
        segments = key.rstrip("/").split("/")
        if any(s in ("", ".", "..") for s in segments):
            raise InputError(text, f"malformed S3 URL: key {key!r} has an empty, '.' or '..' segment")
    return bucket, key


def _url(bucket: str, key: str) -> str:
    return f"s3://{bucket}/{key}"


# ----------------------------------------------------------------------------------------------- client


def client(settings: S3Settings | None = None) -> Any:
    """A boto3 S3 client: credentials, region and endpoint from the standard AWS variables and files only.

    boto3 reads ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_PROFILE``,
    ``AWS_DEFAULT_REGION``/``AWS_REGION`` and ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL`` itself; this function
    adds the retry mode, attempts and timeouts of ``settings``.
    """
    import boto3
    import botocore.session
    from botocore.config import Config

    s = settings if settings is not None else S3Settings.from_env()
    config = Config(
        retries={"mode": s.retry_mode, "total_max_attempts": s.max_attempts},
        connect_timeout=s.connect_timeout,
        read_timeout=s.read_timeout,
        max_pool_connections=max(10, s.max_concurrency + 2),
    )
    # A fresh session re-reads the environment and config files; only the parsed API models are shared.
    core = botocore.session.get_session()
    core.register_component("data_loader", _model_loader())
    return boto3.session.Session(botocore_session=core).client("s3", config=config)


@functools.cache
def _model_loader() -> Any:
    """botocore's loader of service models (read-only JSON, slow to parse), shared between clients."""
    import botocore.loaders

    return botocore.loaders.create_loader()


def _transfer_manager(s3: Any, s: S3Settings) -> Any:
    from boto3.s3.transfer import TransferConfig
    from s3transfer.manager import TransferManager

    config = TransferConfig(
        multipart_threshold=s.multipart_threshold,
        multipart_chunksize=s.multipart_chunksize,
        max_concurrency=s.max_concurrency,
        preferred_transfer_client="classic",
    )
    return TransferManager(s3, config)


# ----------------------------------------------------------------------------------------------- errors and retries


def _redact(text: str) -> str:
    for name in _SECRET_ENV:
        secret = os.environ.get(name, "")
        if len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


def _describe(exc: BaseException, bucket: str) -> str:
    """One line saying what went wrong, without secrets."""
    from botocore.exceptions import ClientError, NoCredentialsError, PartialCredentialsError

    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        code = str(err.get("Code") or status)
        if code == "NoSuchBucket":
            text = f"bucket {bucket!r} does not exist"
        elif code in ("NoSuchKey", "404", "NotFound"):
            text = "no such object"
        elif code in ("AccessDenied", "403", "Forbidden"):
            text = "access denied (HTTP 403): check the credentials and the bucket policy"
        elif code in _CREDENTIAL_CODES:
            text = f"credentials rejected ({code}): check AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN"
        else:
            text = f"{code} (HTTP {status}): {err.get('Message') or 'no message'}"
    elif isinstance(exc, NoCredentialsError | PartialCredentialsError):
        text = f"{exc} (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)"
    else:
        text = f"{type(exc).__name__}: {exc}"
    return _redact(" ".join(text.split()))


def _is_transient(exc: BaseException) -> bool:
    from botocore.exceptions import ClientError, ConnectionError, HTTPClientError, IncompleteReadError
    from s3transfer.exceptions import RetriesExceededError

    if isinstance(exc, ConnectionError | HTTPClientError | IncompleteReadError | RetriesExceededError):
        return True
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        code = exc.response.get("Error", {}).get("Code", "")
        return status >= 500 or status == 429 or code in _TRANSIENT_CODES
    name = type(exc).__name__
    return name in ("ResponseStreamingError", "ReadTimeoutError", "ProtocolError")


def _storage_errors() -> tuple[type[BaseException], ...]:
    from botocore.exceptions import BotoCoreError, ClientError
    from s3transfer.exceptions import (
        RetriesExceededError,
        S3DownloadFailedError,
        S3UploadFailedError,
        S3ValidationError,
    )

    return (
        BotoCoreError,
        ClientError,
        RetriesExceededError,
        S3UploadFailedError,
        S3DownloadFailedError,
        S3ValidationError,
        OSError,
    )


def _retrying(uri: str, what: str, bucket: str, s: S3Settings, fn: Callable[[], T]) -> T:
    """Run ``fn``; retry transient failures with exponential backoff and full jitter, then raise StorageError."""
    caught = _storage_errors()
    for attempt in range(1, s.transfer_attempts + 1):
        try:
            return fn()
        except NodesegError:
            raise
        except caught as exc:
            problem = _describe(exc, bucket)
            if attempt >= s.transfer_attempts or not _is_transient(exc):
                tries = f" after {attempt} attempts" if attempt > 1 else ""
                raise StorageError(f"{uri}: {what} failed{tries}: {problem}") from exc
            delay = _jitter.uniform(0.0, min(s.backoff_max, s.backoff_base * 2 ** (attempt - 1)))
            log.warning(
                "%s: %s attempt %d/%d failed (%s); retrying in %.2f s",
                uri,
                what,
                attempt,
                s.transfer_attempts,
                problem,
                delay,
            )
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


# ----------------------------------------------------------------------------------------------- local helpers


def _scratch_next_to(dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))


def _install(new: Path, dest: Path) -> None:
    """Move ``new`` to ``dest`` by rename; an existing ``dest`` is replaced."""
    if dest.is_file() and new.is_file():
        os.replace(new, dest)
        return
    old: Path | None = None
    if dest.exists() or dest.is_symlink():
        old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(dest, old)
    os.rename(new, dest)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def _relative_ok(rel: str) -> bool:
    parts = rel.split("/")
    return bool(rel) and not rel.startswith("/") and all(p not in ("", ".", "..") for p in parts)


def file_states(root: Path) -> dict[str, tuple[int, int]]:
    """(size, modification time in ns) of every file below ``root``, by path relative to it."""
    states = {}
    for rel, path in _tree_files(root):
        st = path.stat()
        states[rel] = (st.st_size, st.st_mtime_ns)
    return states


def _tree_files(root: Path) -> list[tuple[str, Path]]:
    files = []
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            path = Path(dirpath) / name
            if path.is_file():
                files.append((path.relative_to(root).as_posix(), path))
    return sorted(files)


# ----------------------------------------------------------------------------------------------- download


def download(uri: str, local: str | os.PathLike[str], *, settings: S3Settings | None = None) -> Path:
    """Copy the object or the completed prefix at ``uri`` to exactly ``local`` (a file or a folder); return it.

    A URL ending in ``/`` always names a prefix. A prefix is only read when its ``_SUCCESS`` marker exists,
    and then exactly the files the marker lists. The copy is written next to ``local`` and renamed into place,
    replacing what was there.
    """
    bucket, key = parse_s3(uri)
    s = settings if settings is not None else S3Settings.from_env()
    dest = Path(local)
    s3 = client(s)
    if key and not key.endswith("/"):
        size = _object_size(s3, uri, bucket, key, s)
        if size is not None:
            return _download_object(s3, uri, bucket, key, size, dest, s)
    return _download_prefix(s3, uri, bucket, key.rstrip("/"), dest, s)


def _object_size(s3: Any, uri: str, bucket: str, key: str, s: S3Settings) -> int | None:
    from botocore.exceptions import ClientError

    def head() -> int | None:
        try:
            return int(s3.head_object(Bucket=bucket, Key=key)["ContentLength"])
        except ClientError as exc:
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                return None  # no such key, or no such bucket: the prefix lookup tells which
            raise

    return _retrying(uri, "reading", bucket, s, head)


def _download_object(s3: Any, uri: str, bucket: str, key: str, size: int, dest: Path, s: S3Settings) -> Path:
    scratch = _scratch_next_to(dest)
    try:
        target = scratch / "object"
        _fetch(s3, uri, bucket, key, target, size, s)
        _install(target, dest)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    log.info("downloaded %s to %s (%d bytes)", uri, dest, size)
    return dest


def _fetch(s3: Any, uri: str, bucket: str, key: str, target: Path, size: int, s: S3Settings) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)

    def get() -> None:
        with _transfer_manager(s3, s) as tm:
            tm.download(bucket, key, str(target)).result()

    _retrying(uri, "download", bucket, s, get)
    got = target.stat().st_size
    if got != size:
        raise StorageError(
            f"{uri}: downloaded {got} bytes, expected {size} (was the object replaced meanwhile?)"
        )


def _download_prefix(s3: Any, uri: str, bucket: str, prefix: str, dest: Path, s: S3Settings) -> Path:
    files = _read_marker(s3, uri, bucket, prefix, s)
    scratch = _scratch_next_to(dest)
    try:
        tree = scratch / "tree"
        tree.mkdir()
        for rel, size in files.items():
            key = f"{prefix}/{rel}" if prefix else rel
            _fetch(s3, _url(bucket, key), bucket, key, tree / rel, size, s)
        _install(tree, dest)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    log.info("downloaded %s to %s (%d files)", uri, dest, len(files))
    return dest


def _read_marker(s3: Any, uri: str, bucket: str, prefix: str, s: S3Settings) -> dict[str, int]:
    """The files listed by the prefix's marker; a clear error when it is missing or unreadable."""
    from botocore.exceptions import ClientError

    marker_key = f"{prefix}/{MARKER}" if prefix else MARKER

    def get() -> bytes | None:
        try:
            return s3.get_object(Bucket=bucket, Key=marker_key)["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise

    body = _retrying(uri, "reading", bucket, s, get)
    if body is None:
        listing = _retrying(
            uri,
            "listing",
            bucket,
            s,
            lambda: s3.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/" if prefix else "", MaxKeys=1),
        )
        if not listing.get("KeyCount"):
            raise StorageError(f"{uri}: no such object or prefix (nothing stored under it)")
        raise StorageError(
            f"{uri}: incomplete prefix: marker {MARKER} is missing (the upload failed or is still running)"
        )
    try:
        doc = json.loads(body)
        files = doc["files"]
        ok = doc.get("format") == MARKER_FORMAT and isinstance(files, dict)
        ok = ok and all(_relative_ok(k) and isinstance(v, int) and v >= 0 for k, v in files.items())
    except (ValueError, KeyError, TypeError, AttributeError):
        ok = False
    if not ok:
        raise StorageError(
            f"{_url(bucket, marker_key)}: unreadable completion marker (expected {MARKER_FORMAT} JSON)"
        )
    return dict(files)


# ----------------------------------------------------------------------------------------------- upload


def upload(local: str | os.PathLike[str], uri: str, *, settings: S3Settings | None = None,
           unchanged: Mapping[str, tuple[int, int]] | None = None) -> None:
    """Copy a file to the object ``uri``, or a folder tree under the prefix ``uri`` followed by its marker.

    Large files go in parts (``multipart_threshold``); a failed transfer is aborted and retried with backoff
    while the failure is transient, then :class:`StorageError` is raised. No partial object is ever visible.
    ``unchanged`` (a folder downloaded from ``uri``: :func:`file_states` right after the download) names the
    files already under the prefix as they are here; those whose size and modification time still match are
    listed in the new marker but not sent again.
    """
    bucket, key = parse_s3(uri)
    src = Path(local)
    s = settings if settings is not None else S3Settings.from_env()
    if src.is_file():
        if not key or key.endswith("/"):
            raise InputError(
                uri, f"names a prefix; a file ({src}) needs an object key, e.g. s3://{bucket}/name"
            )
        _put_file(client(s), uri, bucket, key, src, s)
        log.info("uploaded %s to %s", src, uri)
    elif src.is_dir():
        _put_tree(client(s), uri, bucket, key.rstrip("/"), src, s, unchanged or {})
    else:
        raise InputError(src, "does not exist (nothing to upload)")


def _put_file(s3: Any, uri: str, bucket: str, key: str, src: Path, s: S3Settings) -> None:
    failures = 0

    def put() -> None:
        nonlocal failures
        try:
            with _transfer_manager(s3, s) as tm:
                # s3transfer aborts a failed multipart upload before result() raises.
                tm.upload(str(src), bucket, key).result()
        except BaseException:
            failures += 1
            raise

    try:
        _retrying(uri, "upload", bucket, s, put)
    finally:
        if failures and src.stat().st_size >= s.multipart_threshold:
            _abort_open_uploads(s3, uri, bucket, key)  # in case s3transfer's own abort failed too


def _abort_open_uploads(s3: Any, uri: str, bucket: str, key: str) -> None:
    """Safety net after a failed multipart upload: abort what is still open for exactly ``key``."""
    try:
        pages = s3.get_paginator("list_multipart_uploads").paginate(Bucket=bucket, Prefix=key)
        for page in pages:
            for up in page.get("Uploads", []):
                if up["Key"] == key:
                    s3.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=up["UploadId"])
                    log.warning("%s: aborted a leftover multipart upload %s", uri, up["UploadId"])
    except _storage_errors() as exc:
        log.warning("%s: could not check for leftover multipart uploads (%s)", uri, _describe(exc, bucket))


def _put_tree(s3: Any, uri: str, bucket: str, prefix: str, src: Path, s: S3Settings,
              unchanged: Mapping[str, tuple[int, int]]) -> None:
    files = _tree_files(src)
    if any(rel == MARKER for rel, _ in files):
        raise InputError(
            src / MARKER, f"a file named {MARKER} would clash with the upload's completion marker"
        )
    marker_key = f"{prefix}/{MARKER}" if prefix else MARKER
    # Unpublish first, so that readers never pair an old marker with new objects.
    _retrying(uri, "upload", bucket, s, lambda: s3.delete_object(Bucket=bucket, Key=marker_key))
    sizes: dict[str, int] = {}
    kept = 0
    for rel, path in files:
        st = path.stat()
        sizes[rel] = st.st_size
        if unchanged.get(rel) == (st.st_size, st.st_mtime_ns):
            kept += 1  # the object under the prefix is this file already
            continue
        key = f"{prefix}/{rel}" if prefix else rel
        _put_file(s3, _url(bucket, key), bucket, key, path, s)
    body = json.dumps({"format": MARKER_FORMAT, "files": sizes}, indent=1, sort_keys=True).encode()
    _retrying(
        uri,
        "upload",
        bucket,
        s,
        lambda: s3.put_object(Bucket=bucket, Key=marker_key, Body=body, ContentType="application/json"),
    )
    log.info("uploaded %s to %s (%d files%s, marker written)", src, uri, len(files) - kept,
             f"; {kept} unchanged since the download not sent again" if kept else "")


# ----------------------------------------------------------------------------------------------- staging


def _cache_root() -> Path | None:
    raw = os.environ.get(CACHE_ENV, "").strip()
    return Path(raw).expanduser() if raw else None


def _local_name(bucket: str, key: str) -> str:
    return PurePosixPath(key.rstrip("/")).name or bucket


@contextmanager
def staged_input(uri: str | os.PathLike[str], *, settings: S3Settings | None = None) -> Iterator[Path]:
    """Yield a local path for an input: a local path as is, an ``s3://`` URL downloaded first.

    Downloads go to ``$NODESEG_CACHE/s3/<bucket>/<key>`` (kept, refreshed on every use) or, without it, to a
    temporary folder removed on exit.
    """
    if not is_s3(uri):
        yield Path(uri)
        return
    bucket, key = parse_s3(uri)
    cache = _cache_root()
    if cache is not None:
        dest = cache / "s3" / bucket / (key.rstrip("/") or "_bucket")
        yield download(str(uri), dest, settings=settings)
        return
    work = Path(tempfile.mkdtemp(prefix="nodeseg-in-"))
    try:
        yield download(str(uri), work / _local_name(bucket, key), settings=settings)
    finally:
        shutil.rmtree(work, ignore_errors=True)


@contextmanager
def staged_output(
    uri: str | os.PathLike[str], *, settings: S3Settings | None = None, resume: bool = False, publish: bool = True
) -> Iterator[Path]:
    """Yield a local path for an output: a local path as is; for ``s3://``, a fresh path in a work folder.

    The stage writes a file or a folder there; it is uploaded when the block exits without an exception (a
    folder gets its marker last). On an exception nothing is uploaded. The work folder (under
    ``$NODESEG_CACHE/work`` or the system temp dir) is removed either way.

    With ``resume`` (training runs, whose checkpoints are each written atomically) a complete earlier upload
    under ``uri`` is downloaded first, so the stage resumes from it, and what the stage wrote is uploaded
    even when it fails (or is stopped by SIGTERM), so that a restarted job resumes from there; the files it
    left as downloaded are not sent again. A process killed outright uploads
    nothing: keep checkpoints on a volume when that matters (see docs/storage.md).

    ``publish=False`` (data-parallel ranks other than 0, which write nothing) never uploads.
    """
    if not is_s3(uri):
        yield Path(uri)
        return
    bucket, key = parse_s3(uri)
    cache = _cache_root()
    if cache is not None:
        (cache / "work").mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="nodeseg-out-", dir=cache / "work" if cache is not None else None))
    try:
        out = work / _local_name(bucket, key)
        downloaded: dict[str, tuple[int, int]] = {}
        if resume and _has_marker(str(uri), bucket, key, settings):
            download(str(uri), out, settings=settings)
            downloaded = file_states(out) if out.is_dir() else {}
        try:
            yield out
        except BaseException:
            # only what the stage wrote is sent: after SIGTERM a pod has its grace period (30 s by default)
            if resume and publish and out.is_dir():
                upload(out, str(uri), settings=settings, unchanged=downloaded)
            raise
        if not publish:
            return
        if not out.exists():
            raise StorageError(f"{uri}: the stage wrote nothing to upload (expected {out})")
        upload(out, str(uri), settings=settings, unchanged=downloaded)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _has_marker(uri: str, bucket: str, key: str, settings: S3Settings | None) -> bool:
    """Whether a complete folder (with its marker) was uploaded under ``uri`` before."""
    s = settings or S3Settings.from_env()
    s3 = client(s)
    marker_key = f"{key.rstrip('/')}/{MARKER}" if key else MARKER
    try:
        s3.head_object(Bucket=bucket, Key=marker_key)
    except Exception as exc:  # botocore's ClientError: 404 means no earlier upload
        code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
        if code in ("404", "NoSuchKey", "NotFound"):
            return False
        raise StorageError(f"{uri}: {_describe(exc, bucket)}") from None
    return True
