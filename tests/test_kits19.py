"""KiTS19 case reading: header-first validation, lazy loading, labels, HU windowing, slice selection."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from nodeseg.data import kits19
from nodeseg.data.kits19 import (
    IMAGING,
    SEGMENTATION,
    case_id_of,
    foreground,
    kept_slices,
    list_cases,
    normalise_hu,
    open_case,
    read_volume,
    take_slices,
)
from nodeseg.data.synthetic import kits_affine
from nodeseg.errors import InputError

SPACING = (3.0, 0.78, 0.78)


def _labels(shape: tuple[int, int, int] = (6, 16, 16)) -> np.ndarray:
    seg = np.zeros(shape, dtype=np.uint8)
    seg[1:4, 4:10, 4:10] = 1
    seg[2, 6:8, 6:8] = 2
    seg[4, 3:5, 3:5] = 2  # a tumour-only slice
    return seg


def _write(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, kits_affine(SPACING) if affine is None else affine), path)
    return path


def _case(root: Path, name: str = "case_00000", seg: np.ndarray | None = None,
          img: np.ndarray | None = None, with_imaging: bool = True) -> Path:
    seg = _labels() if seg is None else seg
    folder = root / name
    _write(folder / SEGMENTATION, seg)
    if with_imaging:
        hu = np.where(seg > 0, 150, -100).astype(np.int16) if img is None else img
        _write(folder / IMAGING, hu)
    return folder


def test_open_case_reads_headers_then_voxels(tmp_path: Path) -> None:
    folder = _case(tmp_path)
    case = open_case(folder)
    assert case.case_id == "case_00000"
    assert case.shape == (6, 16, 16)
    assert case.spacing == pytest.approx(SPACING)
    np.testing.assert_allclose(case.affine, kits_affine(SPACING), atol=1e-6)
    seg = case.load_segmentation()
    assert seg.dtype == np.uint8 and np.array_equal(seg, _labels())
    hu = case.load_imaging([1, 3])
    assert hu.dtype == np.float32 and hu.shape == (2, 16, 16)
    assert hu[0, 5, 5] == 150 and hu[0, 0, 0] == -100


def test_uint16_labels_and_scaled_imaging(tmp_path: Path) -> None:
    folder = tmp_path / "case_00001"
    _write(folder / SEGMENTATION, _labels().astype(np.uint16))  # 16 real cases store uint16 labels
    img = nib.Nifti1Image(np.full((6, 16, 16), 10, dtype=np.int16), kits_affine(SPACING))
    img.header.set_slope_inter(2.0, -5.0)
    nib.save(img, folder / IMAGING)
    case = open_case(folder)
    assert case.load_segmentation().dtype == np.uint8
    assert np.all(case.load_imaging() == 15.0)


@pytest.mark.parametrize("dtype", ["<i2", ">i2", "<f4", ">u2"])
def test_voxels_read_through_isal_equal_nibabels(tmp_path: Path, dtype: str) -> None:
    """The .nii.gz voxels come from ISA-L's inflate into nibabel's array_from_file: they must equal what
    nibabel decodes itself, in either byte order, and an uncompressed .nii takes nibabel's own path."""
    rng = np.random.default_rng(1)
    data = rng.integers(-300, 900 if dtype != ">u2" else 3, size=(7, 33, 20)).astype(dtype)
    for name in ("ct.nii.gz", "ct.nii"):
        path = tmp_path / name
        nib.save(nib.Nifti1Image(data, kits_affine(SPACING)), path)
        hu, img = read_volume(path)
        expected = np.asarray(nib.load(path).dataobj, dtype=np.float32)
        np.testing.assert_array_equal(hu, expected)
        assert hu.dtype == np.float32 and hu.shape == data.shape


@pytest.mark.parametrize("dtype", ["<i2", ">i2", "<f4", "u1"])
@pytest.mark.parametrize("chunk_bytes", [1, 700, 1 << 20])
def test_kept_slices_streamed_equal_the_whole_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    dtype: str, chunk_bytes: int) -> None:
    """load_imaging(slices) inflates a few W-columns at a time and gathers the slices from each chunk:
    the result must equal nibabel's whole volume indexed by the slices, whatever the chunk size (one
    column, a few with a short last chunk, the whole volume), dtype, byte order or slice order; and
    load_imaging() (what predict reads) the whole volume, C-ordered."""
    monkeypatch.setattr(kits19, "_CHUNK_BYTES", chunk_bytes)
    rng = np.random.default_rng(2)
    data = rng.integers(0, 250, size=(9, 13, 11)).astype(dtype)
    folder = _case(tmp_path, seg=np.zeros(data.shape, np.uint8), img=data)
    whole = np.asarray(nib.load(folder / IMAGING).dataobj, dtype=np.float32)
    case = open_case(folder)
    for slices in ([0], [8, 2, 2, 5], np.arange(9), [-1, 3]):
        got = case.load_imaging(slices)
        assert got.dtype == np.float32 and got.flags.c_contiguous
        np.testing.assert_array_equal(got, whole[np.asarray(slices)])
    got = case.load_imaging()  # the whole volume streams too, into C order
    assert got.dtype == np.float32 and got.flags.c_contiguous
    np.testing.assert_array_equal(got, whole)


def test_streamed_slices_refuse_nan_anywhere_and_truncation(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The streamed read keeps the whole read's refusals: NaN/inf in any slice, kept or not (same count and
    first voxel in the message), and voxel data cut short."""
    monkeypatch.setattr(kits19, "_CHUNK_BYTES", 6 * 16 * 4 * 3)  # 3 W-columns per chunk
    img = np.zeros((6, 16, 16), np.float32)
    img[4, 9, 12] = np.nan
    img[2, 11, 3] = np.inf
    img[2, 11, 1] = -np.inf
    img[4, 0, 0] = np.nan  # same chunk as (2, 11, 1), before it in the file, after it in (slice, row, col)
    case = open_case(_case(tmp_path, img=img))
    with pytest.raises(InputError, match=r"4 NaN/inf voxels \(first at \(slice, row, col\) = \(2, 11, 1\)\)"):
        case.load_imaging([0, 1])
    folder = _case(tmp_path, "case_00001")
    raw = gzip.decompress((folder / IMAGING).read_bytes())
    (folder / IMAGING).write_bytes(gzip.compress(raw[: len(raw) - 300]))
    with pytest.raises(InputError, match="truncated or corrupt voxel data") as err:
        open_case(folder).load_imaging([1])
    assert err.value.path == str(folder / IMAGING) and "\n" not in str(err.value)
    with pytest.raises(IndexError):
        open_case(_case(tmp_path, "case_00002")).load_imaging([6])


def test_list_cases_sorted_ignores_files(tmp_path: Path) -> None:
    for name in ("case_00002", "case_00000"):
        _case(tmp_path, name)
    (tmp_path / "kits.json").write_text("[]")
    (tmp_path / ".hidden").mkdir()
    assert [p.name for p in list_cases(tmp_path)] == ["case_00000", "case_00002"]


def test_bad_case_folder_name(tmp_path: Path) -> None:
    root = tmp_path / "kits19"
    _case(root, "case_7")
    with pytest.raises(InputError, match=r"got 'kits19/case_7': expected case_XXXXX") as err:
        list_cases(root)
    assert err.value.path.endswith("case_7")
    with pytest.raises(InputError, match="expected case_XXXXX"):
        case_id_of(root / "case_7")


def test_empty_root_and_empty_case_folder(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no case_XXXXX folders"):
        list_cases(tmp_path)
    (tmp_path / "case_00003").mkdir()
    with pytest.raises(InputError, match="empty case folder") as err:
        open_case(tmp_path / "case_00003")
    assert err.value.path.endswith("case_00003")


def test_missing_imaging_needs_pseudo_ct(tmp_path: Path) -> None:
    folder = _case(tmp_path, with_imaging=False)
    with pytest.raises(InputError, match="pseudo_ct") as err:
        open_case(folder)
    assert err.value.path.endswith(IMAGING)
    assert not open_case(folder, require_imaging=False).has_imaging


def test_missing_segmentation(tmp_path: Path) -> None:
    folder = tmp_path / "case_00000"
    _write(folder / IMAGING, np.zeros((2, 8, 8), np.int16))
    with pytest.raises(InputError, match="file not found") as err:
        open_case(folder)
    assert err.value.path.endswith(SEGMENTATION)


def test_corrupt_gzip(tmp_path: Path) -> None:
    folder = _case(tmp_path)
    (folder / SEGMENTATION).write_bytes(b"this is not gzip at all" * 10)
    with pytest.raises(InputError, match="corrupt or truncated gzip") as err:
        open_case(folder)
    assert err.value.path == str(folder / SEGMENTATION)
    assert "\n" not in str(err.value)


def test_truncated_nifti_data(tmp_path: Path) -> None:
    folder = _case(tmp_path)
    raw = gzip.decompress((folder / IMAGING).read_bytes())
    (folder / IMAGING).write_bytes(gzip.compress(raw[: len(raw) - 300]))  # header intact, voxels cut short
    case = open_case(folder)  # the header alone is fine
    with pytest.raises(InputError, match="truncated or corrupt voxel data") as err:
        case.load_imaging()
    assert err.value.path == str(folder / IMAGING)
    assert "\n" not in str(err.value)


def test_truncated_gzip_stream(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    folder = _case(tmp_path, img=rng.integers(-1000, 1000, size=(6, 16, 16)).astype(np.int16))
    data = (folder / IMAGING).read_bytes()
    (folder / IMAGING).write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(InputError) as err:
        open_case(folder).load_imaging()
    assert err.value.path == str(folder / IMAGING)


def test_four_d_volume(tmp_path: Path) -> None:
    folder = tmp_path / "case_00000"
    _write(folder / SEGMENTATION, np.zeros((4, 8, 8, 2), np.uint8))
    with pytest.raises(InputError, match=r"expected a 3-D volume .* got shape \(4, 8, 8, 2\)"):
        open_case(folder, require_imaging=False)


def test_shape_mismatch(tmp_path: Path) -> None:
    folder = _case(tmp_path, img=np.zeros((6, 16, 15), np.int16))
    with pytest.raises(InputError, match=r"shape \(6, 16, 15\) does not match segmentation.nii.gz shape \(6, 16, 16\)") as err:
        open_case(folder)
    assert err.value.path.endswith(IMAGING)


def test_affine_mismatch(tmp_path: Path) -> None:
    folder = _case(tmp_path)
    _write(folder / IMAGING, np.zeros((6, 16, 16), np.int16), affine=kits_affine((2.5, 0.78, 0.78)))
    with pytest.raises(InputError, match="affine does not match"):
        open_case(folder)


def test_nan_voxels_in_imaging_and_labels(tmp_path: Path) -> None:
    img = np.zeros((6, 16, 16), np.float32)
    img[2, 3, 4] = np.nan
    img[5, 0, 0] = np.inf
    case = open_case(_case(tmp_path, img=img))
    with pytest.raises(InputError, match=r"2 NaN/inf voxels \(first at \(slice, row, col\) = \(2, 3, 4\)\)"):
        case.load_imaging()
    seg = _labels().astype(np.float32)
    seg[0, 0, 0] = np.nan
    case = open_case(_case(tmp_path, "case_00001", seg=seg))
    with pytest.raises(InputError, match="NaN/inf"):
        case.load_segmentation()


def test_labels_outside_range(tmp_path: Path) -> None:
    seg = _labels()
    seg[0, 1, 2] = 3
    seg[5, 0, 0] = 7
    case = open_case(_case(tmp_path, seg=seg))
    with pytest.raises(InputError, match=r"labels outside \{0, 1, 2\}.*found 3, 7 in 2 voxels") as err:
        case.load_segmentation()
    assert err.value.path.endswith(SEGMENTATION)
    fseg = _labels().astype(np.float32)
    fseg[1, 1, 1] = 0.5
    case = open_case(_case(tmp_path, "case_00001", seg=fseg))
    with pytest.raises(InputError, match="found 0.5"):
        case.load_segmentation()


@pytest.mark.parametrize("dtype", ["u1", "<u2", ">i2", "<f4"])
@pytest.mark.parametrize("chunk_bytes", [1, 500, 1 << 20])
def test_streamed_labels_equal_the_whole_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: str,
                                              chunk_bytes: int) -> None:
    """Integer label maps are streamed a few W-columns at a time into a C-ordered uint8 volume that starts
    at zero and gets only the slices with a label in each chunk: equal to nibabel's whole volume for every
    chunk size and dtype (float labels take the whole-volume path), and a value outside 0…2 in any chunk
    gets the whole read's detailed refusal."""
    monkeypatch.setattr(kits19, "_CHUNK_BYTES", chunk_bytes)
    rng = np.random.default_rng(3)
    seg = np.zeros((7, 12, 10), np.uint8)
    seg[1:3, 2:6, 1:4] = 1
    seg[2, 3:5, 2:3] = 2
    seg[5, 8:11, 6:9] = rng.integers(0, 3, size=(3, 3))  # labels in a later W-column, noise-like
    folder = _case(tmp_path, seg=seg.astype(dtype), with_imaging=False)
    got = open_case(folder, require_imaging=False).load_segmentation()
    assert got.dtype == np.uint8 and got.shape == seg.shape
    np.testing.assert_array_equal(got, np.asarray(nib.load(folder / SEGMENTATION).dataobj))
    np.testing.assert_array_equal(got, seg)
    if dtype != "<f4":
        bad = seg.astype(dtype)
        bad[6, 11, 9] = 3 if dtype != ">i2" else -1  # the very last voxel of the file's last chunk
        folder = _case(tmp_path, "case_00001", seg=bad, with_imaging=False)
        shown = "3" if dtype != ">i2" else "-1"
        with pytest.raises(InputError, match=rf"found {shown} in 1 voxels, first at \(slice, row, col\) = "
                                             r"\(6, 11, 9\)"):
            open_case(folder, require_imaging=False).load_segmentation()


def _header_only(path: Path, shape: tuple[int, ...]) -> None:
    """A .nii.gz holding only a header that claims ``shape`` (no voxel data at all)."""
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(np.uint8)
    hdr.set_data_shape(shape)
    hdr.set_qform(kits_affine(SPACING), code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(hdr.binaryblock + b"\0" * 4))


@pytest.mark.parametrize(
    ("shape", "message"),
    [((5000, 10, 10), "each axis must be between 1 and 4096"), ((4000, 4000, 4000), "voxels exceed the budget")],
)
def test_absurd_dimensions_refused_from_header(tmp_path: Path, shape: tuple[int, int, int], message: str) -> None:
    folder = tmp_path / "case_00000"
    _header_only(folder / SEGMENTATION, shape)
    # the file has no voxels: had it been read we would get 'truncated', not 'absurd dimensions'
    with pytest.raises(InputError, match=f"absurd dimensions .*{message}"):
        open_case(folder, require_imaging=False)


def test_kept_slices_rules() -> None:
    seg = _labels()
    assert kept_slices(seg, (1,)).tolist() == [1, 2, 3]
    assert kept_slices(seg, (1, 2)).tolist() == [1, 2, 3, 4]
    assert kept_slices(np.zeros((3, 4, 4), np.uint8)).size == 0
    with pytest.raises(ValueError, match="keep_labels"):
        kept_slices(seg, (3,))


@pytest.mark.parametrize("order", ["C", "F"])
def test_take_slices_equals_numpy_indexing(order: str) -> None:
    """Tiles of 64 voxels: shapes that are and are not multiples of it, ranges, gaps, repeats, negatives."""
    rng = np.random.default_rng(0)
    for shape in [(9, 130, 70), (5, 64, 64), (1, 3, 200)]:
        v = np.asarray(rng.integers(0, 3, size=shape, dtype=np.uint8), order=order)
        n = shape[0]
        for idx in ([0], list(range(n)), list(range(1, n)), [n - 1, 0], [0, 0, n - 1], [-1], [], [2, 4] if n > 4 else [0]):
            got = take_slices(v, idx)
            np.testing.assert_array_equal(got, v[np.asarray(idx, dtype=np.intp)])
            assert got.flags.c_contiguous and not np.shares_memory(got, v)
            cast = take_slices(v, idx, np.float32)  # the cast in the same copy: astype's values
            assert cast.dtype == np.float32 and cast.flags.c_contiguous
            np.testing.assert_array_equal(cast, v[np.asarray(idx, dtype=np.intp)].astype(np.float32))
    with pytest.raises(IndexError):
        take_slices(np.zeros((3, 4, 4), order="F"), [3])
    with pytest.raises(ValueError, match="volume"):
        take_slices(np.zeros((4, 4)), [0])


def test_foreground_union() -> None:
    seg = _labels()
    assert np.array_equal(foreground(seg[2]), (seg[2] > 0).astype(np.uint8))
    assert foreground(seg[2], (1,)).sum() == (seg[2] == 1).sum()
    # uint8 labels go through a lookup table: the same as isin for every byte value and label choice
    every = np.arange(256, dtype=np.uint8).reshape(16, 16)
    for labels in ((1,), (2,), (1, 2), (2, 1)):
        got = foreground(every, labels)
        assert got.dtype == np.uint8 and np.array_equal(got, np.isin(every, labels).astype(np.uint8))
        assert np.array_equal(foreground(every.astype(np.int16), labels), got)


def test_normalise_hu() -> None:
    hu = np.array([-1000.0, -79.0, 112.5, 304.0, 2000.0], dtype=np.float32)
    np.testing.assert_allclose(normalise_hu(hu), [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-6)
    z = normalise_hu(hu, mode="zscore", stats=(101.0, 76.9))
    np.testing.assert_allclose(z, (np.clip(hu, -79, 304) - 101.0) / 76.9, rtol=1e-6)
    assert z.dtype == np.float32
    with pytest.raises(ValueError, match="window"):
        normalise_hu(hu, window=(10.0, -10.0))
    # inplace: the same values in the caller's float32 array; other dtypes are still copied
    for mode in ("minmax", "zscore"):
        work = hu.copy()
        out = normalise_hu(work, mode=mode, inplace=True)  # type: ignore[arg-type]
        assert out is work
        np.testing.assert_array_equal(out, normalise_hu(hu, mode=mode))  # type: ignore[arg-type]
    ints = np.array([-1000, 112, 2000], dtype=np.int16)
    assert normalise_hu(ints, inplace=True).dtype == np.float32 and ints[0] == -1000


def test_read_volume_standalone(tmp_path: Path) -> None:
    path = _write(tmp_path / "ct.nii.gz", np.full((3, 8, 8), -50, np.int16))
    hu, img = read_volume(path)
    assert hu.dtype == np.float32 and hu.shape == (3, 8, 8) and np.all(hu == -50)
    np.testing.assert_allclose(img.affine, kits_affine(SPACING), atol=1e-6)
    _header_only(tmp_path / "huge.nii.gz", (5000, 10, 10))
    with pytest.raises(InputError, match="absurd dimensions"):
        read_volume(tmp_path / "huge.nii.gz")
    with pytest.raises(InputError, match="file not found"):
        read_volume(tmp_path / "missing.nii.gz")


_DATATYPE_CODES = sorted({int(c) for c in nib.nifti1.data_type_codes.code if isinstance(c, int)} | {9999})
_READ = {"uint8", "int8", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float32", "float64"}


@pytest.mark.parametrize("code", _DATATYPE_CODES)
def test_every_nifti_datatype_is_read_or_refused_by_name(tmp_path: Path, code: int) -> None:
    """Each datatype code of the standard (and one outside it): the real ones read, the others one InputError
    naming the file and the datatype, raised from the header before any voxel is used."""
    codes = nib.nifti1.data_type_codes
    label = codes.label[code] if code in codes.code else "unknown"
    path = tmp_path / "v.nii.gz"
    src = np.arange(2 * 3 * 4).reshape(2, 3, 4) % 3
    try:
        dtype = np.dtype(codes.dtype[code])
    except KeyError:
        dtype = np.dtype("V1")
    if dtype.kind != "V" or dtype.fields:  # a type nibabel writes: real voxels of that type
        hdr = nib.Nifti1Header()
        hdr.set_data_dtype(dtype)
        data = src.astype(dtype) if not dtype.fields else np.zeros(src.shape, dtype)
        nib.save(nib.Nifti1Image(data, kits_affine(SPACING), header=hdr), path)
    else:  # one nibabel cannot write or read: an int16 file whose header claims the code
        _write(path, src.astype(np.int16))
        raw = bytearray(gzip.decompress(path.read_bytes()))
        raw[70:72] = np.int16(code).tobytes()
        path.write_bytes(gzip.compress(bytes(raw)))
    if label in _READ:
        hu, _ = read_volume(path)
        np.testing.assert_array_equal(hu, src.astype(np.float32))
        return
    with pytest.raises(InputError) as info:
        read_volume(path)
    assert info.value.path == str(path)
    assert f"(NIfTI datatype {code})" in info.value.problem
    assert "not a real number" in info.value.problem or "cannot be read" in info.value.problem


@pytest.mark.parametrize("name", ["case_\u0660\u0660\u0660\u0660\u0662", "case_\uff10\uff10\uff10\uff10\uff11",
                                  "case_0000\u0663"])
def test_case_ids_are_ascii_digits(tmp_path: Path, name: str) -> None:
    with pytest.raises(InputError, match="bad case folder name"):
        case_id_of(tmp_path / name)
    assert case_id_of(tmp_path / "case_00002") == "case_00002"
