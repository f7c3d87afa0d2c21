"""The interface every data source implements: list a raw folder's items, turn one item into rows, predict.

A reader is stateless and picklable (ingest sends it to worker processes with the item). It never imports
torch: the model reaches :meth:`Reader.predict` as a function from images to φ.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from nodeseg.data.ingest_config import IngestConfig
from nodeseg.data.shardio import SliceRecord

__all__ = ["ItemResult", "PhiFn", "Reader"]

#: a model as prediction sees it: images (N, C, H, W) float32 → φ̂ (N, H, W) float32
PhiFn = Callable[[np.ndarray], np.ndarray]


@dataclass
class ItemResult:
    """The rows of one item (a case or an image) and what ingest reports about it."""

    item_id: str
    records: list[SliceRecord]
    slices_total: int = 0
    empty_masks: int = 0
    skipped: str | None = None
    warnings: list[str] = field(default_factory=list)


class Reader(ABC):
    """One raw-data layout (``data.source``): its items, their rows, and prediction on its kind of input."""

    name: ClassVar[str]  # the data.source value
    noun: ClassVar[str]  # what an item is, for messages: "case", "image"
    input_kind: ClassVar[str]  # what ``nodeseg predict --input`` takes, for messages

    @abstractmethod
    def list_items(self, root: Path, cfg: IngestConfig) -> dict[str, Any]:
        """item id → a picklable handle (a path, a pair of paths), for every item under ``root``.

        Problems with the folder (missing, stray files, bad names) raise ``InputError`` before any item is read.
        """

    @abstractmethod
    def item_path(self, item: Any) -> Path:
        """The file or folder that messages about ``item`` name."""

    @abstractmethod
    def read_item(self, item: Any, cfg: IngestConfig, seed: int, label: str) -> ItemResult:
        """The rows of one item (runs in a worker process). ``label`` names the data set (``source`` column)."""

    def source_label(self, root: Path) -> str:
        """What the rows' ``source`` column holds for data under ``root``."""
        return self.name

    @abstractmethod
    def input_side(self, preprocessing: dict[str, Any]) -> int:
        """The side of the square images a model trained on this source takes (from its preprocessing)."""

    @abstractmethod
    def accepts(self, path: Path) -> bool:
        """Whether ``path`` is this source's kind of prediction input (a volume file, a folder of images)."""

    @abstractmethod
    def predict(self, phi: PhiFn, preprocessing: dict[str, Any], input_path: Path, output: Path) -> Path:
        """Segment ``input_path`` with ``phi`` and write the result to ``output`` (atomically)."""
