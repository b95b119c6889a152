"""Each model's own consensus: chosen on labelled slices, recorded in the checkpoint, used by "auto"."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from medconddiff.checkpoint import load_checkpoint
from medconddiff.config import SamplingConfig
from medconddiff.consensus_choice import (CANDIDATES, MIN_STEP_CAP, ONE_SHOT_STEP_CAP, SWITCH_MARGIN,
                                          ChoosingSlices, ConsensusChoice, choose_consensus, pick, resolved_consensus,
                                          useful_steps)
from medconddiff.errors import UserInputError
from medconddiff.evaluation import evaluate_volume
from medconddiff.finetune import FINETUNE_CONSENSUS, HeldBack, LabelledScan, finetune, held_back_slice
from medconddiff.segmenter import Segmenter
from tests.conftest import meta_1mm

META = meta_1mm()
QUIET = dict(steps=2, device="cpu", log=lambda message: None)


def test_the_prior_stays_unless_another_fusion_beats_it_by_more_than_the_switch_margin():
    scores = {"mean": 0.80, "late_mean": 0.80 + SWITCH_MARGIN / 2, "last": 0.79}
    assert pick(scores) == "mean"                                  # within what the seed alone moves
    assert pick({**scores, "last": 0.80 + 2 * SWITCH_MARGIN}) == "last"
    assert pick(scores, prior="late_mean") == "late_mean"
    assert pick({"mean": float("nan"), "vote_gated": 0.5}) == "vote_gated"   # an undefined prior cannot stay
    assert pick({"mean": 0.7, "late_mean": 0.7 + 2 * SWITCH_MARGIN, "last": 0.7 + 2 * SWITCH_MARGIN}) == "late_mean"


def test_steps_that_rise_to_the_last_make_last_the_choice_without_a_margin():
    scores = {"mean": 0.8999, "late_mean": 0.9004, "last": 0.9004}       # the bundled default's choosing slices
    assert pick(scores) == "mean"
    assert pick(scores, steps_taken=(0.8985, 0.9004)) == "last"
    assert pick(scores, steps_taken=(0.8985, 0.9004, 0.9004)) == "last"   # a level step still rises overall
    for not_rising in ((0.8833, 0.8829), (0.88, 0.88), (0.88, 0.90, 0.89), (0.9,), (float("nan"), 0.9)):
        assert pick(scores, steps_taken=not_rising) == "mean"
    assert pick({**scores, "vote_gated": 0.9004 + 2 * SWITCH_MARGIN}, steps_taken=(0.8, 0.9)) == "vote_gated"
    choice = ConsensusChoice("last", "x", 1, 4, scores, step_dice=(0.8985, 0.9004, 0.9008, 0.9), one_shot_dice=0.888,
                             step_cap=2)
    assert choice.steps_taken == (0.8985, 0.9004) and "rise to the last" in choice.describe()
    assert "rise" not in dataclasses.replace(choice, method="mean").describe()


def test_the_held_back_slice_is_the_corrected_slice_farthest_from_the_others():
    def scan(slices):
        return LabelledScan("s", np.zeros((4, 4, 40), np.float32), None, np.zeros((4, 4, 40), np.uint8), slices)

    assert held_back_slice([scan([2, 5, 6, 7])]) is None                       # off unless asked for
    assert held_back_slice([scan([2, 5, 6, 7])], hold_back=True) == HeldBack(0, 2)
    assert held_back_slice([scan([5, 6]), scan([10, 11, 12, 14])], hold_back=True) == HeldBack(1, 14)
    assert held_back_slice([scan([3, 4])], hold_back=True) == HeldBack(0, 4)         # one is left to train on
    # A training set's cases count too: the one with the most verified slices (equals: by name).
    cases = {"b": [1, 9, 10], "a": [3, 4, 20]}
    assert held_back_slice([scan([5, 6])], True, cases) == HeldBack(None, 20, "a")
    assert held_back_slice([scan([5, 6, 30])], True, cases) == HeldBack(0, 30)      # scans first among equals
    for too_few, set_slices in (([scan([3])], None), ([], None), ([], {"a": [4]})):
        with pytest.raises(UserInputError, match="at least 2 corrected slices"):
            held_back_slice(too_few, True, set_slices)


def test_a_recorded_choice_is_what_auto_means_and_the_sidecar_says_why(tiny_checkpoint, liver_volume):
    image, _ = liver_volume
    plain = Segmenter.from_checkpoint(tiny_checkpoint, device="cpu")
    assert plain.consensus_choice is None
    result = plain.segment(image, SamplingConfig(steps=2), slices=[1], meta=META)
    assert result.sampling.consensus == "mean" and result.provenance["consensus_choice"] is None
    choice = ConsensusChoice("last", "a test", scans=1, slices=2, candidate_dice={m: 0.5 for m in CANDIDATES},
                             step_dice=(0.4, 0.5), one_shot_dice=0.45)
    chosen = Segmenter(plain.model, plain.config, device="cpu", consensus_choice=choice)
    result = chosen.segment(image, SamplingConfig(steps=2), slices=[1], meta=META)
    assert result.sampling.consensus == "last"
    assert result.provenance["consensus_choice"]["method"] == "last"
    assert result.provenance["consensus_choice"]["basis"] == "a test"
    # An explicit consensus overrides the model's choice.
    assert chosen.segment(image, SamplingConfig(steps=2, consensus="vote_gated"), slices=[1],
                          meta=META).sampling.consensus == "vote_gated"
    # "last" without fusion is exactly the final step's x̂0.
    last = result.step_labels_on_scan(result.trajectory.shape[0] - 1)
    assert np.array_equal(result.geometry.slice_view(result.labels)[[1]], last)


def test_choosing_scores_each_candidate_as_evaluate_does(tiny_checkpoint, liver_volume):
    image, labels = liver_volume
    segmenter = Segmenter.from_checkpoint(tiny_checkpoint, device="cpu")
    sampling = SamplingConfig(steps=3, adaptive=False)
    choice = choose_consensus(segmenter, [ChoosingSlices(image, labels, META, [2])], "slice 2", sampling=sampling)
    assert set(choice.candidate_dice) == set(CANDIDATES) and len(choice.step_dice) == 3
    assert choice.method == pick(choice.candidate_dice, steps_taken=choice.step_dice)
    for method in ("mean", "last"):
        report = evaluate_volume(segmenter, image, labels, META, dataclasses.replace(sampling, consensus=method),
                                 slices=[2])
        assert math.isclose(choice.candidate_dice[method], report["consensus"]["mean_foreground"]["dice"],
                            abs_tol=1e-9)
        assert math.isclose(choice.one_shot_dice, report["one_shot"]["mean_foreground"]["dice"], abs_tol=1e-9)
        assert np.allclose(choice.step_dice, report["step_mean_dice"])
    assert math.isclose(choice.margin, choice.candidate_dice[choice.method] - max(*choice.step_dice,
                                                                                   choice.one_shot_dice))
    # Unchecked voxels count in no figure: ignoring every voxel but slice 2's own leaves the figures unchanged.
    sparse = np.where(np.arange(labels.shape[2])[None, None] == 2, labels, 9).astype(np.uint8)
    again = choose_consensus(segmenter, [ChoosingSlices(image, sparse, META, [2], ignore_value=9)], "slice 2",
                             sampling=sampling)
    assert again.candidate_dice == choice.candidate_dice
    with pytest.raises(UserInputError, match="needs labelled slices"):
        choose_consensus(segmenter, [ChoosingSlices(image, labels, META, [])], "none")


def test_a_fine_tune_records_its_choice_in_the_checkpoint(tmp_path, tiny_checkpoint, liver_volume):
    image, labels = liver_volume
    scans = [LabelledScan("cut", image, META, (labels == 2).astype(np.uint8), slices=[0, 1, 2, 5])]
    run = finetune(tiny_checkpoint, scans, class_names=("background", "lesion"), hold_back=True, **QUIET)
    assert run.held_back == HeldBack(0, 5) and run.consensus_choice.method == FINETUNE_CONSENSUS
    list(run)
    assert run.consensus_choice.slices == 1 and run.consensus_choice.method in CANDIDATES
    path = run.save(tmp_path / "tuned.safetensors")
    extra = load_checkpoint(path).extra
    assert extra["held_back"]["slice"] == 5 and extra["finetuned_on"][0]["slices"] == [0, 1, 2]
    loaded = Segmenter.from_checkpoint(path, device="cpu")
    assert loaded.consensus_choice == run.consensus_choice
    assert run.segmenter("cpu").consensus_choice == run.consensus_choice
    # Without holding back, every slice is trained on and the fine-tune default is the choice.
    every = finetune(tiny_checkpoint, scans, class_names=("background", "lesion"), **QUIET)
    list(every)
    assert every.held_back is None and every.consensus_choice.method == FINETUNE_CONSENSUS
    assert "fine-tune default" in every.consensus_choice.describe()
    saved = load_checkpoint(every.save(tmp_path / "every.safetensors")).extra
    assert saved["consensus_choice"]["method"] == FINETUNE_CONSENSUS and "held_back" not in saved
    assert saved["finetuned_on"][0]["slices"] == [0, 1, 2, 5]


def test_an_unreadable_choice_in_a_checkpoint_is_a_clear_error():
    with pytest.raises(UserInputError, match="consensus choice"):
        ConsensusChoice.from_dict({"basis": "no method"})
    with pytest.raises(UserInputError, match="unknown fusion"):
        ConsensusChoice.from_dict({"method": "median"})
    record = ConsensusChoice("mean", "x", 1, 1, {"mean": float("nan")}, (0.5,), float("nan")).to_dict()
    assert record["candidate_dice"]["mean"] is None and record["one_shot_dice"] is None
    assert math.isnan(ConsensusChoice.from_dict(record).candidate_dice["mean"])


def test_the_step_cap_is_where_later_steps_stop_adding_dice():
    assert useful_steps([0.80, 0.85, 0.8505, 0.8502, 0.8509]) == 2        # later steps add < STEP_GAIN
    assert useful_steps([0.80, 0.82, 0.84, 0.86]) is None                  # still rising: no cap
    assert useful_steps([0.88, 0.87, 0.86]) == MIN_STEP_CAP               # falling: never below two steps
    assert useful_steps([0.7, float("nan"), 0.7, 0.7]) == 3
    assert useful_steps([0.5]) is None


def test_a_capped_model_stops_every_slice_at_its_cap_and_the_choice_scores_what_a_capped_run_fuses(
        tiny_checkpoint, liver_volume):
    image, labels = liver_volume
    plain = Segmenter.from_checkpoint(tiny_checkpoint, device="cpu")
    sampling = SamplingConfig(steps=5, convergence_change=0.0)          # nothing converges: only a cap stops
    uncapped = plain.segment(image, sampling, slices=[1, 2], meta=META)
    assert uncapped.sampling.step_cap == 5 and (uncapped.steps_used == 5).all()
    capped_choice = ConsensusChoice("mean", "a test", 1, 2, {"mean": 0.5}, (0.5,) * 5, 0.5, step_cap=2,
                                    schedule_steps=5)
    capped = Segmenter(plain.model, plain.config, device="cpu", consensus_choice=capped_choice)
    run = capped.segment(image, sampling, slices=[1, 2], meta=META)
    assert run.sampling.step_cap == 2 and (run.steps_used == 2).all()
    assert run.provenance["consensus_choice"]["step_cap"] == 2
    # A cap is a prefix of the same trajectory; fixed steps are never capped; an explicit cap wins.
    np.testing.assert_array_equal(run.trajectory[:2], uncapped.trajectory[:2])
    assert (capped.segment(image, dataclasses.replace(sampling, adaptive=False), slices=[1],
                           meta=META).steps_used == 5).all()
    assert (capped.segment(image, dataclasses.replace(sampling, step_cap=4), slices=[1],
                           meta=META).steps_used == 4).all()
    # choose_consensus scores candidates on the cut trajectories exactly as a capped run fuses them.
    choice = choose_consensus(plain, [ChoosingSlices(image, labels, META, [1, 2])], "test", sampling=sampling)
    report = evaluate_volume(plain, image, labels, META,
                             dataclasses.replace(sampling, step_cap=choice.step_cap or 0, consensus="late_mean"),
                             slices=[1, 2])
    assert math.isclose(choice.candidate_dice["late_mean"], report["consensus"]["mean_foreground"]["dice"],
                        abs_tol=1e-9)
    assert ConsensusChoice.from_dict(choice.to_dict()) == choice


def test_the_command_records_the_choice_in_a_copy_of_the_checkpoint(tmp_path, tiny_checkpoint, liver_volume, capsys):
    import nibabel as nib

    from medconddiff.cli import main

    image, labels = liver_volume
    affine = np.diag([-0.8, -0.8, 2.0, 1.0])          # LPS, as scanners store it
    nib.save(nib.Nifti1Image(image, affine), str(tmp_path / "scan.nii.gz"))
    nib.save(nib.Nifti1Image(labels, affine), str(tmp_path / "labels.nii.gz"))
    out, report = tmp_path / "chosen.safetensors", tmp_path / "choice.json"
    args = ["choose-consensus", str(tmp_path / "scan.nii.gz"), str(tmp_path / "labels.nii.gz"), "--slices", "1:4",
            "--checkpoint", str(tiny_checkpoint), "--device", "cpu", "-o", str(out), "--json", str(report)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    start, chosen = load_checkpoint(tiny_checkpoint), load_checkpoint(out)
    record = chosen.extra["consensus_choice"]
    assert record["slices"] == 3 and record["method"] in CANDIDATES and f"'{record['method']}'" in printed
    assert {k: v for k, v in chosen.extra.items() if k != "consensus_choice"} == start.extra
    assert chosen.config == start.config and chosen.state_dict.keys() == start.state_dict.keys()
    assert all(chosen.state_dict[k].dtype == v.dtype and bool((chosen.state_dict[k] == v).all())
               for k, v in start.state_dict.items())
    assert Segmenter.from_checkpoint(out, device="cpu").consensus_choice == ConsensusChoice.from_dict(record)
    assert json.loads(report.read_text())["method"] == record["method"]
    # The output is never overwritten without --overwrite; a pickle is refused before anything runs.
    out.write_bytes(b"the user's file")
    assert main(args) == 2 and "exists" in capsys.readouterr().err and out.read_bytes() == b"the user's file"
    # Nor an existing --json report: refused before any sampling, and no checkpoint written either.
    report.write_text("the user's notes")
    again = [*args[:-4], "-o", str(tmp_path / "other.safetensors"), "--json", str(report)]
    assert main(again) == 2 and "exists" in capsys.readouterr().err
    assert report.read_text() == "the user's notes" and not (tmp_path / "other.safetensors").exists()
    (tmp_path / "afile").write_text("not a folder")          # -o under a file: refused before any sampling
    assert main([*args[:-4], "-o", str(tmp_path / "afile" / "cc.safetensors")]) == 2
    assert "is a file, so no folder" in capsys.readouterr().err
    pickle = tmp_path / "model.pt"
    pickle.write_bytes(b"\x80\x04junk")
    assert main(["choose-consensus", str(tmp_path / "scan.nii.gz"), str(tmp_path / "labels.nii.gz"), "--slices",
                 "1:4", "--checkpoint", str(pickle), "-o", str(tmp_path / "x.safetensors")]) == 2
    assert "pickle" in capsys.readouterr().err


def test_segment_says_once_how_it_samples_and_whose_choice_that_is(tmp_path, tiny_checkpoint, liver_volume, capsys):
    import nibabel as nib

    from medconddiff.checkpoint import with_extra
    from medconddiff.cli import main

    image, _ = liver_volume
    scan = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(image, np.diag([0.8, 0.8, 2.0, 1.0])), str(scan))
    choice = ConsensusChoice(method="late_mean", basis="3 test slices", scans=1, slices=3,
                             candidate_dice={name: 0.5 for name in CANDIDATES}, step_dice=[0.4, 0.5, 0.5],
                             one_shot_dice=0.45, step_cap=2, schedule_steps=3)
    chosen = tmp_path / "chosen.safetensors"
    with_extra(tiny_checkpoint, chosen, {"consensus_choice": choice.to_dict()})

    def first_line(*flags):
        assert main(["segment", str(scan), "-o", str(tmp_path / "seg.nii.gz"), "--overwrite", "--quiet",
                     "--device", "cpu", "--checkpoint", str(chosen), "--steps", "3", *flags]) == 0
        return capsys.readouterr().out.splitlines()[0]

    assert first_line() == ("sampling: adaptive, at most 2 of 3 steps, consensus late_mean "
                            f"(the model's own: {choice.origin()})")
    # The user's own settings are theirs: no claim that the model chose them.
    assert first_line("--consensus", "vote_gated", "--step-cap", "3") == (
        "sampling: adaptive, at most 3 of 3 steps, consensus vote_gated")
    assert first_line("--no-adaptive", "--consensus", "mean") == "sampling: 3 fixed steps, consensus mean"


def test_the_one_shot_consensus_takes_the_one_shot_labels_and_keeps_the_steps(tiny_checkpoint, liver_volume):
    image, labels = liver_volume
    segmenter = Segmenter.from_checkpoint(tiny_checkpoint, device="cpu")
    sampling = SamplingConfig(steps=3, adaptive=False, consensus="one_shot")
    result = segmenter.segment(image, sampling, slices=[1, 4], meta=META)
    one_shot = segmenter.one_shot(image, slices=[1, 4], meta=META)
    view = result.geometry.slice_view
    assert np.array_equal(view(result.labels)[[1, 4]], view(one_shot)[[1, 4]])
    assert result.one_shot.shape == (segmenter.num_classes, 2) + result.trajectory.shape[-2:]
    assert result.trajectory.shape[0] == 3 and result.uncertainty.any()     # the steps still ran
    # Re-fusing moves between the steps' fusions and the kept one-shot without running anything again.
    assert np.array_equal(result.refuse("mean").refuse("one_shot").labels, result.labels)
    plain = segmenter.segment(image, dataclasses.replace(sampling, consensus="mean"), slices=[1, 4], meta=META)
    assert plain.one_shot is None
    with pytest.raises(UserInputError, match="only a run with that consensus keeps"):
        plain.refuse("one_shot")


def test_a_model_whose_steps_never_beat_its_one_shot_may_choose_it(tiny_checkpoint, liver_volume):
    scores = {"mean": 0.8833, "late_mean": 0.8830, "last": 0.8830, "one_shot": 0.8891}   # LSegDiff's choosing slices
    assert pick(scores, steps_taken=(0.8832, 0.8829)) == "one_shot"
    assert pick({**scores, "one_shot": 0.8833 + SWITCH_MARGIN / 2}) == "mean"
    choice = ConsensusChoice("one_shot", "x", 1, 16, scores, (0.8832, 0.8829), 0.8891, step_cap=ONE_SHOT_STEP_CAP)
    assert choice.margin == 0.0 and choice.one_shot_better
    assert "one-shot forward's" in choice.describe() and "was better" not in choice.describe()
    assert "1 diffusion step beside it" in choice.describe()
    assert ConsensusChoice.from_dict(choice.to_dict()) == choice
    image, labels = liver_volume
    segmenter = Segmenter.from_checkpoint(tiny_checkpoint, device="cpu")
    chosen = choose_consensus(segmenter, [ChoosingSlices(image, labels, META, [2, 3])], "slices 2-3",
                              sampling=SamplingConfig(steps=2, adaptive=False))
    assert chosen.candidate_dice["one_shot"] == chosen.one_shot_dice
    auto = Segmenter(segmenter.model, segmenter.config, device="cpu", consensus_choice=choice)
    result = auto.segment(image, SamplingConfig(steps=2), slices=[2, 3], meta=META)
    assert result.sampling.consensus == "one_shot" and result.one_shot is not None
    # One step beside the one-shot: the uncertainty still has a disagreement to show, at a 2-step run's cost.
    assert result.sampling.step_cap == 1 and np.all(result.steps_used == 1)
    assert np.array_equal(result.labels, segmenter.one_shot(image, slices=[2, 3], meta=META))


def test_a_fusion_asked_of_a_one_shot_model_takes_the_steps_its_step_dice_support(tiny_checkpoint, liver_volume,
                                                                                   capsys):
    """LSegDiff records the one-shot with 1 step beside it; `--consensus mean` fused that single x̂0 (no step
    disagreement in the uncertainty) and the command line called the user's choice the model's own."""
    from medconddiff.commands.segment import sampling_line

    scores = {"mean": 0.8833, "late_mean": 0.8830, "last": 0.8830, "one_shot": 0.8891}
    choice = ConsensusChoice("one_shot", "x", 1, 16, scores, (0.8832, 0.8829, 0.8830), 0.8891,
                             step_cap=ONE_SHOT_STEP_CAP, schedule_steps=3)
    assert choice.step_cap_for("auto") == choice.step_cap_for("one_shot") == ONE_SHOT_STEP_CAP
    assert choice.step_cap_for("mean") == MIN_STEP_CAP == useful_steps(choice.step_dice)
    assert dataclasses.replace(choice, step_dice=(0.80, 0.81, 0.83)).step_cap_for("mean") is None   # every step
    image, _ = liver_volume
    segmenter = Segmenter.from_checkpoint(tiny_checkpoint, device="cpu")
    auto = Segmenter(segmenter.model, segmenter.config, device="cpu", consensus_choice=choice)
    result = auto.segment(image, SamplingConfig(steps=3, consensus="mean"), slices=[2, 3], meta=META)
    assert result.sampling.step_cap == 2 and result.trajectory.shape[0] >= 2
    line = sampling_line(auto, SamplingConfig(steps=3, consensus="mean"))
    assert line.startswith("sampling: adaptive, at most 2 of 3 steps, consensus mean (the model's step cap, ")
    assert "model's own" not in line
    assert "(the model's own: " in sampling_line(auto, SamplingConfig(steps=3))


def test_a_step_cap_counts_steps_of_the_schedule_it_was_measured_on(tiny_checkpoint):
    """The default's cap of 2 was measured on 10 steps (t = 999, 888); a --steps 3 run's first 2 steps stop at
    t = 500, where the recorded `last` scored 0.8704 and below its best step. Another schedule runs uncapped with
    the fallback, as a model without a record does."""
    choice = ConsensusChoice("last", "x", 1, 16, {m: 0.9 for m in CANDIDATES}, (0.8985, 0.9004, 0.9008), 0.888,
                             step_cap=2)                                   # a record of 0.2.0: no schedule kept
    assert choice.measured_schedule == SamplingConfig().steps == 10
    assert choice.holds_for_schedule(10) and not choice.holds_for_schedule(3)
    assert choice.method_for(SamplingConfig(steps=3)) == "mean" and choice.step_cap_for("auto", 3) is None
    plain = Segmenter.from_checkpoint(tiny_checkpoint, device="cpu")
    model = Segmenter(plain.model, plain.config, device="cpu", consensus_choice=choice)
    on_three = model.resolve_sampling(SamplingConfig(steps=3))
    assert (on_three.step_cap, on_three.consensus) == (3, "mean")
    on_ten = model.resolve_sampling(SamplingConfig())
    assert (on_ten.step_cap, on_ten.consensus) == (2, "last")
    measured_on_3 = dataclasses.replace(choice, schedule_steps=3)
    assert ConsensusChoice.from_dict(measured_on_3.to_dict()) == measured_on_3
    assert Segmenter(plain.model, plain.config, device="cpu", consensus_choice=measured_on_3).resolve_sampling(
        SamplingConfig(steps=3)).step_cap == 2
    # The one-shot's labels do not depend on the schedule: its choice holds for any run.
    one_shot = dataclasses.replace(choice, method="one_shot", step_cap=ONE_SHOT_STEP_CAP)
    assert one_shot.method_for(SamplingConfig(steps=3)) == "one_shot" and one_shot.step_cap_for("auto", 3) == 1


def test_a_choice_measured_at_a_step_cap_holds_for_runs_that_stop_there(tiny_checkpoint):
    """The default records `last` of its 2 capped steps; on 10 fixed steps `last` would be its 10th step, which
    the choosing slices never scored, so such a run fuses with `mean` as a model without a record does."""
    choice = ConsensusChoice("last", "x", 1, 16, {m: 0.9 for m in CANDIDATES}, (0.8985, 0.9004, 0.9008), 0.888,
                             step_cap=2)
    assert choice.method_for(SamplingConfig(step_cap=2)) == "last"
    assert choice.method_for(None) == "last"
    assert choice.method_for(SamplingConfig(adaptive=False)) == "mean"            # 10 fixed steps
    assert choice.method_for(SamplingConfig(steps=2, adaptive=False)) == "mean"   # another schedule: t = 999, 500
    assert dataclasses.replace(choice, schedule_steps=2).method_for(SamplingConfig(steps=2, adaptive=False)) == "last"
    assert choice.method_for(SamplingConfig(step_cap=5)) == "mean"                # a larger cap asked for
    assert dataclasses.replace(choice, method="one_shot").method_for(SamplingConfig(adaptive=False)) == "one_shot"
    assert dataclasses.replace(choice, step_cap=None).method_for(SamplingConfig(adaptive=False)) == "last"
    plain = Segmenter.from_checkpoint(tiny_checkpoint, device="cpu")
    chosen = Segmenter(plain.model, plain.config, device="cpu", consensus_choice=choice)
    assert chosen.resolve_sampling(SamplingConfig()).consensus == "last"
    assert chosen.resolve_sampling(SamplingConfig()).step_cap == 2
    assert chosen.resolve_sampling(SamplingConfig(adaptive=False)).consensus == "mean"
    provenance = {"consensus_choice": choice.to_dict()}
    assert resolved_consensus("auto", provenance, SamplingConfig(adaptive=False)) == "mean"
    assert resolved_consensus("auto", provenance, SamplingConfig(step_cap=2)) == "last"
    from medconddiff.commands.segment import sampling_line

    assert "consensus last (the model's own" in sampling_line(chosen, SamplingConfig())
    assert "consensus mean (the model's choice 'last' holds for runs of at most 2 steps" in \
        sampling_line(chosen, SamplingConfig(adaptive=False))
