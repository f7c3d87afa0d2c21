"""The registry of data sources: ``data.source`` name → its :class:`~nodeseg.data.readers.base.Reader`.

nnU-Net's ``imageio/reader_writer_registry.py`` pattern: ingest (listing and reading items), params (the
valid ``data.source`` values), prediction (which input a model takes) and the model spec (its input side)
all look the source up here, so a new layout is one module with a ``Reader`` subclass and one entry below.
"""

from __future__ import annotations

from pathlib import Path

from nodeseg.data.readers.base import ItemResult, PhiFn, Reader
from nodeseg.data.readers.kits19 import Kits19Reader
from nodeseg.data.readers.saliency import SaliencyReader

__all__ = ["READERS", "ItemResult", "PhiFn", "Reader", "get_reader", "reader_for_input"]

READERS: dict[str, type[Reader]] = {cls.name: cls for cls in (Kits19Reader, SaliencyReader)}


def get_reader(source: str) -> Reader:
    """The reader of ``data.source`` ``source``; ValueError quoting it and the choices."""
    try:
        return READERS[source]()
    except (KeyError, TypeError):
        raise ValueError(f"data source must be one of {', '.join(map(repr, READERS))}, got {source!r}") from None


def reader_for_input(path: Path) -> Reader | None:
    """The first reader whose prediction input ``path`` is (for a model that does not record its source)."""
    for cls in READERS.values():
        reader = cls()
        if reader.accepts(path):
            return reader
    return None
