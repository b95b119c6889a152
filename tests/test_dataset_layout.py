"""medconddiff.dataset_layout: Decathlon, nnU-Net v2 and plain folders, and every way they can be wrong."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from medconddiff.dataset_layout import CaseFiles, DatasetError, describe_dataset, load_case_image

SHAPE = (16, 16, 6)
AFFINE = np.diag([0.8, 0.8, 2.5, 1.0])
MRI = ("FLAIR", "T1w", "t1gd", "T2w")


def write(path, data, affine=AFFINE):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))
    return path


def image_data(case: int, channels: int) -> np.ndarray:
    """(X, Y, Z, C) float32 whose every voxel tells its case and channel: 1000 * case + 100 * channel + ramp."""
    ramp = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE) % 97
    return np.stack([1000 * case + 100 * c + ramp for c in range(channels)], axis=-1)


def label_data(case: int) -> np.ndarray:
    labels = np.zeros(SHAPE, np.uint8)
    labels[4:10, 4:10, 1:4] = 1
    labels[6:8, 6:8, 2] = 2
    return labels


def write_json(path, data):
    path.write_text(json.dumps(data))
    return path


def make_decathlon(root, channels=("CT",), cases=("liver_3", "liver_1", "liver_2"), test=("liver_9",)):
    """An MSD v1 folder; 'training' is listed out of order on purpose."""
    for index, name in enumerate(cases):
        data = image_data(index, len(channels))
        write(root / "imagesTr" / f"{name}.nii.gz", data if len(channels) > 1 else data[..., 0])
        write(root / "labelsTr" / f"{name}.nii.gz", label_data(index))
    for name in test:
        write(root / "imagesTs" / f"{name}.nii.gz", image_data(9, len(channels)))
    write_json(root / "dataset.json", {
        "name": "Task03_Liver", "modality": {str(c): name for c, name in enumerate(channels)},
        "labels": {"0": "background", "1": "liver", "2": "tumour"}, "numTraining": len(cases),
        "training": [{"image": f"./imagesTr/{n}.nii.gz", "label": f"./labelsTr/{n}.nii.gz"} for n in cases],
        "test": [f"./imagesTs/{n}.nii.gz" for n in test]})
    return root


def make_nnunet(root, channels=("CT",), cases=("case_b", "case_a"), test=("case_z",), labels=None):
    for index, name in enumerate(cases):
        data = image_data(index, len(channels))
        for c in range(len(channels)):
            write(root / "imagesTr" / f"{name}_{c:04d}.nii.gz", data[..., c])
        write(root / "labelsTr" / f"{name}.nii.gz", label_data(index))
    for name in test:
        for c in range(len(channels)):
            write(root / "imagesTs" / f"{name}_{c:04d}.nii.gz", image_data(9, len(channels))[..., c])
    write_json(root / "dataset.json", {
        "channel_names": {str(c): name for c, name in enumerate(channels)},
        "labels": labels or {"background": 0, "liver": 1, "tumour": 2},
        "numTraining": len(cases), "file_ending": ".nii.gz"})
    return root


# ------------------------------------------------------------------------------------- layouts


def test_decathlon_ct(tmp_path):
    root = make_decathlon(tmp_path / "Task03_Liver")

    description = describe_dataset(root)

    assert description.layout == "decathlon" and description.name == "Task03_Liver"
    assert description.class_names == ("background", "liver", "tumour")
    assert description.channel_names == ("CT",)
    assert description.file_ending == ".nii.gz"
    assert [case.name for case in description.training] == ["liver_1", "liver_2", "liver_3"]
    assert description.training[0] == CaseFiles("liver_1", (root / "imagesTr" / "liver_1.nii.gz",),
                                                 root / "labelsTr" / "liver_1.nii.gz")
    assert description.test == [CaseFiles("liver_9", (root / "imagesTs" / "liver_9.nii.gz",), None)]
    image, meta = load_case_image(description.training[0], expected_channels=1)
    assert image.shape == SHAPE + (1,) and image.dtype == np.float32
    np.testing.assert_array_equal(image[..., 0], image_data(1, 1)[..., 0])  # liver_1 was written second
    np.testing.assert_allclose(meta.affine, AFFINE)


def test_decathlon_mri_case_is_one_4d_file(tmp_path):
    root = make_decathlon(tmp_path / "Task01_BrainTumour", channels=MRI, cases=("brats_1",), test=())

    description = describe_dataset(root)

    assert description.channel_names == MRI and description.test == []
    (case,) = description.training
    assert len(case.images) == 1
    image, _ = load_case_image(case, expected_channels=4)
    assert image.shape == SHAPE + (4,)
    np.testing.assert_array_equal(image, image_data(0, 4))


def test_nnunet_v2_ct(tmp_path):
    root = make_nnunet(tmp_path / "Dataset003_Liver")

    description = describe_dataset(root)

    assert description.layout == "nnunet_v2" and description.name == "Dataset003_Liver"
    assert description.class_names == ("background", "liver", "tumour")
    assert description.channel_names == ("CT",)
    assert [case.name for case in description.training] == ["case_a", "case_b"]
    assert description.training[0].images == (root / "imagesTr" / "case_a_0000.nii.gz",)
    assert description.training[0].label == root / "labelsTr" / "case_a.nii.gz"
    assert description.test == [CaseFiles("case_z", (root / "imagesTs" / "case_z_0000.nii.gz",), None)]


def test_nnunet_v2_mri_has_one_file_per_channel_stacked_in_order(tmp_path):
    root = make_nnunet(tmp_path / "Dataset001_BrainTumour", channels=MRI, cases=("brats_7",))

    description = describe_dataset(root)

    assert description.channel_names == MRI
    (case,) = description.training
    assert case.images == tuple(root / "imagesTr" / f"brats_7_{c:04d}.nii.gz" for c in range(4))
    assert len(description.test[0].images) == 4
    image, _ = load_case_image(case, expected_channels=4)
    np.testing.assert_array_equal(image, image_data(0, 4))


def test_nnunet_v2_class_names_follow_label_ids_not_json_order(tmp_path):
    root = make_nnunet(tmp_path / "ds", labels={"tumour": 2, "background": 0, "liver": 1})
    assert describe_dataset(root).class_names == ("background", "liver", "tumour")


def test_plain_image_label_pairs(tmp_path):
    for index, name in enumerate(("b", "a")):
        write(tmp_path / f"{name}_image.nii.gz", image_data(index, 1)[..., 0])
        write(tmp_path / f"{name}_label.nii", label_data(index))

    description = describe_dataset(tmp_path)

    assert description.layout == "pairs" and description.name == tmp_path.name
    assert description.class_names is None and description.channel_names is None
    assert description.training == [CaseFiles("a", (tmp_path / "a_image.nii.gz",), tmp_path / "a_label.nii"),
                                    CaseFiles("b", (tmp_path / "b_image.nii.gz",), tmp_path / "b_label.nii")]
    assert description.test == [] and description.file_ending == ".nii.gz"


def test_plain_folders_group_channel_files_and_skip_hidden_files(tmp_path):
    for name in ("p2", "p1"):
        for c in range(2):
            write(tmp_path / "imagesTr" / f"{name}_{c:04d}.nii.gz", image_data(0, 2)[..., c])
        write(tmp_path / "labelsTr" / f"{name}.nii.gz", label_data(0))
    for c in range(2):
        write(tmp_path / "imagesTs" / f"p9_{c:04d}.nii.gz", image_data(0, 1)[..., 0])
    (tmp_path / "imagesTr" / "._p1_0000.nii.gz").write_bytes(b"macOS resource fork")

    description = describe_dataset(tmp_path)

    assert description.layout == "pairs" and description.class_names is None
    assert [case.name for case in description.training] == ["p1", "p2"]
    assert description.training[0].images == (tmp_path / "imagesTr" / "p1_0000.nii.gz",
                                               tmp_path / "imagesTr" / "p1_0001.nii.gz")
    assert description.training[0].label == tmp_path / "labelsTr" / "p1.nii.gz"
    assert [case.name for case in description.test] == ["p9"] and len(description.test[0].images) == 2


def test_plain_folders_take_a_number_that_names_a_label_as_part_of_the_case(tmp_path):
    for name in ("case_0001", "case_0002"):
        write(tmp_path / "imagesTr" / f"{name}.nii.gz", image_data(0, 1)[..., 0])
        write(tmp_path / "labelsTr" / f"{name}.nii.gz", label_data(0))
    write(tmp_path / "imagesTs" / "case_0003.nii.gz", image_data(0, 1)[..., 0])

    description = describe_dataset(tmp_path)

    assert [case.name for case in description.training] == ["case_0001", "case_0002"]
    assert [case.name for case in description.test] == ["case_0003"]


# ------------------------------------------------------------------------------------- errors


def test_missing_folder(tmp_path):
    with pytest.raises(DatasetError, match="dataset folder not found"):
        describe_dataset(tmp_path / "nowhere")


def test_empty_folder_says_what_layouts_are_expected(tmp_path):
    with pytest.raises(DatasetError, match=r"no training cases.*dataset\.json.*imagesTr"):
        describe_dataset(tmp_path)


def test_decathlon_missing_listed_file_is_named(tmp_path):
    root = make_decathlon(tmp_path / "ds")
    (root / "labelsTr" / "liver_2.nii.gz").unlink()
    with pytest.raises(DatasetError, match=r"labelsTr/liver_2\.nii\.gz: file listed in dataset\.json does not exist"):
        describe_dataset(root)


def test_nnunet_missing_label_is_named(tmp_path):
    root = make_nnunet(tmp_path / "ds")
    (root / "labelsTr" / "case_b.nii.gz").unlink()
    with pytest.raises(DatasetError, match=r"labelsTr/case_b\.nii\.gz: label file missing for case case_b"):
        describe_dataset(root)


def test_nnunet_label_without_image_is_named(tmp_path):
    root = make_nnunet(tmp_path / "ds")
    write(root / "labelsTr" / "case_c.nii.gz", label_data(0))
    with pytest.raises(DatasetError, match=r"imagesTr/case_c_0000\.nii\.gz: image file missing for case case_c"):
        describe_dataset(root)


def test_nnunet_missing_channel_file_is_named(tmp_path):
    root = make_nnunet(tmp_path / "ds", channels=MRI)
    (root / "imagesTr" / "case_b_0002.nii.gz").unlink()
    with pytest.raises(DatasetError, match=r"case_b_0002\.nii\.gz: channel file missing for case case_b"):
        describe_dataset(root)


def test_nnunet_extra_channel_file_is_refused(tmp_path):
    root = make_nnunet(tmp_path / "ds")
    write(root / "imagesTr" / "case_a_0001.nii.gz", image_data(0, 1)[..., 0])
    with pytest.raises(DatasetError, match=r"case_a_0001\.nii\.gz: channel 1 but dataset\.json names 1"):
        describe_dataset(root)


def test_plain_pair_missing_label_is_named(tmp_path):
    write(tmp_path / "a_image.nii.gz", image_data(0, 1)[..., 0])
    with pytest.raises(DatasetError, match=r"a_label\.nii\.gz: label file missing for a_image\.nii\.gz"):
        describe_dataset(tmp_path)


def test_plain_folder_missing_channel_file_is_named(tmp_path):
    for c in (0, 2):
        write(tmp_path / "imagesTr" / f"p_{c:04d}.nii.gz", image_data(0, 1)[..., 0])
    write(tmp_path / "labelsTr" / "p.nii.gz", label_data(0))
    with pytest.raises(DatasetError, match=r"p_0001\.nii\.gz: channel file missing for case p"):
        describe_dataset(tmp_path)


@pytest.mark.parametrize("labels, missing", [
    ({"0": "background", "1": "liver", "3": "tumour"}, r"missing \[2\]"),
    ({"1": "liver", "2": "tumour"}, r"missing \[0\]"),
])
def test_decathlon_label_ids_must_be_contiguous(tmp_path, labels, missing):
    root = make_decathlon(tmp_path / "ds")
    manifest = json.loads((root / "dataset.json").read_text())
    write_json(root / "dataset.json", {**manifest, "labels": labels})
    with pytest.raises(DatasetError, match=rf"'labels' ids must be 0\.\.N-1 without gaps.*{missing}"):
        describe_dataset(root)


def test_nnunet_label_ids_must_be_contiguous(tmp_path):
    root = make_nnunet(tmp_path / "ds", labels={"background": 0, "liver": 1, "tumour": 4})
    with pytest.raises(DatasetError, match=r"dataset\.json: 'labels' ids .*missing \[2, 3\]"):
        describe_dataset(root)


def test_nnunet_region_based_labels_are_refused(tmp_path):
    root = make_nnunet(tmp_path / "ds", labels={"background": 0, "whole tumour": [1, 2, 3], "core": [2, 3]})
    with pytest.raises(DatasetError, match="region-based labels are not supported"):
        describe_dataset(root)


def test_nnunet_ignore_label_is_read_apart_from_the_classes(tmp_path):
    root = make_nnunet(tmp_path / "ds", labels={"background": 0, "liver": 1, "ignore": 2})
    description = describe_dataset(root)
    assert description.class_names == ("background", "liver")
    assert description.ignore_label == 2


@pytest.mark.parametrize("labels, message", [
    ({"background": 0, "liver": 1, "ignore": 1}, r"'ignore' label's id 1 is also class 'liver'"),
    ({"background": 0, "liver": 1, "tumour": 2, "ignore": 0}, r"'ignore' label's id 0 is also class"),
    ({"background": 0, "liver": 1, "ignore": "2"}, r"'ignore' label must have one whole-number id"),
])
def test_nnunet_ignore_label_that_collides_or_is_not_a_number(tmp_path, labels, message):
    root = make_nnunet(tmp_path / "ds", labels=labels)
    with pytest.raises(DatasetError, match=r"dataset\.json: (the )?" + message):
        describe_dataset(root)


def test_decathlon_4d_image_with_wrong_channel_count(tmp_path):
    root = make_decathlon(tmp_path / "ds", channels=MRI, cases=("brats_1",), test=())
    write(root / "imagesTr" / "brats_1.nii.gz", image_data(0, 3))
    (case,) = describe_dataset(root).training
    with pytest.raises(DatasetError, match=r"brats_1\.nii\.gz: case brats_1 has 3 channel\(s\).*names 4"):
        load_case_image(case, expected_channels=4)


def test_dataset_json_that_is_not_json(tmp_path):
    root = make_nnunet(tmp_path / "ds")
    (root / "dataset.json").write_text("{'channel_names': ")
    with pytest.raises(DatasetError, match=r"dataset\.json: not a readable JSON file"):
        describe_dataset(root)


def test_dataset_json_of_neither_layout_names_the_expected_keys(tmp_path):
    root = make_nnunet(tmp_path / "ds")
    write_json(root / "dataset.json", {"description": "liver", "labels": {"0": "background"}})
    with pytest.raises(DatasetError, match=r"neither a Decathlon dataset\.json \(keys training, modality, labels\) "
                                           r"nor an nnU-Net v2 one \(keys channel_names, labels, file_ending\)"):
        describe_dataset(root)


def test_dataset_json_lacking_a_key_of_its_layout(tmp_path):
    root = make_nnunet(tmp_path / "ds")
    manifest = json.loads((root / "dataset.json").read_text())
    del manifest["file_ending"]
    write_json(root / "dataset.json", manifest)
    with pytest.raises(DatasetError, match="nnU-Net v2 dataset.json lacks 'file_ending'"):
        describe_dataset(root)


def test_num_training_must_match_the_cases_found(tmp_path):
    root = make_nnunet(tmp_path / "ds")
    manifest = json.loads((root / "dataset.json").read_text())
    write_json(root / "dataset.json", {**manifest, "numTraining": 5})
    with pytest.raises(DatasetError, match="numTraining is 5 but 2 training cases were found"):
        describe_dataset(root)
