"""The decode baseline's worker function, in a module that imports nothing heavier than nibabel."""

from __future__ import annotations

import nibabel as nib
import numpy as np


def decode(path: str) -> tuple[int, ...]:
    """Decompress and decode one NIfTI file (``nib.load`` + ``np.asarray``); return its shape."""
    return tuple(np.asarray(nib.load(path).dataobj).shape)
