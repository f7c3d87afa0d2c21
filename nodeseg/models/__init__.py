"""Segmentation models: UNet, the Neural-ODE evolutions, NodeStack, and the registry that builds them."""

from nodeseg.models.evolution import ContourEvolution, ImageEvolution, NodeStack
from nodeseg.models.presets import PRESETS, UNET_PRESETS
from nodeseg.models.registry import KINDS, build_model, count_parameters
from nodeseg.models.unet import UNet

__all__ = [
    "KINDS",
    "PRESETS",
    "UNET_PRESETS",
    "ContourEvolution",
    "ImageEvolution",
    "NodeStack",
    "UNet",
    "build_model",
    "count_parameters",
]
