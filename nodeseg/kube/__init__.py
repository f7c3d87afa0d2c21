"""Kubernetes side of nodeseg: build a PyTorchJob for a DDP stage and run it to completion.

``job`` builds the job with the kubeflow-training SDK models; ``pytorchjob`` is its CLI (render, or launch: what
the pipeline's launcher component calls, ``python -m nodeseg.kube.pytorchjob launch ...``); ``validate`` checks a job
against the SDK models and the training operator's env wiring; ``launcher`` submits it, follows its
conditions and cleans up. Needs the ``kube`` extra (kubernetes, kubeflow-training).
"""

from __future__ import annotations

import importlib
from typing import Any

# Imported lazily so that `python -m nodeseg.kube.pytorchjob` does not import its own module twice.
_EXPORTS = {
    "DDP_STAGES": "nodeseg.kube.job",
    "build_pytorchjob": "nodeseg.kube.job",
    "check_roundtrip": "nodeseg.kube.validate",
    "check_wiring": "nodeseg.kube.validate",
    "JobOutcome": "nodeseg.kube.launcher",
    "LaunchError": "nodeseg.kube.launcher",
    "launch": "nodeseg.kube.launcher",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'nodeseg.kube' has no attribute {name!r}")
