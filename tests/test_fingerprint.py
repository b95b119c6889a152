"""medconddiff.fingerprint and `medconddiff plan`: canonical spacings, foreground intensities, plan rules."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from medconddiff.cli import main
from medconddiff.config import PreprocessPlan, dataclass_from_dict
from medconddiff.dataset_layout import DatasetError, describe_dataset
from medconddiff.fingerprint import (ChannelFingerprint, DatasetFingerprint, compute_fingerprint, is_ct,
                                     plan_from_fingerprint)
from medconddiff.geometry import affine_from_codes

CLASSES = ("background", "lesion")


def write(path, data, affine):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))


def make_nnunet(root, cases, channel_names=("CT",), class_names=CLASSES):
    """cases: name → (image (X, Y, Z, C), labels (X, Y, Z), affine)."""
    for name, (image, labels, affine) in cases.items():
        for c in range(image.shape[3]):
            write(root / "imagesTr" / f"{name}_{c:04d}.nii.gz", image[..., c], affine)
        write(root / "labelsTr" / f"{name}.nii.gz", labels.astype(np.uint8), affine)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {str(c): n for c, n in enumerate(channel_names)},
        "labels": {n: k for k, n in enumerate(class_names)}, "numTraining": len(cases), "file_ending": ".nii.gz"}))
    return root


def ct_case(shape, seed, affine, lesion=(slice(4, 10), slice(3, 9), slice(1, 4))):
    """Air (-1000 HU) around a lesion of soft tissue (-100..200 HU); labels 1 on the lesion."""
    rng = np.random.default_rng(seed)
    image = np.full(shape + (1,), -1000, np.int16)
    labels = np.zeros(shape, np.uint8)
    labels[lesion] = 1
    image[labels > 0, 0] = rng.integers(-100, 201, int(labels.sum()))
    return image, labels, affine


def fingerprint_of(root, **kwargs):
    description = describe_dataset(root)
    return compute_fingerprint(description, description.class_names, description.channel_names, **kwargs)


# ------------------------------------------------------------------------------------- fingerprint


def test_spacing_and_shape_come_out_in_ras_order_for_lps_and_permuted_files(tmp_path):
    cases = {
        "a": ct_case((16, 14, 6), 0, affine_from_codes("LPS", (0.6, 0.7, 5.0))),
        "b": ct_case((16, 14, 6), 1, affine_from_codes("LPS", (0.8, 0.9, 5.0))),
        # Rows run posterior, columns left: R is file axis 1 (1.2 mm), A file axis 0 (0.5 mm).
        "c": ct_case((14, 16, 6), 2, affine_from_codes("PLS", (0.5, 1.2, 5.0)),
                     lesion=(slice(3, 9), slice(4, 10), slice(1, 4))),
    }
    root = make_nnunet(tmp_path / "ds", cases)

    fingerprint = fingerprint_of(root)

    assert fingerprint.cases == 3
    np.testing.assert_allclose(fingerprint.spacings, [(0.6, 0.7, 5.0), (0.8, 0.9, 5.0), (1.2, 0.5, 5.0)], rtol=1e-6)
    assert fingerprint.shapes == [(16, 14, 6), (16, 14, 6), (16, 14, 6)]
    np.testing.assert_allclose(fingerprint.median_spacing, (0.8, 0.7, 5.0), rtol=1e-6)
    plan = plan_from_fingerprint(fingerprint, ("CT",))
    assert plan.slicing == "axial" and plan.target_spacing == (0.8, 0.7)


def test_sagittal_stack_is_reordered_and_sliced_sagittally(tmp_path):
    # File axes point posterior, inferior, right: a stack of 6 sagittal images 4 mm apart.
    affine = affine_from_codes("PIR", (0.9, 1.1, 4.0))
    lesion = (slice(2, 8), slice(3, 6), slice(1, 3))   # file axis 1 (canonical S): 3 of its 12 slices
    root = make_nnunet(tmp_path / "ds", {"s": ct_case((16, 12, 6), 0, affine, lesion)})

    fingerprint = fingerprint_of(root)

    np.testing.assert_allclose(fingerprint.median_spacing, (4.0, 0.9, 1.1), rtol=1e-6)
    assert fingerprint.shapes == [(6, 16, 12)]
    assert fingerprint.class_slice_fraction == {"background": 1.0, "lesion": 0.25}
    assert fingerprint.class_voxels == {"background": 16 * 12 * 6 - 36, "lesion": 36}
    plan = plan_from_fingerprint(fingerprint, ("CT",))
    assert plan.slicing == "sagittal" and plan.target_spacing == (0.9, 1.1)


def test_foreground_intensities_are_those_of_labelled_voxels(tmp_path):
    cases = {name: ct_case((16, 16, 6), seed, affine_from_codes("RAS", (0.7, 0.7, 5.0)))
             for seed, name in enumerate(("a", "b"))}
    root = make_nnunet(tmp_path / "ds", cases)
    foreground = np.concatenate([image[labels > 0, 0] for image, labels, _ in cases.values()]).astype(float)

    fingerprint = fingerprint_of(root)

    (channel,) = fingerprint.channels
    assert channel.name == "CT"
    np.testing.assert_allclose(channel.foreground_percentiles, np.percentile(foreground, (0.5, 50, 99.5)))
    assert channel.mean == pytest.approx(foreground.mean()) and channel.std == pytest.approx(foreground.std())
    assert fingerprint.class_voxels == {"background": 2 * (16 * 16 * 6 - 108), "lesion": 2 * 108}
    assert fingerprint.class_slice_fraction == {"background": 1.0, "lesion": 0.5}
    plan = plan_from_fingerprint(fingerprint, ("CT",))
    assert plan.intensity == ("ct_window",)
    assert plan.window == (channel.foreground_percentiles[0], channel.foreground_percentiles[2])
    assert plan.target_spacing == (0.7, 0.7) and plan.slicing == "axial"
    assert json.loads(json.dumps(fingerprint.to_dict(), allow_nan=False))["class_voxels"]["lesion"] == 216


def test_foreground_sampling_is_bounded_and_seeded(tmp_path):
    cases = {name: ct_case((16, 16, 6), seed, affine_from_codes("RAS", (1.0, 1.0, 3.0)))
             for seed, name in enumerate(("a", "b"))}
    root = make_nnunet(tmp_path / "ds", cases)

    first = fingerprint_of(root, max_voxels_per_case=10, seed=0).channels[0]
    again = fingerprint_of(root, max_voxels_per_case=10, seed=0).channels[0]
    other = fingerprint_of(root, max_voxels_per_case=10, seed=1).channels[0]
    full = fingerprint_of(root).channels[0]

    assert first == again
    assert first.mean != other.mean and first.mean != full.mean
    assert -100 <= first.foreground_percentiles[0] and first.foreground_percentiles[2] <= 200


def test_mri_channels_are_z_scored(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.zeros((16, 16, 6), np.uint8)
    labels[5:9, 5:9, 2:4] = 1
    image = rng.normal(300, 40, (16, 16, 6, 4)).astype(np.float32) * np.array([1, 2, 3, 4], np.float32)
    channels = ("FLAIR", "T1w", "t1gd", "T2w")
    root = make_nnunet(tmp_path / "ds", {"m": (image, labels, affine_from_codes("LPS", (1.0, 1.0, 1.2)))}, channels)

    fingerprint = fingerprint_of(root)
    plan = plan_from_fingerprint(fingerprint, channels)

    assert [c.name for c in fingerprint.channels] == list(channels)
    for c, channel in enumerate(fingerprint.channels):
        np.testing.assert_allclose(channel.foreground_percentiles[1], np.median(image[labels > 0, c]), rtol=1e-5)
    assert plan.channel_names == channels and plan.intensity == ("zscore",) * 4
    assert plan.window == PreprocessPlan().window
    assert plan.slicing == "axial" and plan.target_spacing == (1.0, 1.0)


def test_label_without_a_class_name_is_refused(tmp_path):
    image, labels, affine = ct_case((16, 16, 6), 0, np.eye(4))
    labels[0, 0, 0] = 2
    root = make_nnunet(tmp_path / "ds", {"a": (image, labels, affine)})
    with pytest.raises(DatasetError, match=r"a\.nii\.gz: label value 2 but the dataset names 2 classes"):
        fingerprint_of(root)


def test_label_map_off_the_image_grid_is_refused(tmp_path):
    image, labels, affine = ct_case((16, 16, 6), 0, np.eye(4))
    root = make_nnunet(tmp_path / "ds", {"a": (image, labels, affine)})
    write(root / "labelsTr" / "a.nii.gz", labels[:, :, :5], affine)
    with pytest.raises(DatasetError, match=r"a\.nii\.gz: label map has shape \(16, 16, 5\) but its image has"):
        fingerprint_of(root)


def test_dataset_without_foreground_is_refused(tmp_path):
    image, labels, affine = ct_case((16, 16, 6), 0, np.eye(4))
    root = make_nnunet(tmp_path / "ds", {"a": (image, np.zeros_like(labels), affine)})
    with pytest.raises(DatasetError, match=r"no training case has a foreground voxel"):
        fingerprint_of(root)


def test_decathlon_file_with_another_channel_count_than_modality_is_refused(tmp_path):
    root = tmp_path / "ds"
    image, labels, affine = ct_case((16, 16, 6), 0, np.eye(4))
    write(root / "imagesTr" / "a.nii.gz", np.concatenate([image, image], axis=-1), affine)
    write(root / "labelsTr" / "a.nii.gz", labels, affine)
    (root / "dataset.json").write_text(json.dumps({
        "modality": {"0": "CT"}, "labels": {"0": "background", "1": "lesion"},
        "training": [{"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz"}], "test": []}))
    with pytest.raises(DatasetError, match=r"a\.nii\.gz: case a has 2 channel\(s\) .*names 1"):
        fingerprint_of(root)


# ------------------------------------------------------------------------------------- plan rules


def fingerprint_with(median, channels=(("CT", (-100.0, 40.0, 200.0)),)):
    return DatasetFingerprint(cases=1, spacings=[median], shapes=[(10, 10, 10)], median_spacing=median,
                              channels=[ChannelFingerprint(name, p, 0.0, 1.0) for name, p in channels],
                              class_voxels={}, class_slice_fraction={})


@pytest.mark.parametrize("median, slicing, target", [
    ((0.7, 0.7, 5.0), "axial", (0.7, 0.7)),
    ((4.0, 0.9, 1.1), "sagittal", (0.9, 1.1)),
    ((1.0, 3.0, 1.2), "coronal", (1.0, 1.2)),
    ((2.0, 1.0, 1.0), "sagittal", (1.0, 1.0)),     # exactly twice both others is enough
    ((1.0, 1.0, 1.5), "axial", (1.0, 1.0)),        # no coarse axis: axial
    ((3.0, 1.0, 2.0), "axial", (3.0, 1.0)),        # coarsest not twice the middle one: axial
    ((0.78125, 0.7812345, 2.5), "axial", (0.781, 0.781)),
])
def test_slicing_and_target_spacing_rules(median, slicing, target):
    plan = plan_from_fingerprint(fingerprint_with(median), ("CT",))
    assert (plan.slicing, plan.target_spacing) == (slicing, target)


@pytest.mark.parametrize("name, expected", [
    ("CT", True), ("ct", True), ("CT_arterial", True), ("venous-ct", True), ("CT2", True),
    ("SPECT", False), ("T1", False), ("FLAIR", False), ("MRI", False), ("doctor", False),
])
def test_ct_channel_names(name, expected):
    assert is_ct(name) is expected


def test_window_comes_from_the_first_ct_channel_and_other_channels_are_z_scored():
    channels = (("T1", (0.0, 50.0, 900.0)), ("CT_arterial", (-80.0, 60.0, 310.0)), ("ct_venous", (-5.0, 9.0, 99.0)))
    plan = plan_from_fingerprint(fingerprint_with((0.8, 0.8, 3.0), channels), [name for name, _ in channels])
    assert plan.channel_names == ("T1", "CT_arterial", "ct_venous")
    assert plan.intensity == ("zscore", "ct_window", "ct_window")
    assert plan.window == (-80.0, 310.0)


def test_percentiles_and_context_come_from_the_base_plan():
    base = PreprocessPlan(percentiles=(1.0, 99.0), context_slices=2, context_mm=3.0, window=(-50.0, 50.0),
                          slicing="coronal", target_spacing=(9.0, 9.0))
    plan = plan_from_fingerprint(fingerprint_with((1.0, 1.0, 1.0), (("T2", (0.0, 1.0, 2.0)),)), ["T2"], base)
    assert (plan.percentiles, plan.context_slices, plan.context_mm, plan.window) == ((1.0, 99.0), 2, 3.0, (-50.0, 50.0))
    assert (plan.slicing, plan.target_spacing) == ("axial", (1.0, 1.0))
    default = plan_from_fingerprint(fingerprint_with((1.0, 1.0, 1.0)), ["CT"])
    assert (default.percentiles, default.context_slices) == (PreprocessPlan().percentiles, 0)


def test_plan_refuses_mismatched_channels_and_a_flat_ct_foreground():
    with pytest.raises(ValueError, match="2 channel names for a fingerprint of 1 channels"):
        plan_from_fingerprint(fingerprint_with((1.0, 1.0, 1.0)), ["CT", "PET"])
    with pytest.raises(ValueError, match="single intensity"):
        plan_from_fingerprint(fingerprint_with((1.0, 1.0, 1.0), (("CT", (7.0, 7.0, 7.0)),)), ["CT"])


# ------------------------------------------------------------------------------------- command


@pytest.fixture
def ct_dataset(tmp_path):
    cases = {name: ct_case((16, 16, 6), seed, affine_from_codes("LPS", (0.7, 0.7, 5.0)))
             for seed, name in enumerate(("a", "b"))}
    return make_nnunet(tmp_path / "Dataset007_Lesion", cases)


def test_plan_command_prints_the_summary_and_writes_json(ct_dataset, tmp_path, capsys):
    out = tmp_path / "plan.json"

    assert main(["plan", str(ct_dataset), "--json", str(out)]) == 0

    printed = capsys.readouterr().out
    for text in ("Dataset007_Lesion (nnunet_v2 layout, .nii.gz)", "2 training, 0 test", "0 background, 1 lesion",
                 "0 CT", "median spacing (R, A, S): 0.700 x 0.700 x 5.000 mm", "slicing         axial",
                 "target_spacing  0.7 0.7", "intensity       ct_window"):
        assert text in printed
    assert "does not name" not in printed
    written = json.loads(out.read_text())
    assert set(written) == {"dataset", "fingerprint", "plan"}
    assert written["dataset"]["layout"] == "nnunet_v2" and written["dataset"]["training_cases"] == ["a", "b"]
    plan = dataclass_from_dict(PreprocessPlan, written["plan"])
    assert plan.window == tuple(np.array(written["fingerprint"]["channels"][0]["foreground_percentiles"])[[0, 2]])
    assert f"window          {plan.window[0]:.6g} {plan.window[1]:.6g}" in printed
    # Settings the plan's schemes do not read are left out of the summary (they stay in the JSON).
    assert "percentiles" not in printed.split("\nplan\n")[1] and "context_mm" not in printed
    assert written["plan"]["percentiles"] == [0.5, 99.5]


def test_plan_command_refuses_an_existing_json_unless_told(ct_dataset, tmp_path, capsys):
    out = tmp_path / "plan.json"
    out.write_text("keep me")

    assert main(["plan", str(ct_dataset), "--json", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err and out.read_text() == "keep me"
    assert main(["plan", str(ct_dataset), "--json", str(out), "--overwrite"]) == 0
    assert json.loads(out.read_text())["plan"]["slicing"] == "axial"


def test_plan_command_makes_up_names_for_plain_pairs(tmp_path, capsys):
    image, labels, affine = ct_case((16, 16, 6), 0, np.eye(4))
    labels[0, 0, 0] = 3
    write(tmp_path / "x_image.nii.gz", np.concatenate([image, image], axis=-1), affine)
    write(tmp_path / "x_label.nii.gz", labels, affine)

    assert main(["plan", str(tmp_path)]) == 0

    printed = capsys.readouterr().out
    assert "0 background, 1 class_1, 2 class_2, 3 class_3" in printed
    assert "0 channel_0, 1 channel_1" in printed
    assert "note: the folder does not name its classes or channels" in printed
    assert "intensity       zscore zscore" in printed


def test_plan_command_reports_a_bad_dataset_in_one_line(tmp_path, capsys):
    (tmp_path / "dataset.json").write_text("[1, 2")
    assert main(["plan", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("medconddiff plan: error: ") and "not a readable JSON file" in err
    assert err.count("\n") == 1
