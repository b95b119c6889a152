"""Metrics on hand-made masks with known answers, and `medconddiff evaluate` end to end."""

import json
import math

import nibabel as nib
import numpy as np
import pytest

from medconddiff.cli import main
from medconddiff.evaluation import auroc, class_metrics, dice_score, hd95, iou_score


def square(size=20, lo=5, hi=15):
    mask = np.zeros((size, size, 1), bool)
    mask[lo:hi, lo:hi] = True
    return mask


def test_dice_iou_known_values():
    a, b = square(lo=5, hi=15), square(lo=10, hi=20)   # 100 px each, overlap 25
    assert dice_score(a, b) == pytest.approx(0.25)
    assert iou_score(a, b) == pytest.approx(25 / 175)
    assert dice_score(np.zeros_like(a), np.zeros_like(a)) == 1.0
    assert dice_score(a, np.zeros_like(a)) == 0.0


def test_hd95_uses_spacing_and_is_nan_for_empty():
    a, b = square(lo=5, hi=15), square(lo=7, hi=17)     # shifted by 2 voxels on both axes
    assert hd95(a, a, (1, 1, 1)) == 0.0
    distance = hd95(a, b, (1, 1, 1))
    assert 2.0 <= distance <= math.sqrt(8) + 1e-6
    assert hd95(a, b, (0.5, 0.5, 1)) == pytest.approx(distance / 2)
    assert math.isnan(hd95(a, np.zeros_like(a), (1, 1, 1)))


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


def test_evaluate_cli_on_real_scan(tmp_path, tiny_checkpoint, liver_volume, capsys):
    image, labels = liver_volume
    nib.save(nib.Nifti1Image(image, np.eye(4)), str(tmp_path / "img.nii.gz"))
    nib.save(nib.Nifti1Image(labels, np.eye(4)), str(tmp_path / "lbl.nii.gz"))
    report_path = tmp_path / "scores.json"
    code = main(["evaluate", "--image", str(tmp_path / "img.nii.gz"), "--label", str(tmp_path / "lbl.nii.gz"),
                 "--checkpoint", str(tiny_checkpoint), "--steps", "3", "--slices", "1:5", "--json",
                 str(report_path), "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    report = json.loads(report_path.read_text())
    volume = report["volumes"]["img.nii.gz"]
    assert volume["n_slices"] == 4 and volume["slices"] == "1:5"
    assert set(volume["consensus"]["per_class"]) == {"liver", "tumour"}
    assert len(volume["step_mean_dice"]) == 3
    for key in ("one_shot", "best_step", "uncertainty_auroc", "error_fraction"):
        assert key in volume
    assert "background excluded" in capsys.readouterr().out
    nib.save(nib.Nifti1Image(labels[:, :, :3], np.eye(4)), str(tmp_path / "short.nii.gz"))
    assert main(["evaluate", "--image", str(tmp_path / "img.nii.gz"), "--label", str(tmp_path / "short.nii.gz"),
                 "--checkpoint", str(tiny_checkpoint), "--steps", "2", "--device", "cpu"]) == 2
