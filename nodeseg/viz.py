"""Figures like the paper's: contours at intermediate ODE times (Fig. 1, and as a strip comparing models, e.g.
with and without priors), predicted vs true contours (Fig. 3)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from nodeseg.atomic import atomic_file
from nodeseg.levelset import zero_contours  # noqa: E402

_COLOURS = {"ground truth": "#00c853", "unet": "#ffab00", "contour": "#2962ff", "image": "#d50000"}


def _save(fig: plt.Figure, path: Path) -> Path:
    """Save a figure atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def _draw(ax: plt.Axes, phi: np.ndarray, colour: str, label: str | None, width: float = 1.4) -> None:
    for i, c in enumerate(zero_contours(np.asarray(phi, dtype=np.float64))):
        ax.plot(c[:, 1], c[:, 0], color=colour, linewidth=width, label=label if i == 0 else None)


def plot_evolution(
    image: np.ndarray, phis: Sequence[np.ndarray], times: Sequence[float], path: Path,
    gt_phi: np.ndarray | None = None, title: str = "Contour evolution",
) -> Path:
    """Fig. 1: the zero level set of φ̂(t) at each time in ``times`` over the image (dark to light = early to late)."""
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.imshow(image, cmap="gray")
    cmap = plt.get_cmap("plasma")
    n = max(len(phis) - 1, 1)
    for k, (phi, t) in enumerate(zip(phis, times, strict=True)):
        _draw(ax, phi, cmap(0.1 + 0.8 * k / n), f"t = {t:.2f}")
    if gt_phi is not None:
        _draw(ax, gt_phi, _COLOURS["ground truth"], "ground truth", width=1.0)
    ax.set_title(title)
    ax.axis("off")
    ax.legend(loc="lower right", fontsize=6, framealpha=0.7)
    return _save(fig, path)


def plot_evolution_strip(
    image: np.ndarray, rows: Mapping[str, Sequence[np.ndarray]], times: Sequence[float], path: Path,
    gt_phi: np.ndarray | None = None, title: str = "Contour evolution over the ODE time",
) -> Path:
    """Fig. 1 as a strip: one row per model (e.g. "no prior", "curvature"), one panel per time in ``times``,
    each the zero level set of that model's φ̂(t) over the image (and the ground truth)."""
    names = list(rows)
    for name in names:
        if len(rows[name]) != len(times):
            raise ValueError(f"argument 'rows' ({name!r}: {len(rows[name])} maps) must hold one map per time "
                             f"({len(times)})")
    fig, axes = plt.subplots(len(names), len(times), figsize=(2.2 * len(times), 2.3 * len(names)), squeeze=False)
    for r, name in enumerate(names):
        for c, (phi, t) in enumerate(zip(rows[name], times, strict=True)):
            ax = axes[r, c]
            ax.imshow(image, cmap="gray")
            if gt_phi is not None:
                _draw(ax, gt_phi, _COLOURS["ground truth"], None, width=0.8)
            _draw(ax, phi, _COLOURS["contour"], None)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"t = {t:.2f}", fontsize=8)
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def plot_predictions(
    images: Sequence[np.ndarray], gt_phis: Sequence[np.ndarray],
    predictions: Mapping[str, Sequence[np.ndarray]], path: Path, titles: Sequence[str] | None = None,
) -> Path:
    """Fig. 3: ground-truth and each model's predicted contour over the image, one panel per sample."""
    n = len(images)
    cols = min(n, 4)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        ax.imshow(images[i], cmap="gray")
        _draw(ax, gt_phis[i], _COLOURS["ground truth"], "ground truth")
        for name, phis in predictions.items():
            _draw(ax, phis[i], _COLOURS.get(name, "#aa00ff"), name)
        if titles is not None:
            ax.set_title(titles[i], fontsize=8)
    legend: dict[str, object] = {}
    for ax in axes.flat:  # a panel may lack a model's contour (empty prediction): gather labels from all
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    if legend:
        fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=len(legend), fontsize=8)
    return _save(fig, path)
