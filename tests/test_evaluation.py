"""Metrics on hand-made masks with known answers, evaluate_volume on a scan whose predictions are
known (a stand-in segmenter on a real ScanGeometry), and `medconddiff evaluate` end to end."""

import json
import math

import nibabel as nib
import numpy as np
import pytest

from medconddiff.cli import main
from medconddiff.config import PreprocessPlan, SamplingConfig
from medconddiff.evaluation import (auroc, class_metrics, dice_score, diffusion_check, evaluate_volume,
                                    foreground_region, hd95, iou_score, json_safe, mean_foreground_dice,
                                    summarize_cases)
from medconddiff.geometry import affine_from_codes
from medconddiff.nifti import VolumeMeta
from medconddiff.preprocess import ScanPreprocessor
from medconddiff.segmenter import SegmentationResult

NAMES = ("background", "liver", "tumour")


def square(size=20, lo=5, hi=15):
    mask = np.zeros((size, size, 1), bool)
    mask[lo:hi, lo:hi] = True
    return mask


def strict_json(text: str):
    """json.loads that refuses NaN/Infinity (which Python's json accepts by default)."""
    def refuse(constant):
        raise AssertionError(f"{constant} in JSON output")
    return json.loads(text, parse_constant=refuse)


def test_dice_iou_known_values():
    a, b = square(lo=5, hi=15), square(lo=10, hi=20)   # 100 px each, overlap 25
    assert dice_score(a, b) == pytest.approx(0.25)
    assert iou_score(a, b) == pytest.approx(25 / 175)
    assert dice_score(np.zeros_like(a), np.zeros_like(a)) == 1.0   # convention; means skip such classes
    assert dice_score(a, np.zeros_like(a)) == 0.0


def test_hd95_uses_spacing_and_is_nan_for_empty():
    a, b = square(lo=5, hi=15), square(lo=7, hi=17)     # shifted by 2 voxels on both axes
    assert hd95(a, a, (1, 1, 1)) == 0.0
    distance = hd95(a, b, (1, 1, 1))
    assert 2.0 <= distance <= math.sqrt(8) + 1e-6
    assert hd95(a, b, (0.5, 0.5, 1)) == pytest.approx(distance / 2)
    assert math.isnan(hd95(a, np.zeros_like(a), (1, 1, 1)))


def test_hd95_measures_scored_slices_with_gaps_at_their_positions():
    """evaluate --slices 45,85 stacked the two slices as neighbours: masks swapped between them scored 1 mm."""
    predicted, reference = np.zeros((2, 9, 9), bool), np.zeros((2, 9, 9), bool)
    predicted[0, 3:6, 3:6] = reference[1, 3:6, 3:6] = True
    assert hd95(predicted, reference, (2.5, 1, 1)) == 2.5
    assert hd95(predicted, reference, (2.5, 1, 1), positions=[45, 85]) == 100.0
    assert hd95(predicted, reference, (2.5, 1, 1), positions=[45, 46]) == 2.5
    metrics = class_metrics(predicted.astype(np.uint8), reference.astype(np.uint8), ("background", "c"), (2.5, 1, 1),
                            positions=[45, 85])
    assert metrics["per_class"]["c"]["hd95_mm"] == 100.0


def test_auroc():
    assert auroc(np.array([0.9, 0.8, 0.1, 0.2]), np.array([1, 1, 0, 0])) == 1.0
    assert auroc(np.array([0.1, 0.2, 0.9, 0.8]), np.array([1, 1, 0, 0])) == 0.0
    assert auroc(np.array([0.5, 0.5, 0.5, 0.5]), np.array([1, 0, 1, 0])) == 0.5
    assert math.isnan(auroc(np.array([0.1, 0.2]), np.array([0, 0])))


def test_means_exclude_background():
    reference = np.zeros((10, 10, 1), np.uint8)
    reference[2:5, 2:5] = 1
    predicted = np.zeros_like(reference)                # misses class 1 entirely
    metrics = class_metrics(predicted, reference, ("background", "lesion"), (1, 1, 1))
    assert metrics["mean_foreground"]["dice"] == 0.0    # background's ~0.95 Dice must not count
    assert metrics["background_excluded"] is True
    assert metrics["mean_foreground"]["classes_averaged"] == 1


def test_class_absent_from_both_is_reported_and_not_averaged():
    a, b = square(lo=5, hi=15), square(lo=10, hi=20)
    reference, predicted = a.astype(np.uint8), b.astype(np.uint8)   # liver Dice 0.25; no tumour anywhere
    metrics = class_metrics(predicted, reference, NAMES, (1, 1, 1))
    tumour = metrics["per_class"]["tumour"]
    assert tumour["absent"] is True and tumour["dice"] is None and tumour["hd95_mm"] is None
    assert metrics["per_class"]["liver"]["absent"] is False
    mean = metrics["mean_foreground"]
    assert mean["dice"] == pytest.approx(0.25)           # not (0.25 + 1.0) / 2
    assert mean["classes_averaged"] == 1 and mean["absent_classes"] == ["tumour"]
    # A class only in the prediction (a false positive) is not absent: it scores 0 and counts.
    predicted[0, 0] = 2
    metrics = class_metrics(predicted, reference, NAMES, (1, 1, 1))
    assert metrics["per_class"]["tumour"]["dice"] == 0.0
    assert metrics["mean_foreground"]["dice"] == pytest.approx(0.125)
    assert metrics["mean_foreground"]["absent_classes"] == []
    # Nothing anywhere: no mean at all rather than a perfect one.
    empty = class_metrics(np.zeros_like(reference), np.zeros_like(reference), NAMES, (1, 1, 1))
    assert math.isnan(empty["mean_foreground"]["dice"]) and empty["mean_foreground"]["classes_averaged"] == 0


def test_mean_foreground_dice_skips_absent_classes():
    reference = square(lo=5, hi=15).astype(np.uint8)
    mean, absent = mean_foreground_dice(reference, reference, 3)
    assert mean == 1.0 and absent == [2]
    mean, absent = mean_foreground_dice(square(lo=10, hi=20).astype(np.uint8), reference, 3)
    assert mean == pytest.approx(0.25) and absent == [2]
    mean, absent = mean_foreground_dice(np.zeros_like(reference), np.zeros_like(reference), 3)
    assert math.isnan(mean) and absent == [1, 2]


def test_foreground_region_is_dilated_in_plane_only():
    reference = np.zeros((3, 20, 20), np.uint8)
    reference[1, 10, 10] = 1
    predicted = np.zeros_like(reference)
    predicted[1, 3, 3] = 2
    region = foreground_region(predicted, reference, margin=3)
    assert not region[0].any() and not region[2].any()          # never across slices
    assert region[1, 10, 13] and region[1, 7, 10] and not region[1, 10, 14]
    assert region[1, 3, 6] and region[1, 6, 3] and not region[1, 6, 4]
    assert region[1].sum() == 2 * 25                            # two diamonds of L1 radius 3
    assert not foreground_region(np.zeros_like(reference), np.zeros_like(reference)).any()


def test_json_safe_replaces_every_nan_and_inf():
    report = {"a": float("nan"), "b": [1.0, np.float32("inf"), {"c": np.float64("-inf")}], "d": (np.int64(3), None),
              "e": np.array([0.5, np.nan]), "f": np.bool_(True), "g": "text"}
    with pytest.raises(ValueError):
        json.dumps(report, allow_nan=False, default=lambda v: v.tolist() if hasattr(v, "tolist") else v)
    safe = json_safe(report)
    assert strict_json(json.dumps(safe, allow_nan=False)) == {
        "a": None, "b": [1.0, None, {"c": None}], "d": [3, None], "e": [0.5, None], "f": True, "g": "text"}


def test_summary_over_cases_skips_cases_where_a_class_is_absent():
    reference = np.zeros((1, 20, 20), np.uint8)
    reference[0, 5:15, 5:15] = 1
    reference[0, 16:18, 16:18] = 2
    with_tumour = class_metrics(reference, reference, NAMES, (1, 1, 1))       # liver 1, tumour 1
    liver_only = reference.copy()
    liver_only[liver_only == 2] = 0
    predicted = np.zeros_like(liver_only)
    predicted[0, 10:20, 5:15] = 1
    no_tumour = class_metrics(predicted, liver_only, NAMES, (1, 1, 1))         # liver 0.5, tumour absent
    reports = {name: {"consensus": m, "one_shot": m, "uncertainty_auroc": float("nan"),
                      "uncertainty_auroc_foreground": 0.5}
               for name, m in (("a", with_tumour), ("b", no_tumour))}
    summary = summarize_cases(reports, NAMES)
    assert summary["per_class"]["liver"]["dice"] == pytest.approx(0.75)
    assert summary["per_class"]["tumour"]["dice"] == 1.0                      # case b does not count as 0 or 1
    assert summary["per_class"]["tumour"]["cases_averaged"] == 1
    assert summary["per_class"]["tumour"]["absent_in_cases"] == ["b"]
    assert summary["mean_foreground_dice"] == pytest.approx((1.0 + 0.5) / 2)
    assert summary["n_cases"] == 2 and math.isnan(summary["uncertainty_auroc"])


# ---------------------------------------------------------------------------------------------
# evaluate_volume with known predictions: a stand-in segmenter on a real, reoriented ScanGeometry

# File axes point R, I (reversed superior), A with 0.5, 3.0, 1.0 mm voxels: canonical axial slices
# run along file axis 1, backwards, 3 mm apart; in-plane R (0.5 mm) then A (1 mm).
CODES, SPACING, SHAPE = ("R", "I", "A"), (0.5, 3.0, 1.0), (24, 6, 20)


def oblique_meta() -> VolumeMeta:
    return VolumeMeta(affine=affine_from_codes(CODES, SPACING), spacing=SPACING)


class KnownSegmenter:
    """Returns given file-ordered labels/uncertainty, as a Segmenter's result (only the slices asked)."""

    class_names = NAMES
    num_classes = 3

    def __init__(self, labels, uncertainty, one_shot=None):
        self.labels, self.uncertainty = labels, uncertainty
        self.one_shot_labels = labels if one_shot is None else one_shot
        # Plan spacing = the scan's in-plane spacing, so model grid = scan grid (no resampling).
        self.preprocessor = ScanPreprocessor(PreprocessPlan(target_spacing=(0.5, 1.0)))
        self.calls = []

    def segment(self, volume, sampling, slices=None, *, meta=None):
        geometry = self.preprocessor.geometry(volume.shape[:3], meta)
        assert geometry.model_shape == geometry.plane_shape
        indices = np.arange(geometry.n_slices) if slices is None else np.unique(list(slices))
        self.calls.append(indices)
        labels = np.zeros_like(self.labels)
        unc = np.zeros_like(self.uncertainty)
        geometry.slice_view(labels)[indices] = geometry.slice_view(self.labels)[indices]
        geometry.slice_view(unc)[indices] = geometry.slice_view(self.uncertainty)[indices]
        chosen = geometry.slice_view(self.labels)[indices]                                  # (n, H, W)
        one_hot = (np.arange(3)[:, None, None, None] == chosen[None]).astype(np.uint8) * 255  # (K, n, H, W)
        empty = np.zeros_like(one_hot)
        empty[0] = 255                                                                      # step 0: nothing
        trajectory = np.stack([empty, one_hot])
        return SegmentationResult(labels, unc, trajectory, indices, np.ones(len(indices), bool), geometry,
                                  sampling, NAMES)

    def one_shot(self, volume, slices=None, *, meta=None, precision="auto"):
        self.one_shot_precision = precision     # the run's, as the diffusion's: one column is not fp32, the other bf16
        geometry = self.preprocessor.geometry(volume.shape[:3], meta)
        out = np.zeros_like(self.one_shot_labels)
        indices = np.asarray(list(slices))
        geometry.slice_view(out)[indices] = geometry.slice_view(self.one_shot_labels)[indices]
        return out


def canonical(array):
    """File order (R, I, A) → canonical slices (S, R, A), written independently of ScanGeometry."""
    return np.transpose(array[:, ::-1, :], (1, 0, 2))


def test_evaluate_volume_scores_canonical_slices_with_their_spacing():
    image = np.zeros(SHAPE, np.float32)
    reference = np.zeros(SHAPE, np.uint8)
    predicted = np.zeros(SHAPE, np.uint8)
    ref_c, pred_c = canonical(reference), canonical(predicted)      # writable views
    ref_c[1, 5:15, 5:15] = 1            # liver on canonical slice 1 only (file j = 4)
    pred_c[2, 5:15, 5:15] = 1           # predicted one slice (3 mm) higher
    ref_c[4, 2:4, 2:4] = 2              # tumour only outside the scored slab
    uncertainty = np.zeros(SHAPE, np.float32)
    segmenter = KnownSegmenter(predicted, uncertainty)
    report = evaluate_volume(segmenter, image, reference, oblique_meta(), SamplingConfig(steps=1),
                             slices=range(0, 3))
    assert report["n_slices"] == 3 and report["slicing"] == "axial"
    assert report["spacing_mm"] == [3.0, 0.5, 1.0]
    liver = report["consensus"]["per_class"]["liver"]
    assert liver["reference_voxels"] == 100 and liver["predicted_voxels"] == 100
    assert liver["dice"] == 0.0
    assert liver["hd95_mm"] == pytest.approx(3.0)   # the slice spacing, not 0.5 (file axis 0) or 1.0
    tumour = report["consensus"]["per_class"]["tumour"]
    assert tumour["absent"] is True                  # canonical slice 4 is outside slices 0..2
    assert report["consensus"]["mean_foreground"]["absent_classes"] == ["tumour"]
    assert report["one_shot"]["per_class"]["liver"]["hd95_mm"] == pytest.approx(3.0)
    evaluate_volume(segmenter, image, reference, oblique_meta(), SamplingConfig(steps=1, precision="bf16"))
    assert segmenter.one_shot_precision == "bf16"
    # step 0 predicts nothing (liver Dice 0, tumour absent), step 1 is the prediction: both mean 0.
    assert report["step_mean_dice"] == [0.0, 0.0]
    assert report["best_step"]["index"] == 0
    # On the slab that holds the tumour it counts; a perfect prediction there scores 1 for both.
    perfect = KnownSegmenter(reference, uncertainty)
    report = evaluate_volume(perfect, image, reference, oblique_meta(), SamplingConfig(steps=1), slices=None)
    assert report["n_slices"] == 6
    assert report["consensus"]["mean_foreground"]["dice"] == 1.0
    assert report["consensus"]["mean_foreground"]["classes_averaged"] == 2
    assert report["step_mean_dice"] == [0.0, 1.0] and report["best_step"] == {"index": 1, "mean_dice": 1.0}
    assert report["consensus"]["per_class"]["liver"]["hd95_mm"] == 0.0
    assert json.dumps(json_safe(report), allow_nan=False)


def test_step_dice_per_class_shows_the_reference_class_where_a_stray_class_pulls_the_mean_down():
    image = np.zeros(SHAPE, np.float32)
    reference = np.zeros(SHAPE, np.uint8)
    canonical(reference)[1, 5:15, 5:15] = 1          # liver only
    predicted = reference.copy()
    canonical(predicted)[3, 2:4, 2:4] = 2            # a few tumour voxels where the reference has none
    segmenter = KnownSegmenter(predicted, np.zeros(SHAPE, np.float32))
    report = evaluate_volume(segmenter, image, reference, oblique_meta(), SamplingConfig(steps=1))
    assert report["step_mean_dice"] == [0.0, 0.5]     # the stray tumour counts 0 in the mean
    per_class = report["step_dice_per_class"]
    assert per_class["liver"] == [0.0, 1.0]           # the reference's own class: perfect at the last step
    assert math.isnan(per_class["tumour"][0]) and per_class["tumour"][1] == 0.0   # absent, then stray
    assert json.dumps(json_safe(report), allow_nan=False)


def test_diffusion_check_compares_the_consensus_with_its_best_rival_and_measures_drift():
    below = diffusion_check(0.80, 0.82, [0.70, 0.85, 0.75])
    assert below["consensus_minus_best_of_steps_and_one_shot"] == pytest.approx(-0.05)   # the best step wins
    assert below["last_step_minus_first_step"] == pytest.approx(0.05)
    assert below["consensus_at_least_best"] is False
    above = diffusion_check(0.90, 0.88, [0.85, float("nan"), 0.80])   # a NaN step is skipped, not a rival
    assert above["consensus_minus_best_of_steps_and_one_shot"] == pytest.approx(0.02)
    assert above["last_step_minus_first_step"] == pytest.approx(-0.05)
    assert above["consensus_at_least_best"] is True
    assert math.isnan(diffusion_check(0.5, 0.6, [0.4])["last_step_minus_first_step"])   # one step: no drift
    undefined = diffusion_check(float("nan"), float("nan"), [float("nan")])
    assert undefined["consensus_at_least_best"] is None
    assert math.isnan(undefined["consensus_minus_best_of_steps_and_one_shot"])


def test_step_mean_dice_skips_classes_absent_from_step_and_reference():
    image = np.zeros(SHAPE, np.float32)
    reference = np.zeros(SHAPE, np.uint8)
    canonical(reference)[1, 5:15, 5:15] = 1          # liver only; tumour nowhere
    segmenter = KnownSegmenter(reference.copy(), np.zeros(SHAPE, np.float32))
    report = evaluate_volume(segmenter, image, reference, oblique_meta(), SamplingConfig(steps=1))
    assert report["step_mean_dice"] == [0.0, 1.0]   # not [0.5, 1.0]: the absent tumour is not a free 1.0
    per_class = report["step_dice_per_class"]
    assert per_class["liver"] == [0.0, 1.0] and all(math.isnan(d) for d in per_class["tumour"])
    assert report["consensus"]["mean_foreground"]["dice"] == 1.0
    assert report["consensus"]["per_class"]["tumour"]["absent"] is True


def test_foreground_auroc_is_not_inflated_by_easy_background():
    image = np.zeros(SHAPE, np.float32)
    reference = np.zeros(SHAPE, np.uint8)
    canonical(reference)[:, 8:12, 8:12] = 1
    predicted = reference.copy()
    canonical(predicted)[:, 8:12, 11:12] = 0                          # misses a strip of liver
    region = foreground_region(canonical(predicted), canonical(reference))
    uncertainty = np.zeros(SHAPE, np.float32)
    unc_c = canonical(uncertainty)
    unc_c[region] = 0.5                               # unsure everywhere near the organ ...
    unc_c[canonical(predicted) != canonical(reference)] = 0.4   # ... but less so where it is wrong
    report = evaluate_volume(KnownSegmenter(predicted, uncertainty), image, reference, oblique_meta(),
                             SamplingConfig(steps=1))
    assert report["uncertainty_auroc"] > 0.7        # the certain, correct background makes it look good
    assert report["uncertainty_auroc_foreground"] == 0.0   # near the organ it ranks errors last
    assert report["foreground_region"]["voxels"] == int(region.sum())
    assert report["foreground_region"]["margin_voxels"] == 3


def test_evaluate_volume_rejects_mismatched_labels():
    segmenter = KnownSegmenter(np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.float32))
    with pytest.raises(ValueError, match="differs"):
        evaluate_volume(segmenter, np.zeros(SHAPE, np.float32), np.zeros((24, 5, 20), np.uint8), oblique_meta(),
                        SamplingConfig(steps=1))
    labels = np.zeros(SHAPE, np.uint8)
    labels[0, 0, 0] = 3
    with pytest.raises(ValueError, match="outside"):
        evaluate_volume(segmenter, np.zeros(SHAPE, np.float32), labels, oblique_meta(), SamplingConfig(steps=1))


# ---------------------------------------------------------------------------------------------
# the command, end to end on a cut of the real liver CT


def save_case(folder, name, image, labels, image_suffix="_image", label_suffix="_label"):
    nib.save(nib.Nifti1Image(image, np.eye(4)), str(folder / f"{name}{image_suffix}.nii.gz"))
    nib.save(nib.Nifti1Image(labels, np.eye(4)), str(folder / f"{name}{label_suffix}.nii.gz"))


@pytest.fixture
def predicts_nothing(monkeypatch):
    """Every Segmenter loaded from a checkpoint gets a model whose x̂0 is all background."""
    import torch

    from medconddiff.segmenter import Segmenter

    loaded = Segmenter.from_checkpoint.__func__

    def background(x_t, timesteps, condition):
        probabilities = torch.zeros_like(x_t)
        probabilities[:, 0] = 1
        return probabilities * 2 - 1, probabilities

    def from_checkpoint(cls, *args, **kwargs):
        segmenter = loaded(cls, *args, **kwargs)
        segmenter.model.denoise = background
        return segmenter

    monkeypatch.setattr(Segmenter, "from_checkpoint", classmethod(from_checkpoint))


def test_evaluate_cli_on_real_scan(tmp_path, tiny_checkpoint, liver_volume, capsys):
    image, labels = liver_volume
    save_case(tmp_path, "img", image, labels, "", "_lbl")
    report_path = tmp_path / "scores.json"
    code = main(["evaluate", "--image", str(tmp_path / "img.nii.gz"), "--label", str(tmp_path / "img_lbl.nii.gz"),
                 "--checkpoint", str(tiny_checkpoint), "--steps", "3", "--slices", "1:5", "--json",
                 str(report_path), "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    report = strict_json(report_path.read_text())
    volume = report["volumes"]["img.nii.gz"]
    assert volume["n_slices"] == 4 and volume["slices"] == "1:5"
    assert set(volume["consensus"]["per_class"]) == {"liver", "tumour"}
    assert len(volume["step_mean_dice"]) == 3
    for key in ("one_shot", "best_step", "uncertainty_auroc", "uncertainty_auroc_foreground", "error_fraction"):
        assert key in volume
    check = volume["diffusion_check"]
    rivals = [*volume["step_mean_dice"], volume["one_shot"]["mean_foreground"]["dice"]]
    assert check["consensus_minus_best_of_steps_and_one_shot"] == pytest.approx(
        volume["consensus"]["mean_foreground"]["dice"] - max(rivals))
    assert check["consensus_at_least_best"] == (check["consensus_minus_best_of_steps_and_one_shot"] >= 0)
    assert report["summary"]["n_cases"] == 1
    out = capsys.readouterr().out
    assert "background excluded" in out and "whole slab" in out and "foreground" in out
    assert "consensus − max(best step, one-shot)" in out and "last step − first step" in out
    best = volume["best_step"]     # the JSON keeps the list index; the text counts steps from 1
    assert "(steps 1 → 3)" in out and f"best step {best['index'] + 1} (" in out
    # Two foreground classes: each one's steps on a line of its own, unless it is absent at every step.
    per_class = volume["step_dice_per_class"]
    assert set(per_class) == {"liver", "tumour"} and all(len(d) == 3 for d in per_class.values())
    for name, dice in per_class.items():
        shown = not all(d is None for d in dice)          # NaN is null in the JSON
        assert (f"  {name:<12}[" in out) == shown
    save_case(tmp_path, "short", image, labels[:, :, :3], "", "_lbl")
    assert main(["evaluate", "--image", str(tmp_path / "img.nii.gz"), "--label", str(tmp_path / "short_lbl.nii.gz"),
                 "--checkpoint", str(tiny_checkpoint), "--steps", "2", "--device", "cpu"]) == 2
    assert main(["evaluate", "--image", str(tmp_path / "img.nii.gz"), "--label", str(tmp_path / "img_lbl.nii.gz"),
                 "--checkpoint", str(tiny_checkpoint), "--steps", "2", "--slices", "4:9", "--device", "cpu"]) == 2


def test_evaluate_cli_json_is_valid_when_the_model_predicts_nothing(tmp_path, tiny_checkpoint, liver_volume,
                                                                   predicts_nothing, capsys):
    image, labels = liver_volume
    liver_only = np.where(labels == 2, 0, labels).astype(np.uint8)     # tumour absent from the reference too
    save_case(tmp_path, "img", image, liver_only, "", "_lbl")
    report_path = tmp_path / "scores.json"
    code = main(["evaluate", "--image", str(tmp_path / "img.nii.gz"), "--label", str(tmp_path / "img_lbl.nii.gz"),
                 "--checkpoint", str(tiny_checkpoint), "--steps", "2", "--json", str(report_path),
                 "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    volume = strict_json(report_path.read_text())["volumes"]["img.nii.gz"]
    consensus = volume["consensus"]
    assert consensus["per_class"]["liver"] == {"absent": False, "dice": 0.0, "iou": 0.0, "hd95_mm": None,
                                               "reference_voxels": int((liver_only == 1).sum()),
                                               "predicted_voxels": 0}
    assert consensus["per_class"]["tumour"]["absent"] is True and consensus["per_class"]["tumour"]["dice"] is None
    assert consensus["mean_foreground"]["dice"] == 0.0 and consensus["mean_foreground"]["hd95_mm"] is None
    assert consensus["mean_foreground"]["classes_averaged"] == 1
    assert consensus["mean_foreground"]["absent_classes"] == ["tumour"]
    assert volume["one_shot"]["per_class"]["liver"]["hd95_mm"] is None
    assert volume["step_mean_dice"] == [0.0, 0.0]
    out = capsys.readouterr().out
    assert "absent" in out and "mean over 1 of 2 foreground classes" in out


def test_evaluate_cli_refuses_existing_json_before_computing(tmp_path, tiny_checkpoint, liver_volume, monkeypatch,
                                                            capsys):
    from medconddiff.segmenter import Segmenter

    image, labels = liver_volume
    save_case(tmp_path, "img", image, labels, "", "_lbl")
    report_path = tmp_path / "scores.json"
    report_path.write_text("precious")
    args = ["evaluate", "--image", str(tmp_path / "img.nii.gz"), "--label", str(tmp_path / "img_lbl.nii.gz"),
            "--checkpoint", str(tiny_checkpoint), "--steps", "1", "--slices", "2:3", "--json", str(report_path),
            "--device", "cpu"]
    loaded = Segmenter.from_checkpoint.__func__

    def no_model(cls, *a, **k):
        raise AssertionError("the checkpoint was loaded before the output was checked")

    monkeypatch.setattr(Segmenter, "from_checkpoint", classmethod(no_model))
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err and report_path.read_text() == "precious"
    monkeypatch.setattr(Segmenter, "from_checkpoint", classmethod(loaded))
    assert main(args + ["--overwrite"]) == 0
    assert strict_json(report_path.read_text())["volumes"]["img.nii.gz"]["n_slices"] == 1


def test_evaluate_cli_dataset_folder_prints_cases_and_their_mean(tmp_path, tiny_checkpoint, liver_volume,
                                                                predicts_nothing, capsys):
    image, labels = liver_volume
    dataset = tmp_path / "data"
    dataset.mkdir()
    save_case(dataset, "case_a", image, labels)                         # liver and tumour: both Dice 0
    save_case(dataset, "case_b", image, np.zeros_like(labels))          # nothing to find, nothing found
    report_path = tmp_path / "scores.json"
    code = main(["evaluate", str(dataset), "--checkpoint", str(tiny_checkpoint), "--steps", "1", "--slices", "0:2",
                 "--json", str(report_path), "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split()[1:] for line in lines if line.startswith(("case_", "mean over cases"))}
    assert rows["case_a"] == ["0.0000", "0.0000", "0.0000"]
    assert rows["case_b"] == ["absent", "absent", "n/a"]
    assert rows["mean"] == ["over", "cases", "0.0000", "0.0000", "0.0000"]
    report = strict_json(report_path.read_text())
    assert set(report["volumes"]) == {"case_a", "case_b"}
    summary = report["summary"]
    assert summary["n_cases"] == 2 and summary["cases_averaged"] == 1
    assert summary["per_class"]["liver"]["dice"] == 0.0
    assert summary["per_class"]["liver"]["cases_averaged"] == 1
    assert summary["per_class"]["tumour"]["absent_in_cases"] == ["case_b"]
    assert report["volumes"]["case_b"]["consensus"]["mean_foreground"]["dice"] is None


def test_evaluate_cli_scores_a_dataset_numbered_otherwise_by_its_class_names(tmp_path, tiny_checkpoint, liver_volume,
                                                                           capsys):
    """An nnU-Net v2 dataset whose dataset.json numbers tumour 1 and liver 2 scores as the same labels numbered
    as the model numbers them (it was scored by number, liver against tumour, with a warning)."""
    image, labels = liver_volume

    def nnunet(root, names, written):
        for sub in ("imagesTr", "labelsTr"):
            (root / sub).mkdir(parents=True)
        nib.save(nib.Nifti1Image(image, np.eye(4)), str(root / "imagesTr" / "liver_000_0000.nii.gz"))
        nib.save(nib.Nifti1Image(written, np.eye(4)), str(root / "labelsTr" / "liver_000.nii.gz"))
        (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": names,
                                                       "numTraining": 1, "file_ending": ".nii.gz"}))
        json_path = root.parent / f"{root.name}.json"
        assert main(["evaluate", str(root), "--checkpoint", str(tiny_checkpoint), "--steps", "2", "--slices", "1:4",
                     "--device", "cpu", "--json", str(json_path)]) == 0
        return strict_json(json_path.read_text())["volumes"]["liver_000"]

    same = nnunet(tmp_path / "Dataset001_Same", {"background": 0, "liver": 1, "tumour": 2}, labels)
    other = nnunet(tmp_path / "Dataset002_Other", {"background": 0, "tumor": 1, "liver": 2},
                   np.choose(labels, [0, 2, 1]).astype(labels.dtype))
    err = capsys.readouterr().err
    assert other["consensus"] == same["consensus"] and other["one_shot"] == same["one_shot"]
    assert min(same["consensus"]["per_class"][c]["reference_voxels"] for c in ("liver", "tumour")) > 0
    assert same["reference_classes"] == {"matched_by": "number"}
    assert other["reference_classes"] == {"matched_by": "name", "pairs": {"tumor": "tumour", "liver": "liver"}}
    assert "compared by number" not in err and "tumor → tumour, liver → liver" in err


def test_a_class_renumbered_onto_the_ignore_value_is_still_scored(tmp_path, tiny_checkpoint, liver_volume):
    """A one-structure set (background, tumour, ignore = 2) scored by a liver/tumour model: its tumour
    becomes class 2, the number of its ignore label; unchecked voxels stay ignored, tumour voxels count."""
    image, labels = liver_volume
    root = tmp_path / "Dataset003_Tumour"
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True)
    tumour_only = (labels == 2).astype(np.uint8)
    tumour_only[:, :, :1] = 2                     # slice 0: nobody checked it
    nib.save(nib.Nifti1Image(image, np.eye(4)), str(root / "imagesTr" / "case_0000.nii.gz"))
    nib.save(nib.Nifti1Image(tumour_only, np.eye(4)), str(root / "labelsTr" / "case.nii.gz"))
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "numTraining": 1,
                                                   "labels": {"background": 0, "tumour": 1, "ignore": 2},
                                                   "file_ending": ".nii.gz"}))
    report = tmp_path / "report.json"
    assert main(["evaluate", str(root), "--checkpoint", str(tiny_checkpoint), "--steps", "2", "--device", "cpu",
                 "--json", str(report)]) == 0
    volume = strict_json(report.read_text())["volumes"]["case"]
    scored = volume["consensus"]["per_class"]["tumour"]["reference_voxels"]
    assert scored == int((labels[:, :, 1:] == 2).sum()) > 0


def test_labels_stored_in_another_voxel_order_are_scored_where_they_lie(tmp_path, tiny_checkpoint, liver_volume,
                                                                         capsys):
    """The image's grid stored LPS (axes reversed) or with i and j swapped scores as the labels stored like
    the image (they were compared voxel by voxel: Dice 0.02 for 0.84)."""
    from medconddiff.geometry import onto_grid

    image, labels = liver_volume
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    nib.save(nib.Nifti1Image(image, affine), str(tmp_path / "image.nii.gz"))
    nib.save(nib.Nifti1Image(labels, affine), str(tmp_path / "same.nii.gz"))
    ras = nib.load(str(tmp_path / "same.nii.gz"))
    for codes in ("LPS", "ARS"):
        ornt = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"),
                                               nib.orientations.axcodes2ornt(tuple(codes)))
        stored = ras.as_reoriented(ornt)
        nib.save(stored, str(tmp_path / f"{codes}.nii.gz"))
        moved = onto_grid(np.asarray(stored.dataobj), stored.affine, affine, labels.shape)
        np.testing.assert_array_equal(moved, labels)
    scores = {}
    for name in ("same", "LPS", "ARS"):
        report = tmp_path / f"{name}.json"
        assert main(["evaluate", "--image", str(tmp_path / "image.nii.gz"), "--label", str(tmp_path / f"{name}.nii.gz"),
                     "--checkpoint", str(tiny_checkpoint), "--steps", "2", "--slices", "1:4", "--device", "cpu",
                     "--json", str(report)]) == 0
        (volume,) = strict_json(report.read_text())["volumes"].values()
        scores[name] = {key: volume[key] for key in ("consensus", "one_shot", "step_mean_dice")}
    assert scores["LPS"] == scores["same"] == scores["ARS"]
    assert scores["same"]["consensus"]["per_class"]["liver"]["reference_voxels"] > 0
    assert "another voxel order" in capsys.readouterr().err
    # A grid that is not the image's in another order is not moved.
    assert onto_grid(labels, np.diag([1.0, 1.0, 3.0, 1.0]), affine, labels.shape) is None


def test_evaluate_scores_a_multichannel_scan_as_one_4d_file_or_one_file_per_channel(tmp_path, two_channel_checkpoint,
                                                                                   liver_volume):
    image, labels = liver_volume
    second = (0.5 * image).astype(np.float32)
    nib.save(nib.Nifti1Image(np.stack([image, second], axis=-1), np.eye(4)), str(tmp_path / "both.nii.gz"))
    nib.save(nib.Nifti1Image(image, np.eye(4)), str(tmp_path / "t1.nii.gz"))
    nib.save(nib.Nifti1Image(second, np.eye(4)), str(tmp_path / "t2.nii.gz"))
    nib.save(nib.Nifti1Image(labels, np.eye(4)), str(tmp_path / "labels.nii.gz"))
    reports = {}
    for name, given in (("4d", ["--image", tmp_path / "both.nii.gz"]),
                        ("files", ["--image", tmp_path / "t1.nii.gz", "--channel-file", tmp_path / "t2.nii.gz"])):
        assert main(["evaluate", *map(str, given), "--label", str(tmp_path / "labels.nii.gz"), "--checkpoint",
                     str(two_channel_checkpoint), "--steps", "2", "--slices", "1:3", "--device", "cpu",
                     "--json", str(tmp_path / f"{name}.json")]) == 0
        (volume,) = strict_json((tmp_path / f"{name}.json").read_text())["volumes"].values()
        reports[name] = volume["consensus"]
    assert reports["4d"] == reports["files"]


def test_steps_are_scored_with_the_models_clean_up_as_the_consensus_and_one_shot_are(tiny_checkpoint, liver_volume):
    """LSegDiff cleans its labels (small components removed): its consensus and one-shot were scored cleaned
    and its steps raw, so a 'last' consensus scored apart from its own last step."""
    from medconddiff.segmenter import Segmenter

    image, labels = liver_volume
    segmenter = Segmenter.from_checkpoint(tiny_checkpoint, device="cpu")

    def without_tumour(predicted, model_pixel_area=1.0):    # a clean-up that visibly changes the labels
        return np.where(predicted == 2, 0, predicted).astype(predicted.dtype)

    segmenter.model.postprocess = without_tumour
    from tests.conftest import meta_1mm

    report = evaluate_volume(segmenter, image, labels, meta_1mm(),
                             SamplingConfig(steps=2, adaptive=False, consensus="last"), slices=range(1, 5))
    assert report["consensus"]["per_class"]["tumour"]["predicted_voxels"] == 0
    assert report["step_mean_dice"][-1] == pytest.approx(report["consensus"]["mean_foreground"]["dice"])
