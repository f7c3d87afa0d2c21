"""The ``ingest`` section of params.yaml: how raw data becomes shards (read by ingest and by every reader)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from nodeseg.data.kits19 import MAX_AXIS, MAX_VOXELS
from nodeseg.data.render import PhantomConfig

__all__ = ["MASK_LABELS", "IngestConfig", "group_regex", "mask_color_table"]

MASK_LABELS = (0, 1, 2)  # the labels a colour mask may map to: 0 background, 1 kidney (object), 2 tumour


def group_regex(pattern: str) -> re.Pattern[str]:
    """The compiled ``ingest.group_pattern`` (ASCII classes: ``\\d`` is 0-9); ValueError naming the problem.

    It must hold a group: the named group ``patient`` if there is one, else the first group, is the id.
    """
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"group_pattern must be null or a non-empty regular expression, got {pattern!r}")
    try:
        regex = re.compile(pattern, re.ASCII)
    except re.error as err:
        raise ValueError(f"group_pattern {pattern!r} is not a regular expression ({err})") from None
    if regex.groups < 1:
        raise ValueError(f"group_pattern {pattern!r} has no group: put the patient id in (...) or (?P<patient>...),"
                         " e.g. '(.+)_\\d+' for PATIENT_SLICE names")
    return regex


def mask_color_table(colors: Mapping[Any, Any]) -> dict[int, tuple[int, int, int]]:
    """``ingest.mask_colors`` checked: label (0, 1, 2; digits as text too, as a KFP dict sends them) ->
    (r, g, b) in 0..255, one colour per label and one label per colour."""
    if not isinstance(colors, Mapping):
        raise ValueError(f"mask_colors must be a mapping label -> [r, g, b], got {colors!r}")
    out: dict[int, tuple[int, int, int]] = {}
    for key, rgb in colors.items():
        label = int(key) if isinstance(key, str) and key.isascii() and key.isdigit() else key
        if isinstance(label, bool) or label not in MASK_LABELS:
            raise ValueError(f"mask_colors: label {key!r} must be one of 0 (background), 1 (kidney), 2 (tumour)")
        if not (isinstance(rgb, (list, tuple)) and len(rgb) == 3
                and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in rgb)):
            raise ValueError(f"mask_colors: the colour of label {label} must be [r, g, b] with integers in 0..255, "
                             f"got {rgb!r}")
        if label in out:
            raise ValueError(f"mask_colors: label {label} is given twice")
        out[label] = (int(rgb[0]), int(rgb[1]), int(rgb[2]))
    colours = list(out.values())
    if len(set(colours)) != len(colours):
        twice = next(c for c in colours if colours.count(c) > 1)
        raise ValueError(f"mask_colors: colour {list(twice)} is given to two labels")
    return out


@dataclass(frozen=True)
class IngestConfig:
    """Ingestion parameters (the ``ingest`` section of params.yaml)."""

    size: int = 200  # KiTS19 slices are resized to size × size
    hu_window: tuple[float, float] = (-79.0, 304.0)  # nnU-Net's KiTS19 foreground 0.5 / 99.5 percentiles
    normalisation: Literal["minmax", "zscore"] = "minmax"  # minmax: window → [0, 1]
    zscore_stats: tuple[float, float] = (101.0, 76.9)  # (mean, std) HU for zscore
    foreground_labels: tuple[int, ...] = (1, 2)  # target: kidney ∪ tumour
    keep_labels: tuple[int, ...] = (1,)  # a slice is kept if it holds any of these labels
    val_fraction: float = 0.2
    single_split: Literal["train", "val", "test"] | None = None  # put everything in this split instead
    clip: float = 32.0  # φ clipped to ±clip pixels
    pseudo_ct: bool = False  # synthesise imaging from the labels where imaging.nii.gz is absent
    phantom: PhantomConfig = PhantomConfig()  # appearance of the pseudo-CT
    shard_rows: int = 1000  # rows per parquet file
    row_group_mb: float = 4.0  # row groups of about this many MiB (a random read decodes one)
    saliency_threshold: float = 0.5  # soft ground truth: foreground where value > threshold
    saliency_crop: int = 512  # canvas side for saliency images (zero padded, valid = 0 there)
    saliency_oversize: Literal["shrink", "crop"] = "shrink"  # images larger than the canvas
    require_binary_masks: bool = False
    image_dir: str | None = None  # saliency image folder name (auto-detected when None)
    mask_dir: str | None = None
    group_pattern: str | None = None  # regex on an image's stem: group 1 (or (?P<patient>...)) is its patient
    mask_colors: dict[int, tuple[int, int, int]] = field(default_factory=dict)  # label -> [r, g, b] of RGB masks
    max_axis: int = MAX_AXIS  # refuse volumes beyond these, from the header
    max_voxels: int = MAX_VOXELS

    def __post_init__(self) -> None:
        def bad(name: str, expected: str) -> ValueError:
            return ValueError(f"{name} must be {expected}, got {getattr(self, name)!r}")

        if not (isinstance(self.size, int) and 8 <= self.size <= 4096):
            raise bad("size", "an integer in [8, 4096]")
        lo, hi = self.hu_window
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise bad("hu_window", "(low, high) HU with low < high")
        if self.normalisation not in ("minmax", "zscore"):
            raise bad("normalisation", "one of 'minmax', 'zscore'")
        if not (math.isfinite(self.zscore_stats[0]) and math.isfinite(self.zscore_stats[1]) and self.zscore_stats[1] > 0):
            raise bad("zscore_stats", "(mean, std) with std > 0")
        for name in ("foreground_labels", "keep_labels"):
            labels = getattr(self, name)
            if not (labels and len(set(labels)) == len(labels) and all(v in (1, 2) for v in labels)):
                raise bad(name, "a non-empty list of distinct labels from 1 (kidney), 2 (tumour)")
        if not (0.0 <= self.val_fraction < 1.0):
            raise bad("val_fraction", "in [0, 1)")
        if self.single_split not in (None, "train", "val", "test"):
            raise bad("single_split", "null or one of 'train', 'val', 'test'")
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise bad("clip", "a positive number")
        if not isinstance(self.phantom, PhantomConfig):
            raise bad("phantom", "a PhantomConfig")
        if not (isinstance(self.shard_rows, int) and self.shard_rows >= 1):
            raise bad("shard_rows", "a positive integer")
        if not (math.isfinite(self.row_group_mb) and 0 < self.row_group_mb <= 1024):
            raise bad("row_group_mb", "in (0, 1024]")
        if not (0.0 <= self.saliency_threshold < 1.0):
            raise bad("saliency_threshold", "in [0, 1)")
        if not (isinstance(self.saliency_crop, int) and 8 <= self.saliency_crop <= 4096):
            raise bad("saliency_crop", "an integer in [8, 4096]")
        if self.saliency_oversize not in ("shrink", "crop"):
            raise bad("saliency_oversize", "one of 'shrink', 'crop'")
        if self.group_pattern is not None:
            group_regex(self.group_pattern)
        object.__setattr__(self, "mask_colors", mask_color_table(self.mask_colors))
        if not (isinstance(self.max_axis, int) and self.max_axis >= 1):
            raise bad("max_axis", "a positive integer")
        if not (isinstance(self.max_voxels, int) and self.max_voxels >= 1):
            raise bad("max_voxels", "a positive integer")
