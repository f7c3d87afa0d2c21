"""Pruning a multi-objective study: an Optuna pruner on a single-objective companion study.

Optuna's ``Trial.report`` / ``should_prune`` refuse multi-objective studies. Each trial of the study
therefore gets a twin trial in ``<study>.pruning`` (same storage, one objective: the validation accuracy,
i.e. the study's first objective), reports the accuracy after every epoch there, and asks that study's
pruner. A trial is pruned when its twin is; the twin ends with the trial (COMPLETE, PRUNED or FAIL), so
the pruner compares each trial with the finished ones at the same epoch. The pruner's decision is vetoed
while the trial is within the operating-point rule's margin of the best value at that epoch
(``within_iou``, or ``within_loss`` relative): such a trial could still be chosen, and on short trials
most accuracy differences are that small (a study on the default data pruned two trials 0.02 IoU points
behind). NFE and time are not pruned on: a cheap solver a little below the best may be on the Pareto
front, and a runaway solve already fails at the NFE cap.
"""

from __future__ import annotations

import math

import optuna
from optuna.trial import TrialState

from nodeseg.tuning.config import TuneConfig

SUFFIX = ".pruning"


class MarginPruner(optuna.pruners.BasePruner):
    """``inner``'s decision, vetoed while the trial trails the best value reported at its last step by at
    most ``margin`` (absolute, or a fraction of the best with ``relative``)."""

    def __init__(self, inner: optuna.pruners.BasePruner, margin: float, relative: bool = False) -> None:
        self.inner, self.margin, self.relative = inner, margin, relative

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        step = trial.last_step
        if step is None or not self.inner.prune(study, trial):
            return False
        others = [t.intermediate_values[step] for t in study.get_trials(deepcopy=False, states=_FINISHED)
                  if step in t.intermediate_values]
        if not others:
            return True
        value = trial.intermediate_values[step]
        if study.direction == optuna.study.StudyDirection.MAXIMIZE:
            best, gap = max(others), max(others) - value
        else:
            best, gap = min(others), value - min(others)
        return gap > (self.margin * abs(best) if self.relative else self.margin)


_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def make_pruner(cfg: TuneConfig) -> optuna.pruners.BasePruner:
    """The pruner ``cfg.pruner`` names, over epochs (``percentile``: outside the best ``prune_percentile`` %
    of the finished trials at that epoch; ``median``: the 50th percentile; ``halving``: successive halving),
    with the rule's margin as a veto (:class:`MarginPruner`)."""
    if cfg.pruner == "none":
        return optuna.pruners.NopPruner()
    inner: optuna.pruners.BasePruner
    if cfg.pruner == "halving":
        inner = optuna.pruners.SuccessiveHalvingPruner(min_resource=max(1, cfg.prune_warmup_epochs),
                                                       reduction_factor=2)
    else:  # Optuna's percentile keeps the best `percentile` %: the worst (100 - percentile) % are pruned
        keep = 50.0 if cfg.pruner == "median" else cfg.prune_percentile
        inner = optuna.pruners.PercentilePruner(keep, n_startup_trials=cfg.prune_startup_trials,
                                                n_warmup_steps=cfg.prune_warmup_epochs)
    if cfg.maximize:
        return MarginPruner(inner, cfg.within_iou)
    return MarginPruner(inner, cfg.within_loss, relative=True)


def create_pruning_study(storage: optuna.storages.BaseStorage, name: str, maximize: bool) -> optuna.Study:
    """The companion study of ``name`` (created if absent)."""
    return optuna.create_study(storage=storage, study_name=name + SUFFIX, load_if_exists=True,
                               direction="maximize" if maximize else "minimize")


class EpochPruning:
    """The twin of one trial: ``report(epoch, value)`` returns True when the trial should stop."""

    def __init__(self, study: optuna.Study, trial_number: int) -> None:
        self.study = study
        self.twin = study.ask()
        self.twin.set_user_attr("trial_number", trial_number)
        self.last: float | None = None

    @property
    def number(self) -> int:
        return self.twin.number

    def report(self, epoch: int, value: float) -> bool:
        """Record ``value`` at ``epoch`` and ask the pruner (a non-finite value always prunes)."""
        if not math.isfinite(value):
            return True
        self.last = value
        self.twin.report(value, epoch)
        return self.twin.should_prune()

    def finish(self, state: TrialState) -> None:
        """End the twin with the trial's state (COMPLETE with the last reported value)."""
        if state == TrialState.COMPLETE and self.last is not None:
            self.study.tell(self.twin, self.last)
        elif state == TrialState.COMPLETE:
            self.study.tell(self.twin, state=TrialState.FAIL)
        else:
            self.study.tell(self.twin, state=state)
