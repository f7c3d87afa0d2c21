"""Optuna tolerance studies: solver error tolerance against NFE cost (``nodeseg tune``).

``config`` (the ``tune`` params section, no Optuna import), ``space`` (the search space), ``storage``
(RDB URLs and journal files), ``pruning`` (a pruner for a multi-objective study), ``choose`` (the
operating-point rule and writing it into params.yaml), ``report`` (the Pareto table and plots).
The stage itself (trials through ``fit``, workers, phases) is ``nodeseg.stages.tune``.
"""

DEFAULT_STUDY = "nodeseg-tune"  # the study name when --study-name is not given (CLI, stage, pipelines)
