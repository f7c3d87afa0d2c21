"""The search space: a solver (method, atol, rtol, step size or steps, adjoint), an inference solver and
refine's regulariser weights per trial, and the reference trial."""

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
    changes: dict[str, Any] = {"method": method, "max_nfe": cfg.max_nfe, "steps": None, "step_size": None}
    if method in FIXED_STEP_METHODS and cfg.steps:
        changes["steps"] = int(trial.suggest_categorical("steps", list(cfg.steps)))
    elif method in FIXED_STEP_METHODS:
        changes["step_size"] = float(trial.suggest_categorical("step_size", list(cfg.step_sizes)))
    else:
        changes["atol"] = _round(trial.suggest_float("atol", cfg.atol[0], cfg.atol[1], log=True))
        rtol = 0.0
        if cfg.rtol is not None and not trial.suggest_categorical("rtol_zero", [True, False]):
            rtol = _round(trial.suggest_float("rtol", cfg.rtol[0], cfg.rtol[1], log=True))
        changes["rtol"] = rtol
    changes["adjoint"] = bool(trial.suggest_categorical("adjoint", list(cfg.adjoint)))
    return dataclasses.replace(base, **changes)


def suggest_inference(trial: optuna.Trial, cfg: TuneConfig, solver: SolverConfig) -> SolverConfig | None:
    """The trial's inference solver: None (the training solver) or a fixed-step method of ``cfg.inference_methods``
    with ``inference_steps`` from ``cfg.steps`` (the training solver's caps and adjoint setting)."""
    if not cfg.inference_methods:
        return None
    method = trial.suggest_categorical("inference", ["train", *cfg.inference_methods])
    if method == "train":
        return None
    steps = int(trial.suggest_categorical("inference_steps", list(cfg.steps)))
    return dataclasses.replace(solver, method=method, steps=steps, step_size=None)


def suggest_regularisers(trial: optuna.Trial, cfg: TuneConfig) -> dict[str, float]:
    """refine's regulariser weights: for each range in ``cfg``, ``<name>_zero`` then the weight (log-uniform,
    3 significant digits); a name without a range keeps weight 0."""
    weights: dict[str, float] = {}
    for name in ("kinetic_energy", "jacobian_frobenius"):
        span = getattr(cfg, name)
        weight = 0.0
        if span is not None and not trial.suggest_categorical(f"{name}_zero", [True, False]):
            weight = _round(trial.suggest_float(name, span[0], span[1], log=True))
        weights[name] = weight
    return weights


def reference_params(cfg: TuneConfig) -> dict[str, Any] | None:
    """Trial params of the reference (dopri5 at ``cfg.reference_atol``, rtol 0, adjoint), or None."""
    if cfg.reference_atol is None:
        return None
    params: dict[str, Any] = {"method": "dopri5", "atol": cfg.reference_atol, "adjoint": True}
    if cfg.rtol is not None:
        params["rtol_zero"] = True
    if cfg.inference_methods:
        params["inference"] = "train"
    for name in ("kinetic_energy", "jacobian_frobenius"):
        if getattr(cfg, name) is not None:
            params[f"{name}_zero"] = True
    return params


def tuned_keys(solver: SolverConfig) -> dict[str, Any]:
    """The ``contour.solver`` keys a study decides (what is written into the params file)."""
    return {"method": solver.method, "atol": solver.atol, "rtol": solver.rtol, "step_size": solver.step_size,
            "steps": solver.steps, "adjoint": solver.adjoint}

