"""The decode baselines' worker functions, in a module that imports nothing heavier than nibabel."""

from __future__ import annotations

import nibabel as nib
import numpy as np
from isal import igzip
from nibabel.volumeutils import array_from_file


def decode(path: str) -> tuple[int, ...]:
    """Decompress and decode one NIfTI file (``nib.load`` + ``np.asarray``); return its shape."""
    return tuple(np.asarray(nib.load(path).dataobj).shape)


def decode_isal(path: str) -> tuple[int, ...]:
    """The same with the reader ingest uses: ISA-L's inflate into nibabel's ``array_from_file``."""
    proxy = nib.load(path).dataobj
    with igzip.open(path, "rb") as f:
        a = array_from_file(proxy.shape, proxy.dtype, f, offset=proxy.offset, order=proxy.order, mmap=False)
    return tuple(a.shape)
