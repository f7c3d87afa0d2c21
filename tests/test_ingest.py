"""build_shards end to end: phantom and saliency sources, patient split, streaming, atomic output."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import warnings
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from nodeseg.config import from_mapping, to_mapping
from nodeseg.data.ingest import IngestConfig, _init_worker, build_shards, resolve_workers, split_ids
from nodeseg.data.kits19 import IMAGING, SEGMENTATION, kept_slices, list_cases, open_case
from nodeseg.data.shards import SliceDataset, read_manifest, read_records, shard_files
from nodeseg.data.synthetic import PhantomConfig, kits_affine, write_phantom_cases
from nodeseg.errors import ConfigError, InputError
from nodeseg.levelset import signed_distance

PHANTOM = PhantomConfig(n_cases=3, n_slices=44, shape=(64, 64), spacing=(3.0, 6.25, 6.25))
SMALL = IngestConfig(size=32, val_fraction=0.34)

PAPER_TRAIN, PAPER_VAL = 7108, 1786


@pytest.fixture(scope="module")
def phantom_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("phantoms")
    write_phantom_cases(root, PHANTOM, seed=0)
    return root


def _kept_per_case(root: Path, keep: tuple[int, ...] = (1,)) -> dict[str, int]:
    return {f.name: int(kept_slices(open_case(f).load_segmentation(), keep).size) for f in list_cases(root)}


def test_config_validation_and_loader() -> None:
    with pytest.raises(ValueError, match=r"val_fraction must be in \[0, 1\), got 1.0"):
        IngestConfig(val_fraction=1.0)
    with pytest.raises(ValueError, match=r"keep_labels must be a non-empty list .* got \(3,\)"):
        IngestConfig(keep_labels=(3,))
    with pytest.raises(ValueError, match="hu_window"):
        IngestConfig(hu_window=(300.0, -79.0))
    cfg = from_mapping(IngestConfig, {"size": 64, "hu_window": [-100, 300], "keep_labels": [1, 2],
                                      "single_split": "test", "phantom": {"noise_hu": 10}})
    assert cfg.hu_window == (-100.0, 300.0) and cfg.keep_labels == (1, 2) and cfg.phantom.noise_hu == 10.0
    assert from_mapping(IngestConfig, to_mapping(cfg)) == cfg  # the manifest's params load back
    with pytest.raises(ConfigError, match="normalisation: expected one of 'minmax', 'zscore'"):
        from_mapping(IngestConfig, {"normalisation": "robust"})


def test_split_ids_deterministic_disjoint_and_sized() -> None:
    ids = [f"case_{i:05d}" for i in range(210)]
    train, val = split_ids(ids, 0.2, seed=0)
    assert (len(train), len(val)) == (168, 42)
    assert not set(train) & set(val) and sorted(train + val) == ids
    assert split_ids(list(reversed(ids)), 0.2, seed=0) == (train, val)  # input order does not matter
    assert split_ids(ids, 0.2, seed=1) != (train, val)
    assert split_ids(["a", "b"], 0.01, seed=0)[1] != []  # at least one in val when asked for any
    assert split_ids(["a", "b"], 0.0, seed=0) == (["a", "b"], [])
    with pytest.raises(ValueError, match="ids"):
        split_ids(["a", "a"], 0.5, seed=0)


def test_resolve_workers() -> None:
    assert resolve_workers(3) == 3 and resolve_workers(0) >= 1
    with pytest.raises(ValueError, match="workers"):
        resolve_workers(-1)


def test_kits_phantoms_end_to_end(phantom_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    manifest = build_shards("kits19", phantom_root, out, SMALL, seed=0, workers=1)
    assert manifest == read_manifest(out)
    kept = _kept_per_case(phantom_root)
    splits = manifest["splits"]
    assert sorted(splits) == ["train", "val"]
    assert (splits["train"]["items"], splits["val"]["items"]) == (2, 1)
    assert not set(splits["train"]["cases"]) & set(splits["val"]["cases"])
    for name, split in splits.items():
        assert split["rows"] == sum(kept[c] for c in split["cases"])
        rows = list(read_records(shard_files(out, name)))
        assert {r.case_id for r in rows} == set(split["cases"])  # patients never straddle splits
        for r in rows:
            assert r.image.shape == (1, 32, 32) and 0.0 <= r.image.min() and r.image.max() <= 1.0
            assert r.source == "kits19" and r.valid.all()
            assert np.array_equal(r.phi, signed_distance(r.mask, clip=SMALL.clip))
            assert r.spacing == pytest.approx((6.25 * 64 / 32, 6.25 * 64 / 32))
        assert [(r.case_id, r.slice_index) for r in rows] == sorted((r.case_id, r.slice_index) for r in rows)
    assert manifest["params"]["size"] == 32 and manifest["source"] == "kits19"
    assert manifest["rows"] == sum(kept.values())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shards"]  # no temporary build folder left
    ds = SliceDataset(out, "val")
    assert len(ds) == splits["val"]["rows"] and ds[0]["image"].shape == (1, 32, 32)


def test_keep_rule_kidney_or_tumour_keeps_at_least_as_many(phantom_root: Path, tmp_path: Path) -> None:
    cfg = dataclasses.replace(SMALL, keep_labels=(1, 2), single_split="train")
    manifest = build_shards("kits19", phantom_root, tmp_path / "s", cfg, seed=0, workers=1)
    assert manifest["rows"] == sum(_kept_per_case(phantom_root, (1, 2)).values())
    assert manifest["rows"] >= sum(_kept_per_case(phantom_root, (1,)).values())
    assert list(manifest["splits"]) == ["train"]


def test_small_shard_rows_give_several_files_and_workers_do_not_change_output(
    phantom_root: Path, tmp_path: Path
) -> None:
    cfg = dataclasses.replace(SMALL, shard_rows=10, row_group_mb=0.01)
    serial = build_shards("kits19", phantom_root, tmp_path / "a", cfg, seed=0, workers=1)
    parallel = build_shards("kits19", phantom_root, tmp_path / "b", cfg, seed=0, workers=2)
    assert len(serial["splits"]["train"]["files"]) >= 3
    assert serial["splits"] == parallel["splits"]
    for split in ("train", "val"):
        for name in serial["splits"][split]["files"]:
            assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def _copy_cases(src: Path, dst: Path, names: list[str]) -> Path:
    for n in names:
        (dst / n).mkdir(parents=True)
        for f in (src / n).iterdir():
            (dst / n / f.name).write_bytes(f.read_bytes())
    return dst


def test_failure_leaves_no_partial_output_and_keeps_old_build(phantom_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    build_shards("kits19", phantom_root, out, SMALL, seed=0, workers=1)
    before = (out / "manifest.json").read_text()
    root = _copy_cases(phantom_root, tmp_path / "raw", ["case_00000", "case_00001", "case_00002"])
    (root / "case_00002" / SEGMENTATION).write_bytes(b"corrupt")
    with pytest.raises(InputError, match="corrupt or truncated gzip") as err:
        build_shards("kits19", root, out, SMALL, seed=0, workers=1)
    assert err.value.path.endswith("case_00002/segmentation.nii.gz")
    assert (out / "manifest.json").read_text() == before  # the previous build is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw", "shards"]
    with pytest.raises(InputError, match="case_00002/segmentation.nii.gz"):
        build_shards("kits19", root, tmp_path / "new", SMALL, seed=0, workers=2)  # error crosses processes
    assert not (tmp_path / "new").exists()


def test_refuses_to_replace_a_foreign_folder(phantom_root: Path, tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="not a shard folder"):
        build_shards("kits19", phantom_root, tmp_path / "mine", SMALL, seed=0, workers=1)
    assert (tmp_path / "mine" / "notes.txt").exists()


def test_case_without_kidney_contributes_no_rows(phantom_root: Path, tmp_path: Path) -> None:
    names = ["case_00000", "case_00001", "case_00002"]
    train, val = split_ids(names, SMALL.val_fraction, seed=0)
    good = [train[0], val[0]]
    root = _copy_cases(phantom_root, tmp_path / "raw", good)
    empty = root / train[1]
    empty.mkdir()
    affine = kits_affine(PHANTOM.spacing)
    nib.save(nib.Nifti1Image(np.zeros((5, 64, 64), np.uint8), affine), empty / SEGMENTATION)
    nib.save(nib.Nifti1Image(np.zeros((5, 64, 64), np.int16), affine), empty / IMAGING)
    with pytest.warns(UserWarning, match=f"{train[1]}: no slice with label\\(s\\) 1"):
        manifest = build_shards("kits19", root, tmp_path / "s", SMALL, seed=0, workers=1)
    assert list(manifest["items_without_rows"]) == [train[1]]
    kept = _kept_per_case(phantom_root)
    assert manifest["rows"] == kept[good[0]] + kept[good[1]]
    assert manifest["splits"]["train"]["cases"] == train  # the empty case still belongs to its patient's split
    # when the cases without rows are all of a split, that split would be empty: refused, nothing written
    shutil.rmtree(root / train[0])
    train2, _ = split_ids([train[1], val[0]], SMALL.val_fraction, seed=0)
    lost = "train" if train2 == [train[1]] else "val"
    with pytest.warns(UserWarning), pytest.raises(InputError, match=(
            f"every case of the {lost} split \\(1: {train[1]}\\) lacks a slice with label\\(s\\) 1 "
            rf"\(ingest.keep_labels\): the {lost} split would be empty \(rows: train \d+, val \d+\)")):
        build_shards("kits19", root, tmp_path / "s2", SMALL, seed=0, workers=1)
    assert not (tmp_path / "s2").exists()


def test_labels_only_folder_needs_pseudo_ct(phantom_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "labels"
    (root / "case_00000").mkdir(parents=True)
    (root / "case_00000" / SEGMENTATION).write_bytes((phantom_root / "case_00000" / SEGMENTATION).read_bytes())
    with pytest.raises(InputError, match="set pseudo_ct"):  # one case: one split (two would leave val empty)
        build_shards("kits19", root, tmp_path / "s", dataclasses.replace(SMALL, single_split="train"), 0, 1)
    cfg = dataclasses.replace(SMALL, pseudo_ct=True, single_split="train")
    manifest = build_shards("kits19", root, tmp_path / "s", cfg, seed=0, workers=1)
    rows = list(read_records(shard_files(tmp_path / "s", "train")))
    assert manifest["rows"] == len(rows) == _kept_per_case(phantom_root)["case_00000"]
    assert {r.source for r in rows} == {"kits19-pseudo-ct"}
    again = build_shards("kits19", root, tmp_path / "s2", cfg, seed=0, workers=1)
    rows2 = list(read_records(shard_files(tmp_path / "s2", "train")))
    assert again["rows"] == manifest["rows"]
    assert all(np.array_equal(a.image, b.image) for a, b in zip(rows, rows2, strict=True))  # seeded pseudo-CT


def _saliency_root(root: Path, sizes: dict[str, tuple[int, int]]) -> Path:
    rng = np.random.default_rng(0)
    (root / "Imgs").mkdir(parents=True)
    (root / "GT").mkdir()
    for stem, (h, w) in sizes.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "Imgs" / f"{stem}.jpg")
        m = np.zeros((h, w), np.uint8)
        m[h // 4 : h // 2, w // 4 : w // 2] = 255
        m[h // 2 : h // 2 + 2, w // 4 : w // 2] = 90  # soft edge
        Image.fromarray(m).save(root / "GT" / f"{stem}.png")
    return root


def test_saliency_end_to_end(tmp_path: Path) -> None:
    root = _saliency_root(tmp_path / "ecssd", {"a": (40, 50), "b": (30, 20), "c": (80, 100), "d": (64, 64)})
    cfg = IngestConfig(saliency_crop=64, saliency_threshold=0.5, single_split="test")
    manifest = build_shards("saliency", root, tmp_path / "s", cfg, seed=0, workers=1)
    assert manifest["splits"]["test"]["cases"] == ["a", "b", "c", "d"] and manifest["rows"] == 4
    rows = {r.case_id: r for r in read_records(shard_files(tmp_path / "s", "test"))}
    a = rows["a"]
    assert a.image.shape == (3, 64, 64) and a.source == "saliency:ecssd"
    assert a.valid[:40, :50].all() and a.valid.sum() == 40 * 50
    assert a.image[:, a.valid == 0].max() == 0 and a.mask[a.valid == 0].max() == 0
    assert a.mask.sum() == 10 * 13  # the grey rows (90/255 < 0.5) are background
    assert np.array_equal(a.phi < 0, a.mask.astype(bool))
    c = rows["c"]  # larger than the canvas: shrunk by 0.64, aspect kept
    assert c.valid.sum() == round(80 * 0.64) * 64 and c.spacing == pytest.approx((1 / 0.64, 1 / 0.64))
    low = build_shards("saliency", root, tmp_path / "s0", dataclasses.replace(cfg, saliency_threshold=0.0), 0, 1)
    assert low["rows"] == 4
    a0 = next(r for r in read_records(shard_files(tmp_path / "s0", "test")) if r.case_id == "a")
    assert a0.mask.sum() == 12 * 13  # threshold 0: the soft edge counts as foreground
    split = build_shards("saliency", root, tmp_path / "s1", IngestConfig(saliency_crop=64, val_fraction=0.25), 0, 1)
    assert (split["splits"]["train"]["rows"], split["splits"]["val"]["rows"]) == (3, 1)


def test_saliency_mask_size_mismatch_and_binary(tmp_path: Path) -> None:
    root = _saliency_root(tmp_path / "d", {"a": (40, 50)})
    cfg = IngestConfig(saliency_crop=64, require_binary_masks=True, single_split="test")
    with pytest.raises(InputError, match="mask is not binary") as err:
        build_shards("saliency", root, tmp_path / "s", cfg, seed=0, workers=1)
    assert err.value.path.endswith("a.png")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(root / "GT" / "a.png")
    with pytest.raises(InputError, match=r"mask size \(10, 10\) \(W, H\) does not match its image a.jpg \(50, 40\)"):
        build_shards("saliency", root, tmp_path / "s", dataclasses.replace(cfg, require_binary_masks=False), 0, 1)
    assert not (tmp_path / "s").exists()


# --------------------------------------------------------------------------------------------------------
# the real KiTS19 labels (skipped where absent)


@pytest.mark.realdata
def test_real_kits19_slice_counts_and_patient_split(kits19_labels_dir: Path) -> None:
    """Kidney-slice counts of the 210 real label volumes under both keep rules, and the 168/42 split."""
    counts: dict[tuple[int, ...], dict[str, int]] = {(1,): {}, (1, 2): {}}
    cases = list_cases(kits19_labels_dir)
    assert len(cases) == 210
    for folder in cases:
        seg = open_case(folder, require_imaging=False).load_segmentation()
        for rule in counts:
            counts[rule][folder.name] = int(kept_slices(seg, rule).size)
    train, val = split_ids([f.name for f in cases], IngestConfig().val_fraction, seed=0)
    assert (len(train), len(val)) == (168, 42) and not set(train) & set(val)
    kidney = counts[(1,)]
    n_train, n_val = sum(kidney[c] for c in train), sum(kidney[c] for c in val)
    # default rule (label 1 present): 8943 slices, 0.55 % above the paper's 8894
    assert (n_train, n_val) == (7147, 1796)
    assert abs(n_train + n_val - (PAPER_TRAIN + PAPER_VAL)) / (PAPER_TRAIN + PAPER_VAL) < 0.01
    assert abs(n_val - PAPER_VAL) / PAPER_VAL < 0.01
    # the alternative (kidney or tumour present) lands 4.3 % above
    assert sum(counts[(1, 2)].values()) == 9279


@pytest.mark.realdata
def test_real_kits19_pseudo_ct_shards_on_three_cases(kits19_labels_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "kits19"
    root.mkdir()
    for name in ("case_00000", "case_00001", "case_00002"):
        (root / name).symlink_to(kits19_labels_dir / name, target_is_directory=True)
    cfg = IngestConfig(pseudo_ct=True, size=64, val_fraction=0.34)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        manifest = build_shards("kits19", root, tmp_path / "s", cfg, seed=0, workers=1)
    kept = {f.name: int(kept_slices(open_case(f, require_imaging=False).load_segmentation()).size)
            for f in list_cases(root)}
    assert manifest["rows"] == sum(kept.values())
    assert not list(kits19_labels_dir.joinpath("case_00000").glob(IMAGING))  # nothing written to the source
    ds = SliceDataset(tmp_path / "s", "train")
    item = ds[len(ds) // 2]
    assert item["image"].shape == (1, 64, 64) and (item["mask"] > 0).any()
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["source"] == "kits19"
    # stored spacing: the real 0.78 mm pixels scaled by H / 64
    h = open_case(root / "case_00000", require_imaging=False).shape[1]
    assert item["spacing"][0].item() == pytest.approx(0.781625 * h / 64, rel=1e-4) or item["case_id"] != "case_00000"


def test_pool_workers_limit_blas_and_openmp_to_one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pool uses every core, so each worker must run one thread: numpy's BLAS is loaded before the
    initializer runs, so only threadpoolctl can limit it (two BLAS threads per worker made the pseudo-CT
    pool slower than one process). The tests' OMP_NUM_THREADS=1 is removed so the worker sees what a
    user's shell gives it."""
    from threadpoolctl import threadpool_info

    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    with ProcessPoolExecutor(1, mp_context=get_context("spawn"), initializer=_init_worker) as ex:
        pools = ex.submit(threadpool_info).result()
    assert pools, "no BLAS/OpenMP pool found in the worker"
    assert {p["internal_api"]: p["num_threads"] for p in pools} == {p["internal_api"]: 1 for p in pools}


def test_an_ingest_worker_never_loads_torch(phantom_root: Path) -> None:
    """Ingest workers import the ingest module and run one case: neither needs torch (a second of every
    worker's start), so neither may load it — the writer lives in shardio and levelset's numpy functions
    never import it."""
    case = sorted(phantom_root.iterdir())[0]
    code = ("import sys\n"
            "from nodeseg.data.ingest import IngestConfig, _init_worker\n"
            "from nodeseg.data.readers.kits19 import read_case\n"
            "_init_worker()\n"
            f"r = read_case({str(case)!r}, IngestConfig(size=32), 0)\n"
            "assert r.records, 'no rows'\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout[:300]


def test_cli_refuses_one_case_that_leaves_val_empty(phantom_root: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 21 item 4: one case cannot be split into train and val; refused before anything is written."""
    from nodeseg.cli import main

    raw = _copy_cases(phantom_root, tmp_path / "raw", ["case_00000"])
    params = tmp_path / "params.yaml"
    params.write_text((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    out = tmp_path / "shards"
    code = main(["preprocess", "--params", str(params), "--raw", str(raw), "--out", str(out),
                 "--set", "data.workers=1"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert lines[-1].startswith("nodeseg preprocess: error: ") and str(raw) in lines[-1]
    assert "the val split would be empty: 1 case(s) split as train 1, val 0" in lines[-1]
    assert not out.exists() and not list(tmp_path.glob("shards.tmp-*"))
