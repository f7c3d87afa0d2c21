"""The ``tune`` section of params.yaml: search space, trial budget, pruning and the operating-point rule."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from nodeseg.errors import check_arg
from nodeseg.solve import FIXED_STEP_METHODS, METHODS

Objective = Literal["iou", "loss"]
PrunerName = Literal["percentile", "median", "halving", "none"]


def _log_range(value: tuple[float, float] | None) -> bool:
    return value is not None and len(value) == 2 and all(math.isfinite(v) and v > 0 for v in value) \
        and value[0] <= value[1]


@dataclass(frozen=True)
class TuneConfig:
    """A multi-objective study: accuracy (``objective``) against NFE per training step, seconds per step and
    the peak memory a trial's training adds (``nodeseg.tuning.memory``).

    Each trial refines the selected UNet for ``epochs`` x ``max_batches_per_epoch`` steps with the
    ``refine`` settings and a solver drawn from the space below (the other solver keys come from
    ``contour.solver``; the per-pass cap is ``max_nfe``). ``rtol`` null keeps rtol at 0; a range makes it
    "0 or log-uniform in the range". ``reference_atol`` enqueues dopri5 at that atol (rtol 0, adjoint) as
    the first trial, the baseline of the report's ratios; null leaves it out. Fixed-step methods draw a
    ``step_size`` from ``step_sizes`` or a number of ``steps`` (one of the two lists is empty);
    ``inference_methods`` adds "infer with k steps" to the space, the regulariser ranges refine's weights.
    """

    n_trials: int = 24
    objective: Objective = "iou"
    methods: tuple[str, ...] = ("dopri5", "bosh3", "adaptive_heun", "rk4")
    atol: tuple[float, float] = (1e-6, 1e-2)
    rtol: tuple[float, float] | None = (1e-6, 1e-2)
    step_sizes: tuple[float, ...] = (0.125, 0.25, 0.5)
    steps: tuple[int, ...] = ()  # fixed-step methods: a number of equal steps (instead of step_sizes)
    adjoint: tuple[bool, ...] = (True, False)
    # the inference solver (validation, then evaluate/predict): the training one, or one of these fixed-step
    # methods with a number of steps from ``steps``
    inference_methods: tuple[str, ...] = ()
    # refine's regulariser weights: 0 or log-uniform in the range; null: always 0
    kinetic_energy: tuple[float, float] | None = None
    jacobian_frobenius: tuple[float, float] | None = None
    max_peak_memory_mb: float | None = None  # the rule's memory budget per trial (peak growth); null: none
    reference_atol: float | None = 1e-5
    epochs: int = 2
    max_batches_per_epoch: int = 8
    max_nfe: int = 600
    pruner: PrunerName = "percentile"  # on the validation accuracy per epoch, vetoed within the rule's margin
    prune_percentile: float = 75.0  # percentile: a trial goes on while in the best 75 % at that epoch
    prune_startup_trials: int = 4
    prune_warmup_epochs: int = 0
    within_iou: float = 0.005  # objective iou: the chosen point is within this of the best IoU (0.005 = 0.5 points)
    within_loss: float = 0.05  # objective loss: within this fraction of the best validation loss
    heartbeat_s: int = 60  # a worker's trial beats this often; silent for twice as long, it is taken for dead
    retries: int = 1  # times a trial whose worker died or was stopped is run again (resuming its checkpoints)

    def __post_init__(self) -> None:
        check_arg(self.n_trials >= 1, "n_trials", self.n_trials, ">= 1")
        check_arg(self.objective in ("iou", "loss"), "objective", self.objective, "'iou' or 'loss'")
        check_arg(self.pruner in ("percentile", "median", "halving", "none"), "pruner", self.pruner,
                  "one of 'percentile', 'median', 'halving', 'none'")
        check_arg(len(self.methods) > 0 and all(m in METHODS for m in self.methods)
                  and len(set(self.methods)) == len(self.methods),
                  "methods", self.methods, f"a non-empty list of distinct methods from {', '.join(METHODS)}")
        check_arg(_log_range(self.atol), "atol", self.atol, "[low, high] with 0 < low <= high")
        check_arg(self.rtol is None or _log_range(self.rtol), "rtol", self.rtol,
                  "null (rtol = 0) or [low, high] with 0 < low <= high")
        if any(m in FIXED_STEP_METHODS for m in self.methods) and not self.steps:
            check_arg(len(self.step_sizes) > 0 and all(0 < s <= 1 for s in self.step_sizes), "step_sizes",
                      self.step_sizes, f"a non-empty list of numbers in (0, 1] for {', '.join(FIXED_STEP_METHODS)}"
                                       " (or give steps)")
        check_arg(not (self.steps and self.step_sizes), "steps", self.steps,
                  f"[] when step_sizes is given ({list(self.step_sizes)}): fixed-step methods draw one of the two")
        check_arg(all(isinstance(k, int) and k >= 1 for k in self.steps), "steps", self.steps,
                  "a list of ints >= 1")
        check_arg(all(m in FIXED_STEP_METHODS for m in self.inference_methods)
                  and len(set(self.inference_methods)) == len(self.inference_methods), "inference_methods",
                  self.inference_methods, f"a list of distinct methods from {', '.join(FIXED_STEP_METHODS)}")
        check_arg(not self.inference_methods or self.steps, "inference_methods", self.inference_methods,
                  "[] unless steps is given (the inference solver's number of steps is drawn from it)")
        for name in ("kinetic_energy", "jacobian_frobenius"):
            check_arg(getattr(self, name) is None or _log_range(getattr(self, name)), name, getattr(self, name),
                      "null (weight 0) or [low, high] with 0 < low <= high")
        check_arg(self.max_peak_memory_mb is None or self.max_peak_memory_mb > 0, "max_peak_memory_mb",
                  self.max_peak_memory_mb, "null or a number > 0 (MB)")
        check_arg(len(self.adjoint) > 0 and len(set(self.adjoint)) == len(self.adjoint), "adjoint",
                  self.adjoint, "[true], [false] or [true, false]")
        if self.reference_atol is not None:
            check_arg("dopri5" in self.methods and True in self.adjoint
                      and self.atol[0] <= self.reference_atol <= self.atol[1], "reference_atol",
                      self.reference_atol, f"null, or an atol in {list(self.atol)} with dopri5 in methods and "
                                           "true in adjoint (the reference trial is dopri5, rtol 0, adjoint)")
        check_arg(self.epochs >= 1, "epochs", self.epochs, ">= 1")
        check_arg(self.max_batches_per_epoch >= 0, "max_batches_per_epoch", self.max_batches_per_epoch,
                  ">= 0 (0: the whole training set)")
        check_arg(self.max_nfe >= 1, "max_nfe", self.max_nfe, ">= 1")
        check_arg(0 < self.prune_percentile < 100, "prune_percentile", self.prune_percentile, "in (0, 100)")
        check_arg(self.prune_startup_trials >= 0, "prune_startup_trials", self.prune_startup_trials, ">= 0")
        check_arg(self.prune_warmup_epochs >= 0, "prune_warmup_epochs", self.prune_warmup_epochs, ">= 0")
        check_arg(self.within_iou >= 0, "within_iou", self.within_iou, ">= 0")
        check_arg(self.within_loss >= 0, "within_loss", self.within_loss, ">= 0")
        check_arg(self.heartbeat_s >= 1, "heartbeat_s", self.heartbeat_s, ">= 1 (seconds)")
        check_arg(self.retries >= 0, "retries", self.retries, ">= 0")

    @property
    def maximize(self) -> bool:
        """True when the accuracy objective is maximised (IoU), False when minimised (loss)."""
        return self.objective == "iou"

    @property
    def metric_names(self) -> list[str]:
        """Names of the four objectives, in order."""
        return [f"val_{self.objective}", "nfe_per_step", "seconds_per_step", "peak_memory_mb"]
