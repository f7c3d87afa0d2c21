"""`nodeseg pretrain`: the UNet regresses the signed distance map φ."""

from __future__ import annotations

from pathlib import Path

from nodeseg.models.spec import build_from_spec, make_spec
from nodeseg.params import Params
from nodeseg.stages._training import run_training
from nodeseg.train.loop import FitResult


def pretrain(shards: Path, out: Path, params: Params) -> FitResult:
    """Train ``params.unet`` with ``params.pretrain`` on ``shards``; a checkpoint per epoch in ``out/checkpoints``.

    The checkpoint to keep is chosen afterwards by ``nodeseg select``.
    """

    def build(channels: int):  # noqa: ANN202
        spec = make_spec("unet", params.unet, in_channels=channels)
        return build_from_spec(spec), spec

    # select reads the first select.samples validation losses of each checkpoint: refuse now what it would refuse
    return run_training("pretrain", Path(shards), Path(out), params, params.pretrain, build, export_best=False,
                        select_samples=params.select.samples)
