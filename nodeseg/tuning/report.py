"""The study's report: every trial as CSV and Markdown, the Pareto front as PNG (matplotlib) and HTML (plotly)."""

from __future__ import annotations

import csv
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from nodeseg.tuning.config import TuneConfig

log = logging.getLogger(__name__)


def trial_row(t: FrozenTrial, cfg: TuneConfig, pareto: set[int], chosen: int | None) -> dict[str, Any]:
    """One trial as a flat record: the solver, the objectives, the raw NFE counts and what happened."""
    a = t.user_attrs
    solver = a.get("solver") or {}
    values = list(t.values) if t.state == TrialState.COMPLETE and t.values else []
    values += [None] * (4 - len(values))
    inference = a.get("inference_solver")
    weights = a.get("regularisers") or {}
    note = ""
    if t.state == TrialState.FAIL:
        note = a.get("fail_reason", "failed (no reason recorded)")
    elif t.state == TrialState.PRUNED:
        note = f"pruned after epoch {a.get('pruned_at_epoch', '?')}"
    fixed = solver.get("step_size") is not None or solver.get("steps") is not None
    return {
        "trial": t.number,
        "state": t.state.name,
        "method": solver.get("method", t.params.get("method")),
        "atol": None if fixed else solver.get("atol"),
        "rtol": None if fixed else solver.get("rtol"),
        "step_size": solver.get("step_size"),
        "steps": solver.get("steps"),
        "adjoint": solver.get("adjoint"),
        "inference": "" if not inference else f"{inference['method']} × {inference['steps']}",
        "kinetic_energy": weights.get("kinetic_energy"),
        "jacobian_frobenius": weights.get("jacobian_frobenius"),
        cfg.metric_names[0]: values[0],
        "nfe_per_step": values[1],
        "seconds_per_step": values[2],
        "peak_memory_mb": values[3],
        "peak_memory_kind": a.get("peak_memory_kind"),
        "nfe_forward": a.get("nfe_forward"),
        "nfe_backward": a.get("nfe_backward"),
        "val_nfe": a.get("val_nfe"),
        "reference": bool(a.get("reference", False)),
        "pareto": t.number in pareto,
        "chosen": t.number == chosen,
        "note": note,
        "mlflow_run_id": a.get("mlflow_run_id"),
    }


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "\\|")


def write_tables(rows: Sequence[dict[str, Any]], out: Path) -> tuple[Path, Path]:
    """``trials.csv`` (every column) and ``trials.md`` (the readable columns, the note cut to 100 characters)."""
    csv_path, md_path = out / "trials.csv", out / "trials.md"
    with csv_path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["trial"])
        writer.writeheader()
        writer.writerows(rows)
    cols = [c for c in (rows[0] if rows else {}) if c not in ("mlflow_run_id", "val_nfe", "nfe_forward",
                                                               "nfe_backward")]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r[c])[:100] for c in cols) + " |")
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def plot_png(study: optuna.Study, cfg: TuneConfig, chosen: FrozenTrial | None, path: Path) -> Path:
    """Accuracy against NFE per step with Optuna's matplotlib Pareto plot; the chosen trial starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        ax = optuna.visualization.matplotlib.plot_pareto_front(
            study, targets=lambda t: (t.values[1], t.values[0]),
            target_names=["NFE per training step", cfg.metric_names[0]])
    if chosen is not None:
        ax.scatter([chosen.values[1]], [chosen.values[0]], marker="*", s=260, c="red", zorder=5,
                   label=f"chosen: trial {chosen.number}")
        ax.legend(loc="best", fontsize=8)
    ax.set_title(f"{study.study_name}: Pareto front over ({', '.join(cfg.metric_names)})", fontsize=9)
    fig = ax.figure
    fig.set_size_inches(7, 5)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_html(study: optuna.Study, cfg: TuneConfig, path: Path) -> Path | None:
    """Optuna's interactive Pareto front over accuracy, NFE and peak memory (needs plotly; skipped with a
    warning)."""
    try:
        import plotly  # noqa: F401
    except ImportError:
        log.warning("plotly is not installed: %s not written (pip install plotly)", path.name)
        return None
    # plotly draws at most 3 axes: accuracy, NFE per step and peak memory (seconds are in the tables)
    fig = optuna.visualization.plot_pareto_front(
        study, targets=lambda t: (t.values[1], t.values[3], t.values[0]),
        target_names=["nfe_per_step", "peak_memory_mb", cfg.metric_names[0]])
    fig.write_html(str(path), include_plotlyjs=True)
    return path
