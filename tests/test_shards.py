"""Parquet shards: schema, streaming atomic writer, bit-identical round trip, the torch Dataset."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader

from nodeseg.data.shards import (
    SCHEMA,
    ShardWriter,
    SliceDataset,
    SliceRecord,
    read_manifest,
    read_records,
    shard_files,
)
from nodeseg.data.transforms import AugmentConfig
from nodeseg.errors import InputError
from nodeseg.levelset import signed_distance


def _record(i: int, h: int = 12, w: int = 10, channels: int = 1) -> SliceRecord:
    rng = np.random.default_rng(i)
    mask = np.zeros((h, w), np.uint8)
    mask[2 : 3 + i % 5, 1:6] = 1
    image = rng.standard_normal((channels, h, w)).astype(np.float32)
    image[0, 0, 0] = np.float32(1e-38)  # subnormal-ish values survive bit for bit
    valid = np.ones((h, w), np.uint8)
    valid[-1] = 0
    return SliceRecord(f"case_{i // 3:05d}", i % 3, image, mask, signed_distance(mask), valid, (0.5 + i, 2.0), "test")


def _write(folder: Path, n: int, **kw: int) -> list[Path]:
    with ShardWriter(folder, **kw) as w:
        for i in range(n):
            w.write(_record(i))
    return w.files


def test_schema_columns() -> None:
    assert SCHEMA.names == ["case_id", "slice_index", "height", "width", "channels", "image", "mask", "phi",
                            "valid", "spacing", "source"]


def test_round_trip_is_bit_identical(tmp_path: Path) -> None:
    files = _write(tmp_path / "train", 7, rows_per_file=3)
    back = list(read_records(files))
    assert len(back) == 7
    for i, rec in enumerate(back):
        ref = _record(i)
        assert (rec.case_id, rec.slice_index, rec.spacing, rec.source) == (ref.case_id, ref.slice_index, ref.spacing, ref.source)
        for name in ("image", "mask", "phi", "valid"):
            a, b = getattr(rec, name), getattr(ref, name)
            assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def test_rgb_rows(tmp_path: Path) -> None:
    with ShardWriter(tmp_path) as w:
        w.write(_record(0, channels=3))
    (rec,) = read_records(w.files)
    assert rec.image.shape == (3, 12, 10)


def test_writer_rotates_files_and_flushes_row_groups(tmp_path: Path) -> None:
    files = _write(tmp_path, 10, rows_per_file=4, row_group_bytes=2400)  # one row is 1200 bytes
    assert [f.name for f in files] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f.name for f in files]  # no temporary files
    assert [pq.ParquetFile(f).metadata.num_rows for f in files] == [4, 4, 2]
    assert pq.ParquetFile(files[0]).num_row_groups == 2  # rows were flushed before the file was complete


def test_writer_buffers_at_most_a_row_group(tmp_path: Path) -> None:
    w = ShardWriter(tmp_path, rows_per_file=100, row_group_bytes=3000)
    for i in range(20):
        w.write(_record(i))
        assert w._buffer_bytes < 3000  # flushed as soon as a row group's worth is buffered
    assert w.rows_written >= 15
    w.close()
    assert w.rows_written == 20


def test_writer_leaves_nothing_on_exception(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"), ShardWriter(tmp_path, rows_per_file=2, row_group_bytes=1) as w:
        for i in range(5):
            w.write(_record(i))
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_record_checks_dtypes() -> None:
    rec = _record(0)
    with pytest.raises(ValueError, match="mask"):
        SliceRecord("c", 0, rec.image, rec.mask.astype(bool), rec.phi, rec.valid, (1.0, 1.0), "s")
    with pytest.raises(ValueError, match="image"):
        SliceRecord("c", 0, rec.image[0], rec.mask, rec.phi, rec.valid, (1.0, 1.0), "s")


def _manifest(root: Path, files: dict[str, list[Path]], clip: float = 32.0) -> None:
    splits = {k: {"rows": 0, "cases": [], "files": [str(f.relative_to(root)) for f in v]} for k, v in files.items()}
    (root / "manifest.json").write_text(json.dumps({"format": "nodeseg-shards", "splits": splits,
                                                    "params": {"clip": clip}}))


def test_dataset_items_order_and_collation(tmp_path: Path) -> None:
    files = _write(tmp_path / "train", 9, rows_per_file=4, row_group_bytes=2000)
    _manifest(tmp_path, {"train": files})
    ds = SliceDataset(tmp_path, "train")
    assert len(ds) == 9
    item = ds[4]
    assert item["image"].shape == (1, 12, 10) and item["image"].dtype == torch.float32
    for name in ("mask", "phi", "valid"):
        assert item[name].shape == (1, 12, 10) and item[name].dtype == torch.float32
    ref = _record(4)
    assert np.array_equal(item["phi"][0].numpy(), ref.phi)
    assert torch.equal(item["mask"] > 0, item["phi"] < 0)
    assert (item["case_id"], item["slice_index"]) == ("case_00001", 1)
    assert [ds[i]["slice_index"] for i in range(9)] == [i % 3 for i in range(9)]
    assert ds[-1]["index"] == 8
    with pytest.raises(IndexError):
        ds[9]
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch["image"].shape == (4, 1, 12, 10) and batch["case_id"][:2] == ["case_00000", "case_00000"]
    clone = pickle.loads(pickle.dumps(ds))  # DataLoader workers receive a pickled copy
    assert torch.equal(clone[3]["image"], ds[3]["image"])


def test_dataset_without_manifest_globs_parts(tmp_path: Path) -> None:
    _write(tmp_path / "val", 3)
    assert len(SliceDataset(tmp_path, "val")) == 3
    with pytest.raises(InputError, match="no split folder 'test'"):
        SliceDataset(tmp_path, "test")


def test_dataset_augmentation_is_seeded_per_item_and_epoch(tmp_path: Path) -> None:
    _write(tmp_path / "train", 4)
    cfg = AugmentConfig(scale_range=(0.8, 1.2), flip_prob=0.5, brightness_range=(-0.1, 0.1))
    a, b = SliceDataset(tmp_path, "train", cfg, seed=1), SliceDataset(tmp_path, "train", cfg, seed=1)
    assert torch.equal(a[2]["image"], b[2]["image"]) and torch.equal(a[2]["phi"], b[2]["phi"])
    assert torch.equal(a[2]["mask"] > 0, a[2]["phi"] < 0)
    first = a[2]["image"].clone()
    a.set_epoch(1)
    assert not torch.equal(a[2]["image"], first)


def test_manifest_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="manifest not found"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(InputError, match="not a readable JSON manifest"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(InputError, match="not a nodeseg shard manifest"):
        read_manifest(tmp_path)
    _manifest(tmp_path, {"train": [tmp_path / "train" / "part-00000.parquet"]})
    with pytest.raises(InputError, match="no split 'val' \\(splits: train\\)"):
        shard_files(tmp_path, "val")
    with pytest.raises(InputError, match="listed in manifest.json but missing"):
        shard_files(tmp_path, "train")


def test_not_a_parquet_file(tmp_path: Path) -> None:
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "part-00000.parquet").write_bytes(b"nope")
    with pytest.raises(InputError, match="not a readable parquet shard") as err:
        SliceDataset(tmp_path, "val")
    assert err.value.path.endswith("part-00000.parquet")
