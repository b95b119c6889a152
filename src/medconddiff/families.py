"""The model families by name: the one place that knows both implementations."""

from __future__ import annotations

from .config import ModelConfig
from .latent import LatentSegDiff
from .model import MedCondDiff
from .model_interface import DiffusionSegmentationModel

FAMILIES: dict[str, type[DiffusionSegmentationModel]] = {"pixel": MedCondDiff, "latent": LatentSegDiff}


def build_model(config: ModelConfig, in_channels: int = 1) -> DiffusionSegmentationModel:
    """The network a ModelConfig describes for ``in_channels`` input channels, with random (or local
    pretrained backbone) weights."""
    return FAMILIES[config.family](config, in_channels=in_channels)
