"""The interface every diffusion segmentation family implements, and the helpers they share.

The Segmenter, the trainer and the fine-tuner talk to a model only through
:class:`DiffusionSegmentationModel`; nothing probes a model with ``getattr``/``hasattr``. Two
families implement it: the pixel-space MedCondDiff (:mod:`medconddiff.model`) and the latent LSegDiff
(:mod:`medconddiff.latent`); :func:`medconddiff.families.build_model` picks one from a config.
This module imports neither of them.
"""

from __future__ import annotations

import abc
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig, TrainConfig
from .errors import ConfigError
from .schedulers import NoiseSchedule

Log = Callable[[str], None]


def expand_channels(channels: Sequence[int], stages: int) -> tuple[int, ...]:
    """One denoiser width per backbone stage (a single number is used for every stage)."""
    channels = tuple(channels)
    if len(channels) == 1:
        return channels * stages
    if len(channels) != stages:
        raise ConfigError(f"denoiser_channels has {len(channels)} entries but the backbone has {stages} stages; "
                          "give one number per stage or a single number")
    return channels


def one_hot_state(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Label map (B, H, W) → the K-channel diffusion state in [-1, 1] (B, K, H, W)."""
    return F.one_hot(labels.long(), num_classes).permute(0, 3, 1, 2).float() * 2 - 1


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class DiffusionSegmentationModel(nn.Module, abc.ABC):
    """A conditional diffusion model over segmentation masks of 2-D slices.

    Images are (B, C_in, H, W) with H, W multiples of the network stride; label maps (B, H, W).
    """

    config: ModelConfig
    backbone: nn.Module
    adapter: nn.Module
    denoiser: nn.Module

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def state_clip_range(self) -> Optional[float]:
        """How far the scheduler clips x̂_0 (None: not at all). One-hot states live in [-1, 1]."""
        return 1.0

    @abc.abstractmethod
    def encode_condition(self, image: torch.Tensor) -> list[torch.Tensor]:
        """Everything computed from the image alone, once per slice, reused by every step."""

    @abc.abstractmethod
    def denoise(self, x_t: torch.Tensor, timesteps: torch.Tensor, condition: Sequence[torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x̂_0 state the scheduler consumes, class probabilities (B, K, H, W) a user sees)."""

    @abc.abstractmethod
    def state_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        """Shape of the diffusion state for a batch of H×W slices."""

    @abc.abstractmethod
    def mask_to_state(self, labels: torch.Tensor) -> torch.Tensor:
        """The clean x_0 of a label map (training)."""

    @abc.abstractmethod
    def training_loss(self, image: torch.Tensor, labels: torch.Tensor, schedule: NoiseSchedule,
                      generator: Optional[torch.Generator] = None, dice_weight: float = 1.0,
                      ce_weight: float = 1.0, ignore_fill: str = "prediction", xt_dropout: float = 0.0
                      ) -> dict[str, torch.Tensor]:
        """Noise the mask at a random timestep, predict x̂_0, score it; ``loss`` is back-propagated.

        Label pixels holding :data:`medconddiff.losses.IGNORE_INDEX` add no loss; ``ignore_fill``
        (:data:`medconddiff.losses.IGNORE_FILLS`) says what class they take in the noised x_0.
        ``xt_dropout``: the fraction of items whose noised state is replaced by pure noise
        (:func:`medconddiff.xt_dropout.drop_noised_state`)."""

    def postprocess(self, labels: np.ndarray, model_pixel_area: float = 1.0) -> np.ndarray:
        """Clean consensus labels (slices, H, W); ``model_pixel_area`` = label pixels per model pixel."""
        return labels

    def prepare_training(self, dataset, train_config: TrainConfig, device: torch.device | str = "cpu",
                         log: Log = print) -> dict[str, float]:
        """Family-specific stage before the denoiser is trained (LSegDiff fits its mask VAE)."""
        return {}

    def class_dependent_prefixes(self) -> tuple[str, ...]:
        """State-dict key prefixes that depend on the class list: re-initialised on a new one."""
        return ()

    def parameter_counts(self) -> dict[str, int]:
        counts = {"backbone": count_parameters(self.backbone), "adapter": count_parameters(self.adapter),
                  "denoiser": count_parameters(self.denoiser)}
        counts.update(self.extra_parameter_counts())
        counts["total"] = count_parameters(self)
        return counts

    def extra_parameter_counts(self) -> dict[str, int]:
        return {}
