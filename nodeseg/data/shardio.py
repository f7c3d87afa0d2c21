"""Parquet shards on disk: the schema, a streaming atomic writer, the manifest and reading rows back.

Imports no torch, so ingest workers start in a fraction of a second; the torch ``Dataset`` over these
files is in ``nodeseg.data.shards``.

One row per 2-D slice (or saliency image); see docs/architecture.md. Besides the documented columns each
row carries ``channels`` (1 for CT, 3 for RGB saliency images; ``image`` holds ``(C, H, W)`` float32) and
``valid`` (uint8 ``(H, W)``, 0 on padding; all ones for CT slices).

Files hold row groups of about ``row_group_bytes`` so that a random read decodes only a few rows.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from nodeseg.errors import InputError, check_arg

__all__ = [
    "MANIFEST_NAME",
    "SCHEMA",
    "SCHEMA_VERSION",
    "ShardWriter",
    "SliceRecord",
    "read_manifest",
    "read_records",
    "shard_files",
]

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
SCHEMA = pa.schema(
    [
        pa.field("case_id", pa.string(), nullable=False),
        pa.field("slice_index", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("channels", pa.int32(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),
        pa.field("mask", pa.binary(), nullable=False),
        pa.field("phi", pa.binary(), nullable=False),
        pa.field("valid", pa.binary(), nullable=False),
        pa.field("spacing", pa.list_(pa.float64()), nullable=False),
        pa.field("source", pa.string(), nullable=False),
    ],
    metadata={"nodeseg.schema_version": str(SCHEMA_VERSION)},
)


@dataclass(frozen=True)
class SliceRecord:
    """One row: ``image`` (C, H, W) float32, ``mask``/``valid`` (H, W) uint8, ``phi`` (H, W) float32."""

    case_id: str
    slice_index: int
    image: np.ndarray
    mask: np.ndarray
    phi: np.ndarray
    valid: np.ndarray
    spacing: tuple[float, float]
    source: str

    def __post_init__(self) -> None:
        check_arg(isinstance(self.case_id, str) and self.case_id != "", "case_id", self.case_id, "a non-empty string")
        img = self.image
        check_arg(isinstance(img, np.ndarray) and img.ndim == 3 and img.dtype == np.float32, "image",
                  _describe(img), "a float32 array of shape (C, H, W)")
        hw = img.shape[1:]
        for name, dtype in (("mask", np.uint8), ("phi", np.float32), ("valid", np.uint8)):
            a = getattr(self, name)
            check_arg(isinstance(a, np.ndarray) and a.shape == hw and a.dtype == dtype, name, _describe(a),
                      f"a {np.dtype(dtype).name} array of shape {hw}")
        check_arg(len(self.spacing) == 2, "spacing", self.spacing, "(row_mm, col_mm)")

    @property
    def nbytes(self) -> int:
        return self.image.nbytes + self.mask.nbytes + self.phi.nbytes + self.valid.nbytes


def _describe(a: object) -> str:
    if isinstance(a, np.ndarray):
        return f"{a.dtype} array of shape {a.shape}"
    return type(a).__name__


def _tobytes(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a).tobytes(order="C")


class ShardWriter:
    """Stream :class:`SliceRecord` rows into ``<out_dir>/part-00000.parquet``, ``part-00001``, …

    A new file starts every ``rows_per_file`` rows; rows are buffered only up to ``row_group_bytes`` and
    then flushed as a row group, so memory stays bounded. Each file is written under a hidden temporary
    name and renamed when complete. Used as a context manager: on an exception the file in progress and
    every file this writer already completed are deleted (all or nothing per writer).
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        rows_per_file: int = 1000,
        row_group_bytes: int = 4 << 20,
        compression: str = "zstd",
        prefix: str = "part",
    ) -> None:
        check_arg(isinstance(rows_per_file, int) and rows_per_file > 0, "rows_per_file", rows_per_file,
                  "a positive integer")
        check_arg(isinstance(row_group_bytes, int) and row_group_bytes > 0, "row_group_bytes", row_group_bytes,
                  "a positive integer")
        check_arg(compression in ("zstd", "snappy", "gzip", "none"), "compression", compression,
                  "one of 'zstd', 'snappy', 'gzip', 'none'")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.rows_per_file = rows_per_file
        self.row_group_bytes = row_group_bytes
        self.compression = compression
        self.prefix = prefix
        self.files: list[Path] = []
        self.rows_written = 0
        self._buffer: list[SliceRecord] = []
        self._buffer_bytes = 0
        self._writer: pq.ParquetWriter | None = None
        self._tmp: Path | None = None
        self._final: Path | None = None
        self._rows_in_file = 0
        self._closed = False

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def write(self, record: SliceRecord) -> None:
        """Append one row (flushing a row group or rotating the file when due)."""
        check_arg(not self._closed, "writer", "closed", "an open ShardWriter")
        check_arg(isinstance(record, SliceRecord), "record", type(record).__name__, "a SliceRecord")
        self._buffer.append(record)
        self._buffer_bytes += record.nbytes
        self._rows_in_file += 1
        if self._buffer_bytes >= self.row_group_bytes:
            self._flush()
        if self._rows_in_file >= self.rows_per_file:
            self._finish_file()

    def close(self) -> list[Path]:
        """Flush and rename the last file; returns the completed files in order."""
        if not self._closed:
            self._finish_file()
            self._closed = True
        return list(self.files)

    def abort(self) -> None:
        """Drop the buffered rows, the file in progress and the files already completed by this writer."""
        self._closed = True
        self._buffer.clear()
        if self._writer is not None:
            try:
                self._writer.close()
            except Exception:  # noqa: BLE001 - best effort while already failing
                pass
            self._writer = None
        for p in [self._tmp, *self.files]:
            if p is not None:
                p.unlink(missing_ok=True)
        self._tmp = None
        self.files.clear()

    def _flush(self) -> None:
        if not self._buffer:
            return
        if self._writer is None:
            n = len(self.files)
            self._final = self.out_dir / f"{self.prefix}-{n:05d}.parquet"
            self._tmp = self.out_dir / f".{self._final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            self._writer = pq.ParquetWriter(
                self._tmp, SCHEMA, compression=self.compression, use_dictionary=["case_id", "source"],
                write_statistics=["case_id", "slice_index", "height", "width", "channels"],
            )
        rows = self._buffer
        table = pa.table(
            {
                "case_id": [r.case_id for r in rows],
                "slice_index": [int(r.slice_index) for r in rows],
                "height": [int(r.image.shape[1]) for r in rows],
                "width": [int(r.image.shape[2]) for r in rows],
                "channels": [int(r.image.shape[0]) for r in rows],
                "image": [_tobytes(r.image) for r in rows],
                "mask": [_tobytes(r.mask) for r in rows],
                "phi": [_tobytes(r.phi) for r in rows],
                "valid": [_tobytes(r.valid) for r in rows],
                "spacing": [[float(s) for s in r.spacing] for r in rows],
                "source": [r.source for r in rows],
            },
            schema=SCHEMA,
        )
        self._writer.write_table(table, row_group_size=len(rows))
        self.rows_written += len(rows)
        self._buffer = []
        self._buffer_bytes = 0

    def _finish_file(self) -> None:
        self._flush()
        if self._writer is None:
            return
        self._writer.close()
        self._writer = None
        assert self._tmp is not None and self._final is not None  # set together in _flush
        os.replace(self._tmp, self._final)
        self.files.append(self._final)
        self._tmp = None
        self._rows_in_file = 0


def read_manifest(root: str | os.PathLike[str]) -> dict[str, Any]:
    """``<root>/manifest.json`` as a dict; InputError when missing or not a nodeseg shard manifest."""
    path = Path(root) / MANIFEST_NAME
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(path, "manifest not found: not a shards folder; build one with `nodeseg preprocess`") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(path, f"not a readable JSON manifest ({' '.join(str(err).split())})") from None
    if not isinstance(data, dict) or data.get("format") != "nodeseg-shards" or not isinstance(data.get("splits"), dict):
        raise InputError(path, "not a nodeseg shard manifest (expected 'format': 'nodeseg-shards' and 'splits')")
    return data


def shard_files(root: str | os.PathLike[str], split: str) -> list[Path]:
    """The parquet files of ``split``: from the manifest when there is one, else sorted ``part-*.parquet``."""
    root = Path(root)
    if (root / MANIFEST_NAME).exists():
        manifest = read_manifest(root)
        splits = manifest["splits"]
        if split not in splits:
            raise InputError(root / MANIFEST_NAME, f"no split {split!r} (splits: {', '.join(sorted(splits)) or 'none'})")
        files = [root / f for f in splits[split]["files"]]
        for f in files:
            if not f.is_file():
                raise InputError(f, "listed in manifest.json but missing: rebuild the shards")
        return files
    folder = root / split
    if not folder.is_dir():
        raise InputError(folder, f"no split folder {split!r} and no manifest.json in {root}")
    return sorted(folder.glob("part-*.parquet"))


def _open(path: Path) -> pq.ParquetFile:
    try:
        pf = pq.ParquetFile(path, memory_map=True)
    except (OSError, pa.ArrowException) as err:
        raise InputError(path, f"not a readable parquet shard ({' '.join(str(err).split())})") from None
    if not pf.schema_arrow.equals(SCHEMA, check_metadata=False):
        raise InputError(path, f"unexpected shard schema (columns {pf.schema_arrow.names}); rebuild the shards")
    return pf


def _array(buf: pa.Buffer | bytes, dtype: type, shape: tuple[int, ...]) -> np.ndarray:
    return np.frombuffer(buf, dtype=dtype).reshape(shape)


def _row_arrays(table: pa.Table, i: int) -> dict[str, Any]:
    h = table.column("height")[i].as_py()
    w = table.column("width")[i].as_py()
    c = table.column("channels")[i].as_py()
    return {
        "case_id": table.column("case_id")[i].as_py(),
        "slice_index": table.column("slice_index")[i].as_py(),
        "image": _array(table.column("image")[i].as_buffer(), np.float32, (c, h, w)),
        "mask": _array(table.column("mask")[i].as_buffer(), np.uint8, (h, w)),
        "phi": _array(table.column("phi")[i].as_buffer(), np.float32, (h, w)),
        "valid": _array(table.column("valid")[i].as_buffer(), np.uint8, (h, w)),
        "spacing": tuple(table.column("spacing")[i].as_py()),
        "source": table.column("source")[i].as_py(),
    }


def read_records(files: Sequence[str | os.PathLike[str]]) -> Iterator[SliceRecord]:
    """Stream the rows of ``files`` in order, one row group in memory at a time (read-only arrays)."""
    for f in files:
        pf = _open(Path(f))
        for g in range(pf.num_row_groups):
            table = pf.read_row_group(g)
            for i in range(table.num_rows):
                yield SliceRecord(**_row_arrays(table, i))
