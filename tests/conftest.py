"""Shared fixtures: tiny seeded models and real scans cut small, so tests run in seconds on CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medconddiff.checkpoint import save_checkpoint
from medconddiff.config import DiffusionConfig, ExperimentConfig, ModelConfig, TrainConfig
from medconddiff.model import build_model

DATA = Path(__file__).resolve().parents[1] / "src" / "medconddiff" / "data"


def tiny_config(family: str = "pixel", **model_overrides) -> ExperimentConfig:
    model = dict(family=family, backbone="pvt_v2_b0", image_size=64, denoiser_channels=(16,),
                 stem_channels=8, time_embed_dim=32, class_names=("background", "liver", "tumour"))
    model.update(model_overrides)
    return ExperimentConfig(model=ModelConfig(**model), diffusion=DiffusionConfig(num_train_timesteps=100),
                            train=TrainConfig(epochs=1, train_batch_size=4, iterations_per_epoch=2, val_every=0))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A randomly initialised (seeded) pixel-space checkpoint with the real liver class names."""
    torch.manual_seed(0)
    config = tiny_config()
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_checkpoint(path, build_model(config.model), config)
    return path


@pytest.fixture(scope="session")
def liver_volume() -> tuple[np.ndarray, np.ndarray]:
    """A 64×64×6 cut of the bundled real liver CT and its labels (HU, uint8)."""
    from medconddiff.nifti import load_labels, load_volume

    image, _ = load_volume(DATA / "liver117_image.nii.gz")
    labels, _ = load_labels(DATA / "liver117_label.nii.gz")
    return image[32:96, 32:96, 60:66].copy(), labels[32:96, 32:96, 60:66].copy()
