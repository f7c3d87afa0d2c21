"""`nodeseg refine`: Contour Evolution on top of the selected, frozen UNet."""

from __future__ import annotations

from pathlib import Path

from nodeseg.errors import InputError
from nodeseg.models.spec import build_from_spec, load_model, make_spec
from nodeseg.params import Params
from nodeseg.stages._training import run_training
from nodeseg.train.loop import FitResult


def refine(shards: Path, unet_checkpoint: Path, out: Path, params: Params) -> FitResult:
    """Train ``params.contour`` (φ̂ = φ(1) + ψ(γ(1)) from the UNet's φ) with ``params.refine``.

    The UNet's weights come from ``unet_checkpoint`` (the output of ``nodeseg select``) and stay frozen.
    """
    unet, payload = load_model(Path(unet_checkpoint), expect=("unet",))

    def build(channels: int):  # noqa: ANN202
        unet_spec = {k: v for k, v in payload["model_spec"].items() if k != "preprocessing"}
        if unet_spec["sizes"].get("in_channels", 1) != channels:
            raise InputError(unet_checkpoint, f"the UNet takes {unet_spec['sizes'].get('in_channels', 1)} image "
                                              f"channels, the shards hold {channels}")
        spec = make_spec("contour", params.contour, unet=unet_spec)
        model = build_from_spec(spec)
        model.unet.load_state_dict(unet.state_dict())
        return model, spec

    return run_training("refine", Path(shards), Path(out), params, params.refine, build,
                        tags={"nodeseg.unet_checkpoint": str(unet_checkpoint)})
