"""Fine-tuning on a few labelled slices: one code path for the API, the CLI and the widget."""

from __future__ import annotations

import dataclasses

import nibabel as nib
import numpy as np
import pytest
import torch

from medconddiff.checkpoint import load_checkpoint
from medconddiff.cli import main
from medconddiff.consensus_choice import CANDIDATES
from medconddiff.finetune import (FINETUNE_CONSENSUS, SCAN_KINDS, LabelledScan, channel_names_of_kind,
                                  default_finetune_steps, finetune, scans_learned_from)
from medconddiff.segmenter import Segmenter
from tests.conftest import meta_1mm

META = meta_1mm()


def lesion_scan(liver_volume):
    """The real liver CT cut, relabelled as a user would: one new structure ('lesion', value 1)."""
    image, labels = liver_volume
    return image, (labels == 2).astype(np.uint8)


def test_same_seed_same_weights_and_the_checkpoint_records_its_origin(tmp_path, tiny_checkpoint, liver_volume):
    image, labels = lesion_scan(liver_volume)
    scans = [LabelledScan("cut", image, META, labels, slices=[1, 3])]
    saved = []
    for name in ("a", "b"):
        run = finetune(tiny_checkpoint, scans, class_names=("background", "lesion"), steps=3, seed=7, device="cpu",
                       log=lambda message: None)
        events = list(run)
        assert [e.step for e in events] == [1, 2, 3] and events[-1].total_steps == 3
        saved.append(run.save(tmp_path / f"{name}.safetensors"))
    a, b = (load_checkpoint(path) for path in saved)
    for key in a.state_dict:
        torch.testing.assert_close(a.state_dict[key], b.state_dict[key], rtol=0, atol=0)
    assert a.config.model.class_names == ("background", "lesion")
    start = load_checkpoint(tiny_checkpoint)
    # By file name and hash: the folder above a file may be named after a patient.
    assert a.extra["finetuned_from"] == {"path": tiny_checkpoint.name, "sha256": start.sha256,
                                         "classes": ["background", "liver", "tumour"]}
    assert a.extra["finetuned_on"] == [{"scan": "cut", "slices": [1, 3]}]
    assert a.extra["steps"] == 3 and "denoiser.stem" in a.extra["reinitialised"]
    other = finetune(tiny_checkpoint, scans, class_names=("background", "lesion"), steps=3, seed=8, device="cpu",
                     log=lambda message: None)
    list(other)
    assert not torch.equal(other.trainer.weights_to_save().state_dict()["denoiser.head.2.weight"],
                           a.state_dict["denoiser.head.2.weight"].float())


def test_stopping_early_keeps_the_completed_steps_and_the_segmenter_works(tmp_path, tiny_checkpoint, liver_volume):
    image, labels = lesion_scan(liver_volume)
    run = finetune(tiny_checkpoint, [LabelledScan("cut", image, META, labels, slices=[2])],
                   class_names=("background", "lesion"), steps=50, device="cpu", log=lambda message: None)
    for event in run:
        if event.step == 2:
            break            # the user pressed Cancel
    assert run.completed_steps == 2
    path = run.save(tmp_path / "early.safetensors")
    assert load_checkpoint(path).extra["steps"] == 2 and load_checkpoint(path).extra["steps_planned"] == 50
    segmenter = run.segmenter()
    result = segmenter.segment(image, slices=[0], meta=META)
    assert result.class_names == ("background", "lesion") and result.labels.max() <= 1
    assert Segmenter.from_checkpoint(path, device="cpu").class_names == ("background", "lesion")


def test_a_class_no_training_slice_shows_is_named_in_a_warning(tiny_checkpoint, liver_volume):
    image, labels = liver_volume
    liver_only = np.where(labels == 2, 1, labels)          # a user who painted the tumour as liver
    said = []
    run = finetune(tiny_checkpoint, [LabelledScan("cut", image, META, liver_only, slices=[2])],
                   class_names=("background", "liver", "tumour", "lesion"), steps=1, device="cpu", log=said.append)
    assert len(run.warnings) == 1 and "'tumour', 'lesion' appear on no training slice" in run.warnings[0]
    assert f"warning: {run.warnings[0]}" in said
    shown = finetune(tiny_checkpoint, [LabelledScan("cut", image, META, labels, slices=range(labels.shape[2]))],
                     class_names=("background", "liver", "tumour"), steps=1, device="cpu", log=said.append)
    assert shown.warnings == []


def test_another_spelling_of_the_start_models_classes_is_the_same_class(tmp_path, tiny_checkpoint, liver_volume):
    """A SEG's 'Liver' or an RT structure set's 'Tumor' is the start model's 'liver' / 'tumour': its head is kept,
    not re-initialised, and a training set's 'liver' is not learned as a second class beside it."""
    from medconddiff.training_set import TrainingSet

    image, labels = liver_volume
    said = []
    run = finetune(tiny_checkpoint, [LabelledScan("cut", image, META, labels, slices=[2])],
                   class_names=("background", "Liver", "Tumor"), steps=1, device="cpu", log=said.append)
    assert not any("re-initialised" in line for line in said), said
    training_set = TrainingSet.create(tmp_path / "set", ("background", "liver", "tumour"))
    training_set.add_scan("c", image, META, labels, ("background", "liver", "tumour"), verified_slices=[3])
    swapped = np.choose(labels, [0, 2, 1]).astype(labels.dtype)
    run = finetune(tiny_checkpoint, [LabelledScan("cut", image, META, swapped, slices=[2])],
                   class_names=("background", "TUMOR", "liver"), training_set=training_set, steps=1, device="cpu",
                   log=lambda message: None)
    assert run.config.model.class_names == ("background", "tumour", "liver")     # spelled as the model does
    train_set = run.trainer.train_set
    (current,) = [train_set.slice_labels(i) for i, (name, _) in enumerate(train_set.origin) if name == "cut"]
    (stored,) = [train_set.slice_labels(i) for i, (name, _) in enumerate(train_set.origin) if name != "cut"]
    # Both in the run's numbering (tumour 1, liver 2): the scan's as written, the set's renumbered by class.
    counts = lambda values: np.bincount(np.asarray(values).ravel(), minlength=3)[:3].tolist()  # noqa: E731
    assert counts(current) == counts(swapped[..., 2])
    assert counts(stored) == counts(np.choose(labels[..., 3], [0, 2, 1]))


def test_without_a_number_of_steps_a_fine_tune_trains_200_for_one_scan_and_600_for_more(tmp_path, tiny_checkpoint,
                                                                                        liver_volume):
    """A set of two scans trained for 200 steps was under-trained (README: "Corrections that add up")."""
    from medconddiff.training_set import TrainingSet

    assert [default_finetune_steps(n) for n in (0, 1, 2, 5)] == [200, 200, 600, 600]
    image, labels = liver_volume
    scan = LabelledScan("a", image, META, labels, slices=[1, 2])
    quiet = dict(device="cpu", log=lambda message: None)
    assert finetune(tiny_checkpoint, [scan], **quiet).total_steps == 200
    assert finetune(tiny_checkpoint, [scan, dataclasses.replace(scan, name="b")], **quiet).total_steps == 600
    assert finetune(tiny_checkpoint, [scan], steps=7, **quiet).total_steps == 7
    training_set = TrainingSet.create(tmp_path / "set", ("background", "liver", "tumour"))
    training_set.add_scan("c", image, META, labels, ("background", "liver", "tumour"), verified_slices=[3])
    assert finetune(tiny_checkpoint, [scan], training_set=training_set, **quiet).total_steps == 600
    # The set's own case, with slices the set does not hold yet, is one scan, not two.
    assert scans_learned_from([dataclasses.replace(scan, case="c")], training_set) == 1
    assert scans_learned_from([scan], training_set) == 2
    assert scans_learned_from([dataclasses.replace(scan, slices=[])], training_set) == 1
    assert finetune(tiny_checkpoint, [dataclasses.replace(scan, case="c")], training_set=training_set,
                    **quiet).total_steps == 200


def test_two_scans_of_one_name_each_train_on_their_own_slices(tiny_checkpoint, liver_volume):
    """Two patients' "series 2 'CT'": each scan's corrected slices are what is learned from it."""
    image, labels = liver_volume
    first = LabelledScan("series 2 'CT'", image, META, labels, slices=[1, 2])
    second = LabelledScan("series 2 'CT'", image[:, :, 1:], META, labels[:, :, 1:], slices=[3])
    run = finetune(tiny_checkpoint, [first, second], steps=1, device="cpu", log=lambda message: None)
    assert sorted(run.trainer.train_set.origin) == [("series 2 'CT'", 1), ("series 2 'CT'", 2),
                                                    ("series 2 'CT' (2)", 3)]
    assert [item["slices"] for item in run.provenance()["finetuned_on"]] == [[1, 2], [3]]


def test_unnamed_label_values_and_empty_slice_lists_are_refused(tiny_checkpoint, liver_volume):
    image, labels = liver_volume       # values 0, 1, 2
    with pytest.raises(ValueError, match="label 2 has no class name"):
        finetune(tiny_checkpoint, [LabelledScan("cut", image, META, labels, slices=[1])],
                 class_names=("background", "liver"), steps=1, device="cpu", log=lambda message: None)
    with pytest.raises(ValueError, match="no labelled slices"):
        finetune(tiny_checkpoint, [LabelledScan("cut", image, META, labels, slices=[])], steps=1, device="cpu",
                 log=lambda message: None)
    with pytest.raises(ValueError, match="outside the 6 axial slices"):
        finetune(tiny_checkpoint, [LabelledScan("cut", image, META, labels, slices=[9])], steps=1, device="cpu",
                 log=lambda message: None)


def test_finetune_command_learns_the_labelled_slices_and_refuses_to_overwrite(tmp_path, tiny_checkpoint,
                                                                              liver_volume, capsys):
    image, labels = lesion_scan(liver_volume)
    affine = np.diag([-0.8, -0.8, 2.0, 1.0])       # LPS, 0.8 mm: stored as a scanner would store it
    nib.save(nib.Nifti1Image(image, affine), str(tmp_path / "scan.nii.gz"))
    nib.save(nib.Nifti1Image(labels, affine), str(tmp_path / "labels.nii.gz"))
    out = tmp_path / "tuned.safetensors"
    args = ["finetune", str(tmp_path / "scan.nii.gz"), str(tmp_path / "labels.nii.gz"), "--slices", "labelled",
            "--init", str(tiny_checkpoint), "--class-names", "background", "lesion", "--steps", "2",
            "--device", "cpu", "-o", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    labelled = sorted(int(k) for k in np.flatnonzero(labels.any(axis=(0, 1))))
    assert f"fine-tuning on {len(labelled)} slice(s)" in printed and "saved" in printed
    assert "consensus 'last': the fine-tune default" in printed
    extra = load_checkpoint(out).extra
    assert extra["finetuned_on"][0]["slices"] == labelled and "held_back" not in extra
    choice = extra["consensus_choice"]
    assert choice["method"] == FINETUNE_CONSENSUS == "last" and choice["slices"] == 0
    # --hold-back: one corrected slice chooses the consensus and is not trained on.
    assert main([*args[:-1], str(tmp_path / "held.safetensors"), "--hold-back"]) == 0
    printed = capsys.readouterr().out
    held_extra = load_checkpoint(tmp_path / "held.safetensors").extra
    held = held_extra["held_back"]["slice"]
    assert held in labelled and held_extra["finetuned_on"][0]["slices"] == [i for i in labelled if i != held]
    assert f"slice {held} is held back" in printed and "chosen on 1 corrected slice held back" in printed
    assert held_extra["consensus_choice"]["slices"] == 1 and held_extra["consensus_choice"]["method"] in CANDIDATES
    out.write_bytes(b"the user's file")
    assert main(args) == 2 and "exists" in capsys.readouterr().err
    assert out.read_bytes() == b"the user's file"
    assert main([*args[:4], "2-1", *args[5:-1], str(tmp_path / "x.safetensors")]) == 2
    assert "'10, 12, 20-24'" in capsys.readouterr().err
    # Outputs that cannot be written are refused before training, not after minutes of it.
    (tmp_path / "afile").write_text("not a folder")
    (tmp_path / "folder.safetensors").mkdir()
    for target, extra, said in ((tmp_path / "afile" / "ft.safetensors", [], "is a file, so no folder"),
                                (tmp_path / "folder.safetensors", ["--overwrite"], "is a directory")):
        assert main([*args[:-1], str(target), *extra, "--steps", "50"]) == 2
        err = capsys.readouterr()
        assert said in err.err and "step 10/50" not in err.out
    assert main([*args[:-1], str(tmp_path / "new" / "deeper" / "ft.safetensors")]) == 0      # missing folders are made
    # A file that appears while training stays; the weights go beside it instead of being thrown away.
    import medconddiff.finetune as finetune_module

    race = tmp_path / "race.safetensors"
    real_iter = finetune_module.FinetuneRun.__iter__

    def another_program_writes(self):
        for event in real_iter(self):
            race.write_bytes(b"another program's file")
            yield event

    finetune_module.FinetuneRun.__iter__ = another_program_writes
    try:
        assert main([*args[:-1], str(race)]) == 0
    finally:
        finetune_module.FinetuneRun.__iter__ = real_iter
    assert race.read_bytes() == b"another program's file" and (tmp_path / "race_2.safetensors").is_file()
    assert "is left as it is; the model is saved as race_2.safetensors" in capsys.readouterr().err


def test_naming_the_scan_kind_switches_a_ct_model_to_the_kind_s_intensity_scheme(tmp_path, tiny_checkpoint,
                                                                                 liver_volume, capsys):
    """A CT model fine-tuned on an MRI must not clip it to a HU window: named as MRI, the scan is
    z-scored and the checkpoint records that; unnamed, the start model's CT scheme is kept."""
    image, labels = lesion_scan(liver_volume)
    mri = (image - image.min()).astype(np.float32)
    scans = [LabelledScan("t1", mri, META, labels, slices=[2])]
    quiet = dict(class_names=("background", "lesion"), steps=1, device="cpu", log=lambda message: None)
    assert finetune(tiny_checkpoint, scans, **quiet).config.plan.intensity == ("ct_window",)
    run = finetune(tiny_checkpoint, scans, channel_names=("T1",), **quiet)
    assert run.config.plan.channel_names == ("T1",) and run.config.plan.intensity == ("zscore",)
    list(run)
    assert load_checkpoint(run.save(tmp_path / "t1.safetensors")).config.plan.intensity == ("zscore",)

    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    nib.save(nib.Nifti1Image(mri, affine), str(tmp_path / "t1.nii.gz"))
    nib.save(nib.Nifti1Image(labels, affine), str(tmp_path / "labels.nii.gz"))
    args = ["finetune", str(tmp_path / "t1.nii.gz"), str(tmp_path / "labels.nii.gz"), "--slices", "2",
            "--init", str(tiny_checkpoint), "--class-names", "background", "lesion", "--channel-names", "T1",
            "--steps", "1", "--device", "cpu", "-o", str(tmp_path / "cli.safetensors")]
    assert main(args) == 0
    assert load_checkpoint(tmp_path / "cli.safetensors").config.plan.channel_names == ("T1",)
    assert "intensity scheme zscore from the data" in capsys.readouterr().out
    # Two channels named for a one-channel scan: one clear line, nothing written.
    two = args[:args.index("T1") + 1] + ["T2"] + args[args.index("T1") + 1:-1] + [str(tmp_path / "two.safetensors")]
    assert main(two) == 2
    assert "channel" in capsys.readouterr().err and not (tmp_path / "two.safetensors").exists()


def test_scan_kinds_become_channel_names_the_plan_understands():
    assert SCAN_KINDS == ("model", "CT", "MRI", "other")
    assert channel_names_of_kind("model", ("CT",)) is None
    assert channel_names_of_kind("MRI", ("CT",)) == ("MRI",)
    assert channel_names_of_kind("CT", ("FLAIR", "T1")) == ("CT 1", "CT 2")
    assert channel_names_of_kind("other", ("CT",)) == ("image",)
    with pytest.raises(ValueError, match="scan kind must be one of"):
        channel_names_of_kind("PET", ("CT",))


def test_a_ct_model_on_a_scan_that_is_not_in_hounsfield_units_needs_channel_names(tmp_path, tiny_checkpoint,
                                                                                  liver_volume, capsys):
    """An MRI (no voxel below 0) given to a CT model without --channel-names is refused, naming the flag,
    instead of being clipped to the CT window; a real CT (HU) goes on as before."""
    from medconddiff.finetune import channels_not_in_hounsfield

    image, labels = lesion_scan(liver_volume)
    mri = (image - image.min()).astype(np.float32)
    start = load_checkpoint(tiny_checkpoint)
    assert channels_not_in_hounsfield(start.config.plan, mri) == [0]
    assert channels_not_in_hounsfield(start.config.plan, image) == []
    for name, data in (("t1", mri), ("ct", image)):
        nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / f"{name}.nii.gz"))
    nib.save(nib.Nifti1Image(labels, np.eye(4)), str(tmp_path / "labels.nii.gz"))

    def args(scan: str, out: str) -> list[str]:
        return ["finetune", str(tmp_path / scan), str(tmp_path / "labels.nii.gz"), "--slices", "2", "--init",
                str(tiny_checkpoint), "--class-names", "background", "lesion", "--steps", "1", "--device", "cpu",
                "--quiet", "-o", str(tmp_path / out)]

    assert main(args("t1.nii.gz", "t1.safetensors")) == 2
    err = capsys.readouterr().err.strip()
    assert "--channel-names MRI" in err and "no voxel below 0" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "t1.safetensors").exists()
    assert main(args("ct.nii.gz", "ct.safetensors")) == 0
    assert load_checkpoint(tmp_path / "ct.safetensors").config.plan.intensity == ("ct_window",)


def test_finetune_slices_are_checked_against_the_scan(tmp_path, tiny_checkpoint, liver_volume, capsys):
    image, labels = lesion_scan(liver_volume)
    nib.save(nib.Nifti1Image(image, np.eye(4)), str(tmp_path / "scan.nii.gz"))
    nib.save(nib.Nifti1Image(labels, np.eye(4)), str(tmp_path / "labels.nii.gz"))
    args = ["finetune", str(tmp_path / "scan.nii.gz"), str(tmp_path / "labels.nii.gz"), "--slices", "4:9",
            "--init", str(tiny_checkpoint), "--steps", "1", "--device", "cpu", "-o", str(tmp_path / "x.safetensors")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "--slices '4:9'" in err and "outside the 6 slices of scan.nii.gz" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x.safetensors").exists()



def test_finetune_help_states_the_rule_the_fine_tune_runs_with(capsys):
    from medconddiff.finetune_steps import finetune_steps_rule

    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"(default: {finetune_steps_rule()}" in help_text
    assert finetune_steps_rule().startswith(f"{default_finetune_steps(1)} for one scan, {default_finetune_steps(2)} ")


def test_labels_given_as_floats_are_class_values_only_when_whole(liver_volume):
    """finetune() cast labels 0.75 / 1.5 / -1 to 0 / 1 / 255 and trained on them without a word; labels read
    with load_volume (float32, whole values) are class values."""
    from medconddiff.errors import UserInputError

    image, labels = liver_volume
    scan = LabelledScan("cut", image, META, labels.astype(np.float32), slices=[2])
    np.testing.assert_array_equal(scan.labels, labels)
    for bad, shown in ((labels * 0.75, "0.75"), (labels.astype(np.int16) - 1, "-1")):
        with pytest.raises(UserInputError, match=rf"cut: the labels hold {shown}"):
            LabelledScan("cut", image, META, bad, slices=[2])
