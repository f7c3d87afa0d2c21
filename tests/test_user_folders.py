"""A user's own image folders: patient groups by regex, explicit train/val/test folders, colour label maps."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from nodeseg.config import from_mapping
from nodeseg.data.ingest import IngestConfig, assign_splits, build_shards, group_items, split_ids
from nodeseg.data.readers import READERS, get_reader
from nodeseg.data.saliency import load_label_mask
from nodeseg.data.shards import read_records, shard_files
from nodeseg.errors import ConfigError, InputError

CFG = IngestConfig(saliency_crop=16, val_fraction=0.3)
BLUE, RED, GREEN = (0, 0, 255), (255, 0, 0), (0, 255, 0)


def _images(root: Path, stems: list[str], mask: np.ndarray | None = None) -> Path:
    """``root/{images,masks}``: an 8×8 RGB image and a mask (a 3×3 square unless ``mask`` is given) per stem."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(len(stems))
    square = np.zeros((8, 8), np.uint8)
    square[2:5, 2:5] = 255
    for s in stems:
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / "images" / f"{s}.png")
        Image.fromarray(square if mask is None else mask).save(root / "masks" / f"{s}.png")
    return root


# -------------------------------------------------------------------------------------------- patient groups

patients = st.lists(st.text("abcXYZ019-_", min_size=1, max_size=6), min_size=1, max_size=12, unique=True)


@settings(max_examples=200, deadline=None)
@given(patients=patients, slices=st.lists(st.integers(1, 4), min_size=12, max_size=12),
       val_fraction=st.sampled_from([0.1, 0.2, 0.5, 0.8]), seed=st.integers(0, 2**16),
       named=st.booleans())
def test_every_patient_lands_in_one_split(patients: list[str], slices: list[int], val_fraction: float, seed: int,
                                          named: bool) -> None:
    """Names PATIENT_SLICE (patient ids holding '_' and digits too): the regex's group is the patient, the
    patients are split as split_ids splits them, and all of a patient's slices follow it."""
    names = {f"{p}_{k:03d}": p for p, n in zip(patients, slices, strict=False) for k in range(n)}
    pattern = r"(?P<patient>.+)_\d+$" if named else r"(.+)_\d+$"
    groups = group_items(sorted(names), pattern)
    assert groups == names  # the greedy group takes everything before the last _digits
    cfg = dataclasses.replace(CFG, val_fraction=val_fraction, group_pattern=pattern)
    splits = assign_splits(groups, cfg, seed)
    assert sorted(splits["train"] + splits["val"]) == sorted(names)
    split_of_patient: dict[str, set[str]] = {}
    for split, members in splits.items():
        for item in members:
            split_of_patient.setdefault(names[item], set()).add(split)
    assert all(len(s) == 1 for s in split_of_patient.values())  # no patient in two splits
    train_p, val_p = split_ids(patients, val_fraction, seed)
    assert {names[i] for i in splits["val"]} == set(val_p) and {names[i] for i in splits["train"]} == set(train_p)


def test_without_a_pattern_each_image_is_its_own_group() -> None:
    ids = ["p1_001", "p1_002", "p2_001", "p3_001", "p3_002"]
    assert group_items(ids, None) == {i: i for i in ids}
    assert assign_splits(group_items(ids, None), CFG, 0) == dict(zip(("train", "val"), split_ids(ids, 0.3, 0),
                                                                       strict=True))


def test_group_pattern_is_checked() -> None:
    with pytest.raises(ValueError, match="has no group"):
        IngestConfig(group_pattern=r"\d+")
    with pytest.raises(ValueError, match="is not a regular expression"):
        IngestConfig(group_pattern="(")
    with pytest.raises(ConfigError, match="group_pattern"):
        from_mapping(IngestConfig, {"group_pattern": ""}, source="params.yaml")
    # ASCII classes: an Arabic-Indic digit is not a \d
    with pytest.raises(InputError, match=re.escape("name 'p1_\u0661' does not match ingest.group_pattern")):
        group_items(["p1_001", "p1_\u0661"], r"(.+)_\d+$")


def test_grouped_folder_end_to_end(tmp_path: Path) -> None:
    stems = [f"pat{p}_{k:02d}" for p in range(5) for k in range(3)]
    root = _images(tmp_path / "slices", stems)
    cfg = dataclasses.replace(CFG, group_pattern=r"(pat\d+)_")
    manifest = build_shards("saliency", root, tmp_path / "s", cfg, seed=0, workers=1)
    train, val = (set(manifest["splits"][n]["cases"]) for n in ("train", "val"))
    assert {s[:4] for s in train}.isdisjoint({s[:4] for s in val}) and len(train | val) == 15
    assert (manifest["splits"]["train"]["groups"], manifest["splits"]["val"]["groups"]) == (3, 2)  # round(5 × 0.3)
    assert "ingest.group_pattern '(pat\\\\d+)_'" in manifest["split_rule"]
    rows = {r.case_id for n in ("train", "val") for r in read_records(shard_files(tmp_path / "s", n))}
    assert rows == set(stems)
    (root / "images" / "other.png").write_bytes((root / "images" / "pat0_00.png").read_bytes())
    (root / "masks" / "other.png").write_bytes((root / "masks" / "pat0_00.png").read_bytes())
    with pytest.raises(InputError, match=re.escape("name 'other' does not match ingest.group_pattern "
                                                     f"{cfg.group_pattern!r}")) as err:
        build_shards("saliency", root, tmp_path / "s2", cfg, seed=0, workers=1)
    assert err.value.path.endswith("images/other.png") and not (tmp_path / "s2").exists()


# -------------------------------------------------------------------------------------- explicit split folders


def test_train_val_test_folders_are_the_split(tmp_path: Path) -> None:
    root = tmp_path / "duts"
    _images(root / "train", ["a", "b", "c"])
    _images(root / "Val", ["d"])  # any case
    _images(root / "test", ["e", "f"])
    manifest = build_shards("saliency", root, tmp_path / "s", CFG, seed=0, workers=1)
    assert {n: s["cases"] for n, s in manifest["splits"].items()} == {"train": ["a", "b", "c"], "val": ["d"],
                                                                      "test": ["e", "f"]}
    assert manifest["split_rule"] == "explicit split folders train/, Val/, test/"
    assert [r.case_id for r in read_records(shard_files(tmp_path / "s", "test"))] == ["e", "f"]
    # the folders win over val_fraction and the seed
    again = build_shards("saliency", root, tmp_path / "s2", dataclasses.replace(CFG, val_fraction=0.9), 7, 1)
    assert again["splits"]["val"]["cases"] == ["d"]


def test_train_and_test_folders_draw_val_from_train(tmp_path: Path) -> None:
    """DUTS-TR + DUTS-TE: no val/ folder, so val comes from train/ by patient; test/ stays test."""
    root = tmp_path / "duts"
    train_stems = [f"p{p}_{k}" for p in range(4) for k in range(2)]
    _images(root / "train", train_stems)
    _images(root / "test", ["p8_1", "p9_1"])
    cfg = dataclasses.replace(CFG, group_pattern=r"(p\d)_", val_fraction=0.25)
    manifest = build_shards("saliency", root, tmp_path / "s", cfg, seed=0, workers=1)
    splits = {n: s["cases"] for n, s in manifest["splits"].items()}
    assert splits["test"] == ["p8_1", "p9_1"]
    assert sorted(splits["train"] + splits["val"]) == sorted(train_stems)
    _, val_patients = split_ids([f"p{p}" for p in range(4)], 0.25, 0)
    assert splits["val"] == sorted(s for s in train_stems if s[:2] in val_patients) and len(val_patients) == 1


def test_split_folders_refuse_what_they_cannot_mean(tmp_path: Path) -> None:
    both = tmp_path / "both"
    _images(both / "train", ["p1_1", "p2_1"])
    _images(both / "val", ["p1_2"])
    cfg = dataclasses.replace(CFG, group_pattern=r"(p\d)_")
    with pytest.raises(InputError, match=re.escape(f"patient 'p1' (ingest.group_pattern {cfg.group_pattern!r}) is in "
                                                   "val/ and in train/")):
        build_shards("saliency", both, tmp_path / "s", cfg, 0, 1)
    mixed = tmp_path / "mixed"
    _images(mixed / "train", ["a", "b"])
    _images(mixed / "extra", ["c"])
    with pytest.raises(InputError, match=r"holds split folders \(train/\) and other folders \('extra'\)"):
        build_shards("saliency", mixed, tmp_path / "s", CFG, 0, 1)
    twice = tmp_path / "twice"
    _images(twice / "train", ["a", "b"])
    _images(twice / "val", ["a"])
    with pytest.raises(InputError, match="image 'a' is also in train/: ids must be unique across the split folders"):
        build_shards("saliency", twice, tmp_path / "s", CFG, 0, 1)
    no_train = tmp_path / "no_train"
    _images(no_train / "val", ["a"])
    with pytest.raises(InputError, match=r"split folders val/ without a train/ folder"):
        build_shards("saliency", no_train, tmp_path / "s", CFG, 0, 1)
    assert not (tmp_path / "s").exists()


def test_one_image_or_no_val_fraction_is_refused_before_reading(tmp_path: Path) -> None:
    root = _images(tmp_path / "one", ["only"])
    (root / "masks" / "only.png").write_bytes(b"not read")  # refused before any item is read
    with pytest.raises(InputError, match=(r"the val split would be empty: 1 image\(s\) split as train 1, val 0 "
                                          r"image\(s\) with ingest.val_fraction 0.3")):
        build_shards("saliency", root, tmp_path / "s", CFG, 0, 1)
    two = _images(tmp_path / "two", ["a", "b"])
    with pytest.raises(InputError, match="the val split would be empty: 2 image"):
        build_shards("saliency", two, tmp_path / "s", dataclasses.replace(CFG, val_fraction=0.0), 0, 1)
    assert not (tmp_path / "s").exists()
    single = build_shards("saliency", two, tmp_path / "s", dataclasses.replace(CFG, single_split="test"), 0, 1)
    assert single["splits"]["test"]["cases"] == ["a", "b"]


# ------------------------------------------------------------------------------------------ colour label maps


def _colour_mask() -> np.ndarray:
    """8×8 RGB: black background, a blue kidney (rows 1-5, cols 1-5) holding a red tumour (rows 2-3, cols 2-3)."""
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[1:6, 1:6] = BLUE
    rgb[2:4, 2:4] = RED
    return rgb


def test_colour_masks_become_labels_then_the_target(tmp_path: Path) -> None:
    rgb = _colour_mask()
    Image.fromarray(rgb).save(tmp_path / "m.png")
    colours = {1: BLUE, 2: RED}
    labels = load_label_mask(tmp_path / "m.png", colours)
    expected = np.zeros((8, 8), np.uint8)
    expected[1:6, 1:6] = 1
    expected[2:4, 2:4] = 2
    assert np.array_equal(labels, expected)
    Image.fromarray(rgb).convert("P").save(tmp_path / "p.png")  # a palette PNG of the same colours
    Image.fromarray(np.dstack([rgb, np.full((8, 8), 255, np.uint8)])).save(tmp_path / "a.png")  # RGBA
    assert np.array_equal(load_label_mask(tmp_path / "p.png", colours), expected)
    assert np.array_equal(load_label_mask(tmp_path / "a.png", colours), expected)
    root = _images(tmp_path / "ds", ["x", "y", "z"], mask=rgb)
    for fg, want in (((1, 2), expected > 0), ((2,), expected == 2), ((1,), expected == 1)):
        cfg = dataclasses.replace(CFG, mask_colors={1: BLUE, 2: RED}, foreground_labels=fg, single_split="train",
                                  saliency_crop=8)
        build_shards("saliency", root, tmp_path / f"s{fg}", cfg, 0, 1)
        masks = [r.mask for r in read_records(shard_files(tmp_path / f"s{fg}", "train"))]
        assert len(masks) == 3 and all(np.array_equal(m, want.astype(np.uint8)) for m in masks), fg


def test_a_colour_outside_the_map_names_the_file_and_colour(tmp_path: Path) -> None:
    rgb = _colour_mask()
    rgb[7, 6] = GREEN
    rgb[7, 7] = GREEN
    root = _images(tmp_path / "ds", ["x", "y"], mask=rgb)
    cfg = dataclasses.replace(CFG, mask_colors={1: BLUE, 2: RED})
    with pytest.raises(InputError) as err:
        build_shards("saliency", root, tmp_path / "s", cfg, 0, 1)
    assert err.value.path.endswith("masks/x.png")
    assert err.value.problem.startswith("colour [0, 255, 0] (2 pixels, first at (row, col) = (7, 6)) is not in "
                                        "ingest.mask_colors (0: [0, 0, 0], 1: [0, 0, 255], 2: [255, 0, 0])")
    assert not (tmp_path / "s").exists()
    # without the map an RGB mask is refused as before, and the message points to the map
    with pytest.raises(InputError, match="got mode 'RGB'"):
        build_shards("saliency", root, tmp_path / "s", CFG, 0, 1)


def test_mask_colors_are_checked_and_take_text_labels() -> None:
    cfg = from_mapping(IngestConfig, {"mask_colors": {"1": [0, 0, 255], 2: [255, 0, 0]}})  # KFP sends text keys
    assert cfg.mask_colors == {1: BLUE, 2: RED}
    for bad, message in (({3: [1, 2, 3]}, "label 3 must be one of 0"), ({1: [0, 0, 256]}, "integers in 0..255"),
                         ({1: [0, 0]}, "must be \\[r, g, b\\]"), ({1: BLUE, 2: BLUE}, "given to two labels")):
        with pytest.raises(ValueError, match=message):
            IngestConfig(mask_colors=bad)


# ------------------------------------------------------------------------------------------------- registry


def test_every_source_has_one_reader_module(tmp_path: Path) -> None:
    assert set(READERS) == {"kits19", "saliency"}
    for name, cls in READERS.items():
        reader = get_reader(name)
        assert reader.name == name and cls.__module__ == f"nodeseg.data.readers.{name}"
    with pytest.raises(ValueError, match=re.escape("data source must be one of 'kits19', 'saliency', got 'nifti'")):
        get_reader("nifti")
    assert get_reader("saliency").accepts(tmp_path) and not get_reader("kits19").accepts(tmp_path)
    assert get_reader("kits19").accepts(tmp_path / "scan.nii.gz")
    assert get_reader("saliency").input_side({"saliency_crop": 48, "size": 64}) == 48
    assert get_reader("kits19").input_side({"saliency_crop": 48, "size": 64}) == 64
