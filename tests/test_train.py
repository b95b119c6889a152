"""Training: a real loss decrease on real slices, resume, Ctrl-C, DDP agreement, dataset errors."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medconddiff.checkpoint import load_checkpoint
from medconddiff.cli import main
from medconddiff.datasets import Case, DatasetError, TrainingSlices, load_case
from medconddiff.nifti import load_volume
from medconddiff.train import Trainer
from tests.conftest import meta_1mm, tiny_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def liver_case(liver_volume):
    image, labels = liver_volume
    return Case("liver", image, labels, meta_1mm())


@pytest.mark.parametrize("decoder", ["resblocks", "light"])
def test_loss_decreases_on_real_slices(tmp_path, liver_case, decoder):
    config = tiny_config(denoiser_decoder=decoder)
    config.train.augment = False
    config.train.iterations_per_epoch = 8
    config.train.epochs = 3
    config.train.lr = 3e-3
    config.train.warmup_steps = 1
    train_set = TrainingSlices([liver_case], config.plan, config.train.patch_size)
    trainer = Trainer(config, train_set, tmp_path, device="cpu")
    trainer.fit()
    losses = [record["loss"] for record in trainer.history]
    assert losses[-1] < losses[0], losses
    checkpoint = load_checkpoint(tmp_path / "final.safetensors")
    assert checkpoint.config == config and checkpoint.extra["step"] == 24


def test_resume_and_interrupt_keep_the_run(tmp_path, liver_case, monkeypatch):
    config = tiny_config()
    config.train.epochs = 3
    train_set = TrainingSlices([liver_case], config.plan, config.train.patch_size, augment=True)
    trainer = Trainer(config, train_set, tmp_path, device="cpu")
    calls = {"n": 0}
    original = Trainer.train_step

    def interrupt_in_second_epoch(self, *args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(Trainer, "train_step", interrupt_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    monkeypatch.setattr(Trainer, "train_step", original)
    saved = load_checkpoint(tmp_path / "last.safetensors")
    assert saved.extra["epoch"] == 1 and saved.extra["step"] == 2
    assert any(k.startswith("aux.optim.") for k in saved.state_dict)
    resumed = Trainer(config, train_set, tmp_path, device="cpu")
    resumed.resume(tmp_path / "last.safetensors")
    assert resumed.step == 2 and resumed.epoch == 1
    torch.testing.assert_close(resumed.ema.module.state_dict()["denoiser.head.2.weight"],
                               saved.state_dict["denoiser.head.2.weight"])
    resumed.fit()
    assert load_checkpoint(tmp_path / "final.safetensors").extra["step"] == 6


def test_ddp_two_cpu_processes_agree(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(ROOT / "tests" / "ddp_worker.py"), str(tmp_path)]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert completed.returncode == 0, completed.stderr[-3000:]
    digests = [(tmp_path / f"rank{r}_of_2.txt").read_text() for r in range(2)]
    assert digests[0] == digests[1], "DDP ranks diverged"
    assert (tmp_path / "final.safetensors").is_file()
    assert load_checkpoint(tmp_path / "final.safetensors").extra["world_size"] == 2
    assert load_checkpoint(tmp_path / "final.safetensors").extra["epoch"] == 1     # both stopped where rank 0 did


def write_pair(folder: Path, name: str, shape=(16, 16, 3), label_max=2, label_affine=None, suffix=""):
    image = np.random.default_rng(0).normal(0, 100, shape).astype(np.float32)
    labels = np.zeros(shape, np.uint8)
    labels[4:8, 4:8] = label_max
    nib.save(nib.Nifti1Image(image, np.eye(4)), str(folder / f"{name}_image.nii.gz"))
    affine = np.eye(4) if label_affine is None else label_affine
    nib.save(nib.Nifti1Image(labels, affine), str(folder / f"{name}_label{suffix}.nii.gz"))
    return folder / f"{name}_image.nii.gz", folder / f"{name}_label{suffix}.nii.gz"


def test_label_files_must_lie_on_the_image_grid_and_fit_the_classes(tmp_path):
    def case(image_path, label_path):
        image, meta = load_volume(image_path)
        return load_case("x", image, meta, label_path, num_classes=3)

    bad_shape = write_pair(tmp_path, "b", shape=(16, 16, 3))
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 4), np.uint8), np.eye(4)), str(bad_shape[1]))
    with pytest.raises(DatasetError, match="shape"):
        case(*bad_shape)
    shifted = np.eye(4)
    shifted[0, 3] = 5
    with pytest.raises(DatasetError, match="affine"):
        case(*write_pair(tmp_path, "c", label_affine=shifted))
    with pytest.raises(DatasetError, match="label 5"):
        case(*write_pair(tmp_path, "d", label_max=5))


def test_training_crops_are_at_the_plan_spacing_centred_on_foreground_and_padded_with_air(liver_case):
    from medconddiff.config import PreprocessPlan

    fine = Case("fine", liver_case.image, liver_case.labels, liver_case.meta)
    fine.meta = type(liver_case.meta)(affine=np.diag([0.5, 0.5, 1.0, 1.0]), spacing=(0.5, 0.5, 1.0))
    torch.manual_seed(0)
    crops = TrainingSlices([fine], PreprocessPlan(), patch_size=64, foreground_fraction=1.0)
    assert tuple(crops.cases[0].images.shape[-2:]) == (32, 32)   # 64 px at 0.5 mm = 32 px at the plan's 1 mm
    image, labels = crops[0]
    assert image.shape == (1, 64, 64) and labels.shape == (64, 64)
    assert (labels > 0).any(), "a foreground-centred crop shows foreground"
    # A 64-px crop of a 32-px slice reaches past it: air (-1 under the CT window) and background.
    assert (image == -1.0).float().mean() > 0.5 and (labels == 0).float().mean() > 0.5
    weights = crops.class_slice_weights(3)
    assert torch.isclose(weights.sum(), torch.tensor(1.0)) and (weights > 0).all()
    picked = TrainingSlices([liver_case], PreprocessPlan(), patch_size=64, slices_by_case={"liver": [4, 1]})
    assert [origin[1] for origin in picked.origin] == [1, 4]


def test_train_cli_refuses_to_clobber_and_reports_errors(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "final.safetensors").write_bytes(b"previous run")
    image, label = write_pair(tmp_path, "a")
    assert main(["train", "--pair", str(image), str(label), "-o", str(tmp_path / "run")]) == 2
    assert "exists" in capsys.readouterr().err
    assert (tmp_path / "run" / "final.safetensors").read_bytes() == b"previous run"
    # An interrupted run's last checkpoint, what --resume continues, is kept as well.
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "last.safetensors").write_bytes(b"interrupted run")
    assert main(["train", "--pair", str(image), str(label), "-o", str(tmp_path / "cut")]) == 2
    assert "--resume" in capsys.readouterr().err
    assert (tmp_path / "cut" / "last.safetensors").read_bytes() == b"interrupted run"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["train", str(empty), "-o", str(tmp_path / "x")]) == 2
    assert "expected" in capsys.readouterr().err
    # --max-minutes 0 ran without a limit and -5 stopped after one epoch, without a word.
    for minutes in ("0", "-5", "nan"):
        with pytest.raises(SystemExit):
            main(["train", "--pair", str(image), str(label), "-o", str(tmp_path / "y"), "--max-minutes", minutes])
        assert "give a positive number" in capsys.readouterr().err


def write_nnunet_mri(root: Path, cases: int = 2) -> Path:
    """A tiny nnU-Net v2 dataset: 2-channel MRI (FLAIR, T1), labels background/tumour, 1.2 mm in-plane."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    rng = np.random.default_rng(1)
    affine = np.diag([1.2, 1.2, 3.0, 1.0])
    for c in range(cases):
        labels = np.zeros((40, 40, 4), np.uint8)
        labels[10 + c:22 + c, 12:26, 1:3] = 1
        for channel in range(2):
            image = (400 + 300.0 * labels * (channel + 1) + rng.normal(0, 30, labels.shape)).astype(np.float32)
            nib.save(nib.Nifti1Image(image, affine), str(root / "imagesTr" / f"brain_{c:03d}_{channel:04d}.nii.gz"))
        nib.save(nib.Nifti1Image(labels, affine), str(root / "labelsTr" / f"brain_{c:03d}.nii.gz"))
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "FLAIR", "1": "T1"}, "labels": {"background": 0, "tumour": 1},
        "numTraining": cases, "file_ending": ".nii.gz", "name": "TinyBrain"}))
    return root


TINY_FLAGS = ["--backbone", "pvt_v2_b0", "--denoiser-channels", "16", "--stem-channels", "8", "--time-embed-dim", "32",
              "--num-train-timesteps", "100", "--epochs", "1", "--iterations-per-epoch", "2", "--train-batch-size", "2",
              "--patch-size", "32", "--val-every", "0", "--device", "cpu"]


def test_the_dataset_says_classes_channels_and_intensity_and_flags_may_not_contradict_it(tmp_path, capsys):
    data = write_nnunet_mri(tmp_path / "Dataset001_TinyBrain")
    assert main(["train", str(data), "-o", str(tmp_path / "run"), *TINY_FLAGS]) == 0
    config = load_checkpoint(tmp_path / "run" / "final.safetensors").config
    assert config.model.class_names == ("background", "tumour")
    assert config.plan.channel_names == ("FLAIR", "T1") and config.plan.intensity == ("zscore", "zscore")
    assert config.plan.target_spacing == (1.2, 1.2)
    logged = json.loads((tmp_path / "run" / "config.json").read_text())
    assert logged["provenance"]["fingerprint"]["cases"] == 2
    capsys.readouterr()
    for flags, message in [(["--class-names", "background", "liver", "tumour"], "names the labels background tumour"),
                           (["--intensity", "ct_window"], "does not call it CT"),
                           (["--channel-names", "CT"], "names the channels FLAIR T1")]:
        assert main(["train", str(data), "-o", str(tmp_path / "bad"), *TINY_FLAGS, *flags]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "bad" / "final.safetensors").exists()


def test_train_names_the_channels_of_plain_pairs_by_the_flag(tmp_path, capsys):
    """`train --pair ... --channel-names T1` saved channel_names ['CT'], intensity ['ct_window']: an MRI read
    through a CT window, the flag dropped."""
    from medconddiff.checkpoint import load_checkpoint

    image, label = write_pair(tmp_path, "a", shape=(40, 40, 4), label_max=1)
    assert main(["train", "--pair", str(image), str(label), "-o", str(tmp_path / "run"), "--channel-names", "T1",
                 "--class-names", "background", "lesion", *TINY_FLAGS]) == 0, capsys.readouterr().err
    plan = load_checkpoint(tmp_path / "run" / "final.safetensors").config.plan
    assert plan.channel_names == ("T1",) and plan.intensity == ("zscore",)


def test_init_default_with_a_new_class_list_keeps_the_body_and_reinitialises_the_class_layers(tmp_path, capsys):
    """Fine-tuning the bundled CT liver model on a 2-channel MRI tumour dataset: no flag repeated."""
    data = write_nnunet_mri(tmp_path / "Dataset001_TinyBrain", cases=1)
    flags = ["--epochs", "1", "--iterations-per-epoch", "2", "--train-batch-size", "2", "--patch-size", "64",
             "--val-every", "0", "--device", "cpu"]
    assert main(["train", str(data), "--init", "default", "-o", str(tmp_path / "ft"), *flags]) == 0
    out = capsys.readouterr().out
    assert "re-initialised for the new class list ['background', 'tumour']: denoiser.head.2, denoiser.stem" in out
    assert "adapted to 2 input channels" in out
    start = load_checkpoint("default")
    tuned = load_checkpoint(tmp_path / "ft" / "final.safetensors")
    assert tuned.config.model.backbone == start.config.model.backbone
    assert tuned.config.plan.target_spacing == start.config.plan.target_spacing      # geometry from the start
    assert tuned.config.plan.intensity == ("zscore", "zscore")                       # intensity from the MRI data
    assert tuned.extra["init_from"]["sha256"] == start.sha256
    assert main(["train", str(data), "--init", "default", "-o", str(tmp_path / "x"), *flags,
                 "--backbone", "pvt_v2_b1"]) == 2
    assert "contradicts the start checkpoint" in capsys.readouterr().err


def _warmup_then_cosine(step, total, lr, warmup):
    """The schedule as it was written by hand before torch's schedulers replaced it."""
    import math

    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


@pytest.mark.parametrize("lr, warmup, total", [(3e-4, 20, 100), (1e-4, 50, 2000), (1e-3, 0, 300), (3e-3, 1, 2),
                                               (2e-4, 50, 10)])
def test_learning_rate_schedule_is_the_linear_warmup_then_cosine_it_always_was(lr, warmup, total):
    """torch's LinearLR + CosineAnnealingLR give the rates of the former formula, in a run step by step
    (what Trainer does), at single steps (lr_at), after the end (the floor) and in a resumed run."""
    from types import SimpleNamespace

    from medconddiff.train import follow_lr_schedule, lr_at, lr_schedule

    config = SimpleNamespace(lr=lr, warmup_steps=warmup)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    schedule = lr_schedule(optimizer, total, config)
    for step in range(total + 3):
        follow_lr_schedule(schedule, step, total, config)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(_warmup_then_cosine(step, total, lr, warmup), rel=1e-12)
    for step in sorted({0, warmup // 2, max(0, warmup - 1), warmup, (warmup + total) // 2, total - 1, total + 5}):
        assert lr_at(step, total, config) == pytest.approx(_warmup_then_cosine(step, total, lr, warmup), rel=1e-12)


def test_a_resumed_trainer_continues_the_learning_rate_where_it_stopped(tmp_path, liver_case):
    config = tiny_config()
    config.train.warmup_steps = 3
    config.train.epochs = 3
    train_set = TrainingSlices([liver_case], config.plan, config.train.patch_size)
    trainer = Trainer(config, train_set, tmp_path, device="cpu")
    trainer.step = 4          # as resume() leaves it
    trainer._follow_lr_schedule(total_steps=6)
    expected = _warmup_then_cosine(4, 6, config.train.lr, 3)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12)


def test_training_with_validation_slices_records_the_consensus_they_support(tmp_path, liver_case):
    """The final checkpoint carries a consensus choice and step cap measured on the validation slices
    (never trained on); per-epoch checkpoints do not; --consensus auto then uses it."""
    from medconddiff.consensus_choice import EXTRA_KEY, recorded_choice
    from medconddiff.segmenter import Segmenter
    from medconddiff.train import Validation

    config = tiny_config()
    config.train.epochs = 1
    config.train.iterations_per_epoch = 2
    config.train.val_every = 0
    train_set = TrainingSlices([liver_case], config.plan, config.train.patch_size, [(0, 3)])
    messages = []
    trainer = Trainer(config, train_set, tmp_path, device="cpu", validation=Validation([liver_case], [(3, 6)]),
                      log=messages.append)
    trainer.fit()
    assert EXTRA_KEY not in load_checkpoint(tmp_path / "last.safetensors").extra
    choice = recorded_choice(load_checkpoint(tmp_path / "final.safetensors").extra)
    assert choice is not None and choice.slices == 3 and choice.scans == 1
    assert choice.basis == "3 validation slice(s) of 1 case(s), not trained on"
    assert set(choice.candidate_dice) >= {"mean", "late_mean", "last"} and len(choice.step_dice) >= 1
    assert any(message.startswith(f"consensus '{choice.method}', chosen on 3 validation") for message in messages)
    assert Segmenter.from_checkpoint(tmp_path / "final.safetensors", device="cpu").consensus_choice == choice


def test_training_without_validation_slices_records_no_consensus_choice(tmp_path, liver_case):
    from medconddiff.consensus_choice import EXTRA_KEY

    config = tiny_config()
    config.train.epochs = 1
    config.train.iterations_per_epoch = 1
    trainer = Trainer(config, TrainingSlices([liver_case], config.plan, config.train.patch_size), tmp_path,
                      device="cpu")
    trainer.fit()
    assert EXTRA_KEY not in load_checkpoint(tmp_path / "final.safetensors").extra


def test_the_optimizer_s_foreach_path_trains_the_weights_the_single_tensor_loop_trains(tmp_path, liver_case,
                                                                                      monkeypatch):
    """The Trainer asks AdamW for its foreach path (a third faster on the CPU, where torch's default is a loop
    over tensors); fine-tunes and their README figures rely on it changing no weight, not even in the last bit."""
    config = tiny_config()
    config.train.augment = False
    config.train.iterations_per_epoch = 6
    config.train.epochs = 1
    train_set = TrainingSlices([liver_case], config.plan, config.train.patch_size)

    def trained_weights(folder: Path) -> dict[str, torch.Tensor]:
        trainer = Trainer(config, train_set, folder, device="cpu")
        trainer.fit()
        return {k: v.detach().clone() for k, v in trainer.weights_to_save().state_dict().items()}

    foreach = trained_weights(tmp_path / "foreach")
    adamw = torch.optim.AdamW

    class SingleTensorAdamW(adamw):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "foreach": False})

    monkeypatch.setattr(torch.optim, "AdamW", SingleTensorAdamW)
    single = trained_weights(tmp_path / "single")
    assert foreach.keys() == single.keys()
    changed = [key for key in foreach if not torch.equal(foreach[key], single[key])]
    assert not changed, changed[:3]
    start = Trainer(config, train_set, tmp_path / "start", device="cpu").weights_to_save().state_dict()
    assert any(not torch.equal(start[key], foreach[key]) for key in foreach)   # training moved the weights


def test_a_non_finite_loss_skips_its_step_and_a_diverged_run_stops_without_saving_nan(tmp_path, liver_case,
                                                                                       monkeypatch):
    import math

    from medconddiff.train import MAX_NONFINITE_STEPS, TrainingDiverged, _TrainingLoss

    config = tiny_config()
    config.train.epochs, config.train.iterations_per_epoch = 2, 4
    trainer = Trainer(config, TrainingSlices([liver_case], config.plan, config.train.patch_size), tmp_path,
                      device="cpu")
    original = _TrainingLoss.forward
    poisoned = {2, 5}                            # the optimizer steps whose loss is NaN (a bf16 overflow)

    def forward(self, *args, **kwargs):
        losses = original(self, *args, **kwargs)
        if trainer.step + 1 in poisoned:
            losses["loss"] = losses["loss"] * float("nan")
        return losses

    monkeypatch.setattr(_TrainingLoss, "forward", forward)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train_step(*next(iter(trainer.loader())), 8)
    after_first = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train_step(*next(iter(trainer.loader())), 8)             # step 2: NaN, skipped
    assert all(torch.equal(after_first[k], v) for k, v in trainer.model.state_dict().items())
    assert any(not torch.equal(before[k], after_first[k]) for k in before)
    trainer.fit()
    assert trainer.history[0]["skipped_steps"] == 1 and math.isfinite(trainer.history[0]["loss"])
    assert all(torch.isfinite(t).all() for t in load_checkpoint(tmp_path / "final.safetensors").state_dict.values()
               if t.is_floating_point())

    diverged = Trainer(config, TrainingSlices([liver_case], config.plan, config.train.patch_size), tmp_path / "d",
                       device="cpu")
    trainer = diverged
    poisoned.update(range(1, 100))
    with pytest.raises(TrainingDiverged, match=f"{MAX_NONFINITE_STEPS} steps in a row"):
        diverged.fit()
    assert not (tmp_path / "d" / "final.safetensors").exists()


def test_validation_slices_are_never_trained_on(liver_case, tmp_path):
    """--val-slices alone (or overlapping --train-slices) used to train on the validation slices too."""
    from medconddiff.dataset_layout import DatasetError
    from medconddiff.train import build_datasets

    config = tiny_config()
    train_set, validation = build_datasets(config, [liver_case], None, [(2, 4)])
    assert sorted({index for _, index in train_set.origin}) == [0, 1, 4, 5] and validation is not None
    train_set, _ = build_datasets(config, [liver_case], [(0, 4)], [(3, 6)])
    assert sorted({index for _, index in train_set.origin}) == [0, 1, 2]
    train_set, validation = build_datasets(config, [liver_case], [(1, 3)], None)
    assert sorted({index for _, index in train_set.origin}) == [1, 2] and validation is None
    with pytest.raises(DatasetError, match="every training slice is a validation slice"):
        build_datasets(config, [liver_case], [(0, 2)], [(0, 6)])
    # A sparse case keeps leaving out the slices nobody verified.
    from medconddiff.losses import IGNORE_INDEX
    from medconddiff.preprocess import ScanPreprocessor

    sparse = dataclasses.replace(liver_case, labels=liver_case.labels.copy())
    ScanPreprocessor(config.plan).geometry(sparse.labels.shape, sparse.meta).slice_view(sparse.labels)[4] = IGNORE_INDEX
    train_set, _ = build_datasets(config, [sparse], None, [(2, 3)])
    assert sorted({index for _, index in train_set.origin}) == [0, 1, 3, 5]
    # Nor are they scored: a consensus 'chosen' on slices nobody checked was NaN everywhere and replaced
    # the model's own record.
    from medconddiff.segmenter import Segmenter
    from medconddiff.train import Validation
    from tests.conftest import save_tiny

    segmenter = Segmenter.from_checkpoint(save_tiny(tmp_path / "t.safetensors", config), device="cpu")
    (scan,) = Validation([sparse], [(3, 6)]).choosing_slices(segmenter)
    assert list(scan.slices) == [3, 5]


def test_resuming_into_another_runs_folder_is_refused_and_needs_no_pretrained_file(tmp_path, capsys):
    image, label = write_pair(tmp_path, "a")
    tiny = [*TINY_FLAGS, "--iterations-per-epoch", "1"]
    assert main(["train", "--pair", str(image), str(label), "-o", str(tmp_path / "one"), *tiny]) == 0
    assert main(["train", "--pair", str(image), str(label), "-o", str(tmp_path / "two"), *tiny]) == 0
    kept = (tmp_path / "two" / "final.safetensors").read_bytes()
    assert main(["train", "--pair", str(image), str(label), "-o", str(tmp_path / "two"),
                 "--resume", str(tmp_path / "one" / "last.safetensors"), *tiny]) == 2
    assert "exists" in capsys.readouterr().err and (tmp_path / "two" / "final.safetensors").read_bytes() == kept
    assert main(["train", "--pair", str(image), str(label), "-o", str(tmp_path / "one"),
                 "--resume", str(tmp_path / "one" / "last.safetensors"), *tiny]) == 0
    # A run begun from a pretrained backbone file resumes where that file is gone (another machine, /tmp cleaned).
    import timm
    from safetensors.torch import save_file

    body = timm.create_model("pvt_v2_b0", features_only=True, pretrained=False, in_chans=1)
    save_file({k: v.contiguous() for k, v in body.state_dict().items()}, str(tmp_path / "pretrained.safetensors"))
    assert main(["train", "--pair", str(image), str(label), "-o", str(tmp_path / "three"), *tiny,
                 "--backbone-weights", str(tmp_path / "pretrained.safetensors")]) == 0
    (tmp_path / "pretrained.safetensors").unlink()
    capsys.readouterr()
    assert main(["train", "--pair", str(image), str(label), "-o", str(tmp_path / "three"),
                 "--resume", str(tmp_path / "three" / "last.safetensors"), *tiny]) == 0
    assert "is not here; the resumed weights do not need it" in capsys.readouterr().err


def test_a_resumed_run_goes_on_averaging_and_drawing_where_it_stopped(tmp_path, liver_case):
    config = tiny_config()
    config.train.epochs, config.train.iterations_per_epoch = 1, 3

    def trainer():
        return Trainer(config, TrainingSlices([liver_case], config.plan, config.train.patch_size), tmp_path,
                       device="cpu")

    first = trainer()
    first.fit()
    assert int(first.ema.n_averaged) == 3
    fresh, resumed = trainer(), trainer()
    resumed.resume(tmp_path / "last.safetensors")
    assert int(resumed.ema.n_averaged) == 3           # was 0: the next update copied the raw weights into the EMA
    # Its sampler draws are not the run's first draws again.
    draws = [list(iter(t.loader().sampler)) for t in (fresh, resumed)]
    assert draws[0] != draws[1]
