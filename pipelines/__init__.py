"""Kubeflow pipelines of nodeseg, each with its compiled YAML beside it.

``training`` (preprocess → pretrain → select → refine, image-evolve → evaluate → register) and ``tuning``
(the solver-tolerance study). ``python -m pipelines.<name> compile | submit | local``.
"""
