"""Training, configuration and checkpoint safety: channels named and ordered by name, the reserved 'ignore'
class, non-finite or absurd settings and weights, edited checkpoint headers and records, an interrupted
overwrite, and choosing a consensus on slices the model learned."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medconddiff.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from medconddiff.cli import main
from medconddiff.config import (DiffusionConfig, ExperimentConfig, ModelConfig, PreprocessPlan, SamplingConfig,
                                TrainConfig)
from medconddiff.datasets import TrainingSlices
from medconddiff.errors import ConfigError
from medconddiff.experiment import ConfigConflict, training_config
from medconddiff.train import Trainer, TrainingDiverged
from medconddiff.training_data import TrainingData
from tests.conftest import meta_1mm, save_tiny, tiny_config
from tests.test_train import write_nnunet_mri

META = meta_1mm()
QUIET = dict(log=lambda message: None)


def write_two_channel_pair(folder: Path) -> tuple[Path, Path]:
    """A 2-channel MRI-like pair without names: channel 0 bright where labelled, channel 1 dark there."""
    folder.mkdir(parents=True, exist_ok=True)
    labels = np.zeros((24, 24, 3), np.uint8)
    labels[6:14, 6:14] = 1
    bright = labels.astype(np.float32)
    image = np.stack([400.0 + 300 * bright, 900.0 - 300 * bright], -1).astype(np.float32)
    nib.save(nib.Nifti1Image(image, np.eye(4)), str(folder / "b_image.nii.gz"))
    nib.save(nib.Nifti1Image(labels, np.eye(4)), str(folder / "b_label.nii.gz"))
    return folder / "b_image.nii.gz", folder / "b_label.nii.gz"


# -- 1: --channel-names name the channels of plain pairs ------------------------------------------------------


def test_channel_names_of_plain_pairs_set_the_plan_the_fingerprint_and_the_channel_count(tmp_path):
    image, label = write_two_channel_pair(tmp_path / "pairs")
    data = TrainingData.from_sources(tmp_path / "pairs", channel_names=("FLAIR", "T1"))
    plan = data.plan()
    assert plan.channel_names == ("FLAIR", "T1") and plan.intensity == ("zscore", "zscore")
    assert [c["name"] for c in data.fingerprint_record()["channels"]] == ["FLAIR", "T1"]
    assert data.load_cases(2)[0].image.shape == (24, 24, 3, 2)
    one = TrainingData.from_sources(None, [(image, label)], channel_names=("T1",))
    assert one.channel_names == ("T1",)
    # A dataset.json's own names stay: a contradicting flag is training_config's to refuse.
    mri = write_nnunet_mri(tmp_path / "Dataset001_TinyBrain", cases=1)
    assert TrainingData.from_sources(mri, channel_names=("T2", "PD")).channel_names == ("FLAIR", "T1")


# -- 1b: channels matched by name, not by position -------------------------------------------------------------


def test_channel_order_puts_a_reordering_in_the_model_s_order_and_refuses_a_mix():
    from medconddiff.experiment import channel_order

    assert channel_order(("FLAIR", "T1"), ("T1", "FLAIR")) == (1, 0)
    assert channel_order(("FLAIR", "T1"), ("t1", "flair")) == (1, 0)              # case aside
    assert channel_order(("FLAIR", "T1"), ("FLAIR", "T1")) is None
    assert channel_order(("CT",), ("CT",)) is None and channel_order(("CT",), ("T1",)) is None   # a kind change
    assert channel_order(("FLAIR", "T1"), ("MRI 1", "MRI 2")) is None             # positional: as they come
    assert channel_order(("channel_0", "channel_1"), ("channel_1", "channel_0")) is None
    assert channel_order(("FLAIR", "T1"), ("FLAIR", "T2")) is None                # T2 in T1's place
    with pytest.raises(ConfigConflict, match=r"^the set names the channels T1 T2 and the model takes FLAIR T1"):
        channel_order(("FLAIR", "T1"), ("T1", "T2"), data_label="the set")


def test_training_data_reordered_by_name_loads_in_the_run_s_order_and_a_run_that_cannot_reorder_refuses(tmp_path):
    image, label = write_two_channel_pair(tmp_path / "pairs")
    data = TrainingData.from_sources(tmp_path / "pairs", channel_names=("T1", "FLAIR"))
    as_stored = data.load_cases(2)[0].image
    in_order = data.load_cases(2, ("FLAIR", "T1"))[0].image
    np.testing.assert_array_equal(in_order, as_stored[..., ::-1])
    start = load_checkpoint(save_tiny(tmp_path / "two.safetensors",
                                      tiny_config(plan=PreprocessPlan(channel_names=("FLAIR", "T1"),
                                                                      intensity=("zscore",)))))
    with pytest.raises(ConfigConflict, match="in another order"):
        training_config(flags={}, start=start, channel_names=("T1", "FLAIR"), **QUIET)
    config = training_config(flags={}, start=start, channel_names=("T1", "FLAIR"), reorder_channels=True, **QUIET)
    assert config.plan.channel_names == ("FLAIR", "T1")


def test_a_fine_tune_on_a_set_naming_the_model_s_channels_in_another_order_feeds_each_to_its_filters(
        tmp_path, two_channel_checkpoint, liver_volume):
    from medconddiff.finetune import finetune
    from medconddiff.training_set import TrainingSet

    _, labels = liver_volume
    t1 = 400.0 + 100 * labels.astype(np.float32)
    flair = 900.0 - 200 * labels.astype(np.float32)
    classes = ("background", "liver", "tumour")
    root = tmp_path / "set"
    TrainingSet.create(root, classes, ("T1", "FLAIR")).add_scan("a", np.stack([t1, flair], -1), META, labels, classes,
                                                                verified_slices=[2])
    run = finetune(two_channel_checkpoint, [], training_set=TrainingSet.open(root), steps=1, device="cpu", **QUIET)
    assert run.config.plan.channel_names == ("FLAIR", "T1")
    case = run._set_case("a", run.training_set, run.config)
    np.testing.assert_array_equal(case.image[..., 0], flair)                      # the model's FLAIR filters: FLAIR
    np.testing.assert_array_equal(case.image[..., 1], t1)


def test_evaluate_reads_a_dataset_s_channels_in_the_model_s_order(tmp_path):
    from medconddiff.commands.evaluate import dataset_cases, in_model_channel_order

    root = write_nnunet_mri(tmp_path / "Dataset001_TinyBrain", cases=1)          # channels FLAIR, T1
    cases, _ = dataset_cases(root)
    stored, _ = cases[0].load_image()
    ordered = in_model_channel_order(cases, ("T1", "FLAIR"), "its dataset.json", "the model")
    image, _ = ordered[0].load_image()
    np.testing.assert_array_equal(image, stored[..., ::-1])
    assert in_model_channel_order(cases, ("FLAIR", "T1"), "x", "y")[0].load_image is cases[0].load_image
    with pytest.raises(ConfigConflict, match="names the channels FLAIR T1 and the model takes T1 T2"):
        in_model_channel_order(cases, ("T1", "T2"), "its dataset.json", "the model")


# -- 2: 'ignore' is no class ---------------------------------------------------------------------------------


def test_a_class_named_ignore_is_refused_and_a_set_s_label_file_says_why(tmp_path, tiny_checkpoint, liver_volume,
                                                                         capsys):
    from medconddiff.training_set import TrainingSet

    for name in ("ignore", " Ignore"):
        with pytest.raises(ConfigError, match="give its folder instead of its files"):
            ModelConfig(class_names=("background", "liver", name))
    image, labels = liver_volume
    classes = ("background", "liver", "tumour")
    TrainingSet.create(tmp_path / "set", classes).add_scan("a", image, META, labels, classes, verified_slices=[2])
    scan, label = tmp_path / "set" / "imagesTr" / "a_0000.nii.gz", tmp_path / "set" / "labelsTr" / "a.nii.gz"
    capsys.readouterr()
    for extra in ([], ["--class-names", "background", "liver", "tumour", "lesion"]):
        assert main(["finetune", str(scan), str(label), "--slices", "labelled", "--init", str(tiny_checkpoint),
                     "--steps", "1", "--device", "cpu", "--quiet", "-o", str(tmp_path / "ft.safetensors"),
                     *extra]) == 2
        err = capsys.readouterr().err
        assert "value 3 is 'ignore'" in err and "give the set's folder (set)" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "ft.safetensors").exists()


# -- 3: non-finite and absurd settings; non-finite weights never saved ----------------------------------------


@pytest.mark.parametrize("make, message", [
    (lambda: TrainConfig(lr=math.inf), "lr must be a finite number"),
    (lambda: TrainConfig(lr=2.0), r"lr must be in \(0, 1\]"),
    (lambda: TrainConfig(weight_decay=math.nan), "weight_decay must be a finite number"),
    (lambda: TrainConfig(dice_weight=-1.0), "0 or more and not both 0"),
    (lambda: TrainConfig(dice_weight=0.0, ce_weight=0.0), "not both 0"),
    (lambda: PreprocessPlan(window=(0.0, math.inf)), "window must be a finite number"),
    (lambda: PreprocessPlan(context_mm=math.nan), "context_mm must be a finite number"),
    (lambda: PreprocessPlan(percentiles=(math.nan, 99.0)), "percentiles must be a finite number"),
    (lambda: SamplingConfig(eta=math.inf), "eta must be a finite number"),
    (lambda: TrainConfig(train_seed=99999999999999999), "train_seed must be 0 to 4294967295"),
    (lambda: SamplingConfig(seed=2 ** 32 - 1, num_seeds=2), r"seed \+ num_seeds at most"),
])
def test_non_finite_and_absurd_settings_are_refused(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_a_checkpoint_config_with_a_non_finite_float_is_refused_on_load(tmp_path):
    config = tiny_config().to_dict()
    config["train"]["lr"] = math.inf
    with pytest.raises(ConfigError, match="lr must be a finite number"):
        ExperimentConfig.from_dict(config)


def test_a_step_that_makes_a_weight_non_finite_is_undone_and_stops_the_run(tmp_path, liver_volume):
    image, labels = liver_volume
    from medconddiff.datasets import Case

    config = tiny_config()
    trainer = Trainer(config, TrainingSlices([Case("liver", image, labels, META)], config.plan, 64), tmp_path,
                      device="cpu", **QUIET)
    # What a huge learning rate or weight decay does: a finite gradient, an infinite weight.
    trainer.optimizer.register_step_post_hook(lambda *args: trainer.trainable[0].data.fill_(math.inf))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(TrainingDiverged, match="made weights NaN or infinite"):
        trainer.train_step(*next(iter(trainer.loader())), 2)
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


def test_save_checkpoint_refuses_non_finite_weights_and_keeps_the_file(tmp_path):
    from medconddiff.families import build_model

    config = tiny_config()
    model = build_model(config.model, in_channels=1)
    target = save_tiny(tmp_path / "mine.safetensors")
    before = target.read_bytes()
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = math.nan
    with pytest.raises(CheckpointError, match=r"^mine.safetensors not saved: tensor '.*' holds 1 NaN"):
        save_checkpoint(target, model, config)
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = 1e6                                 # finite, beyond fp16
    with pytest.raises(CheckpointError, match="beyond fp16's range"):
        save_checkpoint(target, model, config, half=True)
    assert target.read_bytes() == before


# -- 4: --val-steps checked before training ---------------------------------------------------------------------


def test_val_steps_beyond_the_model_s_timesteps_are_refused_before_training():
    with pytest.raises(ConfigError, match=r"--val-steps 500 cannot exceed the 100 timesteps"):
        training_config(flags={"diffusion": {"num_train_timesteps": 100},
                               "model": {"backbone": "pvt_v2_b0"},
                               "train": {"val_steps": 500, "val_every": 2}}, **QUIET)
    config = tiny_config()
    config.train.val_every, config.train.val_steps = 1, 101
    with pytest.raises(ConfigError, match="--val-steps 101"):
        Trainer(config, None, None, device="cpu", **QUIET)
    # Without validation the steps are never used.
    training_config(flags={"diffusion": {"num_train_timesteps": 100}, "model": {"backbone": "pvt_v2_b0"},
                           "train": {"val_steps": 500, "val_every": 0}}, **QUIET)


# -- 5: an edited checkpoint header ------------------------------------------------------------------------------


def _edited(source: Path, target: Path, section: str, change) -> Path:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(source), "pt") as reader:
        metadata, state = dict(reader.metadata()), {k: reader.get_tensor(k) for k in reader.keys()}
    record = json.loads(metadata[section])
    change(record)
    metadata[section] = json.dumps(record)
    save_file(state, str(target), metadata=metadata)
    return target


def test_huge_numbers_in_a_checkpoint_header_are_refused_before_anything_is_allocated(tmp_path, tiny_checkpoint):
    from medconddiff.checkpoint import check_tensor_shapes

    huge = _edited(tiny_checkpoint, tmp_path / "t.safetensors", "config",
                   lambda c: c["diffusion"].update(num_train_timesteps=10 ** 9))
    with pytest.raises(CheckpointError, match="num_train_timesteps must be 2 to 100000"):
        load_checkpoint(huge)
    wide = _edited(tiny_checkpoint, tmp_path / "w.safetensors", "config",
                   lambda c: c["model"].update(time_embed_dim=100000))
    with pytest.raises(CheckpointError, match="time_embed_dim must be at most 1024"):
        load_checkpoint(wide)
    # Within the bounds, but not what the file holds: found on the meta device, named by tensor.
    other = _edited(tiny_checkpoint, tmp_path / "o.safetensors", "config",
                    lambda c: c["model"].update(time_embed_dim=64))
    with pytest.raises(CheckpointError, match=r"^o.safetensors does not fit .*: tensor '[^']*embed[^']*' is \(\d+"):
        check_tensor_shapes(load_checkpoint(other))
    check_tensor_shapes(load_checkpoint(tiny_checkpoint))


def test_the_cosine_schedule_is_tabulated_at_once_and_unchanged():
    from medconddiff.schedulers import MAX_BETA, make_betas

    s, steps = 0.008, 1000

    def alpha_bar(t):
        return math.cos((t + s) / (1 + s) * math.pi / 2) ** 2

    loop = torch.tensor([min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), MAX_BETA) for i in range(steps)],
                        dtype=torch.float64)
    assert torch.equal(make_betas(DiffusionConfig(num_train_timesteps=steps)), loop)
    assert len(make_betas(DiffusionConfig(num_train_timesteps=100_000))) == 100_000


# -- 6: an edited record of a run to resume --------------------------------------------------------------------


@pytest.mark.parametrize("extra, message", [({"step": "x"}, "'step' must be a whole number"),
                                            ({"step": 1e30}, "'step' must be a whole number"),
                                            ({"epoch": -1}, "'epoch' must be a whole number"),
                                            ({"history": 5}, "'history' must be a list")])
def test_resuming_from_an_edited_record_is_a_checkpoint_error(tmp_path, tiny_checkpoint, extra, message):
    edited = _edited(tiny_checkpoint, tmp_path / "last.safetensors", "extra", lambda record: record.update(extra))
    trainer = Trainer(tiny_config(), None, tmp_path, device="cpu", **QUIET)
    with pytest.raises(CheckpointError, match=f"^last.safetensors: its record's {message}"):
        trainer.resume(edited)


# -- 7: Ctrl-C during finetune --overwrite ------------------------------------------------------------------


def test_an_interrupted_fine_tune_never_replaces_the_file_it_was_to_overwrite(tmp_path, capsys):
    from medconddiff.commands.finetune import _train_and_save

    target = tmp_path / "my_model.safetensors"
    target.write_bytes(b"the user's model")

    class InterruptedRun:
        completed_steps = 3

        class consensus_choice:
            @staticmethod
            def describe():
                return "consensus 'last'"

        def __iter__(self):
            raise KeyboardInterrupt

        def save(self, path, *, overwrite=False):
            assert not Path(path).exists() or overwrite
            Path(path).write_bytes(b"partial")
            return Path(path)

    args = argparse.Namespace(output=target, overwrite=True, quiet=True)
    assert _train_and_save(args, InterruptedRun()) == 130
    assert target.read_bytes() == b"the user's model"
    assert (tmp_path / "my_model_2.safetensors").read_bytes() == b"partial"
    assert "my_model.safetensors is left as it is" in capsys.readouterr().err
    target.unlink()                                     # nothing to keep: the interrupted model takes the name
    assert _train_and_save(args, InterruptedRun()) == 130 and target.read_bytes() == b"partial"


# -- 8: choosing a consensus on slices the model learned -----------------------------------------------------


def test_choosing_on_trained_slices_is_found_from_the_checkpoint_s_record():
    from medconddiff.commands.choose_consensus import _trained_among

    trained = {"trained_on": ["liver117_image"], "train_slices": "0:40,80:128"}
    assert _trained_among(trained, "liver117_image", [38, 39, 40, 41], 128) == ([38, 39], False)
    assert _trained_among(trained, "other", [38, 39], 128) == ([], False)
    assert _trained_among({"trained_on": ["case"]}, "case_0000", [3], 10) == ([3], False)    # every slice
    finetuned = {"trained_on": ["scan", "setcase"], "finetuned_on": [{"scan": "scan", "slices": [4, 6]}]}
    assert _trained_among(finetuned, "scan", [5, 6], 10) == ([6], False)
    assert _trained_among(finetuned, "setcase", [5], 10) == ([], True)


def test_choose_consensus_warns_and_records_when_the_slices_were_trained_on(tmp_path, tiny_checkpoint, capsys):
    from medconddiff.checkpoint import with_extra
    from tests.test_train import write_pair

    image, label = write_pair(tmp_path, "scan", shape=(32, 32, 4))
    model = with_extra(tiny_checkpoint, tmp_path / "m.safetensors", {"trained_on": ["scan_image"],
                                                                      "train_slices": "0:2"})
    assert main(["choose-consensus", str(image), str(label), "--slices", "1:3", "--checkpoint", str(model),
                 "-o", str(tmp_path / "chosen.safetensors"), "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "warning: scan_image: 1 of these 2 slices are ones the model was trained on (1)" in err
    basis = load_checkpoint(tmp_path / "chosen.safetensors").extra["consensus_choice"]["basis"]
    assert basis == "2 labelled slice(s) of a scan (warning: 1 of these 2 slices are ones the model was trained on)"


# -- 9: minor flags -----------------------------------------------------------------------------------------


def test_an_unknown_backbone_is_refused_with_the_config_not_after_the_data():
    with pytest.raises(ConfigError, match="--backbone 'pvt_v2_b9' is not a timm model"):
        training_config(flags={"model": {"backbone": "pvt_v2_b9"}}, **QUIET)


def test_finetune_replay_0_is_refused_not_taken_as_off(tmp_path, liver_volume, capsys):
    image, labels = liver_volume
    nib.save(nib.Nifti1Image(image, np.eye(4)), str(tmp_path / "scan.nii.gz"))
    nib.save(nib.Nifti1Image(labels, np.eye(4)), str(tmp_path / "labels.nii.gz"))
    capsys.readouterr()
    assert main(["finetune", str(tmp_path / "scan.nii.gz"), str(tmp_path / "labels.nii.gz"), "--slices", "2",
                 "--steps", "1", "--replay", "0", "--device", "cpu", "--quiet",
                 "-o", str(tmp_path / "ft.safetensors")]) == 2
    assert "the replay fraction must be between 0 and 1, got 0.0" in capsys.readouterr().err
    assert not (tmp_path / "ft.safetensors").exists()
