"""Diffusion segmentation models behind one interface the sampler, trainer and Segmenter use.

Every model family implements:

* ``encode_condition(image) -> condition``: everything computed from the image alone, once per
  slice (backbone + adapter), then reused by every denoising step;
* ``denoise(x_t, t, condition) -> (x0_state, probabilities)``: the x̂_0 the scheduler consumes, and
  the class probabilities a user sees for that step;
* ``state_shape(batch, height, width)``: the shape of the diffusion state;
* ``mask_to_state(labels)``: the clean x_0 of a label map, for training.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import FeatureBackbone
from .config import ModelConfig
from .denoiser import ConditionalUNet, FeatureAdapter
from .losses import hybrid_loss
from .schedulers import NoiseSchedule


def expand_channels(channels: Sequence[int], stages: int) -> tuple[int, ...]:
    channels = tuple(channels)
    if len(channels) == 1:
        return channels * stages
    if len(channels) != stages:
        raise ValueError(f"denoiser_channels has {len(channels)} entries but the backbone has {stages} stages; "
                         "give one number per stage or a single number")
    return channels


def one_hot_state(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Label map (B, H, W) → the K-channel diffusion state in [-1, 1] (B, K, H, W)."""
    return F.one_hot(labels.long(), num_classes).permute(0, 3, 1, 2).float() * 2 - 1


class MedCondDiff(nn.Module):
    """Pixel-space MedCondDiff: PVT features added into a UNet that denoises a one-hot mask."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.backbone = FeatureBackbone(config.backbone, in_chans=1, weights=config.backbone_weights)
        stages = len(self.backbone.channels)
        widths = expand_channels(config.denoiser_channels, stages)
        self.adapter = FeatureAdapter(self.backbone.channels, widths)
        self.denoiser = ConditionalUNet(
            in_channels=config.num_classes, out_channels=config.num_classes, stage_channels=widths,
            stage_reductions=self.backbone.reductions, stem_channels=config.stem_channels,
            embed_dim=config.time_embed_dim, fusion=config.fusion)

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def encode_condition(self, image: torch.Tensor) -> list[torch.Tensor]:
        return self.adapter(self.backbone(image))

    def denoise_logits(self, x_t: torch.Tensor, timesteps: torch.Tensor, condition: Sequence[torch.Tensor]
                       ) -> torch.Tensor:
        return self.denoiser(x_t, timesteps, condition)

    def denoise(self, x_t: torch.Tensor, timesteps: torch.Tensor, condition: Sequence[torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        probabilities = self.denoise_logits(x_t, timesteps, condition).float().softmax(dim=1)
        return probabilities * 2 - 1, probabilities

    def state_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        return (batch, self.num_classes, height, width)

    def mask_to_state(self, labels: torch.Tensor) -> torch.Tensor:
        return one_hot_state(labels, self.num_classes)

    def forward(self, x_t: torch.Tensor, timesteps: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """Training forward: x̂_0 logits for a batch of noisy masks and their images."""
        return self.denoise_logits(x_t, timesteps, self.encode_condition(image))

    def training_loss(self, image: torch.Tensor, labels: torch.Tensor, schedule: NoiseSchedule,
                      generator: torch.Generator | None = None, dice_weight: float = 1.0, ce_weight: float = 1.0
                      ) -> dict[str, torch.Tensor]:
        """Noise the one-hot mask at a random timestep, predict x̂_0, score it with Dice + CE."""
        x0 = self.mask_to_state(labels)
        timesteps = torch.randint(0, schedule.num_train_timesteps, (x0.shape[0],), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        x_t = schedule.add_noise(x0, noise.to(x0.device), timesteps.to(x0.device))
        logits = self(x_t, timesteps.to(x0.device), image)
        return hybrid_loss(logits, labels, dice_weight, ce_weight)

    def parameter_counts(self) -> dict[str, int]:
        def count(module: nn.Module) -> int:
            return sum(p.numel() for p in module.parameters())

        return {"backbone": count(self.backbone), "adapter": count(self.adapter),
                "denoiser": count(self.denoiser), "total": count(self)}


def build_model(config: ModelConfig) -> nn.Module:
    """The network a ModelConfig describes, with random (or local pretrained backbone) weights."""
    if config.family == "pixel":
        return MedCondDiff(config)
    from .latent import LatentSegDiff  # LSegDiff lives in its own module

    return LatentSegDiff(config)
