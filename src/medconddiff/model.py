"""MedCondDiff in pixel space: backbone features added into a UNet that denoises a one-hot mask.

Implements :class:`~medconddiff.model_interface.DiffusionSegmentationModel`; see there for the
interface the Segmenter and the trainer use.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .backbone import FeatureBackbone
from .config import ModelConfig
from .denoiser import ConditionalUNet, FeatureAdapter
from .losses import fill_ignored, hybrid_loss
from .model_interface import DiffusionSegmentationModel, expand_channels, one_hot_state
from .schedulers import NoiseSchedule
from .xt_dropout import drop_noised_state


class MedCondDiff(DiffusionSegmentationModel):
    """Pixel-space MedCondDiff: multi-scale backbone features added into a conditional UNet."""

    def __init__(self, config: ModelConfig, in_channels: int = 1):
        super().__init__()
        self.config = config
        self.backbone = FeatureBackbone(config.backbone, in_chans=in_channels, weights=config.backbone_weights)
        stages = len(self.backbone.channels)
        widths = expand_channels(config.denoiser_channels, stages)
        self.adapter = FeatureAdapter(self.backbone.channels, widths)
        self.denoiser = ConditionalUNet(
            in_channels=config.num_classes, out_channels=config.num_classes, stage_channels=widths,
            stage_reductions=self.backbone.reductions, stem_channels=config.stem_channels,
            embed_dim=config.time_embed_dim, fusion=config.fusion, decoder=config.denoiser_decoder)

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

    def class_dependent_prefixes(self) -> tuple[str, ...]:
        # The mask stem reads K channels and the head writes K logits; everything else is class-free.
        return ("denoiser.stem.weight", "denoiser.head.2.")

    def forward(self, x_t: torch.Tensor, timesteps: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """Training forward: x̂_0 logits for a batch of noisy masks and their images."""
        return self.denoise_logits(x_t, timesteps, self.encode_condition(image))

    def training_loss(self, image: torch.Tensor, labels: torch.Tensor, schedule: NoiseSchedule,
                      generator: Optional[torch.Generator] = None, dice_weight: float = 1.0, ce_weight: float = 1.0,
                      ignore_fill: str = "prediction", xt_dropout: float = 0.0) -> dict[str, torch.Tensor]:
        """Noise the one-hot mask at a random timestep, predict x̂_0, score it with Dice + CE.

        Ignored pixels (:data:`IGNORE_INDEX`) add no loss; the clean mask that is noised needs a
        class there, which ``ignore_fill`` chooses (see :func:`fill_ignored`). A fraction
        ``xt_dropout`` of the items sees pure noise as x_t (see :mod:`medconddiff.xt_dropout`)."""
        condition = self.encode_condition(image)
        filled = fill_ignored(labels, ignore_fill, lambda: self._noise_prediction(condition, labels.shape, schedule,
                                                                                generator))
        x0 = self.mask_to_state(filled)
        timesteps = torch.randint(0, schedule.num_train_timesteps, (x0.shape[0],), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        x_t = schedule.add_noise(x0, noise.to(x0.device), timesteps.to(x0.device))
        x_t = drop_noised_state(x_t, xt_dropout, generator)
        logits = self.denoise_logits(x_t, timesteps.to(x0.device), condition)
        return hybrid_loss(logits, labels, dice_weight, ce_weight)

    @torch.no_grad()
    def _noise_prediction(self, condition: Sequence[torch.Tensor], label_shape: Sequence[int],
                          schedule: NoiseSchedule, generator: Optional[torch.Generator]) -> torch.Tensor:
        """Arg-max of x̂_0 from pure noise at the last timestep: the image's own first guess, as the first
        step of inference sees it (the condition is shared with the trained pass, so only the
        denoiser runs again)."""
        batch, height, width = label_shape
        noise = torch.randn(self.state_shape(batch, height, width), generator=generator).to(condition[0].device)
        last = torch.full((batch,), schedule.num_train_timesteps - 1, dtype=torch.long, device=condition[0].device)
        logits = self.denoise_logits(noise, last, [c.detach() for c in condition])
        return logits.argmax(dim=1)

