"""Sparse labels: ignored voxels add no loss, are never sampled alone, and count in no metric."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from medconddiff.config import PreprocessPlan, SamplingConfig
from medconddiff.datasets import Case, TrainingSlices
from medconddiff.evaluation import evaluate_volume
from medconddiff.families import build_model
from medconddiff.class_match import merge_class_lists
from medconddiff.finetune import Replay, finetune
from medconddiff.losses import IGNORE_INDEX, fill_ignored, hybrid_loss, soft_dice_loss
from medconddiff.preprocess import ScanPreprocessor
from medconddiff.schedulers import NoiseSchedule
from medconddiff.training_set import TrainingSet
from tests.conftest import meta_1mm, tiny_config

META = meta_1mm()
LIVER = ("background", "liver", "tumour")


def random_batch(seed: int = 0, classes: int = 3, size: int = 16):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, classes, size, size, generator=generator, requires_grad=True)
    labels = torch.randint(0, classes, (2, size, size), generator=generator)
    return logits, labels


def test_ignored_pixels_add_no_loss_and_get_no_gradient():
    logits, labels = random_batch()
    sparse = labels.clone()
    sparse[:, :, 8:] = IGNORE_INDEX
    loss = hybrid_loss(logits, sparse)["loss"]
    loss.backward()
    assert logits.grad[..., 8:].abs().max() == 0 and logits.grad[..., :8].abs().max() > 0
    # The same as scoring the known half alone.
    known = hybrid_loss(logits.detach()[..., :8], labels[..., :8])
    torch.testing.assert_close(hybrid_loss(logits.detach(), sparse)["loss"], known["loss"])
    torch.testing.assert_close(soft_dice_loss(logits.detach(), sparse), soft_dice_loss(logits.detach()[..., :8],
                                                                                       labels[..., :8]))


def test_a_batch_with_nothing_verified_teaches_nothing_and_stays_finite():
    logits, labels = random_batch()
    losses = hybrid_loss(logits, torch.full_like(labels, IGNORE_INDEX))
    assert torch.isfinite(losses["loss"]) and float(losses["ce"]) == 0.0
    losses["loss"].backward()
    assert logits.grad.abs().max() == 0


def test_fill_ignored_uses_background_or_the_prediction_and_predicts_only_when_needed():
    _, labels = random_batch()
    sparse = labels.clone()
    sparse[0, :4] = IGNORE_INDEX
    calls = []

    def predict():
        calls.append(1)
        return torch.full_like(labels, 2)

    assert (fill_ignored(sparse, "background", predict)[0, :4] == 0).all() and not calls
    filled = fill_ignored(sparse, "prediction", predict)
    assert (filled[0, :4] == 2).all() and torch.equal(filled[:, 4:], labels[:, 4:]) and len(calls) == 1
    fill_ignored(labels, "prediction", predict)
    assert len(calls) == 1
    with pytest.raises(ValueError, match="ignore_fill"):
        fill_ignored(sparse, "zeros", predict)


@pytest.mark.parametrize("family", ["pixel", "latent"])
@pytest.mark.parametrize("ignore_fill", ["prediction", "background"])
def test_both_families_train_on_sparse_labels(family, ignore_fill, one_torch_thread):
    config = tiny_config(family)
    torch.manual_seed(0)
    model = build_model(config.model)
    schedule = NoiseSchedule(config.diffusion)
    image = torch.randn(2, 1, 64, 64)
    labels = torch.randint(0, 3, (2, 64, 64))
    if family == "latent":
        model.latent_scale.fill_(1.0)
        model.latent_bound.fill_(3.0)           # as if prepare_training had fitted the VAE
        model.freeze_vae()
    sparse = labels.clone()
    sparse[:, 16:] = IGNORE_INDEX
    losses = model.training_loss(image, sparse, schedule, torch.Generator().manual_seed(1), ignore_fill=ignore_fill)
    assert torch.isfinite(losses["loss"])
    losses["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.denoiser.parameters())


def sparse_case(liver_volume, verified=(1, 4), name="cut") -> Case:
    image, labels = liver_volume
    sparse = labels.copy()
    unverified = [k for k in range(labels.shape[2]) if k not in verified]
    sparse[..., unverified] = IGNORE_INDEX
    return Case(name, image, sparse, META)


def test_only_verified_slices_are_sampled_and_crops_hold_a_verified_pixel(liver_volume):
    case = sparse_case(liver_volume)
    case.labels[:, :40, 1] = IGNORE_INDEX                        # slice 1 verified in part only (strokes)
    dataset = TrainingSlices([case], PreprocessPlan(), 32, foreground_fraction=0.0)
    assert [index for _, index in dataset.origin] == [1, 4]
    torch.manual_seed(0)
    for _ in range(20):
        _, crop = dataset[0]
        assert (crop != IGNORE_INDEX).any()
    weights = dataset.class_slice_weights(3)
    assert torch.isfinite(weights).all() and float(weights.sum()) == pytest.approx(1.0)


def test_replayed_slices_get_their_share_of_the_draws(liver_volume):
    image, labels = liver_volume
    own = TrainingSlices([sparse_case(liver_volume)], PreprocessPlan(), 32)
    replay = TrainingSlices([Case("replay", image, labels, META)], PreprocessPlan(), 32)
    own.add_replay(replay, 0.25)
    assert len(own) == 2 + 6
    weights = own.class_slice_weights(3)
    assert float(weights[2:].sum()) == pytest.approx(0.25) and float(weights.sum()) == pytest.approx(1.0)


class _FixedSegmenter:
    """Predicts a fixed label map: evaluation's arithmetic, without a model."""

    class_names = LIVER
    num_classes = 3

    def __init__(self, predicted: np.ndarray):
        self.predicted = predicted
        self.preprocessor = ScanPreprocessor(PreprocessPlan())

    def segment(self, image, sampling, slices=None, meta=None):
        geometry = self.preprocessor.geometry(image.shape, meta)
        indices = np.arange(geometry.n_slices) if slices is None else np.asarray(list(slices))
        view = geometry.slice_view(self.predicted)[indices]
        return SimpleNamespace(geometry=geometry, slice_indices=indices, labels=self.predicted,
                               trajectory=np.zeros((1,)), step_labels_on_scan=lambda step, clean=False: view,
                               uncertainty=np.random.default_rng(0).random(self.predicted.shape),
                               steps_used=np.ones(len(indices)), completed=np.ones(len(indices), bool),
                               sampling=SamplingConfig(consensus="mean"), provenance={"consensus_choice": None})

    def one_shot(self, image, slices=None, meta=None, precision="auto"):
        return self.predicted


def test_ignored_voxels_count_in_no_metric(liver_volume):
    image, labels = liver_volume
    predicted = labels.copy()
    predicted[..., 3:] = 2                                      # wrong everywhere on slices 3-5
    sparse = labels.copy()
    sparse[..., 3:] = 3                                         # ... which nobody verified
    report = evaluate_volume(_FixedSegmenter(predicted), image, sparse, META, None, ignore_value=3)
    assert report["consensus"]["per_class"]["liver"]["dice"] == 1.0
    assert report["consensus"]["per_class"]["tumour"]["dice"] == 1.0
    assert report["error_fraction"] == 0.0 and report["ignored_voxels"] == int((sparse == 3).sum())
    dense = evaluate_volume(_FixedSegmenter(predicted), image, labels, META, None)
    assert dense["consensus"]["per_class"]["tumour"]["dice"] < 0.5


def test_finetune_trains_on_every_verified_slice_of_a_training_set_plus_replay(tmp_path, tiny_checkpoint,
                                                                                 liver_volume, one_torch_thread):
    image, labels = liver_volume
    training_set = TrainingSet.create(tmp_path / "set", ("background", "lesion"))
    training_set.add_scan("a", image, META, (labels == 2).astype(np.uint8), ("background", "lesion"),
                          verified_slices=[1, 3])
    training_set.add_scan("b", image[::-1].copy(), META, (labels[::-1] == 2).astype(np.uint8),
                          ("background", "lesion"), verified_slices=[2])
    replay = Replay([Case("replay:liver", image, labels, META)], LIVER, {"replay:liver": [0, 5]}, 0.5)
    run = finetune(tiny_checkpoint, training_set=training_set, replay=replay, steps=2, device="cpu",
                   log=lambda message: None)
    assert run.config.model.class_names == ("background", "liver", "tumour", "lesion")
    dataset = run.trainer.train_set
    assert sorted(dataset.origin) == [("replay:liver", 0), ("replay:liver", 5), ("set:a", 1), ("set:a", 3),
                                      ("set:b", 2)]
    lesion = [dataset.slice_labels(i) for i, (name, _) in enumerate(dataset.origin) if name.startswith("set:")]
    assert all(set(torch.unique(x).tolist()) <= {0, 3, IGNORE_INDEX} for x in lesion)    # lesion is class 3 now
    assert [e.step for e in run] == [1, 2]
    saved = run.save(tmp_path / "ft.safetensors")
    from medconddiff.checkpoint import load_checkpoint

    extra = load_checkpoint(saved).extra
    assert extra["training_set"]["verified_slices"] == {"a": 2, "b": 1}
    assert extra["replay"] == {"fraction": 0.5, "slices": {"replay:liver": 2}}


def test_a_training_set_alone_is_enough_and_the_scan_s_classes_join_by_name(tmp_path, tiny_checkpoint, liver_volume,
                                                                            one_torch_thread):
    from medconddiff.finetune import LabelledScan

    image, labels = liver_volume
    training_set = TrainingSet.create(tmp_path / "set", ("background", "lesion"))
    training_set.add_scan("a", image, META, (labels == 2).astype(np.uint8), ("background", "lesion"),
                          verified_slices=[1])
    scan = LabelledScan("current", image, META, labels, slices=[4])
    run = finetune(tiny_checkpoint, [scan], class_names=LIVER, training_set=training_set, steps=1,
                   device="cpu", log=lambda message: None)
    assert run.config.model.class_names == ("background", "liver", "tumour", "lesion")
    assert merge_class_lists(("bg", "a"), ("background", "b", "a")) == ("bg", "a", "b")
    assert merge_class_lists(LIVER, ("background", "Liver", "Tumor", "lesion")) == (*LIVER, "lesion")
    current = [run.trainer.train_set.slice_labels(i) for i, (name, _) in enumerate(run.trainer.train_set.origin)
               if name == "current"]
    assert set(torch.unique(current[0]).tolist()) <= {0, 1, 2}


def test_known_classes_can_keep_their_start_entries_when_the_class_list_grows(tiny_checkpoint, liver_volume,
                                                                              one_torch_thread):
    from medconddiff.checkpoint import load_checkpoint, model_state

    image, labels = liver_volume
    replay = Replay([Case("replay:liver", image, labels, META)], LIVER, {"replay:liver": [0]}, 0.5)
    quiet = dict(class_names=("background", "lesion"), replay=replay, steps=1, device="cpu", log=lambda m: None)
    from medconddiff.finetune import LabelledScan

    scans = [LabelledScan("cut", image, META, (labels == 2).astype(np.uint8), slices=[2])]
    start = model_state(load_checkpoint(tiny_checkpoint))
    kept = finetune(tiny_checkpoint, scans, keep_known_classes=True, **quiet)
    fresh = finetune(tiny_checkpoint, scans, **quiet)
    assert kept.config.model.class_names == ("background", "liver", "tumour", "lesion")
    assert sorted(kept.carried) == ["denoiser.head.2.bias", "denoiser.head.2.weight", "denoiser.stem.weight"]
    for model in (kept.trainer.model, kept.trainer.ema.module):
        head = model.state_dict()["denoiser.head.2.weight"]
        torch.testing.assert_close(head[:3], start["denoiser.head.2.weight"])      # bg, liver, tumour carried
    assert not torch.equal(fresh.trainer.model.state_dict()["denoiser.head.2.weight"][:3],
                           start["denoiser.head.2.weight"])
