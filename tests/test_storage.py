"""nodeseg.storage against a real S3 endpoint (moto's server on 127.0.0.1), with a fault-injecting proxy."""

from __future__ import annotations

import http.client
import logging
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import boto3
import numpy as np
import pytest

from nodeseg import storage
from nodeseg.errors import ConfigError, InputError, StorageError
from nodeseg.storage import MARKER, MiB, S3Settings

pytest_plugins = ["s3_server"]  # fixtures: moto_endpoint (one per session), s3_env, bucket

# Small parts so that a 12 MiB file is a 3-part multipart upload; one part at a time keeps fault counts exact.
FAST = S3Settings(
    max_attempts=2,
    connect_timeout=2,
    read_timeout=10,
    multipart_threshold=6 * MiB,
    multipart_chunksize=5 * MiB,
    max_concurrency=1,
    transfer_attempts=3,
    backoff_base=0.01,
    backoff_max=0.05,
)


def _payload(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def _write_tree(root: Path) -> dict[str, bytes]:
    files = {"a.txt": b"alpha\n", "sub/b.bin": _payload(1000, 1), "sub/deeper/c.json": b"{}", "empty": b""}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def _read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _keys(bucket: str, prefix: str = "") -> list[str]:
    resp = boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for o in resp.get("Contents", []))


def _open_uploads(bucket: str) -> list[dict]:
    return boto3.client("s3").list_multipart_uploads(Bucket=bucket).get("Uploads", [])


# ----------------------------------------------------------------------------------------------- fault proxy


def operation(method: str, path: str, query: str) -> str:
    """The S3 operation a path-style request is, as far as the proxy needs to know."""
    q = parse_qs(query, keep_blank_values=True)
    if method == "PUT" and "partNumber" in q and "uploadId" in q:
        return "UploadPart"
    if method == "POST" and "uploads" in q:
        return "CreateMultipartUpload"
    if method == "POST" and "uploadId" in q:
        return "CompleteMultipartUpload"
    if method == "DELETE" and "uploadId" in q:
        return "AbortMultipartUpload"
    has_key = len([p for p in path.split("/") if p]) >= 2
    if method == "PUT" and has_key:
        return "PutObject"
    return f"{method} {'object' if has_key else 'bucket'}"


@dataclass
class Fault:
    op: str
    mode: str  # "500": answer HTTP 500 InternalError; "drop": read half the body and close the connection
    skip: int  # let this many matching requests through first
    count: int | None  # then fail this many (None: all)
    seen: int = 0
    fired: int = 0


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 that forwards to an S3 endpoint and fails chosen operations."""

    def __init__(self, upstream: str) -> None:
        target = urlsplit(upstream)
        self.target = (target.hostname or "127.0.0.1", target.port or 80)
        self.faults: list[Fault] = []
        self.log: list[str] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def inject(self, op: str, mode: str = "500", skip: int = 0, count: int | None = 1) -> Fault:
        fault = Fault(op, mode, skip, count)
        with self.lock:
            self.faults.append(fault)
        return fault

    def ops(self, op: str) -> int:
        return self.log.count(op)

    def _decide(self, op: str) -> str | None:
        with self.lock:
            self.log.append(op)
            for f in self.faults:
                if f.op != op:
                    continue
                f.seen += 1
                if f.seen > f.skip and (f.count is None or f.fired < f.count):
                    f.fired += 1
                    return f.mode
        return None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # quiet
                pass

            def _forward(self) -> None:
                split = urlsplit(self.path)
                mode = proxy._decide(operation(self.command, split.path, split.query))
                length = int(self.headers.get("Content-Length") or 0)
                assert "chunked" not in self.headers.get("Transfer-Encoding", ""), (
                    "proxy expects Content-Length"
                )
                if mode == "drop":
                    self.rfile.read(length // 2)
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                body = self.rfile.read(length) if length else b""
                if mode == "500":
                    self._reply(500, {"Content-Type": "application/xml"}, _INTERNAL_ERROR, close=True)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                conn = http.client.HTTPConnection(*proxy.target, timeout=30)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    out = {k: v for k, v in resp.getheaders() if k.lower() not in _HOP_BY_HOP}
                finally:
                    conn.close()
                self._reply(resp.status, out, data, head=self.command == "HEAD")

            def _reply(
                self,
                status: int,
                headers: dict[str, str],
                data: bytes,
                head: bool = False,
                close: bool = False,
            ) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    if k.lower() != "content-length":
                        self.send_header(k, v)
                if head:
                    self.send_header(
                        "Content-Length", headers.get("Content-Length", headers.get("content-length", "0"))
                    )
                else:
                    self.send_header("Content-Length", str(len(data)))
                if close:
                    self.send_header("Connection", "close")
                    self.close_connection = True
                self.end_headers()
                if not head:
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        return Handler

    def __enter__(self) -> FaultProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "expect", "upgrade", "te"}
_INTERNAL_ERROR = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InternalError</Code>'
    b"<Message>injected fault</Message><RequestId>proxy</RequestId></Error>"
)


@pytest.fixture
def proxy(s3_env: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultProxy]:
    """A fault proxy in front of moto; the storage client goes through it, test checks go straight to moto."""
    with FaultProxy(s3_env) as p:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", p.url)  # storage.client(); boto3.client("s3") in checks too
        yield p


# ----------------------------------------------------------------------------------------------- URLs and settings


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("s3://bucket", ("bucket", "")),
        ("s3://bucket/", ("bucket", "")),
        ("s3://my.bucket-1/a/b.parquet", ("my.bucket-1", "a/b.parquet")),
        ("s3://bucket/prefix/", ("bucket", "prefix/")),
    ],
)
def test_parse_s3(uri: str, expected: tuple[str, str]) -> None:
    assert storage.is_s3(uri)
    assert storage.parse_s3(uri) == expected


@pytest.mark.parametrize(
    ("uri", "problem"),
    [
        ("s3://", "no bucket"),
        ("s3:///x", "no bucket"),
        ("s3:/bucket/x", "filesystem path"),
        ("S3://bucket/x", "expected s3://"),
        ("s3://b/x", "invalid bucket name"),
        ("s3://bad_bucket!/x", "invalid bucket name"),
        ("s3://bucket//x", "segment"),
        ("s3://bucket/a/../b", "segment"),
        ("/data/x", "not an s3:// URL"),
    ],
)
def test_malformed_urls_are_refused(uri: str, problem: str) -> None:
    with pytest.raises(InputError, match=problem) as err:
        storage.parse_s3(uri)
    assert str(err.value).startswith(uri) and "\n" not in str(err.value)


def test_is_s3_and_local_paths() -> None:
    assert not storage.is_s3("data/raw")
    assert not storage.is_s3(Path("/tmp/s3"))
    assert storage.is_s3(
        Path("s3://bucket/x")
    )  # a URL mangled by Path is caught by parse_s3, not used as a path


def test_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_RETRY_MODE", "adaptive")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "7")
    monkeypatch.setenv("NODESEG_S3_MULTIPART_THRESHOLD", str(8 * MiB))
    s = S3Settings.from_env()
    assert (s.retry_mode, s.max_attempts, s.multipart_threshold) == ("adaptive", 7, 8 * MiB)
    monkeypatch.setenv("NODESEG_S3_MAX_ATTEMPTS", "many")
    with pytest.raises(ConfigError, match="NODESEG_S3_MAX_ATTEMPTS='many'"):
        S3Settings.from_env()
    with pytest.raises(ValueError, match="retry_mode"):
        S3Settings(retry_mode="legacy")


def test_client_reads_endpoint_and_retries_from_env(s3_env: str, monkeypatch: pytest.MonkeyPatch) -> None:
    c = storage.client(FAST)
    assert c.meta.endpoint_url == s3_env
    assert c.meta.config.retries == {"mode": "standard", "total_max_attempts": 2}
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")
    assert storage.client(FAST).meta.endpoint_url == "http://127.0.0.1:9"


# ----------------------------------------------------------------------------------------------- round trips


def test_file_round_trip(bucket: str, tmp_path: Path) -> None:
    src = tmp_path / "model.pt"
    src.write_bytes(_payload(4096))
    uri = f"s3://{bucket}/runs/1/model.pt"
    storage.upload(src, uri, settings=FAST)
    assert _keys(bucket) == ["runs/1/model.pt"]
    out = storage.download(uri, tmp_path / "back" / "model.pt", settings=FAST)
    assert out.read_bytes() == src.read_bytes()
    src.write_bytes(b"v2")  # replacing an existing local copy
    storage.upload(src, uri, settings=FAST)
    assert storage.download(uri, out, settings=FAST).read_bytes() == b"v2"
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.pt"]  # no scratch left behind


def test_folder_round_trip(bucket: str, tmp_path: Path) -> None:
    files = _write_tree(tmp_path / "shards")
    uri = f"s3://{bucket}/datasets/shards"
    storage.upload(tmp_path / "shards", uri, settings=FAST)
    keys = _keys(bucket)
    assert keys == sorted(f"datasets/shards/{rel}" for rel in [*files, MARKER])
    back = storage.download(uri + "/", tmp_path / "back", settings=FAST)
    assert _read_tree(back) == files
    assert not (back / MARKER).exists()
    # Re-publishing a smaller tree: the marker lists only the new files, stale objects are not read.
    (tmp_path / "shards" / "a.txt").unlink()
    storage.upload(tmp_path / "shards", uri, settings=FAST)
    back = storage.download(uri, tmp_path / "back", settings=FAST)
    assert set(_read_tree(back)) == set(files) - {"a.txt"}


def test_multipart_upload_above_threshold(bucket: str, tmp_path: Path) -> None:
    src = tmp_path / "big.bin"
    src.write_bytes(_payload(12 * MiB + 123))
    uri = f"s3://{bucket}/big.bin"
    storage.upload(src, uri, settings=FAST)
    head = boto3.client("s3").head_object(Bucket=bucket, Key="big.bin")
    assert head["ETag"].strip('"').endswith("-3")  # a 3-part multipart object
    assert storage.download(uri, tmp_path / "big.back", settings=FAST).read_bytes() == src.read_bytes()
    assert _open_uploads(bucket) == []


# ----------------------------------------------------------------------------------------------- faults


def _big(tmp_path: Path) -> Path:
    src = tmp_path / "big.bin"
    src.write_bytes(_payload(12 * MiB, 2))
    return src


def _direct_client() -> object:
    return boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])


def test_transient_part_failure_is_retried_by_botocore(
    bucket: str, proxy: FaultProxy, tmp_path: Path
) -> None:
    src = _big(tmp_path)
    fault = proxy.inject("UploadPart", "500", skip=1, count=1)
    storage.upload(src, f"s3://{bucket}/big.bin", settings=FAST)
    assert fault.fired == 1 and proxy.ops("UploadPart") == 4  # 3 parts + 1 retried by botocore
    assert _direct_client().get_object(Bucket=bucket, Key="big.bin")["Body"].read() == src.read_bytes()


def test_transfer_is_retried_with_backoff_when_botocore_gives_up(
    bucket: str, proxy: FaultProxy, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src = _big(tmp_path)
    small = tmp_path / "small.txt"
    small.write_bytes(b"small")
    # Part 2 fails twice in a row (dropped connections): botocore's 2 attempts are spent, the transfer is
    # aborted, and storage retries the whole upload after a backoff.
    proxy.inject("UploadPart", "drop", skip=1, count=2)
    proxy.inject("PutObject", "500", count=2)
    caplog.set_level(logging.WARNING, logger="nodeseg.storage")
    storage.upload(src, f"s3://{bucket}/big.bin", settings=FAST)
    storage.upload(small, f"s3://{bucket}/small.txt", settings=FAST)
    s3 = _direct_client()
    assert s3.get_object(Bucket=bucket, Key="big.bin")["Body"].read() == src.read_bytes()
    assert s3.get_object(Bucket=bucket, Key="small.txt")["Body"].read() == b"small"
    assert proxy.ops("CreateMultipartUpload") == 2 and proxy.ops("AbortMultipartUpload") == 1
    retries = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert len(retries) == 2 and all("attempt 1/3" in m for m in retries)
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_leftover_multipart_upload_is_aborted(bucket: str, proxy: FaultProxy, tmp_path: Path) -> None:
    src = _big(tmp_path)
    proxy.inject("UploadPart", "drop", skip=1, count=2)  # the first transfer fails...
    proxy.inject("AbortMultipartUpload", "500", count=2)  # ...and so does s3transfer's abort of it
    storage.upload(src, f"s3://{bucket}/big.bin", settings=FAST)
    s3 = _direct_client()
    assert s3.get_object(Bucket=bucket, Key="big.bin")["Body"].read() == src.read_bytes()
    assert proxy.ops("AbortMultipartUpload") == 3  # 2 failed + the safety net's
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


@pytest.mark.parametrize("mode", ["500", "drop"])
def test_persistent_part_failure_leaves_nothing(
    bucket: str, proxy: FaultProxy, tmp_path: Path, mode: str
) -> None:
    uri = f"s3://{bucket}/out/big.bin"
    proxy.inject("UploadPart", mode, skip=1, count=None)
    with pytest.raises(StorageError) as err:
        storage.upload(_big(tmp_path), uri, settings=FAST)
    msg = str(err.value)
    assert msg.startswith(f"{uri}: upload failed after 3 attempts") and "\n" not in msg
    s3 = _direct_client()
    assert s3.list_objects_v2(Bucket=bucket).get("KeyCount") == 0  # no partial object
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []  # nothing left open
    assert proxy.ops("AbortMultipartUpload") >= 3


def test_persistent_put_failure_leaves_nothing(bucket: str, proxy: FaultProxy, tmp_path: Path) -> None:
    src = tmp_path / "small.bin"
    src.write_bytes(_payload(100_000))
    uri = f"s3://{bucket}/small.bin"
    proxy.inject("PutObject", "drop", count=None)
    with pytest.raises(StorageError, match=f"^{uri}: upload failed after 3 attempts"):
        storage.upload(src, uri, settings=FAST)
    assert _direct_client().list_objects_v2(Bucket=bucket).get("KeyCount") == 0


def test_half_uploaded_folder_is_refused(bucket: str, proxy: FaultProxy, tmp_path: Path) -> None:
    _write_tree(tmp_path / "tree")
    uri = f"s3://{bucket}/tree"
    proxy.inject("PutObject", "500", skip=2, count=None)  # two files get through, then the endpoint breaks
    with pytest.raises(StorageError, match=f"^s3://{bucket}/tree/"):
        storage.upload(tmp_path / "tree", uri, settings=FAST)
    keys = [o["Key"] for o in _direct_client().list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert len(keys) == 2 and f"tree/{MARKER}" not in keys
    proxy.faults.clear()
    with pytest.raises(StorageError, match=f"^{uri}: incomplete prefix: marker {MARKER} is missing"):
        storage.download(uri, tmp_path / "back", settings=FAST)
    assert not (tmp_path / "back").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # scratch removed


def test_republishing_unpublishes_first(bucket: str, proxy: FaultProxy, tmp_path: Path) -> None:
    _write_tree(tmp_path / "tree")
    uri = f"s3://{bucket}/tree"
    storage.upload(tmp_path / "tree", uri, settings=FAST)
    storage.download(uri, tmp_path / "back", settings=FAST)
    proxy.inject("PutObject", "500", skip=1, count=None)  # the second publication breaks half-way
    with pytest.raises(StorageError):
        storage.upload(tmp_path / "tree", uri, settings=FAST)
    proxy.faults.clear()
    with pytest.raises(StorageError, match="marker"):  # the old marker was removed before new objects went up
        storage.download(uri, tmp_path / "back", settings=FAST)
    assert _read_tree(tmp_path / "back")  # the earlier local copy is untouched by the refused download


# ----------------------------------------------------------------------------------------------- clear errors


def test_empty_prefix_and_missing_object(bucket: str, tmp_path: Path) -> None:
    for uri in (f"s3://{bucket}/nothing", f"s3://{bucket}/nothing/", f"s3://{bucket}"):
        with pytest.raises(StorageError, match="no such object or prefix"):
            storage.download(uri, tmp_path / "x", settings=FAST)


def test_missing_bucket(s3_env: str, tmp_path: Path) -> None:
    src = tmp_path / "f.txt"
    src.write_text("x")
    uri = "s3://no-such-bucket-nodeseg/f.txt"
    with pytest.raises(StorageError, match=f"^{uri}: .*bucket 'no-such-bucket-nodeseg' does not exist"):
        storage.upload(src, uri, settings=FAST)
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-nodeseg' does not exist"):
        storage.upload(tmp_path, "s3://no-such-bucket-nodeseg/dir", settings=FAST)
    with pytest.raises(StorageError, match=f"^{uri}: .*bucket 'no-such-bucket-nodeseg' does not exist"):
        storage.download(uri, tmp_path / "back", settings=FAST)


def test_unreachable_endpoint(s3_env: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    src = tmp_path / "f.txt"
    src.write_text("x")
    with pytest.raises(
        StorageError, match=r"^s3://some-bucket/f.txt: upload failed after 3 attempts: .*127\.0\.0\.1"
    ):
        storage.upload(src, "s3://some-bucket/f.txt", settings=replace(FAST, max_attempts=1))


def test_bad_local_inputs(s3_env: str, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        storage.upload(tmp_path / "missing", "s3://bucket/x", settings=FAST)
    (tmp_path / "f").write_text("x")
    with pytest.raises(InputError, match="names a prefix"):
        storage.upload(tmp_path / "f", "s3://bucket/dir/", settings=FAST)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / MARKER).write_text("x")
    with pytest.raises(InputError, match="clash"):
        storage.upload(tmp_path / "d", "s3://bucket/d", settings=FAST)


def test_corrupt_marker(bucket: str, tmp_path: Path) -> None:
    s3 = boto3.client("s3")
    s3.put_object(Bucket=bucket, Key="p/a", Body=b"a")
    s3.put_object(
        Bucket=bucket, Key=f"p/{MARKER}", Body=b'{"format": "nodeseg-prefix/1", "files": {"../evil": 1}}'
    )
    with pytest.raises(StorageError, match="unreadable completion marker"):
        storage.download(f"s3://{bucket}/p", tmp_path / "back", settings=FAST)
    assert not (tmp_path / "evil").exists()


# ----------------------------------------------------------------------------------------------- staging


def test_staged_local_paths_pass_through(tmp_path: Path) -> None:
    with storage.staged_input(str(tmp_path / "in")) as p:
        assert p == tmp_path / "in"
    with storage.staged_output(tmp_path / "out") as q:
        assert q == tmp_path / "out"


def test_staged_input_and_output(bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = _write_tree(tmp_path / "tree")
    storage.upload(tmp_path / "tree", f"s3://{bucket}/in/tree", settings=FAST)
    with storage.staged_input(f"s3://{bucket}/in/tree", settings=FAST) as local:
        assert local.name == "tree" and _read_tree(local) == files
        with storage.staged_output(f"s3://{bucket}/out/result.json", settings=FAST) as out:
            assert not out.exists() and out.name == "result.json"
            out.write_text('{"ok": true}')
            assert _keys(bucket, "out/") == []  # nothing before the stage succeeded
    assert not local.exists()  # temporary download removed
    assert not out.parent.exists()
    assert (
        boto3.client("s3").get_object(Bucket=bucket, Key="out/result.json")["Body"].read() == b'{"ok": true}'
    )

    monkeypatch.setenv("NODESEG_CACHE", str(tmp_path / "cache"))
    with storage.staged_input(f"s3://{bucket}/out/result.json", settings=FAST) as cached:
        assert cached == tmp_path / "cache" / "s3" / bucket / "out" / "result.json"
    assert cached.read_text() == '{"ok": true}'  # the cache is kept
    with storage.staged_output(f"s3://{bucket}/out/shards", settings=FAST) as out:
        assert out.is_relative_to(tmp_path / "cache" / "work")
        _write_tree(out)
    assert f"out/shards/{MARKER}" in _keys(bucket, "out/shards/")


def test_resumed_output_sends_only_what_the_stage_wrote(bucket: str, proxy: FaultProxy, tmp_path: Path) -> None:
    """A training output is downloaded, extended and published again, here on the failure path that SIGTERM
    takes (a pod has its grace period, 30 s by default, for this): the files left as downloaded are not sent
    again, and the new marker lists every file."""
    uri = f"s3://{bucket}/run"
    with storage.staged_output(uri, settings=FAST, resume=True) as out:
        (out / "checkpoints").mkdir(parents=True)
        for epoch in (1, 2):
            (out / "checkpoints" / f"epoch-000{epoch}.pt").write_bytes(_payload(50_000 + epoch))
        (out / "val_log.csv").write_text("epoch\n1\n2\n")
    assert proxy.ops("PutObject") == 4  # three files and the marker
    with pytest.raises(RuntimeError, match="stopped"):
        with storage.staged_output(uri, settings=FAST, resume=True) as out:
            assert sorted(storage.file_states(out)) == ["checkpoints/epoch-0001.pt", "checkpoints/epoch-0002.pt",
                                                        "val_log.csv"]
            (out / "checkpoints" / "epoch-0003.pt").write_bytes(_payload(50_003))
            (out / "val_log.csv").write_text("epoch\n1\n2\n3\n")  # rewritten: sent again
            raise RuntimeError("stopped")
    assert proxy.ops("PutObject") == 4 + 3  # epoch-0003.pt, val_log.csv and the marker
    back = storage.download(uri, tmp_path / "back", settings=FAST)
    assert sorted(storage.file_states(back)) == [f"checkpoints/epoch-000{e}.pt" for e in (1, 2, 3)] + ["val_log.csv"]
    assert (back / "checkpoints" / "epoch-0001.pt").read_bytes() == _payload(50_001)
    assert (back / "val_log.csv").read_text() == "epoch\n1\n2\n3\n"


def test_staged_output_uploads_nothing_on_failure(bucket: str, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="stage failed"):
        with storage.staged_output(f"s3://{bucket}/out/shards", settings=FAST) as out:
            _write_tree(out)
            raise RuntimeError("stage failed")
    assert _keys(bucket) == []
    assert not out.exists()
    with pytest.raises(StorageError, match="wrote nothing"):
        with storage.staged_output(f"s3://{bucket}/out/none", settings=FAST):
            pass


# ----------------------------------------------------------------------------------------------- secrets


def test_credentials_never_logged(
    bucket: str, proxy: FaultProxy, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    caplog.set_level(logging.DEBUG)  # botocore and s3transfer debug logging included
    for name in ("botocore", "s3transfer", "urllib3"):  # the CLI quietens these globally when it runs
        caplog.set_level(logging.DEBUG, logger=name)
    _write_tree(tmp_path / "tree")
    storage.upload(tmp_path / "tree", f"s3://{bucket}/t", settings=FAST)
    storage.download(f"s3://{bucket}/t", tmp_path / "back", settings=FAST)
    proxy.inject("PutObject", "500", count=None)
    errors = []
    for call in (
        lambda: storage.upload(tmp_path / "tree" / "a.txt", f"s3://{bucket}/a.txt", settings=FAST),
        lambda: storage.download("s3://no-such-bucket-nodeseg/x", tmp_path / "y", settings=FAST),
    ):
        with pytest.raises(StorageError) as err:
            call()
        errors.append(str(err.value))
    assert len(caplog.records) > 20 and any(r.name.startswith("botocore") for r in caplog.records)
    assert secret not in caplog.text
    assert all(secret not in e for e in errors)
