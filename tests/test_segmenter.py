"""The Segmenter: feature caching, determinism, cancellation, odd inputs, checkpoints."""

import dataclasses

import numpy as np
import pytest
import torch

from medconddiff.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from medconddiff.config import SamplingConfig
from medconddiff.errors import ConfigError, SliceSpecError
from medconddiff.families import build_model
from medconddiff.geometry import GeometryWarning
from medconddiff.nifti import VolumeMeta
from medconddiff.preprocess import ScanError
from medconddiff.segmenter import SlicesDone, Segmenter, StepUpdate
from tests.conftest import meta_1mm, save_tiny, tiny_config

META = meta_1mm()


@pytest.fixture(scope="module")
def segmenter(tiny_checkpoint):
    return Segmenter.from_checkpoint(tiny_checkpoint, device="cpu")


def count_backbone_images(segmenter):
    """Wrap the backbone so every image it sees is counted."""
    seen = []
    original = segmenter.model.backbone.forward

    def counting(image):
        seen.append(image.shape[0])
        return original(image)

    segmenter.model.backbone.forward = counting
    return seen, lambda: setattr(segmenter.model.backbone, "forward", original)


def test_backbone_runs_once_per_slice(segmenter, liver_volume):
    image, _ = liver_volume
    seen, restore = count_backbone_images(segmenter)
    try:
        segmenter.segment(image, SamplingConfig(steps=4, batch_size=4, num_seeds=2), meta=META)
        assert sum(seen) == image.shape[2], "features must be computed once per slice, not per step or seed"
        seen.clear()
        segmenter.segment(image, SamplingConfig(steps=4, batch_size=4, reextract_features=True, adaptive=False),
                          meta=META)
        assert sum(seen) == image.shape[2] * (1 + 4), "reference behaviour re-extracts at every step"
    finally:
        restore()


@pytest.mark.parametrize("scheduler, eta", [("ddim", 0.0), ("ddim", 0.7), ("ddpm", 0.0)])
def test_same_seed_same_result_any_batch_size(segmenter, liver_volume, scheduler, eta):
    """A slice's result does not depend on its batch, for every scheduler (step noise is per slice)."""
    image, _ = liver_volume
    config = dict(steps=3, seed=5, scheduler=scheduler, eta=eta)
    a = segmenter.segment(image, SamplingConfig(batch_size=2, **config), meta=META)
    again = segmenter.segment(image, SamplingConfig(batch_size=2, **config), meta=META)
    b = segmenter.segment(image, SamplingConfig(batch_size=6, **config), meta=META)
    alone = segmenter.segment(image, SamplingConfig(batch_size=1, **config), slices=[3], meta=META)
    c = segmenter.segment(image, SamplingConfig(batch_size=2, **{**config, "seed": 6}), meta=META)
    np.testing.assert_array_equal(a.trajectory, again.trajectory)
    np.testing.assert_array_equal(a.labels, again.labels)
    # Another batch size changes only float summation order: at most one quantum in the kept uint8.
    np.testing.assert_allclose(a.trajectory.astype(int), b.trajectory.astype(int), atol=1)
    np.testing.assert_allclose(a.trajectory[:, :, 3].astype(int), alone.trajectory[:, :, 0].astype(int), atol=1)
    assert (a.labels == b.labels).mean() > 0.999
    assert np.abs(a.trajectory.astype(int) - c.trajectory.astype(int)).max() > 10


def test_result_shapes_and_ranges(segmenter, liver_volume):
    image, _ = liver_volume
    result = segmenter.segment(image, SamplingConfig(steps=3, num_seeds=2), meta=META)
    assert result.labels.shape == image.shape and result.labels.dtype == np.uint8
    assert result.labels.max() < 3
    assert result.uncertainty.shape == image.shape and 0 <= result.uncertainty.min() <= result.uncertainty.max() <= 1
    assert result.trajectory.shape == (6, 3, image.shape[2], 64, 64)
    assert result.step_labels.shape == (6, image.shape[2], 64, 64)
    assert result.is_complete
    assert result.provenance["geometry"]["slicing"] == "axial"
    assert result.provenance["plan"]["target_spacing"] == [1.0, 1.0] or result.provenance["plan"]["target_spacing"] == (1.0, 1.0)


def test_model_grid_follows_the_plan_spacing_not_a_fixed_size(segmenter, liver_volume):
    """0.5 mm pixels are resampled to the plan's 1 mm: half the pixels, same field of view."""
    image, _ = liver_volume
    fine = VolumeMeta(affine=np.diag([0.5, 0.5, 1.0, 1.0]), spacing=(0.5, 0.5, 1.0))
    result = segmenter.segment(image[:, :40], SamplingConfig(steps=2), slices=[0], meta=fine)
    assert result.geometry.plane_shape == (64, 40)
    assert result.geometry.model_shape == (32, 20)
    assert result.geometry.padded_shape == (32, 32)
    assert result.trajectory.shape[-2:] == (32, 20)
    assert result.labels.shape == image[:, :40].shape


def test_events_and_cancellation_keep_finished_slices(segmenter, liver_volume):
    image, _ = liver_volume
    run = segmenter.run(image, SamplingConfig(steps=2, batch_size=2), meta=META)
    events = []
    for event in run:
        events.append(event)
        if isinstance(event, SlicesDone):
            break  # the user pressed Cancel after the first batch
    assert [type(e) for e in events] == [StepUpdate, StepUpdate, SlicesDone]
    assert events[-1].completed == 2 and events[-1].total == image.shape[2]
    result = run.result
    assert result.completed.tolist() == [True, True] + [False] * (image.shape[2] - 2)
    assert not result.is_complete
    assert (result.trajectory[:, :, 2:] == 0).all()
    np.testing.assert_array_equal(result.labels[..., 0], events[-1].labels[0])


def test_refuse_changes_consensus_without_rerunning(segmenter, liver_volume):
    image, _ = liver_volume
    result = segmenter.segment(image, SamplingConfig(steps=4), meta=META)
    same = result.refuse("mean", 0)
    np.testing.assert_array_equal(same.labels, result.labels)
    other = result.refuse("last", 0)
    assert other.sampling.consensus == "last"
    assert other.trajectory is result.trajectory
    # 'last' is the final step's x̂0 (one seed): its labels are that step's labels on the scan grid.
    np.testing.assert_array_equal(result.slice_view(other.labels), result.step_labels_on_scan(3))


def test_last_with_several_seeds_uses_every_seeds_last_step(segmenter, liver_volume):
    image, _ = liver_volume
    result = segmenter.segment(image, SamplingConfig(steps=3, num_seeds=2), slices=[2], meta=META)
    last = result.refuse("last", 0)
    fused = (result.trajectory[2].astype(np.float32) + result.trajectory[5].astype(np.float32)) / 2
    from medconddiff.segmenter import scan_labels

    expected = scan_labels(fused.transpose(1, 0, 2, 3), result.geometry)
    np.testing.assert_array_equal(result.slice_view(last.labels)[[2]], expected)


def test_slice_selection(segmenter, liver_volume):
    image, _ = liver_volume
    result = segmenter.segment(image, SamplingConfig(steps=2), slices=[1, 3], meta=META)
    assert result.slice_indices.tolist() == [1, 3]
    assert result.labels[..., 0].max() == 0 and result.labels[..., 2].max() == 0
    with pytest.raises(ValueError, match="slice indices"):
        segmenter.run(image, slices=[99], meta=META)


def test_two_d_nan_constant_and_four_d_inputs(segmenter, liver_volume):
    image, _ = liver_volume
    two_d = segmenter.segment(image[..., 0], SamplingConfig(steps=2), meta=meta_1mm(2))
    assert two_d.labels.shape == image[..., :1].shape
    with_nan = image.copy()
    with_nan[0, 0, :] = np.nan
    result = segmenter.segment(with_nan, SamplingConfig(steps=2), meta=META)
    assert np.isfinite(result.uncertainty).all()
    # A note of this scan (a cohort's warning named none and was shown once), kept in its sidecar's geometry.
    note = f"{image.shape[2]} NaN/Inf voxels were replaced by the lowest finite intensity"
    assert note in result.geometry.notes and note in result.provenance["geometry"]["notes"]
    constant = segmenter.segment(np.full((32, 32, 2), 40.0, np.float32), SamplingConfig(steps=2), meta=META)
    assert constant.labels.shape == (32, 32, 2)
    with pytest.raises(ScanError, match="expects 1 channel"):
        segmenter.run(np.zeros((8, 8, 8, 2), np.float32), meta=META)
    with pytest.raises(ScanError, match="no finite voxel"):
        segmenter.run(np.full((8, 8, 2), np.nan, np.float32), meta=META)
    with pytest.raises(ScanError, match="5-D"):
        segmenter.run(np.zeros((4, 4, 4, 1, 1), np.float32), meta=META)


def test_a_scan_without_a_usable_affine_is_processed_in_voxel_order_with_a_warning(segmenter, liver_volume):
    image, _ = liver_volume
    reference = segmenter.segment(image, SamplingConfig(steps=2), meta=META)
    singular = VolumeMeta(affine=np.diag([1.0, 1.0, 0.0, 1.0]), spacing=(1.0, 1.0, 1.0))
    assert not singular.affine_known
    with pytest.warns(GeometryWarning, match="degenerate"):
        result = segmenter.segment(image, SamplingConfig(steps=2), meta=singular)
    np.testing.assert_array_equal(result.labels, reference.labels)
    assert result.geometry.notes and "R, A, S" in result.geometry.notes[0]
    with pytest.warns(GeometryWarning, match="no geometry was given"):
        segmenter.segment(image, SamplingConfig(steps=2), slices=[0])


def test_one_shot_is_deterministic(segmenter, liver_volume):
    image, _ = liver_volume
    np.testing.assert_array_equal(segmenter.one_shot(image, meta=META), segmenter.one_shot(image, meta=META))


@pytest.mark.parametrize("slices", [[-1], [2, 6], [1.5]])
def test_one_shot_and_run_refuse_slices_outside_the_scan_naming_index_and_range(segmenter, liver_volume, slices):
    """A negative index would otherwise count from the end and write into another slice."""
    image, _ = liver_volume
    bad = {-1: "-1", 6: "6", 1.5: "1.5"}[slices[-1]]
    for call in (lambda: segmenter.one_shot(image, slices=slices, meta=META),
                 lambda: segmenter.run(image, slices=slices, meta=META)):
        with pytest.raises(SliceSpecError, match=rf"slice {bad}\b.*\[0, 6\)"):
            call()
    with pytest.raises(SliceSpecError, match="no slices"):
        segmenter.one_shot(image, slices=[], meta=META)
    labels = segmenter.one_shot(image, slices=[5], meta=META)
    assert labels[..., :5].max() == 0


def test_an_array_in_another_axis_order_than_its_meta_is_refused(tmp_path, segmenter, liver_volume):
    """SimpleITK's (z, y, x) array with nibabel's meta was segmented without a word, the spacing on the wrong
    axes; an array of another size (padded) keeps the meta for its spacing."""
    import nibabel as nib

    from medconddiff.nifti import load_volume

    image, _ = liver_volume
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    nib.save(nib.Nifti1Image(image.astype(np.int16), affine), str(tmp_path / "ct.nii.gz"))
    volume, meta = load_volume(tmp_path / "ct.nii.gz")
    with pytest.raises(ScanError, match=r"shape \(6, 64, 64\) is not the \(64, 64, 6\) its meta describes"):
        segmenter.one_shot(np.ascontiguousarray(volume.transpose(2, 1, 0)), meta=meta)
    padded = np.pad(volume, ((4, 4), (4, 4), (0, 0)), constant_values=-1000)
    assert segmenter.one_shot(padded, slices=[2], meta=meta).shape == padded.shape


def test_sampling_settings_the_model_cannot_run_are_refused(segmenter, liver_volume):
    image, _ = liver_volume
    with pytest.raises(ValueError, match="cannot exceed the 100 timesteps"):
        segmenter.run(image, SamplingConfig(steps=101), meta=META)


def test_multi_channel_model_takes_channels_last_and_explains_a_mismatch(tmp_path, liver_volume):
    from medconddiff.config import PreprocessPlan

    plan = PreprocessPlan(channel_names=("T1", "T2"), intensity=("zscore",))
    path = save_tiny(tmp_path / "two.safetensors", tiny_config(plan=plan))
    segmenter = Segmenter.from_checkpoint(path, device="cpu")
    image, _ = liver_volume
    both = np.stack([image, -image], axis=-1)
    result = segmenter.segment(both, SamplingConfig(steps=2), slices=[0], meta=META)
    assert result.labels.shape == image.shape
    assert [c["scheme"] for c in result.provenance["intensity"]] == ["zscore", "zscore"]
    with pytest.raises(ScanError, match="expects 2 channel"):
        segmenter.run(image, meta=META)


def test_checkpoint_round_trip_and_refusals(tmp_path, tiny_checkpoint):
    checkpoint = load_checkpoint(tiny_checkpoint)
    assert checkpoint.config == tiny_config()
    half = tmp_path / "half.safetensors"
    channels_last = build_model(checkpoint.config.model).to(memory_format=torch.channels_last)   # as CPU training
    save_checkpoint(half, channels_last, checkpoint.config, half=True)
    assert Segmenter.from_checkpoint(half, device="cpu").model.denoiser.head[2].weight.dtype == torch.float32

    pickle_file = tmp_path / "model.pt"
    torch.save({"weights": torch.zeros(2)}, pickle_file)
    with pytest.raises(CheckpointError, match="pickle"):
        Segmenter.from_checkpoint(pickle_file)
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(CheckpointError, match="not a medconddiff checkpoint"):
        Segmenter.from_checkpoint(foreign)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01not a checkpoint at all" * 10)
    with pytest.raises(CheckpointError):
        Segmenter.from_checkpoint(garbage)
    with pytest.raises(CheckpointError, match="not found"):
        Segmenter.from_checkpoint(tmp_path / "missing.safetensors")
    # Tagged as ours, but its records are not JSON objects: a clear refusal, not a crash.
    from safetensors import safe_open

    with safe_open(str(tiny_checkpoint), framework="pt") as reader:
        metadata, state = reader.metadata(), {key: reader.get_tensor(key) for key in reader.keys()}
    for field, value in (("config", "null"), ("config", "[]"), ("extra", "[1, 2]")):
        mangled = tmp_path / f"mangled_{field}.safetensors"
        save_file(state, str(mangled), metadata={**metadata, field: value})
        with pytest.raises(CheckpointError, match="must be JSON objects"):
            Segmenter.from_checkpoint(mangled)


def test_a_checkpoint_without_a_plan_is_refused_with_the_fix_and_can_start_a_finetune(tmp_path, tiny_checkpoint):
    """medconddiff 0.1 checkpoints (format 1) had no plan: refused for inference, readable as a start."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(tiny_checkpoint), framework="pt") as reader:
        tensors = {k: reader.get_tensor(k) for k in reader.keys()}
        metadata = dict(reader.metadata())
    config = json.loads(metadata["config"])
    plan = config.pop("plan")
    config["model"]["image_size"] = 64
    config["preprocess"] = {"intensity": plan["intensity"][0], "window": plan["window"],
                            "percentiles": plan["percentiles"], "slice_axis": 2}
    legacy = tmp_path / "legacy.safetensors"
    save_file(tensors, str(legacy), metadata={**metadata, "config": json.dumps(config), "format_version": "1"})
    with pytest.raises(CheckpointError, match="without a preprocessing plan.*--init"):
        Segmenter.from_checkpoint(legacy)
    start = load_checkpoint(legacy, allow_legacy=True)
    assert start.config.plan.slicing == "axial" and start.config.plan.target_spacing == (1.0, 1.0)
    assert start.extra["upgraded_from_format"] == "1"


def test_checkpoint_whose_weights_do_not_fit_is_refused(tmp_path):
    config = tiny_config()
    wrong = tiny_config(denoiser_channels=(8,))
    path = tmp_path / "mismatch.safetensors"
    save_checkpoint(path, build_model(wrong.model), config)  # weights of another shape under this config
    with pytest.raises(CheckpointError, match="does not fit"):
        Segmenter.from_checkpoint(path, device="cpu")


def test_cuda_request_without_gpu_is_a_clear_error(tiny_checkpoint):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match="CUDA"):
        Segmenter.from_checkpoint(tiny_checkpoint, device="cuda")


def test_checkpoint_does_not_need_the_backbone_weights_file_it_started_from(tmp_path):
    """Trained checkpoints carry their backbone; the pretrained file named in the config may be gone."""
    config = tiny_config()
    config.model = dataclasses.replace(config.model, backbone_weights="relative/path/that/is/gone.pth")
    path = tmp_path / "trained.safetensors"
    save_checkpoint(path, build_model(tiny_config().model), config)
    segmenter = Segmenter.from_checkpoint(path, device="cpu")
    assert segmenter.config.model.backbone_weights == "relative/path/that/is/gone.pth"  # provenance kept


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.cuda
def test_cuda_matches_cpu_labels(tiny_checkpoint, liver_volume):
    image, _ = liver_volume
    cpu = Segmenter.from_checkpoint(tiny_checkpoint, device="cpu").segment(image, SamplingConfig(steps=3), meta=META)
    gpu = Segmenter.from_checkpoint(tiny_checkpoint, device="cuda").segment(image, SamplingConfig(steps=3), meta=META)
    assert (cpu.labels == gpu.labels).mean() > 0.98   # bf16 autocast on CUDA: rare boundary flips only


def test_adaptive_steps_stop_converged_slices_and_fuse_only_the_steps_taken(segmenter, liver_volume):
    image, _ = liver_volume
    fixed = segmenter.segment(image, SamplingConfig(steps=8, batch_size=6, adaptive=False), meta=META)
    adaptive = segmenter.segment(image, SamplingConfig(steps=8, batch_size=6, adaptive=True, convergence_change=0.05),
                                 meta=META)
    used = adaptive.steps_used
    assert used.min() >= 3 and used.max() <= 8 and (used < 8).any(), used   # patience 2: at least 3 steps
    for position, steps in enumerate(used):
        # Same noise, same steps: identical until the slice stopped, nothing stored after it.
        np.testing.assert_array_equal(adaptive.trajectory[:steps, :, position], fixed.trajectory[:steps, :, position])
        assert (adaptive.trajectory[steps:, :, position] == 0).all()
        # A stopped slice shows its last step on later steps of the slider.
        np.testing.assert_array_equal(adaptive.step_labels[7, position], adaptive.step_labels[steps - 1, position])
    # The consensus is the fusion of the steps each slice took.
    from medconddiff.segmenter import fuse_slices

    position = int(np.argmin(used))
    expected, _ = fuse_slices(adaptive.trajectory[:used[position], :, [position]],
                              SamplingConfig(steps=int(used[position]), consensus="mean"), adaptive.geometry)
    np.testing.assert_array_equal(adaptive.slice_view(adaptive.labels)[[position]], expected)
    refused = adaptive.refuse("vote_gated", skip_first=7)       # skip-first never empties a slice
    assert refused.steps_used is adaptive.steps_used and refused.labels.shape == image.shape
    # A slice's steps and result do not depend on the batch it ran in.
    alone = segmenter.segment(image, SamplingConfig(steps=8, batch_size=1, adaptive=True, convergence_change=0.05),
                              slices=[position], meta=META)
    assert alone.steps_used[0] == used[position]
    np.testing.assert_array_equal(alone.slice_view(alone.labels)[position], adaptive.slice_view(adaptive.labels)[position])


def test_an_image_that_is_no_ct_in_hounsfield_units_is_flagged_for_a_ct_window(liver_volume, tmp_path, capsys):
    """A CT window flattens an MRI (intensities ≥ 0): the run's notes say so, through the API and the CLI;
    a CT (air and fat below 0 HU) and a z-scored plan are not flagged."""
    import nibabel as nib

    from medconddiff.cli import main
    from medconddiff.config import PreprocessPlan
    from medconddiff.preprocess import ScanPreprocessor

    ct = liver_volume[0]
    mri = ct - ct.min()
    assert ct.min() < 0
    ct_plan = PreprocessPlan()
    assert ct_plan.intensity == ("ct_window",)
    flagged = ScanPreprocessor(ct_plan).prepare(mri, meta_1mm()).geometry.notes
    assert any("does not look like CT in Hounsfield units" in note for note in flagged)
    assert not any("Hounsfield" in n for n in ScanPreprocessor(ct_plan).prepare(ct, meta_1mm()).geometry.notes)
    mri_plan = PreprocessPlan(channel_names=("T1",), intensity=("zscore",))
    assert not any("Hounsfield" in n for n in ScanPreprocessor(mri_plan).prepare(mri, meta_1mm()).geometry.notes)

    nib.save(nib.Nifti1Image(mri, np.eye(4)), str(tmp_path / "t1.nii.gz"))
    checkpoint = save_tiny(tmp_path / "tiny.safetensors")
    assert main(["segment", str(tmp_path / "t1.nii.gz"), "-o", str(tmp_path / "seg.nii.gz"), "--checkpoint",
                 str(checkpoint), "--steps", "1", "--device", "cpu", "--quiet"]) == 0
    assert "t1: note: channel 0 (CT) has no voxel below 0" in capsys.readouterr().err


@pytest.mark.parametrize("family", ["pixel", "latent"])
def test_a_light_decoder_model_is_its_own_architecture_saved_with_its_checkpoint(tmp_path, family, liver_volume):
    """--denoiser-decoder light: 1×1 skip mixes and no decoder blocks; the checkpoint says so and only fits itself."""
    light, full = tiny_config(family, denoiser_decoder="light"), tiny_config(family)
    light_model, full_model = build_model(light.model), build_model(full.model)
    assert len(light_model.denoiser.decoders) == 0 and len(full_model.denoiser.decoders) > 0
    assert all(mix.kernel_size == (1, 1) for mix in [*light_model.denoiser.up_mix, light_model.denoiser.fine_mix])
    n_params = [sum(p.numel() for p in m.denoiser.parameters()) for m in (light_model, full_model)]
    assert n_params[0] < 0.8 * n_params[1], n_params

    path = save_tiny(tmp_path / "light.safetensors", light)
    segmenter = Segmenter.from_checkpoint(path, device="cpu")
    assert segmenter.config.model.denoiser_decoder == "light"
    image, _ = liver_volume
    sampling = SamplingConfig(steps=3, seed=1)
    first = segmenter.segment(image[..., 2:4], sampling, meta=META)
    again = segmenter.segment(image[..., 2:4], sampling, meta=META)
    assert first.labels.shape == image[..., 2:4].shape and np.array_equal(first.labels, again.labels)

    mismatch = tmp_path / "mismatch.safetensors"
    save_checkpoint(mismatch, full_model, light)   # resblocks weights under a light config
    with pytest.raises(CheckpointError, match="does not fit"):
        Segmenter.from_checkpoint(mismatch, device="cpu")
    with pytest.raises(ConfigError, match="denoiser_decoder"):
        tiny_config(family, denoiser_decoder="thin")
