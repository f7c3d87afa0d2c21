"""Bad input, end to end through the CLI: one line naming the file and the problem, a non-zero exit, no output.

Each entry of ``CATALOGUE`` writes one malformed input (tiny: 4×16×16 volumes, 12×12 images) into the test's
folder and runs ``nodeseg.cli.main`` in-process. The error must be the last line on stderr and the only one
with the ``nodeseg <stage>: error:`` prefix, start with the offending path and hold the stable part of the
message; the test's folder must be byte-for-byte what it was before the command (nothing partial written, a
previous output untouched). docs/errors.md holds the same catalogue as a table, checked here so that the two
cannot drift: regenerate it with ``python tests/test_bad_input.py``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from committed import PARAMS
from PIL import Image

from nodeseg.cli import main
from nodeseg.data.ingest import split_ids
from nodeseg.data.synthetic import kits_affine
from nodeseg.models.spec import build_from_spec, make_spec
from nodeseg.params import load_params
from nodeseg.train import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "errors.md"
COMMON = ["--params", str(PARAMS), "--set", "data.workers=1", "--set", "ingest.size=16",
          "--set", "ingest.saliency_crop=16"]
SALIENCY = [*COMMON, "--set", "data.source=saliency"]
SEG, IMG = "segmentation.nii.gz", "imaging.nii.gz"
SPACING = (3.0, 0.8, 0.8)
START, END = "<!-- catalogue:start -->", "<!-- catalogue:end -->"

pytestmark = pytest.mark.filterwarnings("ignore:.*no slice with label")


# ----------------------------------------------------------------------------------------------- inputs


def _labels() -> np.ndarray:
    seg = np.zeros((4, 16, 16), np.uint8)
    seg[1:3, 4:10, 4:10] = 1
    seg[2, 6:8, 6:8] = 2
    return seg


def _nifti(path: Path, data: np.ndarray, spacing: tuple[float, float, float] = SPACING) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, kits_affine(spacing)), path)
    return path


def _case(raw: Path, name: str, seg: np.ndarray | None = None, img: np.ndarray | None = None) -> Path:
    seg = _labels() if seg is None else seg
    _nifti(raw / name / SEG, seg)
    _nifti(raw / name / IMG, np.where(seg > 0, 150, -100).astype(np.int16) if img is None else img)
    return raw / name


def _kits(tmp: Path, n: int = 2) -> Path:
    """``tmp/raw`` with ``n`` good cases; the catalogue breaks case_00001."""
    for i in range(n):
        _case(tmp / "raw", f"case_{i:05d}")
    return tmp / "raw"


def _saliency(tmp: Path, stems: tuple[str, ...] = ("a", "b")) -> Path:
    """``tmp/sal/{images,masks}`` with 12×12 RGB images and binary masks."""
    root = tmp / "sal"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for s in stems:
        Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(root / "images" / f"{s}.jpg")
        mask = np.zeros((12, 12), np.uint8)
        mask[3:8, 3:8] = 255
        Image.fromarray(mask).save(root / "masks" / f"{s}.png")
    return root


def _preprocess(tmp: Path, raw: str = "raw", options: list[str] = COMMON) -> list[str]:
    return [*options, "--raw", str(tmp / raw), "--out", str(tmp / "shards")]


def _header_only(path: Path, shape: tuple[int, int, int]) -> None:
    """A .nii.gz holding a NIfTI-2 header that claims ``shape`` and 16 bytes of voxel data."""
    hdr = nib.Nifti2Header()
    hdr.set_data_dtype(np.uint8)
    hdr.set_data_shape(shape)
    hdr.set_qform(kits_affine(SPACING), code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(hdr.binaryblock + b"\0" * 20))


class _Exploit:
    """Pickles to ``exec(code)``: what a malicious checkpoint carries; weights_only=True must refuse it."""

    def __init__(self, marker: Path) -> None:
        self.code = f"open({str(marker)!r}, 'w').close()"

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (exec, (self.code,))


@dataclass
class Base:
    """Good inputs built once: raw cases, their shards, an untrained UNet and Contour Evolution checkpoint."""

    shards: Path
    unet: Path
    contour: Path


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Base:
    root = tmp_path_factory.mktemp("good")
    _kits(root)
    assert main(["preprocess", *_preprocess(root)]) == 0
    params = load_params([PARAMS])
    unet = make_spec("unet", params.unet)
    contour = make_spec("contour", params.contour, unet=unet)
    for name, spec in (("unet", unet), ("contour", contour)):
        ckpt.save(root / f"{name}.pt", {"stage": "test", "model_spec": spec, "model": build_from_spec(spec).state_dict()})
    return Base(root / "shards", root / "unet.pt", root / "contour.pt")


# ----------------------------------------------------------------------------------------------- the catalogue


@dataclass(frozen=True)
class Case:
    """One malformed input, the command given it, and the error line it must produce."""

    id: str
    what: str  # the input, in words (docs/errors.md)
    stage: str
    culprit: str  # what the message starts with: {tmp} is the test's folder, {committed} the folder of the committed params.yaml (tests/committed.py)
    message: str  # the stable part of the problem
    build: Callable[[Path, Base], list[str]]  # writes the input under tmp; returns the arguments after the stage
    code: int = 2


CATALOGUE: list[Case] = []


def case(id: str, what: str, stage: str, culprit: str, message: str, code: int = 2) -> Callable:
    """Register the decorated builder as a catalogue entry."""

    def register(build: Callable[[Path, Base], list[str]]) -> Callable[[Path, Base], list[str]]:
        CATALOGUE.append(Case(id, what, stage, culprit, message, build, code))
        return build

    return register


# KiTS19 case folders ---------------------------------------------------------------------------------------

@case("corrupt-gzip", "a `segmentation.nii.gz` that is not gzip (random bytes)", "preprocess",
      "{tmp}/raw/case_00001/segmentation.nii.gz",
      "cannot read the NIfTI header: corrupt or truncated gzip, or not NIfTI")
def _corrupt_gzip(tmp: Path, base: Base) -> list[str]:
    (_kits(tmp) / "case_00001" / SEG).write_bytes(np.random.default_rng(0).bytes(300))
    return _preprocess(tmp)


@case("truncated-nifti", "an `imaging.nii.gz` whose voxel data is cut short (header intact, valid gzip)",
      "preprocess", "{tmp}/raw/case_00001/imaging.nii.gz", "truncated or corrupt voxel data")
def _truncated_nifti(tmp: Path, base: Base) -> list[str]:
    path = _kits(tmp) / "case_00001" / IMG
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-300]))
    return _preprocess(tmp)


@case("truncated-gzip", "an `imaging.nii.gz` cut at two thirds (an interrupted download)", "preprocess",
      "{tmp}/raw/case_00001/imaging.nii.gz", "truncated or corrupt voxel data")
def _truncated_gzip(tmp: Path, base: Base) -> list[str]:
    raw = tmp / "raw"
    _case(raw, "case_00000")
    noise = np.random.default_rng(0).integers(-1000, 1000, (4, 16, 16)).astype(np.int16)
    path = _case(raw, "case_00001", img=noise) / IMG
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    return _preprocess(tmp)


@case("4d-volume", "a 4-D segmentation, shape (4, 16, 16, 2)", "preprocess",
      "{tmp}/raw/case_00001/segmentation.nii.gz", "expected a 3-D volume (slices, H, W), got shape (4, 16, 16, 2)")
def _four_d(tmp: Path, base: Base) -> list[str]:
    _nifti(_kits(tmp) / "case_00001" / SEG, np.zeros((4, 16, 16, 2), np.uint8))
    return _preprocess(tmp)


@case("shape-mismatch", "imaging (4, 16, 15) and segmentation (4, 16, 16) of different shapes", "preprocess",
      "{tmp}/raw/case_00001/imaging.nii.gz", "shape (4, 16, 15) does not match segmentation.nii.gz shape (4, 16, 16)")
def _shape_mismatch(tmp: Path, base: Base) -> list[str]:
    _nifti(_kits(tmp) / "case_00001" / IMG, np.zeros((4, 16, 15), np.int16))
    return _preprocess(tmp)


@case("affine-mismatch", "imaging whose affine has another slice spacing than the segmentation's", "preprocess",
      "{tmp}/raw/case_00001/imaging.nii.gz", "affine does not match segmentation.nii.gz's")
def _affine_mismatch(tmp: Path, base: Base) -> list[str]:
    _nifti(_kits(tmp) / "case_00001" / IMG, np.zeros((4, 16, 16), np.int16), spacing=(2.5, 0.8, 0.8))
    return _preprocess(tmp)


@case("nan-imaging", "float32 imaging with a NaN and an inf voxel", "preprocess",
      "{tmp}/raw/case_00001/imaging.nii.gz", "2 NaN/inf voxels (first at (slice, row, col) = (1, 2, 3))")
def _nan_imaging(tmp: Path, base: Base) -> list[str]:
    img = np.zeros((4, 16, 16), np.float32)
    img[1, 2, 3], img[2, 0, 0] = np.nan, np.inf
    _nifti(_kits(tmp) / "case_00001" / IMG, img)
    return _preprocess(tmp)


@case("inf-labels", "a float32 segmentation with an inf voxel", "preprocess",
      "{tmp}/raw/case_00001/segmentation.nii.gz", "1 NaN/inf voxels (first at (slice, row, col) = (0, 0, 0))")
def _inf_labels(tmp: Path, base: Base) -> list[str]:
    seg = _labels().astype(np.float32)
    seg[0, 0, 0] = np.inf
    _nifti(_kits(tmp) / "case_00001" / SEG, seg)
    return _preprocess(tmp)


@case("labels-outside", "labels 3 and 7 in a segmentation", "preprocess",
      "{tmp}/raw/case_00001/segmentation.nii.gz",
      "labels outside {0, 1, 2} (0 background, 1 kidney, 2 tumour): found 3, 7 in 2 voxels")
def _labels_outside(tmp: Path, base: Base) -> list[str]:
    seg = _labels()
    seg[0, 1, 2], seg[3, 0, 0] = 3, 7
    _nifti(_kits(tmp) / "case_00001" / SEG, seg)
    return _preprocess(tmp)


def _with_datatype(path: Path, code: int, bitpix: int) -> None:
    """Rewrite the header of the .nii.gz ``path`` to claim NIfTI datatype ``code`` (voxel bytes unchanged)."""
    data = bytearray(gzip.decompress(path.read_bytes()))
    struct.pack_into("<hh", data, 70, code, bitpix)  # NIfTI-1: datatype and bitpix, little-endian as nibabel writes
    path.write_bytes(gzip.compress(bytes(data)))


@case("rgb24-imaging", "an `imaging.nii.gz` of RGB24 colour voxels (NIfTI datatype 128)", "preprocess",
      "{tmp}/raw/case_00001/imaging.nii.gz", "voxel datatype RGB24 (NIfTI datatype 128) is colour (structured), "
      "not a real number: expected integer or float32/float64 voxels")
def _rgb24(tmp: Path, base: Base) -> list[str]:
    _nifti(_kits(tmp) / "case_00001" / IMG, np.zeros((4, 16, 16), [("R", "u1"), ("G", "u1"), ("B", "u1")]))
    return _preprocess(tmp)


@case("complex64-imaging", "an `imaging.nii.gz` of complex64 voxels (its imaginary part would be dropped)",
      "preprocess", "{tmp}/raw/case_00001/imaging.nii.gz",
      "voxel datatype COMPLEX64 (NIfTI datatype 32) is complex, not a real number")
def _complex64(tmp: Path, base: Base) -> list[str]:
    _nifti(_kits(tmp) / "case_00001" / IMG, np.full((4, 16, 16), 100 + 5j, np.complex64))
    return _preprocess(tmp)


@case("complex128-labels", "a `segmentation.nii.gz` of complex128 voxels", "preprocess",
      "{tmp}/raw/case_00001/segmentation.nii.gz",
      "voxel datatype COMPLEX128 (NIfTI datatype 1792) is complex, not a real number")
def _complex128(tmp: Path, base: Base) -> list[str]:
    _nifti(_kits(tmp) / "case_00001" / SEG, _labels().astype(np.complex128))
    return _preprocess(tmp)


@case("binary-datatype", "a segmentation whose header claims 1-bit binary voxels (NIfTI datatype 1)", "preprocess",
      "{tmp}/raw/case_00001/segmentation.nii.gz", "voxel datatype binary (NIfTI datatype 1) cannot be read")
def _binary(tmp: Path, base: Base) -> list[str]:
    _with_datatype(_kits(tmp) / "case_00001" / SEG, 1, 1)
    return _preprocess(tmp)


@case("float128-datatype", "an imaging header claiming float128 voxels (NIfTI datatype 1536)", "preprocess",
      "{tmp}/raw/case_00001/imaging.nii.gz", "voxel datatype FLOAT128 (NIfTI datatype 1536) cannot be read")
def _float128(tmp: Path, base: Base) -> list[str]:
    _with_datatype(_kits(tmp) / "case_00001" / IMG, 1536, 128)
    return _preprocess(tmp)


@case("unknown-datatype", "an imaging header with datatype code 9999 (not in the NIfTI standard)", "preprocess",
      "{tmp}/raw/case_00001/imaging.nii.gz", "voxel datatype unknown (NIfTI datatype 9999) cannot be read")
def _unknown_datatype(tmp: Path, base: Base) -> list[str]:
    _with_datatype(_kits(tmp) / "case_00001" / IMG, 9999, 16)
    return _preprocess(tmp)


@case("empty-case", "an empty case folder", "preprocess", "{tmp}/raw/case_00001",
      "empty case folder: expected segmentation.nii.gz and imaging.nii.gz")
def _empty_case(tmp: Path, base: Base) -> list[str]:
    raw = tmp / "raw"
    _case(raw, "case_00000")
    (raw / "case_00001").mkdir()
    return _preprocess(tmp)


@case("no-segmentation", "a case folder with `imaging.nii.gz` only", "preprocess",
      "{tmp}/raw/case_00001/segmentation.nii.gz", "file not found: every case folder needs the label volume")
def _no_segmentation(tmp: Path, base: Base) -> list[str]:
    (_kits(tmp) / "case_00001" / SEG).unlink()
    return _preprocess(tmp)


@case("no-kidney-anywhere", "no case holds kidney (every label volume is all zeros)", "preprocess", "{tmp}/raw",
      "none of the 2 cases has a slice with label(s) 1 (ingest.keep_labels): no rows to write")
def _no_kidney(tmp: Path, base: Base) -> list[str]:
    for i in range(2):
        _case(tmp / "raw", f"case_{i:05d}", seg=np.zeros((4, 16, 16), np.uint8))
    return _preprocess(tmp)


@case("absurd-dimensions", "a header claiming 100000×100000×100000 voxels over 20 bytes of data (NIfTI-2)",
      "preprocess", "{tmp}/raw/case_00001/segmentation.nii.gz",
      "absurd dimensions (100000, 100000, 100000): each axis must be between 1 and 4096")
def _absurd(tmp: Path, base: Base) -> list[str]:
    _header_only(_kits(tmp) / "case_00001" / SEG, (100_000, 100_000, 100_000))
    return _preprocess(tmp)


@case("misnamed-case", "a case folder named `case_7`", "preprocess", "{tmp}/raw/case_7",
      "bad case folder name: got 'raw/case_7': expected case_XXXXX (five digits, e.g. case_00007)")
def _misnamed(tmp: Path, base: Base) -> list[str]:
    _kits(tmp, 1)
    _case(tmp / "raw", "case_7")
    return _preprocess(tmp)


@case("one-case", "a raw folder with one case (the split would leave val empty)", "preprocess", "{tmp}/raw",
      "the val split would be empty: 1 case(s) split as train 1, val 0 case(s) with ingest.val_fraction 0.2")
def _one_case(tmp: Path, base: Base) -> list[str]:
    _kits(tmp, 1)
    return _preprocess(tmp)


@case("unicode-digit-case", "a case folder named `case_٠٠٠٠٢` (Arabic-Indic digits: case ids are ASCII)",
      "preprocess", "{tmp}/raw/case_٠٠٠٠٢", "bad case folder name: got 'raw/case_٠٠٠٠٢': expected case_XXXXX")
def _unicode_digits(tmp: Path, base: Base) -> list[str]:
    _kits(tmp, 1)
    _case(tmp / "raw", "case_\u0660\u0660\u0660\u0660\u0662")
    return _preprocess(tmp)


@case("control-chars-case", "a case folder whose name holds a newline and ANSI colour codes (shown escaped)",
      "preprocess", "{tmp}/raw/case_00001\\n\\x1b[32mOK\\x1b[0m",
      "bad case folder name: got 'raw/case_00001\\n\\x1b[32mOK\\x1b[0m'")
def _control_chars(tmp: Path, base: Base) -> list[str]:
    _kits(tmp, 1)
    _case(tmp / "raw", "case_00001\n\x1b[32mOK\x1b[0m")
    return _preprocess(tmp)


@case("raw-missing", "`--raw` names a folder that does not exist", "preprocess", "{tmp}/nowhere",
      "not a folder: expected a KiTS19 root holding case_XXXXX folders")
def _raw_missing(tmp: Path, base: Base) -> list[str]:
    return _preprocess(tmp, raw="nowhere")


@case("out-foreign-folder", "`--out` is an existing folder that is not a shards folder (kept as it was)",
      "preprocess", "{tmp}/shards", "exists and is not a shard folder (no manifest.json)")
def _out_foreign(tmp: Path, base: Base) -> list[str]:
    _kits(tmp)
    (tmp / "shards").mkdir()
    (tmp / "shards" / "notes.txt").write_text("mine")
    return _preprocess(tmp)


@case("out-under-a-file", "`--out` lies under a regular file", "preprocess", "{tmp}/notes.txt",
      "File exists: a file is in the way of a folder", code=4)
def _out_under_file(tmp: Path, base: Base) -> list[str]:
    _kits(tmp)
    (tmp / "notes.txt").write_text("mine")
    return [*COMMON, "--raw", str(tmp / "raw"), "--out", str(tmp / "notes.txt" / "shards")]


@case("previous-build-kept", "a corrupt case while `--out` holds an earlier build (kept as it was)", "preprocess",
      "{tmp}/raw/case_00001/segmentation.nii.gz", "cannot read the NIfTI header")
def _previous_kept(tmp: Path, base: Base) -> list[str]:
    shutil.copytree(base.shards, tmp / "shards")
    (_kits(tmp) / "case_00001" / SEG).write_bytes(b"\x1f\x8b" + b"\0" * 30)  # a gzip magic, then nothing valid
    return _preprocess(tmp)


# saliency folders ------------------------------------------------------------------------------------------

@case("saliency-non-image", "a `notes.txt` among the images of a saliency folder", "preprocess",
      "{tmp}/sal/images/notes.txt", "not an image file: expected one of .bmp, .jpeg, .jpg, .png; remove it from images/")
def _non_image(tmp: Path, base: Base) -> list[str]:
    (_saliency(tmp) / "images" / "notes.txt").write_text("hello")
    return _preprocess(tmp, "sal", SALIENCY)


@case("saliency-not-binary", "a mask with a grey level 90 while `ingest.require_binary_masks: true`", "preprocess",
      "{tmp}/sal/masks/a.png", "mask is not binary: found grey levels [90] besides 0 and 255")
def _not_binary(tmp: Path, base: Base) -> list[str]:
    root = _saliency(tmp)
    mask = np.zeros((12, 12), np.uint8)
    mask[3:8, 3:8], mask[8, 3:8] = 255, 90
    Image.fromarray(mask).save(root / "masks" / "a.png")
    return _preprocess(tmp, "sal", [*SALIENCY, "--set", "ingest.require_binary_masks=true"])


@case("saliency-stems", "image `b.jpg` and mask `c.png` whose stems do not match", "preprocess", "{tmp}/sal",
      "unmatched stems: 1 image(s) without a mask (b); 1 mask(s) without an image (c)")
def _stems(tmp: Path, base: Base) -> list[str]:
    root = _saliency(tmp)
    (root / "masks" / "b.png").rename(root / "masks" / "c.png")
    return _preprocess(tmp, "sal", SALIENCY)


@case("saliency-truncated-image", "a jpg cut to its first 50 bytes", "preprocess", "{tmp}/sal/images/b.jpg",
      "unreadable image")
def _truncated_image(tmp: Path, base: Base) -> list[str]:
    path = _saliency(tmp) / "images" / "b.jpg"
    path.write_bytes(path.read_bytes()[:50])
    return _preprocess(tmp, "sal", SALIENCY)


@case("saliency-colour-mask", "an RGB mask", "preprocess", "{tmp}/sal/masks/a.png",
      "mask must be single-channel grey or binary, got mode 'RGB'")
def _colour_mask(tmp: Path, base: Base) -> list[str]:
    root = _saliency(tmp)
    Image.fromarray(np.zeros((12, 12, 3), np.uint8)).save(root / "masks" / "a.png")
    return _preprocess(tmp, "sal", SALIENCY)


@case("saliency-mask-size", "a 10×12 mask for a 12×12 image", "preprocess", "{tmp}/sal/masks/b.png",
      "mask size (10, 12) (W, H) does not match its image b.jpg (12, 12)")
def _mask_size(tmp: Path, base: Base) -> list[str]:
    root = _saliency(tmp)
    Image.fromarray(np.zeros((12, 10), np.uint8)).save(root / "masks" / "b.png")
    return _preprocess(tmp, "sal", SALIENCY)


@case("saliency-unknown-colour", "an RGB mask holding a red that `ingest.mask_colors: {1: [0, 0, 255]}` does not map",
      "preprocess", "{tmp}/sal/masks/a.png",
      "colour [255, 0, 0] (25 pixels, first at (row, col) = (3, 3)) is not in ingest.mask_colors")
def _unknown_colour(tmp: Path, base: Base) -> list[str]:
    root = _saliency(tmp)
    rgb = np.zeros((12, 12, 3), np.uint8)
    rgb[3:8, 3:8] = (255, 0, 0)
    for stem in ("a", "b"):
        Image.fromarray(rgb).save(root / "masks" / f"{stem}.png")
    return _preprocess(tmp, "sal", [*SALIENCY, "--set", "ingest.mask_colors={1: [0, 0, 255]}"])


@case("group-pattern-mismatch", "an image name that `ingest.group_pattern` does not match", "preprocess",
      "{tmp}/sal/images/b.jpg", "name 'b' does not match ingest.group_pattern '(p\\\\d+)_'")
def _group_mismatch(tmp: Path, base: Base) -> list[str]:
    root = _saliency(tmp, ("p1_1", "p2_1", "b"))
    assert (root / "images" / "b.jpg").exists()
    return _preprocess(tmp, "sal", [*SALIENCY, "--set", "ingest.group_pattern=(p\\d+)_"])


@case("split-folders-mixed", "a raw folder holding `train/` beside `images/` and `masks/`", "preprocess", "{tmp}/sal",
      "holds split folders (train/) and other folders ('images', 'masks')")
def _split_mixed(tmp: Path, base: Base) -> list[str]:
    root = _saliency(tmp)
    shutil.copytree(root, tmp / "train")
    shutil.move(tmp / "train", root / "train")
    return _preprocess(tmp, "sal", SALIENCY)


# params ------------------------------------------------------------------------------------------------------

def _with_params(text: str) -> Callable[[Path, Base], list[str]]:
    def build(tmp: Path, base: Base) -> list[str]:
        (tmp / "params.yaml").write_text(text)
        return ["--params", str(PARAMS), "--params", str(tmp / "params.yaml"),
                "--shards", str(base.shards), "--out", str(tmp / "run")]

    return build


BOTH = "{committed}/params.yaml + {tmp}/params.yaml"  # a key or type error names the merged files
for _id, _what, _text, _culprit, _message in [
    ("params-unknown-key", "a params file with an unknown key (`pretrain.epoch`)", "pretrain:\n  epoch: 3\n", BOTH,
     "unknown key 'pretrain.epoch' (valid keys: augment, band_width,"),
    ("params-wrong-type", "a params file with a wrong type (`pretrain.epochs: ten`)", "pretrain:\n  epochs: ten\n",
     BOTH, "pretrain.epochs: expected int, got 'ten'"),
    ("params-bad-value", "a params file with a value out of range (`pretrain.batch_size: 0`)",
     "pretrain:\n  batch_size: 0\n", BOTH, "pretrain: argument 'batch_size' must be >= 1, got 0"),
    ("params-not-yaml", "a params file that is not YAML", "pretrain: [\n", "{tmp}/params.yaml",
     "not valid YAML at line 2"),
]:
    case(_id, _what, "pretrain", _culprit, _message)(_with_params(_text))


@case("params-missing", "`--params` names a file that does not exist", "pretrain", "{tmp}/params.yaml",
      "file not found")
def _params_missing(tmp: Path, base: Base) -> list[str]:
    return ["--params", str(tmp / "params.yaml"), "--shards", str(base.shards), "--out", str(tmp / "run")]


@case("set-unknown-key", "`--set pretrian.epochs=1` (a misspelt section)", "pretrain",
      "{committed}/params.yaml (with --set)", "unknown key 'pretrian' (valid keys: contour, data,")
def _set_unknown(tmp: Path, base: Base) -> list[str]:
    return [*COMMON, "--set", "pretrian.epochs=1", "--shards", str(base.shards), "--out", str(tmp / "run")]


@case("set-no-value", "`--set pretrain.epochs` (no `=value`)", "pretrain", "--set 'pretrain.epochs'",
      "expected key=value, e.g. refine.lr=1e-4")
def _set_no_value(tmp: Path, base: Base) -> list[str]:
    return [*COMMON, "--set", "pretrain.epochs", "--shards", str(base.shards), "--out", str(tmp / "run")]


@case("set-not-a-section", "`--set seed.value=1` (a key under a plain value)", "pretrain", "--set 'seed.value=1'",
      "'seed' is not a section")
def _set_not_section(tmp: Path, base: Base) -> list[str]:
    return [*COMMON, "--set", "seed.value=1", "--shards", str(base.shards), "--out", str(tmp / "run")]


# checkpoints -------------------------------------------------------------------------------------------------

def _refine(tmp: Path, base: Base, unet: Path) -> list[str]:
    return [*COMMON, "--shards", str(base.shards), "--unet", str(unet), "--out", str(tmp / "refine")]


@case("refine-given-contour", "`refine --unet` given a Contour Evolution checkpoint", "refine", "{tmp}/contour.pt",
      "checkpoint holds a 'contour' model, expected 'unet'")
def _refine_contour(tmp: Path, base: Base) -> list[str]:
    shutil.copy(base.contour, tmp / "contour.pt")
    return _refine(tmp, base, tmp / "contour.pt")


@case("evaluate-given-unet", "`evaluate --contour` given a UNet checkpoint", "evaluate", "{tmp}/unet.pt",
      "checkpoint holds a 'unet' model, expected 'contour'")
def _evaluate_unet(tmp: Path, base: Base) -> list[str]:
    shutil.copy(base.unet, tmp / "unet.pt")
    return [*COMMON, "--shards", str(base.shards), "--contour", str(tmp / "unet.pt"), "--out", str(tmp / "eval")]


@case("checkpoint-truncated", "a checkpoint cut in half (an interrupted copy)", "refine", "{tmp}/unet.pt",
      "not a readable checkpoint: not a torch.save archive (truncated, corrupt or another format)")
def _ckpt_truncated(tmp: Path, base: Base) -> list[str]:
    data = base.unet.read_bytes()
    (tmp / "unet.pt").write_bytes(data[: len(data) // 2])
    return _refine(tmp, base, tmp / "unet.pt")


@case("checkpoint-corrupt", "a checkpoint with a corrupted tensor record (bytes flipped inside the archive)",
      "refine", "{tmp}/unet.pt", "fails its CRC-32 check (corrupted on disk or in transfer)")
def _ckpt_corrupt(tmp: Path, base: Base) -> list[str]:
    data = bytearray(base.unet.read_bytes())
    at = data.find(b"data/0") + 6  # inside the first tensor's local file header and data
    data[at : at + 64] = bytes(64)
    (tmp / "unet.pt").write_bytes(bytes(data))
    return _refine(tmp, base, tmp / "unet.pt")


@case("checkpoint-code", "a checkpoint that pickles a call to `exec` (a malicious file)", "refine",
      "{tmp}/evil.pt", "the safe loader (weights_only=True) refuses the Python object exec in it")
def _ckpt_code(tmp: Path, base: Base) -> list[str]:
    torch.save({"format": ckpt.FORMAT, "model": _Exploit(tmp / "pwned")}, tmp / "evil.pt")
    return _refine(tmp, base, tmp / "evil.pt")  # the snapshot check proves 'pwned' was never written


@case("checkpoint-foreign", "a `torch.save` file of another program (a plain dict of tensors)", "refine",
      "{tmp}/other.pt", "not a nodeseg checkpoint (expected format 'nodeseg-checkpoint/1')")
def _ckpt_foreign(tmp: Path, base: Base) -> list[str]:
    torch.save({"weights": torch.zeros(3)}, tmp / "other.pt")
    return _refine(tmp, base, tmp / "other.pt")


@case("checkpoint-missing", "`--unet` names a file that does not exist", "refine", "{tmp}/model.pt",
      "checkpoint not found")
def _ckpt_missing(tmp: Path, base: Base) -> list[str]:
    return _refine(tmp, base, tmp / "model.pt")


@case("run-corrupt-checkpoint", "`select --run` on a run whose `epoch-0001.pt` is garbage", "select",
      "{tmp}/run/checkpoints/epoch-0001.pt", "not a readable checkpoint")
def _run_corrupt(tmp: Path, base: Base) -> list[str]:
    (tmp / "run" / "checkpoints").mkdir(parents=True)
    (tmp / "run" / "checkpoints" / "epoch-0001.pt").write_bytes(b"garbage" * 20)
    return [*COMMON, "--run", str(tmp / "run"), "--out", str(tmp / "select")]


@case("run-without-checkpoints", "`select --run` on a folder without checkpoints", "select",
      "{tmp}/run/checkpoints", "no epoch-NNNN.pt checkpoints found: run `nodeseg pretrain` first")
def _run_empty(tmp: Path, base: Base) -> list[str]:
    (tmp / "run").mkdir()
    return [*COMMON, "--run", str(tmp / "run"), "--out", str(tmp / "select")]


# shards ------------------------------------------------------------------------------------------------------

def _pretrain(tmp: Path, shards: Path) -> list[str]:
    return [*COMMON, "--shards", str(shards), "--out", str(tmp / "run")]


@case("shards-no-manifest", "`--shards` is a folder of parquet files without `manifest.json`", "pretrain",
      "{tmp}/shards/manifest.json", "manifest not found: not a shards folder; build one with `nodeseg preprocess`")
def _no_manifest(tmp: Path, base: Base) -> list[str]:
    shutil.copytree(base.shards, tmp / "shards")
    (tmp / "shards" / "manifest.json").unlink()
    return _pretrain(tmp, tmp / "shards")


@case("shards-corrupt-parquet", "a shard file that is not parquet", "pretrain",
      "{tmp}/shards/train/part-00000.parquet", "not a readable parquet shard")
def _corrupt_parquet(tmp: Path, base: Base) -> list[str]:
    shutil.copytree(base.shards, tmp / "shards")
    (tmp / "shards" / "train" / "part-00000.parquet").write_bytes(b"PAR1" + b"\0" * 100)
    return _pretrain(tmp, tmp / "shards")


@case("shards-missing-file", "a shard file listed in the manifest is gone", "pretrain",
      "{tmp}/shards/val/part-00000.parquet", "listed in manifest.json but missing: rebuild the shards")
def _missing_shard(tmp: Path, base: Base) -> list[str]:
    shutil.copytree(base.shards, tmp / "shards")
    (tmp / "shards" / "val" / "part-00000.parquet").unlink()
    return _pretrain(tmp, tmp / "shards")


@case("shards-empty-val", "shards without a val split (`ingest.single_split: train`)", "pretrain", "{tmp}/shards",
      "the val split is empty (rows: train 4): training needs train and val rows")
def _empty_val(tmp: Path, base: Base) -> list[str]:
    _kits(tmp / "src")
    assert main(["preprocess", *COMMON, "--set", "ingest.single_split=train", "--raw", str(tmp / "src" / "raw"),
                 "--out", str(tmp / "shards")]) == 0
    return _pretrain(tmp, tmp / "shards")


@case("select-samples-unrecorded", "`pretrain.select_samples: 1` below `select.samples: 8` (the val split has 2)",
      "pretrain", "pretrain.select_samples",
      "1 is below select.samples (8) on a val split of 2 samples, so `nodeseg select` would fail after training")
def _head_short(tmp: Path, base: Base) -> list[str]:
    return [*COMMON, "--set", "pretrain.select_samples=1", "--shards", str(base.shards), "--out", str(tmp / "run")]


# predict and URLs --------------------------------------------------------------------------------------------

def _predict(tmp: Path, base: Base, given: Path) -> list[str]:
    return ["--model", str(base.unet), "--input", str(given), "--output", str(tmp / "labels.nii.gz")]


@case("predict-not-nifti", "`predict --input` given a text file", "predict", "{tmp}/scan.txt",
      "expected a NIfTI volume (.nii or .nii.gz) or a folder of images")
def _predict_text(tmp: Path, base: Base) -> list[str]:
    (tmp / "scan.txt").write_text("not an image")
    return _predict(tmp, base, tmp / "scan.txt")


@case("predict-fake-nifti", "`predict --input` given a text file named `.nii.gz`", "predict", "{tmp}/scan.nii.gz",
      "cannot read the NIfTI header: corrupt or truncated gzip, or not NIfTI")
def _predict_fake(tmp: Path, base: Base) -> list[str]:
    (tmp / "scan.nii.gz").write_text("not an image")
    return _predict(tmp, base, tmp / "scan.nii.gz")


@case("predict-empty-folder", "`predict --input` given a folder without images", "predict", "{tmp}/images",
      "no images (.bmp, .jpeg, .jpg, .png) found")
def _predict_empty(tmp: Path, base: Base) -> list[str]:
    (tmp / "images").mkdir()
    (tmp / "images" / "readme.md").write_text("x")
    return _predict(tmp, base, tmp / "images")


@case("s3-malformed-url", "`--out s3:/bucket/x` (one slash: a shell or path join ate one)", "select",
      "s3:/bucket/x", "malformed S3 URL: expected s3://bucket/key (was it turned into a filesystem path?)")
def _s3_malformed(tmp: Path, base: Base) -> list[str]:
    return [*COMMON, "--run", str(tmp), "--out", "s3:/bucket/x"]


@case("s3-bad-bucket", "`--shards s3://Bad_Bucket!/x` (not a bucket name)", "pretrain", "s3://Bad_Bucket!/x",
      "malformed S3 URL: invalid bucket name 'Bad_Bucket!'")
def _s3_bucket(tmp: Path, base: Base) -> list[str]:
    return [*COMMON, "--shards", "s3://Bad_Bucket!/x", "--out", str(tmp / "run")]


# ----------------------------------------------------------------------------------------------- tests


def _snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (hidden ones included): a file's sha256, or 'dir'."""
    out = {}
    for p in sorted(root.rglob("*")):
        out[p.relative_to(root).as_posix()] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.mark.parametrize("entry", CATALOGUE, ids=[c.id for c in CATALOGUE])
def test_bad_input_gives_one_line_and_no_output(
    entry: Case, base: Base, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [entry.stage, *entry.build(tmp_path, base)]
    before = _snapshot(tmp_path)
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    prefix = f"nodeseg {entry.stage}: error: "
    lines = err.splitlines()  # also splits on the \r of a cleared progress bar
    assert code == entry.code, err
    assert "Traceback" not in err
    assert [line for line in lines if prefix in line] == lines[-1:], err
    assert lines[-1].isprintable(), lines[-1]  # no control character (ESC, CR, ...) reaches the terminal
    culprit = entry.culprit.format(tmp=tmp_path, committed=PARAMS.parent)
    assert lines[-1].startswith(f"{prefix}{culprit}: "), lines[-1]
    assert entry.message in lines[-1], lines[-1]
    assert _snapshot(tmp_path) == before  # nothing written (no partial output), a previous output untouched


def test_catalogue_is_large_and_unique() -> None:
    ids = [c.id for c in CATALOGUE]
    assert len(ids) >= 20 and len(set(ids)) == len(ids)


def test_a_case_without_kidney_is_skipped_and_recorded(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ids = [f"case_{i:05d}" for i in range(3)]
    train, _ = split_ids(ids, 0.2, seed=0)  # the committed params: val_fraction 0.2, seed 0
    for name in ids:
        _case(tmp_path / "raw", name, seg=np.zeros((4, 16, 16), np.uint8) if name == train[0] else None)
    with pytest.warns(UserWarning, match=f"{train[0]}: no slice with label\\(s\\) 1"):
        assert main(["preprocess", *_preprocess(tmp_path)]) == 0
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["items_without_rows"] == {train[0]: "no slice with label(s) 1: the case contributes no rows"}
    assert train[0] in manifest["splits"]["train"]["cases"]  # still part of the split: the split is by patient
    assert manifest["rows"] == 2 * 2  # two kidney slices in each of the two other cases


# ----------------------------------------------------------------------------------------------- docs/errors.md


def _code(text: str) -> str:
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def render_table() -> str:
    """The catalogue as the Markdown table of docs/errors.md."""
    rows = ["| id | input | command | the line starts with | and says | exit |", "|---|---|---|---|---|---|"]
    for c in CATALOGUE:
        shown = c.culprit.replace("{tmp}/", "…/").replace("{committed}/", "…/")
        rows.append(f"| {c.id} | {c.what} | `nodeseg {c.stage}` | {_code(shown)} | {_code(c.message)} | {c.code} |")
    return "\n".join(rows)


def _doc_block(text: str) -> str:
    return text.split(START, 1)[1].split(END, 1)[0].strip()


def test_docs_match_the_catalogue() -> None:
    assert all("|" not in c.message and "|" not in c.what for c in CATALOGUE)
    assert _doc_block(DOC.read_text()) == render_table(), (
        "docs/errors.md is out of date: run `python tests/test_bad_input.py` to regenerate its table"
    )


if __name__ == "__main__":  # regenerate the table in docs/errors.md
    text = DOC.read_text()
    head, rest = text.split(START, 1)
    DOC.write_text(f"{head}{START}\n{render_table()}\n{END}{rest.split(END, 1)[1]}")
    sys.exit(0)
