"""The torch ``Dataset`` over parquet shards (the files themselves: ``nodeseg.data.shardio``).

One row per 2-D slice (or saliency image); see docs/architecture.md. Besides the documented columns each
row carries ``channels`` (1 for CT, 3 for RGB saliency images; ``image`` holds ``(C, H, W)`` float32) and
``valid`` (uint8 ``(H, W)``, 0 on padding; all ones for CT slices).

Files hold row groups of about ``row_group_bytes`` so that a random read decodes only a few rows; the
dataset memory-maps the files, reads only the footers up front and decodes one row group at a time.
The names of ``shardio`` are re-exported here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import Dataset

from nodeseg.data.shardio import (
    MANIFEST_NAME,
    SCHEMA,
    SCHEMA_VERSION,
    ShardWriter,
    SliceRecord,
    _open,
    _row_arrays,
    read_manifest,
    read_records,
    shard_files,
)
from nodeseg.data.transforms import AugmentConfig, augment
from nodeseg.errors import check_arg

__all__ = [
    "MANIFEST_NAME",
    "SCHEMA",
    "SCHEMA_VERSION",
    "ShardWriter",
    "SliceDataset",
    "SliceRecord",
    "read_manifest",
    "read_records",
    "shard_files",
]


class SliceDataset(Dataset):
    """Rows of one split as dicts of tensors: image (C,H,W), mask/phi/valid (1,H,W) float32, plus ids.

    Only the parquet footers are read at construction; items are decoded one row group at a time from
    memory-mapped files (one cached row group per worker). Order is deterministic: files in name order,
    rows in written order. With ``augment`` the draw for item ``i`` comes from
    ``default_rng((seed, epoch, i))``, so it does not depend on DataLoader workers; call
    :meth:`set_epoch` each epoch for fresh draws.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str,
        augment: AugmentConfig | None = None,
        seed: int = 0,
    ) -> None:
        check_arg(augment is None or isinstance(augment, AugmentConfig), "augment", augment,
                  "None or an AugmentConfig")
        check_arg(isinstance(seed, int) and seed >= 0, "seed", seed, "a non-negative integer")
        self.root = Path(root)
        self.split = split
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self.clip = 32.0
        if (self.root / MANIFEST_NAME).exists():
            self.clip = float(read_manifest(self.root).get("params", {}).get("clip", 32.0))
        self.files = shard_files(self.root, split)
        index: list[tuple[int, int, int]] = []  # (file, row group, row within group)
        for fi, f in enumerate(self.files):
            md = _open(f).metadata
            for g in range(md.num_row_groups):
                index.extend((fi, g, r) for r in range(md.row_group(g).num_rows))
        self._index = index
        self._files_open: dict[int, pq.ParquetFile] = {}
        self._cache_key: tuple[int, int] | None = None
        self._cache: pa.Table | None = None

    def __len__(self) -> int:
        return len(self._index)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draws of ``epoch``."""
        self.epoch = int(epoch)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_files_open"] = {}
        state["_cache_key"] = None
        state["_cache"] = None
        return state

    def _row_group(self, fi: int, g: int) -> pa.Table:
        if self._cache_key != (fi, g):
            pf = self._files_open.get(fi)
            if pf is None:
                pf = self._files_open[fi] = _open(self.files[fi])
            self._cache = pf.read_row_group(g)
            self._cache_key = (fi, g)
        assert self._cache is not None
        return self._cache

    def __getitem__(self, idx: int) -> dict[str, Any]:
        if idx < 0:
            idx += len(self)
        if not 0 <= idx < len(self):
            raise IndexError(f"index {idx} out of range for {len(self)} rows")
        fi, g, r = self._index[idx]
        row = _row_arrays(self._row_group(fi, g), r)
        image, mask, phi, valid = row["image"], row["mask"], row["phi"], row["valid"]
        if self.augment is not None and self.augment.enabled:
            rng = np.random.default_rng((self.seed, self.epoch, idx))
            image, mask, phi, valid = augment(image, mask, phi, valid, self.augment, rng, clip=self.clip)
        return {
            "image": torch.from_numpy(np.array(image, dtype=np.float32)),
            "mask": torch.from_numpy(np.array(mask, dtype=np.float32)[None]),
            "phi": torch.from_numpy(np.array(phi, dtype=np.float32)[None]),
            "valid": torch.from_numpy(np.array(valid, dtype=np.float32)[None]),
            "spacing": torch.tensor(row["spacing"], dtype=torch.float32),
            "case_id": row["case_id"],
            "slice_index": int(row["slice_index"]),
            "index": idx,
        }
