"""`nodeseg image-evolve`: Image Evolution, h(0) = λ(I), dh/dt = fθ(h, t), φ̂ = ψ(h(1))."""

from __future__ import annotations

from pathlib import Path

from nodeseg.models.spec import build_from_spec, make_spec
from nodeseg.params import Params
from nodeseg.stages._training import run_training
from nodeseg.train.loop import FitResult


def image_evolve(shards: Path, out: Path, params: Params) -> FitResult:
    """Train ``params.image`` with ``params.image_evolve``; ``out/model.pt`` is the best epoch."""

    def build(channels: int):  # noqa: ANN202
        spec = make_spec("image", params.image, in_channels=channels)
        return build_from_spec(spec), spec

    return run_training("image_evolve", Path(shards), Path(out), params, params.image_evolve, build)
