"""The Segmenter: feature caching, determinism, cancellation, odd inputs, checkpoints."""

import numpy as np
import pytest
import torch

from medconddiff.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from medconddiff.config import SamplingConfig
from medconddiff.model import build_model
from medconddiff.preprocess import ScanError
from medconddiff.segmenter import SlicesDone, Segmenter, StepUpdate


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
        segmenter.segment(image, SamplingConfig(steps=4, batch_size=4, num_seeds=2))
        assert sum(seen) == image.shape[2], "features must be computed once per slice, not per step or seed"
        seen.clear()
        segmenter.segment(image, SamplingConfig(steps=4, batch_size=4, reextract_features=True))
        assert sum(seen) == image.shape[2] * (1 + 4), "reference behaviour re-extracts at every step"
    finally:
        restore()


def test_same_seed_same_result_any_batch_size(segmenter, liver_volume):
    image, _ = liver_volume
    a = segmenter.segment(image, SamplingConfig(steps=3, batch_size=2, seed=5))
    again = segmenter.segment(image, SamplingConfig(steps=3, batch_size=2, seed=5))
    b = segmenter.segment(image, SamplingConfig(steps=3, batch_size=6, seed=5))
    c = segmenter.segment(image, SamplingConfig(steps=3, batch_size=2, seed=6))
    np.testing.assert_array_equal(a.trajectory, again.trajectory)
    np.testing.assert_array_equal(a.labels, again.labels)
    # Another batch size changes only float summation order: at most one quantum in the kept uint8.
    np.testing.assert_allclose(a.trajectory.astype(int), b.trajectory.astype(int), atol=1)
    assert (a.labels == b.labels).mean() > 0.999
    assert np.abs(a.trajectory.astype(int) - c.trajectory.astype(int)).max() > 10


def test_result_shapes_and_ranges(segmenter, liver_volume):
    image, _ = liver_volume
    result = segmenter.segment(image, SamplingConfig(steps=3, num_seeds=2))
    assert result.labels.shape == image.shape and result.labels.dtype == np.uint8
    assert result.labels.max() < 3
    assert result.uncertainty.shape == image.shape and 0 <= result.uncertainty.min() <= result.uncertainty.max() <= 1
    assert result.trajectory.shape == (6, 3, image.shape[2], 64, 64)
    assert result.step_labels.shape == (6, image.shape[2], 64, 64)
    assert result.is_complete


def test_events_and_cancellation_keep_finished_slices(segmenter, liver_volume):
    image, _ = liver_volume
    run = segmenter.run(image, SamplingConfig(steps=2, batch_size=2))
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
    result = segmenter.segment(image, SamplingConfig(steps=4))
    same = result.refuse("mean", 0)
    np.testing.assert_array_equal(same.labels, result.labels)
    other = result.refuse("last", 0)
    assert other.sampling.consensus == "last"
    assert other.trajectory is result.trajectory


def test_slice_selection(segmenter, liver_volume):
    image, _ = liver_volume
    result = segmenter.segment(image, SamplingConfig(steps=2), slices=[1, 3])
    assert result.slice_indices.tolist() == [1, 3]
    assert result.labels[..., 0].max() == 0 and result.labels[..., 2].max() == 0
    with pytest.raises(ValueError, match="slice indices"):
        segmenter.run(image, slices=[99])


def test_two_d_nan_constant_and_four_d_inputs(segmenter, liver_volume):
    image, _ = liver_volume
    two_d = segmenter.segment(image[..., 0], SamplingConfig(steps=2))
    assert two_d.labels.shape == image[..., :1].shape
    with_nan = image.copy()
    with_nan[0, 0, :] = np.nan
    with pytest.warns(UserWarning, match="NaN"):
        result = segmenter.segment(with_nan, SamplingConfig(steps=2))
    assert np.isfinite(result.uncertainty).all()
    constant = segmenter.segment(np.full((32, 32, 2), 40.0, np.float32), SamplingConfig(steps=2))
    assert constant.labels.shape == (32, 32, 2)
    with pytest.raises(ScanError, match="4-D"):
        segmenter.run(np.zeros((8, 8, 8, 2), np.float32))
    with pytest.raises(ScanError, match="no finite voxel"):
        segmenter.run(np.full((8, 8, 2), np.nan, np.float32))


def test_one_shot_is_deterministic(segmenter, liver_volume):
    image, _ = liver_volume
    np.testing.assert_array_equal(segmenter.one_shot(image), segmenter.one_shot(image))


def test_checkpoint_round_trip_and_refusals(tmp_path, tiny_checkpoint):
    from tests.conftest import tiny_config

    checkpoint = load_checkpoint(tiny_checkpoint)
    assert checkpoint.config == tiny_config()
    half = tmp_path / "half.safetensors"
    save_checkpoint(half, build_model(checkpoint.config.model), checkpoint.config, half=True)
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


def test_checkpoint_whose_weights_do_not_fit_is_refused(tmp_path):
    from tests.conftest import tiny_config

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
    import dataclasses

    from tests.conftest import tiny_config

    config = tiny_config()
    config.model = dataclasses.replace(config.model, backbone_weights="relative/path/that/is/gone.pth")
    path = tmp_path / "trained.safetensors"
    save_checkpoint(path, build_model(tiny_config().model), config)
    segmenter = Segmenter.from_checkpoint(path, device="cpu")
    assert segmenter.config.model.backbone_weights == "relative/path/that/is/gone.pth"  # provenance kept
