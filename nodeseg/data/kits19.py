"""KiTS19 case folders: listing, header-first validation, lazy loading, HU windowing, slice selection.

Layout (official release): ``<root>/case_XXXXX/imaging.nii.gz`` and ``segmentation.nii.gz``, arrays of
shape (slices, H, W); labels 0 background, 1 kidney, 2 tumour. Headers are read and checked (3-D, sane
dimensions, matching shape and affine) before any voxel is decompressed; the voxel data then comes from the
nibabel array proxy (``dataobj``). Every problem raises ``InputError(path, problem)``.
"""

from __future__ import annotations

import os
import re
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np
from isal import igzip, isal_zlib
from nibabel.filebasedimages import ImageFileError
from nibabel.nifti1 import data_type_codes
from nibabel.spatialimages import HeaderDataError
from nibabel.volumeutils import array_from_file

from nodeseg.errors import InputError, check_arg

__all__ = [
    "IMAGING",
    "LABELS",
    "MAX_AXIS",
    "MAX_VOXELS",
    "SEGMENTATION",
    "KitsCase",
    "case_id_of",
    "foreground",
    "kept_slices",
    "list_cases",
    "normalise_hu",
    "open_case",
    "read_volume",
    "take_slices",
]

IMAGING = "imaging.nii.gz"
SEGMENTATION = "segmentation.nii.gz"
LABELS = {0: "background", 1: "kidney", 2: "tumour"}
MAX_AXIS = 4096
MAX_VOXELS = 1 << 29  # 537 M voxels: 2 GiB as float32; the largest interpolated KiTS19 case has 116 M
CASE_RE = re.compile(r"case_[0-9]{5}")  # ASCII digits only: \d would take Arabic-Indic and other digits
_TILE = 64  # take_slices copies Fortran-ordered volumes in tiles of _TILE × _TILE voxels per slice
_CHUNK_BYTES = 1 << 20  # _read_slices inflates this much of a volume at a time (whole W-columns)
_READ_ERRORS = (OSError, EOFError, ValueError, zlib.error, isal_zlib.error, struct.error, ImageFileError,
                HeaderDataError)


def _oneline(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def case_id_of(folder: str | os.PathLike[str]) -> str:
    """The case id of a case folder (its name), refusing names other than ``case_XXXXX``."""
    folder = Path(folder)
    if not CASE_RE.fullmatch(folder.name):
        shown = f"{folder.parent.name}/{folder.name}" if folder.parent.name else folder.name
        raise InputError(folder, f"bad case folder name: got {shown!r}: expected case_XXXXX (five digits, e.g. case_00007)")
    return folder.name


def list_cases(root: str | os.PathLike[str]) -> list[Path]:
    """The case folders under ``root``, sorted; files (kits.json, LICENSE) and hidden entries are ignored."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(root, "not a folder: expected a KiTS19 root holding case_XXXXX folders")
    cases = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        case_id_of(entry)
        cases.append(entry)
    if not cases:
        raise InputError(root, "no case_XXXXX folders found: expected <root>/case_00000/segmentation.nii.gz, ...")
    return cases


def _datatype_name(code: int) -> str:
    """A NIfTI datatype code in words, e.g. ``RGB24 (NIfTI datatype 128)``."""
    try:
        name = data_type_codes.niistring[code].removeprefix("NIFTI_TYPE_") or data_type_codes.label[code]
    except KeyError:
        name = "unknown"
    return f"{name} (NIfTI datatype {code})"


def _stored_datatype(path: Path) -> int | None:
    """The datatype code in the header of ``path``, read without nibabel's checks; None if it cannot be read."""
    try:
        with (igzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")) as f:
            block = f.read(540)
        for klass in (nib.Nifti1Header, nib.Nifti2Header):
            if klass.may_contain_header(block):
                return int(klass(block[:klass.template_dtype.itemsize], check=False)["datatype"])
    except (*_READ_ERRORS, KeyError):
        pass
    return None


def _check_real_voxels(img: nib.Nifti1Image, path: Path) -> None:
    """Refuse voxel types that are not real numbers.

    Accepted: the integer types (u)int8 … (u)int64 and float32/float64, either byte order. Refused: complex64
    and complex128 (the imaginary part would be dropped), RGB24 and RGBA32 (structured colour voxels); the
    codes nibabel cannot read at all (binary, float128, complex256, none, unknown codes) are refused when the
    header is loaded. NIfTI has no float16 or bool datatype.
    """
    dtype = np.dtype(img.get_data_dtype())
    if dtype.kind in "iu" or (dtype.kind == "f" and dtype.itemsize in (4, 8)):
        return
    code = int(img.header["datatype"])
    kind = ("complex" if dtype.kind == "c" else "colour (structured)" if dtype.fields
            else f"a {8 * dtype.itemsize}-bit float" if dtype.kind == "f" else "non-numeric")
    raise InputError(path, f"voxel datatype {_datatype_name(code)} is {kind}, not a real number: expected "
                           f"integer or float32/float64 voxels; re-export the volume (CT as int16, labels as uint8)")


def _load_header(path: Path, max_axis: int, max_voxels: int) -> nib.Nifti1Image:
    """Open ``path`` lazily and check the header: a real voxel type, 3-D, positive finite spacing, sane dimensions."""
    try:
        img = nib.load(path)
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    except HeaderDataError as err:
        code = _stored_datatype(path)
        if code is not None and (code not in data_type_codes.code
                                 or np.dtype(data_type_codes.dtype[code]).kind == "V"
                                 and not np.dtype(data_type_codes.dtype[code]).fields):
            raise InputError(path, f"voxel datatype {_datatype_name(code)} cannot be read: expected integer or "
                                   f"float32/float64 voxels; re-export the volume (CT as int16, labels as uint8)"
                             ) from None
        raise InputError(path, f"cannot read the NIfTI header: corrupt or truncated gzip, or not NIfTI "
                               f"({_oneline(err)}); re-download or re-export the file") from None
    except _READ_ERRORS as err:
        raise InputError(path, f"cannot read the NIfTI header: corrupt or truncated gzip, or not NIfTI "
                               f"({_oneline(err)}); re-download or re-export the file") from None
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise InputError(path, f"expected a NIfTI image, got {type(img).__name__}")
    _check_real_voxels(img, path)
    shape = tuple(int(s) for s in img.shape)
    if len(shape) != 3:
        raise InputError(path, f"expected a 3-D volume (slices, H, W), got shape {shape}")
    if min(shape) < 1 or max(shape) > max_axis:
        raise InputError(path, f"absurd dimensions {shape}: each axis must be between 1 and {max_axis}")
    n = int(np.prod(shape, dtype=np.int64))
    if n > max_voxels:
        raise InputError(path, f"absurd dimensions {shape}: {n} voxels exceed the budget of {max_voxels}")
    zooms = [float(z) for z in img.header.get_zooms()[:3]]
    if not all(np.isfinite(z) and z > 0 for z in zooms):
        raise InputError(path, f"voxel spacing {tuple(zooms)} must be positive and finite (check pixdim)")
    if not np.isfinite(img.affine).all():
        raise InputError(path, "affine holds NaN or inf (check the sform/qform)")
    return img


def _read(img: nib.Nifti1Image, path: Path) -> np.ndarray:
    """All voxels, unscaled, in the stored dtype.

    A ``.gz`` file is inflated by ISA-L (python-isal's ``igzip``, in one pass into the array) where
    nibabel would use the stdlib's ``GzipFile``: a quarter less time on these files. The voxels are read
    with nibabel's ``array_from_file`` at the offset, dtype and shape of the header already checked.
    """
    try:
        proxy = img.dataobj
        if path.name.endswith(".gz"):
            with igzip.open(path, "rb") as f:
                return array_from_file(proxy.shape, proxy.dtype, f, offset=proxy.offset, order=proxy.order,
                                       mmap=False)
        return np.asarray(proxy.get_unscaled())
    except MemoryError:
        raise InputError(path, f"not enough memory to load a volume of shape {img.shape}") from None
    except _READ_ERRORS as err:
        raise InputError(path, f"truncated or corrupt voxel data ({_oneline(err)}); re-download the file") from None


def _first_index(bad: np.ndarray) -> tuple[int, ...]:
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(bad.ravel())), bad.shape))


def _check_finite(a: np.ndarray, path: Path) -> None:
    if np.issubdtype(a.dtype, np.floating):
        finite = np.isfinite(a)
        if not finite.all():
            bad = ~finite
            _refuse_non_finite(path, int(bad.sum()), _first_index(bad))


def _refuse_non_finite(path: Path, count: int, first: tuple[int, ...]) -> None:
    raise InputError(path, f"{count} NaN/inf voxels (first at (slice, row, col) = {first}); fix or drop the case")


def _streamable(img: nib.Nifti1Image, path: Path) -> bool:
    """Whether ``_columns`` can stream the voxels of ``img``: a gzipped, Fortran-ordered (every NIfTI) file."""
    return path.name.endswith(".gz") and img.dataobj.order == "F"


def _columns(img: nib.Nifti1Image, path: Path) -> Iterator[tuple[int, np.ndarray]]:
    """The voxels of a gzipped Fortran-ordered volume (S, H, W), a few W-columns at a time.

    Yields ``(w0, chunk)`` where ``chunk`` (k, H, S), C order, stored dtype, is ``volume[:, :, w0:w0+k]``
    transposed, a view of one reused buffer of about ``_CHUNK_BYTES`` that ISA-L inflates into: use it
    before the next. Read errors become ``InputError(path, ...)``.
    """
    proxy = img.dataobj
    n_s, n_h, n_w = (int(v) for v in proxy.shape)
    dtype = np.dtype(proxy.dtype)
    column = n_s * n_h * dtype.itemsize
    k = max(1, _CHUNK_BYTES // column)
    buf = bytearray(column * min(k, n_w))
    view = memoryview(buf)
    try:
        with igzip.open(path, "rb") as f:
            f.seek(int(proxy.offset))
            for w0 in range(0, n_w, k):
                kk = min(k, n_w - w0)
                need, got = kk * column, 0
                while got < need:
                    n = f.readinto(view[got:need])
                    if not n:
                        raise EOFError(f"expected {n_w * column} bytes of voxels, the stream ended after "
                                       f"{w0 * column + got}")
                    got += n
                yield w0, np.frombuffer(buf, dtype=dtype, count=kk * n_h * n_s).reshape(kk, n_h, n_s)
    except MemoryError:
        raise InputError(path, f"not enough memory to read a volume of shape {proxy.shape}") from None
    except _READ_ERRORS as err:
        raise InputError(path, f"truncated or corrupt voxel data ({_oneline(err)}); re-download the file") from None


def _read_slices(img: nib.Nifti1Image, path: Path, slices: Sequence[int] | np.ndarray,
                 dtype: np.dtype | type | None = None) -> np.ndarray:
    """``volume[slices]`` (C order, unscaled, cast to ``dtype`` if given) without holding the whole volume.

    A streamable volume (``_columns``) has the wanted slices gathered from each chunk while it is in cache,
    then put in C order by ``take_slices``' tiled copy: memory is twice the kept slices, not the volume.
    The voxels are checked for NaN/inf as they stream past (all of them, kept or not). Other files go
    through ``_read`` and ``take_slices``. Equal to ``take_slices(_read(...), slices)``.
    """
    proxy = img.dataobj
    shape = tuple(int(v) for v in proxy.shape)
    idx = np.arange(shape[0])[np.asarray(slices, dtype=np.intp)]  # numpy's bounds check and negatives
    if not _streamable(img, path) or idx.size == 0:
        raw = _read(img, path)
        _check_finite(raw, path)
        return take_slices(raw, idx, dtype)
    stored = np.dtype(proxy.dtype)
    every = idx.size == shape[0] and bool((idx == np.arange(shape[0])).all())
    try:  # (W, H, n) in C order is (n, H, W) in Fortran order, as the volume itself
        gathered = np.empty((shape[2], shape[1], idx.size), dtype=stored)
    except MemoryError:
        raise InputError(path, f"not enough memory for {idx.size} slices of a volume of shape {shape}") from None
    floating = np.issubdtype(stored, np.floating)
    n_bad, first = 0, None
    for w0, chunk in _columns(img, path):
        if floating:
            bad = ~np.isfinite(chunk)
            if bad.any():
                n_bad += int(bad.sum())
                s, h, w = _first_index(bad.transpose(2, 1, 0))
                here = (s, h, w0 + w)
                first = here if first is None else min(first, here)
        if every:
            gathered[w0:w0 + chunk.shape[0]] = chunk
        else:
            np.take(chunk, idx, axis=2, out=gathered[w0:w0 + chunk.shape[0]])
    if n_bad:
        _refuse_non_finite(path, n_bad, first)  # type: ignore[arg-type]
    # to C order (and dtype) in cache-sized tiles (a transposing copy element by element would cost a third of
    # the read)
    return take_slices(gathered.transpose(2, 1, 0), np.arange(idx.size), dtype)


def _read_labels(img: nib.Nifti1Image, path: Path) -> np.ndarray | None:
    """The label volume as C-ordered uint8 (S, H, W), streamed, or None where the fast path does not apply.

    For a streamable integer volume with no scaling: each chunk is range-checked (0…2) while in cache, and
    only the slices with a label in it are written into a zero-initialised output — label maps are mostly
    background, and untouched pages of ``np.zeros`` cost nothing. None (the caller takes the whole-volume
    path and its detailed error) for floats, scaled data, or a value outside 0…2.
    """
    proxy = img.dataobj
    dtype = np.dtype(proxy.dtype)
    if (not _streamable(img, path) or not np.issubdtype(dtype, np.integer)
            or (float(proxy.slope), float(proxy.inter)) != (1.0, 0.0)):
        return None
    shape = tuple(int(v) for v in proxy.shape)
    try:
        out = np.zeros(shape, dtype=np.uint8)
    except MemoryError:
        raise InputError(path, f"not enough memory to load a volume of shape {shape}") from None
    signed = np.issubdtype(dtype, np.signedinteger)
    for w0, chunk in _columns(img, path):
        if chunk.max() > 2 or (signed and chunk.min() < 0):
            return None
        hit = np.flatnonzero(chunk.any(axis=(0, 1)))
        if hit.size:
            out[hit, :, w0:w0 + chunk.shape[0]] = chunk[:, :, hit].transpose(2, 1, 0)
    return out


@dataclass
class KitsCase:
    """An opened case: headers checked, voxels not loaded yet."""

    case_id: str
    folder: Path
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]  # (slice, row, col) mm
    affine: np.ndarray
    segmentation_image: nib.Nifti1Image
    imaging_image: nib.Nifti1Image | None

    @property
    def has_imaging(self) -> bool:
        return self.imaging_image is not None

    def load_segmentation(self) -> np.ndarray:
        """Labels as uint8 (slices, H, W); InputError for NaN/inf or values outside {0, 1, 2}.

        Integer label maps (the usual case) are streamed into a C-ordered array (``_read_labels``); others
        are read whole (nibabel's Fortran order).
        """
        path = self.folder / SEGMENTATION
        img = self.segmentation_image
        fast = _read_labels(img, path)
        if fast is not None:
            return fast
        a = _read(img, path)
        slope, inter = img.dataobj.slope, img.dataobj.inter
        if (slope, inter) != (1.0, 0.0):
            a = a * np.float32(slope) + np.float32(inter)
        _check_finite(a, path)
        if a.dtype == np.bool_:
            return a.astype(np.uint8)
        if np.issubdtype(a.dtype, np.integer) and a.size and (a.min() >= 0 and a.max() <= 2):
            return a.astype(np.uint8, copy=False)
        bad = ~np.isin(a, (0, 1, 2))
        if bad.any():
            values = np.unique(a[bad])
            shown = ", ".join(repr(v.item()) for v in values[:5]) + (", ..." if values.size > 5 else "")
            raise InputError(path, f"labels outside {{0, 1, 2}} (0 background, 1 kidney, 2 tumour): found {shown} "
                                   f"in {int(bad.sum())} voxels, first at (slice, row, col) = {_first_index(bad)}")
        return a.astype(np.uint8)

    def load_imaging(self, slices: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """CT in HU as float32 (slices, H, W), only the given slice indices if any; NaN/inf refused."""
        if self.imaging_image is None:
            raise InputError(self.folder / IMAGING, "file not found")
        return _hu(self.imaging_image, self.folder / IMAGING, slices)


def take_slices(volume: np.ndarray, indices: Sequence[int] | np.ndarray,
                dtype: np.dtype | type | None = None) -> np.ndarray:
    """``volume[indices]`` (slices along axis 0) as a new C-ordered array, cast to ``dtype`` if given.

    nibabel gives NIfTI volumes in Fortran order (the slice index varies fastest in memory), where
    numpy's gather, or any copy to C order, reads a cache line per voxel. Copying the span of the
    indices tile by tile (64 × 64 voxels of every slice at a time) does the same at a sixth of the cost.
    """
    v = np.asarray(volume)
    check_arg(v.ndim == 3, "volume", f"array of shape {v.shape}", "a (slices, H, W) array")
    idx = np.arange(v.shape[0])[np.asarray(indices, dtype=np.intp)]  # numpy's bounds check and negatives
    if v.flags.c_contiguous or idx.size == 0:
        return np.ascontiguousarray(v[idx], dtype=dtype)
    lo, hi = int(idx.min()), int(idx.max()) + 1
    span = v[lo:hi]
    out = np.empty(span.shape, dtype=v.dtype if dtype is None else dtype)
    for r in range(0, span.shape[1], _TILE):
        for c in range(0, span.shape[2], _TILE):
            out[:, r:r + _TILE, c:c + _TILE] = span[:, r:r + _TILE, c:c + _TILE]
    if idx.size == hi - lo and bool((np.diff(idx) == 1).all()):
        return out
    return out[idx - lo]


def _hu(img: nib.Nifti1Image, path: Path, slices: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
    """The voxels of ``img`` in HU (scl_slope / scl_inter applied) as float32, optionally some slices only."""
    slope, inter = float(img.dataobj.slope), float(img.dataobj.inter)
    if not (np.isfinite(slope) and np.isfinite(inter)):
        raise InputError(path, f"scl_slope/scl_inter ({slope}, {inter}) must be finite")
    # C-ordered float32 (streamed where the file allows): each slice contiguous for the per-slice work after
    out = _read_slices(img, path, np.arange(int(img.shape[0])) if slices is None else slices, np.float32)
    if (slope, inter) != (1.0, 0.0):
        out = out * np.float32(slope) + np.float32(inter)
    return out


def read_volume(
    path: str | os.PathLike[str], *, max_axis: int = MAX_AXIS, max_voxels: int = MAX_VOXELS
) -> tuple[np.ndarray, nib.Nifti1Image]:
    """One CT volume outside a case folder (e.g. for prediction): HU float32 (slices, H, W) and its image.

    Same checks as a case's imaging: header first (3-D, dimensions), then finite voxels.
    """
    path = Path(path)
    img = _load_header(path, max_axis, max_voxels)
    return _hu(img, path), img


def open_case(
    folder: str | os.PathLike[str],
    *,
    require_imaging: bool = True,
    max_axis: int = MAX_AXIS,
    max_voxels: int = MAX_VOXELS,
) -> KitsCase:
    """Open a case folder and check its headers (shape, dimensions, image/segmentation agreement).

    With ``require_imaging=False`` a missing ``imaging.nii.gz`` is allowed (labels-only release).
    """
    folder = Path(folder)
    case_id = case_id_of(folder)
    if not folder.is_dir():
        raise InputError(folder, "not a folder: expected a case folder with imaging.nii.gz and segmentation.nii.gz")
    if not any(folder.iterdir()):
        raise InputError(folder, f"empty case folder: expected {SEGMENTATION}"
                                 + (f" and {IMAGING}" if require_imaging else ""))
    seg_path, img_path = folder / SEGMENTATION, folder / IMAGING
    if not seg_path.exists():
        raise InputError(seg_path, "file not found: every case folder needs the label volume")
    seg = _load_header(seg_path, max_axis, max_voxels)
    img = None
    if img_path.exists():
        img = _load_header(img_path, max_axis, max_voxels)
        if img.shape != seg.shape:
            raise InputError(img_path, f"shape {tuple(img.shape)} does not match {SEGMENTATION} shape {tuple(seg.shape)}")
        if not np.allclose(img.affine, seg.affine, rtol=0.0, atol=1e-3):
            raise InputError(img_path, f"affine does not match {SEGMENTATION}'s: "
                                       f"{np.round(img.affine[:3], 4).tolist()} vs {np.round(seg.affine[:3], 4).tolist()}")
    elif require_imaging:
        raise InputError(img_path, "file not found: the KiTS19 labels-only release has no CT; set pseudo_ct "
                                   "to synthesise one from the labels, or download the imaging")
    zooms = tuple(float(z) for z in seg.header.get_zooms()[:3])
    return KitsCase(
        case_id=case_id,
        folder=folder,
        shape=tuple(int(s) for s in seg.shape),  # type: ignore[arg-type]
        spacing=zooms,  # type: ignore[arg-type]
        affine=np.asarray(seg.affine, dtype=np.float64),
        segmentation_image=seg,
        imaging_image=img,
    )


def _check_labels(labels: Sequence[int], name: str) -> tuple[int, ...]:
    ok = (
        isinstance(labels, (tuple, list))
        and len(labels) > 0
        and len(set(labels)) == len(labels)
        and all(isinstance(v, int) and v in (1, 2) for v in labels)
    )
    check_arg(ok, name, labels, "a non-empty list of distinct labels from {1 (kidney), 2 (tumour)}")
    return tuple(labels)


def kept_slices(segmentation: np.ndarray, keep_labels: Sequence[int] = (1,)) -> np.ndarray:
    """Indices of the slices (axis 0) that contain at least one voxel of any of ``keep_labels``."""
    keep_labels = _check_labels(keep_labels, "keep_labels")
    seg = np.asarray(segmentation)
    check_arg(seg.ndim == 3, "segmentation", f"array of shape {seg.shape}", "a (slices, H, W) array")
    present = np.zeros(seg.shape[0], dtype=bool)
    for label in keep_labels:
        present |= (seg == label).any(axis=(1, 2))
    return np.flatnonzero(present)


def foreground(labels: np.ndarray, foreground_labels: Sequence[int] = (1, 2)) -> np.ndarray:
    """The binary target (uint8) of a label array: 1 where the label is one of ``foreground_labels``."""
    fg = _check_labels(foreground_labels, "foreground_labels")
    a = np.asarray(labels)
    if a.dtype == np.uint8:  # a lookup table: one pass where isin makes four
        lut = np.zeros(256, dtype=np.uint8)
        lut[list(fg)] = 1
        return lut[a]
    return np.isin(a, fg).astype(np.uint8)


def normalise_hu(
    hu: np.ndarray,
    window: tuple[float, float] = (-79.0, 304.0),
    mode: Literal["minmax", "zscore"] = "minmax",
    stats: tuple[float, float] = (101.0, 76.9),
    *,
    inplace: bool = False,
) -> np.ndarray:
    """Clip HU to ``window`` then scale: ``minmax`` → [0, 1]; ``zscore`` → (x − mean) / std with ``stats``.

    The default window is nnU-Net's KiTS19 foreground 0.5/99.5 percentiles; ``stats`` its foreground mean
    and standard deviation (approximate). ``inplace`` reuses ``hu`` when it is a float32 array (the
    same values; a caller done with the HU saves a copy of the volume).
    """
    lo, hi = window
    check_arg(lo < hi, "window", window, "(low, high) with low < high")
    check_arg(mode in ("minmax", "zscore"), "mode", mode, "'minmax' or 'zscore'")
    if mode == "zscore":
        check_arg(stats[1] > 0, "stats", stats, "(mean, std) with std > 0")
    # one float32 copy (none when inplace), then in place: the same float32 operations as clip → subtract →
    # divide
    reuse = inplace and isinstance(hu, np.ndarray) and hu.dtype == np.float32 and hu.flags.writeable
    x = hu if reuse else np.array(hu, dtype=np.float32, copy=True)
    np.clip(x, np.float32(lo), np.float32(hi), out=x)
    shift, scale = (lo, hi - lo) if mode == "minmax" else stats
    x -= np.float32(shift)
    x /= np.float32(scale)
    return x
