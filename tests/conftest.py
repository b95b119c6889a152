"""Shared fixtures: tiny seeded models and real scans cut small, so tests run in seconds on CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medconddiff.checkpoint import save_checkpoint
from medconddiff.config import DiffusionConfig, ExperimentConfig, ModelConfig, PreprocessPlan, TrainConfig
from medconddiff.families import build_model
from medconddiff.nifti import VolumeMeta

DATA = Path(__file__).resolve().parents[1] / "src" / "medconddiff" / "data"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def tiny_config(family: str = "pixel", plan: PreprocessPlan | None = None, **model_overrides) -> ExperimentConfig:
    model = dict(family=family, backbone="pvt_v2_b0", denoiser_channels=(16,),
                 stem_channels=8, time_embed_dim=32, class_names=("background", "liver", "tumour"))
    model.update(model_overrides)
    return ExperimentConfig(model=ModelConfig(**model), diffusion=DiffusionConfig(num_train_timesteps=100),
                            plan=plan or PreprocessPlan(),
                            train=TrainConfig(epochs=1, train_batch_size=4, iterations_per_epoch=2, val_every=0,
                                              patch_size=64))


def save_tiny(path: Path, config: ExperimentConfig | None = None, seed: int = 0) -> Path:
    """A randomly initialised (seeded) checkpoint of ``config`` (default: the tiny pixel model)."""
    torch.manual_seed(seed)
    config = config or tiny_config()
    save_checkpoint(path, build_model(config.model, in_channels=config.plan.input_channels), config)
    return path


def meta_1mm(shape_ndim: int = 3) -> VolumeMeta:
    """An RAS, 1 mm affine: how the bundled liver scan (and every cut of it) is stored."""
    return VolumeMeta(affine=np.eye(4), spacing=(1.0, 1.0, 1.0), original_ndim=shape_ndim)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module: tiny convolutions gain nothing from a second thread, and on a
    machine whose cores are busy, threads that spin against each other make a 0.1 s run take seconds."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A randomly initialised (seeded) pixel-space checkpoint with the real liver class names."""
    return save_tiny(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


@pytest.fixture(scope="session")
def liver_volume() -> tuple[np.ndarray, np.ndarray]:
    """A 64×64×6 cut of the bundled real liver CT and its labels (HU, uint8), RAS at 1 mm (meta_1mm)."""
    from medconddiff.nifti import load_labels, load_volume

    image, _ = load_volume(DATA / "liver117_image.nii.gz")
    labels, _ = load_labels(DATA / "liver117_label.nii.gz")
    return image[32:96, 32:96, 60:66].copy(), labels[32:96, 32:96, 60:66].copy()


@pytest.fixture(scope="session")
def two_channel_checkpoint(tmp_path_factory) -> Path:
    """A tiny random model taking two MRI channels (FLAIR, T1; z-scored), as a BraTS model would."""
    plan = PreprocessPlan(channel_names=("FLAIR", "T1"), intensity=("zscore",))
    return save_tiny(tmp_path_factory.mktemp("ckpt") / "two_channels.safetensors", tiny_config(plan=plan))


@pytest.fixture
def notifications():
    """Notifications dispatched during the test (napari's manager keeps every record)."""
    from napari.utils.notifications import notification_manager

    start = len(notification_manager.records)

    class Recorded:
        def messages(self, severity: str | None = None) -> list[str]:
            return [str(n.message) for n in notification_manager.records[start:]
                    if severity is None or str(n.severity) == severity]

    return Recorded()
