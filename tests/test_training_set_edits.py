"""Taking things out of a training set: only by the user's word, all or nothing (remove-from-set, merge-cases)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medconddiff.dataset_layout import describe_dataset
from medconddiff.nifti import VolumeMeta, load_labels
from medconddiff.training_set import TrainingSet, TrainingSetError
from tests.conftest import meta_1mm

META = meta_1mm()
LIVER = ("background", "liver", "tumour")
IGNORE = 3                                     # the ignore value of a set of LIVER


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def label_file(root: Path, case: str) -> np.ndarray:
    return load_labels(root / "labelsTr" / f"{case}.nii.gz")[0]


def lps_copy(array: np.ndarray) -> np.ndarray:
    """The voxel order of the same scan read from its DICOM series (LPS, first two axes swapped)."""
    return np.ascontiguousarray(np.transpose(array[::-1], (1, 0, 2)))


def lps_meta(n0: int) -> VolumeMeta:
    return VolumeMeta(affine=np.array([[0., -1, 0, n0 - 1], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]),
                      spacing=(1.0, 1.0, 1.0))


@pytest.fixture
def two_cases(tmp_path, liver_volume):
    image, labels = liver_volume
    root = tmp_path / "set"
    training_set = TrainingSet.create(root, LIVER)
    training_set.add_scan("a", image, META, labels, LIVER, verified_slices=[1, 3, 4])
    training_set.add_scan("b", image + 1, META, labels, LIVER, verified_slices=[0])
    return root, image, labels


def test_removing_a_case_deletes_its_files_and_entries_and_nothing_else(two_cases):
    root, image, labels = two_cases
    b_label = (root / "labelsTr" / "b.nii.gz").read_bytes()
    TrainingSet.open(root).remove_case("a")
    assert sorted(p.name for p in (root / "imagesTr").iterdir()) == ["b_0000.nii.gz"]
    assert sorted(p.name for p in (root / "labelsTr").iterdir()) == ["b.nii.gz"]
    assert (root / "labelsTr" / "b.nii.gz").read_bytes() == b_label
    manifest = json.loads((root / "dataset.json").read_text())
    assert manifest["numTraining"] == 1 and list(manifest["medconddiff"]["image_sha256"]) == ["b"]
    assert list(manifest["medconddiff"]["slicing"]) == ["b"]
    assert [case.name for case in describe_dataset(root).training] == ["b"]
    reopened = TrainingSet.open(root)
    assert reopened.cases == ["b"] and reopened.class_names == LIVER
    # The scan can come back later: it is a new case then.
    assert reopened.add_scan("a", image, META, labels, LIVER, verified_slices=[2]).new_case


def test_a_case_that_is_not_there_or_a_failed_move_changes_nothing(two_cases, monkeypatch):
    root, _, _ = two_cases
    before = snapshot(root)
    with pytest.raises(TrainingSetError, match=r"no case 'c' \(cases: a, b\)"):
        TrainingSet.open(root).remove_case("c")
    real_replace = os.replace

    def failing_replace(source, target):
        if str(target).endswith("dataset.json"):          # the last move: the case's files were moved already
            raise OSError("disk full")
        return real_replace(source, target)

    monkeypatch.setattr("medconddiff.atomic.os.replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        TrainingSet.open(root).remove_case("a")
    monkeypatch.undo()
    assert snapshot(root) == before
    assert TrainingSet.open(root).cases == ["a", "b"]


def test_unverifying_slices_makes_only_them_ignore(two_cases):
    root, _, labels = two_cases
    training_set = TrainingSet.open(root)
    assert training_set.unverify_slices("a", [3]) == 2
    stored = label_file(root, "a")
    np.testing.assert_array_equal(stored[..., [1, 4]], labels[..., [1, 4]])
    assert (stored[..., [0, 2, 3, 5]] == IGNORE).all()
    assert TrainingSet.open(root).verified_slices("a") == [1, 4]
    before = snapshot(root)
    for slices, message in (([2], r"slice\(s\) \[2\] hold no verified voxel \(axial\); its verified slices are 1, 4"),
                            ([1, 4], "every verified slice of the case; remove the case instead"),
                            ([9], r"slices \[9\] are outside its 6 axial slices"),
                            ([], r"slice\(s\) \[\] hold no verified voxel")):
        with pytest.raises(TrainingSetError, match=message):
            training_set.unverify_slices("a", slices)
    assert snapshot(root) == before


def _legacy_duplicate(root: Path, image: np.ndarray, labels: np.ndarray, verified: list[int]) -> None:
    """What an earlier release could leave: case 'a' again as 'dup', written from its DICOM series (LPS, axes
    swapped), verified on ``verified``, and no digests in dataset.json."""
    stored = np.full(labels.shape, IGNORE, np.uint8)
    stored[..., verified] = labels[..., verified]
    affine = lps_meta(image.shape[0]).affine
    nib.save(nib.Nifti1Image(lps_copy(image).astype(np.int16), affine), str(root / "imagesTr" / "dup_0000.nii.gz"))
    nib.save(nib.Nifti1Image(lps_copy(stored), affine), str(root / "labelsTr" / "dup.nii.gz"))
    manifest = json.loads((root / "dataset.json").read_text())
    manifest["numTraining"] += 1
    manifest["medconddiff"].pop("image_sha256")
    (root / "dataset.json").write_text(json.dumps(manifest))


def test_merging_a_scan_held_under_two_names_moves_the_labels_and_removes_the_second(two_cases):
    root, image, labels = two_cases
    edited = labels.copy()
    spot = tuple(np.argwhere(labels[..., 1] == 1)[0]) + (1,)
    edited[spot] = 2                                   # 'dup' says tumour where 'a' says liver, on slice 1
    _legacy_duplicate(root, image, edited, verified=[1, 2])
    training_set = TrainingSet.open(root)
    assert training_set.summary().same_scan == (("a", "dup"),)
    assert "`medconddiff merge-cases` merges them" in training_set.summary().text()
    before = snapshot(root)
    with pytest.raises(TrainingSetError, match=r"cases a and dup disagree on 1 voxel\(s\) verified in both "
                                               r"\(slices 1 of a\); say whose labels win"):
        training_set.merge_cases("a", "dup")
    with pytest.raises(TrainingSetError, match="prefer names one of the two cases"):
        training_set.merge_cases("a", "dup", prefer="b")
    with pytest.raises(TrainingSetError, match="cases a and b hold different scans"):
        training_set.merge_cases("a", "b")
    with pytest.raises(TrainingSetError, match="cannot be merged into itself"):
        training_set.merge_cases("a", "a")
    assert snapshot(root) == before

    result = training_set.merge_cases("a", "dup", prefer="dup")
    assert (result.copied_voxels, result.disagreeing_voxels, result.preferred, result.verified_slices) == \
        (labels[..., 2].size, 1, "dup", 4)
    assert "took dup's" in result.description()
    stored = label_file(root, "a")                     # in a's voxel order, the disagreement settled for dup
    np.testing.assert_array_equal(stored[..., [1, 2, 3, 4]], edited[..., [1, 2, 3, 4]])
    assert (stored[..., [0, 5]] == IGNORE).all()
    reopened = TrainingSet.open(root)
    assert reopened.cases == ["a", "b"] and reopened.summary().same_scan == ()
    assert not (root / "imagesTr" / "dup_0000.nii.gz").exists() and not (root / "labelsTr" / "dup.nii.gz").exists()
    assert sorted(json.loads((root / "dataset.json").read_text())["medconddiff"]["image_sha256"]) == ["a", "b"]


def test_the_commands_remove_and_merge_by_the_users_word(two_cases, capsys):
    from medconddiff.cli import main

    root, image, labels = two_cases
    before = snapshot(root)
    assert main(["remove-from-set", str(root)]) == 0                   # no case named: a listing, nothing removed
    out = capsys.readouterr().out
    assert "  a: 3 verified slices (liver, tumour)\n" in out and "  b: 1 verified slice (liver, tumour)\n" in out
    assert main(["remove-from-set", str(root), "--slices", "3"]) == 2
    assert "--slices needs the case" in capsys.readouterr().err
    assert snapshot(root) == before
    assert main(["remove-from-set", str(root), "a", "--slices", "3-4"]) == 0
    out = capsys.readouterr().out
    assert "slice(s) 3–4 of case 'a' are unverified again (1 verified slice(s) left)" in out
    assert "2 cases, 2 verified slices" in out
    before = snapshot(root)
    assert main(["remove-from-set", str(root), "a", "--slices", "1"]) == 2
    assert "remove the case instead" in capsys.readouterr().err
    assert main(["remove-from-set", str(root), "nobody"]) == 2
    assert "no case 'nobody' (cases: a, b)" in capsys.readouterr().err
    assert snapshot(root) == before

    _legacy_duplicate(root, image, labels, verified=[1, 5])
    assert main(["merge-cases", str(root), "a", "dup"]) == 0          # they agree on slice 1: no --prefer needed
    out = capsys.readouterr().out
    assert "case 'dup' merged into 'a'" in out and "2 verified slice(s)) and removed" in out
    np.testing.assert_array_equal(label_file(root, "a")[..., [1, 5]], labels[..., [1, 5]])
    assert main(["remove-from-set", str(root), "b"]) == 0
    assert "case 'b' removed" in capsys.readouterr().out
    assert TrainingSet.open(root).cases == ["a"]


def test_a_set_whose_cases_label_disjoint_classes_says_so(tmp_path, liver_volume):
    image, labels = liver_volume
    training_set = TrainingSet.create(tmp_path / "set", LIVER)
    training_set.add_scan("liver_case", image, META, labels, LIVER, verified_slices=[1])
    lesion = (labels == 2).astype(np.uint8)
    assert lesion[..., 2].any(), "slice 2 of the cut shows the tumour, here called lesion"
    training_set.add_scan("lesion_case", image + 1, META, lesion, ("background", "lesion"), verified_slices=[2])
    # A case verified as background only labels nothing to mix.
    training_set.add_scan("empty_case", image + 2, META, np.zeros_like(labels), LIVER, verified_slices=[0])
    summary = TrainingSet.open(tmp_path / "set").summary()
    assert summary.mixed_labelling == ((("lesion",), ("lesion_case",)), (("liver", "tumour"), ("liver_case",)))
    assert "its cases label different classes (lesion: lesion_case; liver, tumour: liver_case)" in summary.text()
    # Cases that share a class are one kind of labelling.
    shared = TrainingSet.create(tmp_path / "shared", LIVER)
    shared.add_scan("a", image, META, labels, LIVER, verified_slices=[1])
    shared.add_scan("b", image + 1, META, (labels > 0).astype(np.uint8), LIVER, verified_slices=[2])
    assert shared.summary().mixed_labelling == () and "different classes" not in shared.summary().text()
