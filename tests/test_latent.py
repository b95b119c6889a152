"""LSegDiff (family='latent'): the mask VAE on real masks, the model interface, training hooks,
checkpoints and sampling through the Segmenter."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Subset

from medconddiff.checkpoint import load_checkpoint, save_checkpoint
from medconddiff.config import ModelConfig, PreprocessPlan, SamplingConfig
from medconddiff.datasets import Case, TrainingSlices
from medconddiff.evaluation import dice_per_class
from medconddiff.families import build_model
from medconddiff.latent import LatentSegDiff
from medconddiff.nifti import load_labels, load_volume
from medconddiff.schedulers import NoiseSchedule
from medconddiff.segmenter import Segmenter, SlicesDone, StepUpdate
from tests.conftest import DATA, meta_1mm, tiny_config

META = meta_1mm()

VAE_STEPS = 100


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def liver_slices() -> TrainingSlices:
    """All 128 slices of the bundled real liver CT and its liver/tumour labels, whole, at 2 mm (64²)."""
    image, meta = load_volume(DATA / "liver117_image.nii.gz")
    labels, _ = load_labels(DATA / "liver117_label.nii.gz")
    return TrainingSlices([Case("liver117", image, labels, meta)], PreprocessPlan(target_spacing=(2.0, 2.0)), 64,
                          centre_crops=True)


def all_labels(slices: TrainingSlices) -> torch.Tensor:
    return slices.cases[0].labels.long()


def all_images(slices: TrainingSlices) -> torch.Tensor:
    return slices.cases[0].images


@pytest.fixture(scope="module")
def trained_latent(liver_slices):
    """A tiny LSegDiff whose VAE was fitted (seeded) on the even slices; the odd ones are held out."""
    torch.manual_seed(0)
    config = tiny_config("latent")
    config.train.lr = 3e-3
    config.train.train_batch_size = 8
    model = build_model(config.model)
    messages: list[str] = []
    train = Subset(liver_slices, range(0, len(liver_slices), 2))
    metrics = model.prepare_training(train, config.train, "cpu", log=messages.append, steps=VAE_STEPS)
    return config, model.eval(), metrics, messages


def majority_per_cell(labels: torch.Tensor, cell: int) -> torch.Tensor:
    """The best one label per latent cell can do: each cell's majority class, blown back up."""
    one_hot = F.one_hot(labels, 3).permute(0, 3, 1, 2).float()
    majority = F.avg_pool2d(one_hot, cell).argmax(1, keepdim=True).float()
    return F.interpolate(majority, scale_factor=cell, mode="nearest")[:, 0].long()


def test_vae_reconstructs_held_out_real_masks(trained_latent, liver_slices):
    config, model, metrics, messages = trained_latent
    held_out = all_labels(liver_slices)[1::2]
    with torch.no_grad():
        state = model.mask_to_state(held_out)
        reconstruction = model.decode_logits(state).argmax(1)
    dice = dice_per_class(reconstruction.numpy(), held_out.numpy(), 3)
    baseline = dice_per_class(majority_per_cell(held_out, 4).numpy(), held_out.numpy(), 3)
    # The 4-channel latent must carry more than one label per 4×4 cell: boundaries inside cells.
    assert dice[0] > 0.92 and dice[1] > 0.8, dice
    assert dice[0] > baseline[0] + 0.02 and dice[1] > baseline[1] + 0.02, (dice, baseline)
    assert state.shape == (64, 4, 16, 16)
    assert 0.8 < float(state.std()) < 1.2  # the scale calibrated on the training slices carries over
    assert metrics["latent_scale"] == pytest.approx(float(model.latent_scale))
    assert any("latent scale" in m for m in messages) and any(f"VAE step {VAE_STEPS}/" in m for m in messages)


def test_prepare_training_calibrates_and_freezes(trained_latent, liver_slices):
    config, model, _, _ = trained_latent
    train_states = model.mask_to_state(all_labels(liver_slices)[0::2])
    assert float(train_states.std()) == pytest.approx(1.0, abs=1e-3)
    assert model.vae_trained and model.state_clip_range >= float(train_states.abs().max())
    assert model.state_clip_range > 1  # latents are not in [-1, 1]: the Segmenter must not clip at 1
    assert not any(p.requires_grad for p in model.vae.parameters())
    assert all(p.requires_grad for p in model.denoiser.parameters())
    # A model whose VAE is trained (e.g. loaded from a checkpoint) keeps it.
    again = copy.deepcopy(model)
    messages: list[str] = []
    again.prepare_training(liver_slices, config.train, "cpu", log=messages.append, steps=3)
    assert "already trained" in messages[0]
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name


def test_interface_shapes_and_parameter_counts():
    torch.manual_seed(0)
    model = build_model(tiny_config("latent").model).eval()
    assert isinstance(model, LatentSegDiff)
    assert model.state_shape(2, 64, 64) == (2, 4, 16, 16)
    assert model.denoiser.stem.stride == (1, 1)  # the latent grid already is the first stage (1/4)
    image = torch.rand(2, 1, 64, 64) * 2 - 1
    labels = torch.randint(0, 3, (2, 64, 64))
    with torch.no_grad():
        condition = model.encode_condition(image)
        x0, probabilities = model.denoise(torch.randn(2, 4, 16, 16), torch.tensor([99, 5]), condition)
        predicted = model(torch.randn(2, 4, 16, 16), torch.tensor([3, 4]), image)
    assert x0.shape == predicted.shape == model.mask_to_state(labels).shape == (2, 4, 16, 16)
    assert probabilities.shape == (2, 3, 64, 64)
    assert torch.allclose(probabilities.sum(1), torch.ones(2, 64, 64), atol=1e-5)
    counts = model.parameter_counts()
    assert set(counts) == {"backbone", "adapter", "denoiser", "vae", "total"}
    assert counts["total"] == counts["backbone"] + counts["adapter"] + counts["denoiser"] + counts["vae"]
    assert model.state_clip_range is None  # no clip before the latent range is known


@pytest.mark.parametrize("downsample, stages, latent", [(2, (0, 1, 2, 3), 32), (8, (1, 2, 3), 8)])
def test_latent_grids_finer_or_coarser_than_the_first_stage(downsample, stages, latent):
    model = build_model(tiny_config("latent", latent_downsample=downsample).model).eval()
    assert model.stage_indices == stages
    with torch.no_grad():
        x0, probabilities = model.denoise(torch.randn(1, 4, latent, latent), torch.tensor([10]),
                                          model.encode_condition(torch.zeros(1, 1, 64, 64)))
    assert x0.shape == (1, 4, latent, latent) and probabilities.shape == (1, 3, 64, 64)


@pytest.mark.parametrize("overrides, message", [
    ({"latent_downsample": 3}, "power of two"),
    ({"latent_downsample": 64}, "power of two up to 32"),
    ({"latent_channels": 0}, "latent_channels"),
])
def test_bad_latent_configs_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        LatentSegDiff(tiny_config("latent", **overrides).model)   # the config or the model refuses it


def test_state_shape_refuses_sizes_off_the_latent_grid():
    model = LatentSegDiff(tiny_config("latent").model)
    with pytest.raises(ValueError, match="not divisible"):
        model.state_shape(1, 30, 30)


def test_training_loss_is_seeded_and_leaves_the_vae_alone(trained_latent, liver_slices):
    config, trained, _, _ = trained_latent
    model = copy.deepcopy(trained).train()
    schedule = NoiseSchedule(config.diffusion)
    image, labels = all_images(liver_slices)[40:44], all_labels(liver_slices)[40:44]
    first = model.training_loss(image, labels, schedule, torch.Generator().manual_seed(3))
    second = model.training_loss(image, labels, schedule, torch.Generator().manual_seed(3))
    assert set(first) == {"loss", "latent_mse", "decoded_dice_loss", "decoded_ce"}
    assert torch.isfinite(first["loss"]) and torch.equal(first["loss"], second["loss"])
    expected = first["latent_mse"] + model.decoded_loss_weight * (first["decoded_dice_loss"] + first["decoded_ce"])
    assert first["loss"].detach().item() == pytest.approx(float(expected), rel=1e-5)
    first["loss"].backward()
    assert all(p.grad is None for p in model.vae.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.denoiser.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())
    untrained = LatentSegDiff(config.model)
    with pytest.raises(RuntimeError, match="prepare_training"):
        untrained.training_loss(image, labels, schedule)


def test_checkpoint_keeps_the_latent_scale_and_sampling_is_seeded(trained_latent, liver_volume, tmp_path):
    config, model, _, _ = trained_latent
    path = save_checkpoint(tmp_path / "latent.safetensors", model, config)
    assert load_checkpoint(path).config.model.family == "latent"
    segmenter = Segmenter.from_checkpoint(path, device="cpu")
    assert torch.equal(segmenter.model.latent_scale, model.latent_scale)
    assert torch.equal(segmenter.model.latent_bound, model.latent_bound)
    assert segmenter.model.state_clip_range == model.state_clip_range
    volume = liver_volume[0]
    sampling = SamplingConfig(steps=3, scheduler="ddpm", seed=5, batch_size=6)
    first = segmenter.segment(volume, sampling, meta=META)
    second = segmenter.segment(volume, sampling, meta=META)
    other = segmenter.segment(volume, SamplingConfig(steps=3, scheduler="ddpm", seed=6, batch_size=6), meta=META)
    assert np.array_equal(first.trajectory, second.trajectory)
    assert np.array_equal(first.labels, second.labels)
    assert not np.array_equal(first.trajectory, other.trajectory)


def test_segmenter_run_yields_probabilities_of_the_image_size(trained_latent, liver_volume):
    config, model, _, _ = trained_latent
    segmenter = Segmenter(model, config, device="cpu")
    volume = liver_volume[0]
    events = list(segmenter.run(volume, SamplingConfig(steps=2, batch_size=4), meta=META))
    updates = [e for e in events if isinstance(e, StepUpdate)]
    done = [e for e in events if isinstance(e, SlicesDone)]
    assert len(updates) == 4 and len(done) == 2  # 6 slices in batches of 4 and 2, 2 steps each
    for update in updates:
        assert update.probabilities.shape == (len(update.slice_indices), 3, 64, 64)
        np.testing.assert_allclose(update.probabilities.sum(1), 1, atol=1e-4)
    assert done[-1].labels.shape == (2, 64, 64) and done[-1].completed == 6


def test_postprocess_removes_specks_relative_to_the_latent_cell(trained_latent):
    _, model, _, _ = trained_latent
    # Labels at twice the model resolution: one latent cell is 4×4 model pixels = 8×8 here (64 px);
    # specks under half a cell (32 px) go, larger objects stay.
    labels = np.zeros((1, 128, 128), np.uint8)
    labels[0, 20:60, 20:60] = 1
    labels[0, 100:105, 100:105] = 2    # 25 px: removed
    labels[0, 80:86, 10:16] = 2        # 36 px: kept
    labels[0, 30:33, 30:33] = 0        # a hole in the liver: filled
    cleaned = model.postprocess(labels, 4.0)
    assert (cleaned[0, 100:105, 100:105] == 0).all()
    assert (cleaned[0, 80:86, 10:16] == 2).all()
    assert (cleaned[0, 20:60, 20:60] == 1).all()
    assert cleaned.dtype == np.uint8 and cleaned.shape == labels.shape


def test_trainer_trains_a_latent_model(tmp_path, liver_volume, monkeypatch):
    from medconddiff.train import Trainer

    monkeypatch.setattr(LatentSegDiff, "vae_steps", 30)
    config = tiny_config("latent")
    config.train.augment = False
    config.train.epochs = 2
    config.train.iterations_per_epoch = 6
    config.train.lr = 3e-3
    config.train.warmup_steps = 1
    image, labels = liver_volume
    train_set = TrainingSlices([Case("liver", image, labels, META)], config.plan, 64)
    trainer = Trainer(config, train_set, tmp_path, device="cpu", log=lambda message: None)
    path = trainer.fit()
    losses = [record["loss"] for record in trainer.history]
    assert losses[-1] < losses[0], losses
    assert {"latent_mse", "decoded_dice_loss", "decoded_ce"} <= set(trainer.history[0])
    assert not any(p.requires_grad for p in trainer.model.vae.parameters())
    saved = load_checkpoint(path).state_dict
    assert float(saved["latent_bound"]) > 0
    assert torch.equal(saved["latent_scale"], trainer.model.latent_scale)
    assert Segmenter.from_checkpoint(path, device="cpu").model.vae_trained


def test_default_latent_model_shape():
    model = LatentSegDiff(ModelConfig(family="latent", backbone="pvt_v2_b0"))
    assert model.state_shape(1, 128, 128) == (1, 4, 32, 32)
    assert model.stage_indices == (0, 1, 2, 3)


# The two tests below check the Segmenter's side of the latent family: it must clip x̂_0 to the
# model's ``state_clip_range`` (not to ±1) and apply ``model.postprocess`` to consensus labels.

def test_segmenter_clips_to_the_model_state_range(trained_latent, liver_volume, monkeypatch):
    import medconddiff.segmenter as segmenter_module

    config, model, _, _ = trained_latent
    clips = []
    original = segmenter_module.make_scheduler

    def spy(*args, **kwargs):
        scheduler = original(*args, **kwargs)
        clips.append(scheduler.clip_range)
        return scheduler

    monkeypatch.setattr(segmenter_module, "make_scheduler", spy)
    Segmenter(model, config, device="cpu").segment(liver_volume[0], SamplingConfig(steps=2, batch_size=6), meta=META)
    assert clips == [model.state_clip_range] and clips[0] > 1


def test_segmenter_postprocesses_consensus_labels(trained_latent, liver_volume, monkeypatch):
    config, model, _, _ = trained_latent
    calls = []

    def recording_postprocess(labels, model_pixel_area):
        calls.append(labels.shape)
        return LatentSegDiff.postprocess(model, labels, model_pixel_area)

    monkeypatch.setattr(model, "postprocess", recording_postprocess, raising=False)
    segmenter = Segmenter(model, config, device="cpu")
    result = segmenter.segment(liver_volume[0], SamplingConfig(steps=2, batch_size=4), meta=META)
    assert calls == [(4, 64, 64), (2, 64, 64)]
    refused = result.refuse("last")
    assert len(calls) == 3 and calls[-1] == (6, 64, 64)
    assert refused.labels.shape == liver_volume[0].shape
