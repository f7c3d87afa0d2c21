"""The search space: a solver (method, atol, rtol, step size, adjoint) per trial, and the reference trial."""

from __future__ import annotations

import dataclasses
from typing import Any

import optuna

from nodeseg.solve import FIXED_STEP_METHODS, SolverConfig
from nodeseg.tuning.config import TuneConfig


def _round(value: float) -> float:
    return float(f"{value:.3g}")


def suggest_solver(trial: optuna.Trial, cfg: TuneConfig, base: SolverConfig) -> SolverConfig:
    """The trial's solver: ``base`` (``contour.solver``) with the suggested keys and ``cfg.max_nfe`` as the cap.

    Adaptive methods draw ``atol`` (log-uniform) and, when ``cfg.rtol`` is a range, ``rtol_zero`` then
    ``rtol`` (log-uniform); fixed-step methods draw ``step_size`` instead and keep ``base``'s tolerances.
    Tolerances are rounded to 3 significant digits, so that what is written into params.yaml is exactly what
    the trial ran (17-digit floats do not survive DVC's params round trip: it would see a change forever).
    """
    method = trial.suggest_categorical("method", list(cfg.methods))
    changes: dict[str, Any] = {"method": method, "max_nfe": cfg.max_nfe}
    if method in FIXED_STEP_METHODS:
        changes["step_size"] = float(trial.suggest_categorical("step_size", list(cfg.step_sizes)))
    else:
        changes["step_size"] = None
        changes["atol"] = _round(trial.suggest_float("atol", cfg.atol[0], cfg.atol[1], log=True))
        rtol = 0.0
        if cfg.rtol is not None and not trial.suggest_categorical("rtol_zero", [True, False]):
            rtol = _round(trial.suggest_float("rtol", cfg.rtol[0], cfg.rtol[1], log=True))
        changes["rtol"] = rtol
    changes["adjoint"] = bool(trial.suggest_categorical("adjoint", list(cfg.adjoint)))
    return dataclasses.replace(base, **changes)


def reference_params(cfg: TuneConfig) -> dict[str, Any] | None:
    """Trial params of the reference (dopri5 at ``cfg.reference_atol``, rtol 0, adjoint), or None."""
    if cfg.reference_atol is None:
        return None
    params: dict[str, Any] = {"method": "dopri5", "atol": cfg.reference_atol, "adjoint": True}
    if cfg.rtol is not None:
        params["rtol_zero"] = True
    return params


def tuned_keys(solver: SolverConfig) -> dict[str, Any]:
    """The ``contour.solver`` keys a study decides (what is written into the params file)."""
    return {"method": solver.method, "atol": solver.atol, "rtol": solver.rtol, "step_size": solver.step_size,
            "adjoint": solver.adjoint}
