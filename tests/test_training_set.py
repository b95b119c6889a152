"""A training set that grows scan by scan: nnU-Net v2 layout, sparse labels, merges, atomic adds."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medconddiff.dataset_layout import describe_dataset
from medconddiff.losses import IGNORE_INDEX
from medconddiff.nifti import VolumeMeta, load_labels
from medconddiff.training_data import TrainingData
from medconddiff.training_set import LOCK_FILE, STAGING_FOLDER, TrainingSet, TrainingSetError, case_id_from_name
from tests.conftest import meta_1mm

META = meta_1mm()
LIVER = ("background", "liver", "tumour")


@pytest.fixture
def scan(liver_volume):
    image, labels = liver_volume
    return image, labels


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file of a set, by relative path: a failed add must leave this unchanged."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def label_file(root: Path, case: str) -> np.ndarray:
    return load_labels(root / "labelsTr" / f"{case}.nii.gz")[0]


def test_a_new_set_is_an_nnunet_v2_folder_with_an_ignore_label_above_the_classes(tmp_path, scan):
    image, labels = scan
    root = tmp_path / "Dataset001_Mine"
    training_set = TrainingSet.create(root, LIVER, ("CT",))
    result = training_set.add_scan("scan-01.nii.gz", image, META, labels, LIVER, verified_slices=[1, 4])
    assert (result.case, result.new_case, result.verified_slices) == ("scan-01", True, 2)
    manifest = json.loads((root / "dataset.json").read_text())
    assert manifest["labels"] == {"background": 0, "liver": 1, "tumour": 2, "ignore": 3}
    assert manifest["channel_names"] == {"0": "CT"} and manifest["numTraining"] == 1
    assert manifest["file_ending"] == ".nii.gz"
    # No staging left behind; the (released) lock of one add at a time stays, hidden.
    assert sorted(os.listdir(root)) == [LOCK_FILE, "dataset.json", "imagesTr", "labelsTr"]
    stored = label_file(root, "scan-01")
    # Axial slices of an RAS scan are file axis 2: verified slices hold the labels, the rest is ignore.
    np.testing.assert_array_equal(stored[..., [1, 4]], labels[..., [1, 4]])
    assert (stored[..., [0, 2, 3, 5]] == 3).all()
    saved = nib.load(str(root / "imagesTr" / "scan-01_0000.nii.gz"))
    np.testing.assert_allclose(saved.affine, META.affine)
    np.testing.assert_array_equal(np.asarray(saved.dataobj), image)     # HU kept exactly (as int16)
    summary = training_set.summary()
    assert (summary.cases, summary.verified_slices) == (1, 2)
    assert summary.labelled_voxels == {name: int((labels[..., [1, 4]] == k).sum()) for k, name in enumerate(LIVER)}
    assert summary.text().startswith("1 case, 2 verified slices; labelled voxels: background ")
    description = describe_dataset(root)
    assert (description.class_names, description.ignore_label) == (LIVER, 3)


def test_adding_a_scan_again_merges_its_verified_slices(tmp_path, scan):
    image, labels = scan
    root = tmp_path / "set"
    training_set = TrainingSet.create(root, LIVER)
    training_set.add_scan("scan", image, META, labels, LIVER, verified_slices=[1, 2])
    corrected = labels.copy()
    corrected[..., 2] = 0                                   # the user re-checked slice 2: nothing there
    result = training_set.add_scan("scan", image, META, corrected, LIVER, verified_slices=[2, 5])
    assert (result.new_case, result.verified_slices) == (False, 3)
    stored = label_file(root, "scan")
    np.testing.assert_array_equal(stored[..., 1], labels[..., 1])          # verified earlier: kept
    assert (stored[..., 2] == 0).all()                                      # verified again: the new labels
    np.testing.assert_array_equal(stored[..., 5], labels[..., 5])
    assert (stored[..., [0, 3, 4]] == 3).all()
    reopened = TrainingSet.open(root)
    assert reopened.cases == ["scan"] and json.loads((root / "dataset.json").read_text())["numTraining"] == 1
    assert reopened.verified_slices("scan") == [1, 2, 5]


def test_the_same_scan_under_another_name_merges_into_its_case(tmp_path, scan, monkeypatch):
    image, labels = scan
    root = tmp_path / "set"
    training_set = TrainingSet.create(root, LIVER)
    training_set.add_scan("CT venous", image, META, labels, LIVER, verified_slices=[1])
    # The same series again under this release's DICOM case name (or a renamed layer): one case, merged.
    result = training_set.add_scan("series2_CT_venous_3ab8c05f", image, META, labels, LIVER, verified_slices=[4])
    assert (result.case, result.new_case, result.requested, result.verified_slices) == \
        ("CT_venous", False, "series2_CT_venous_3ab8c05f", 2)
    assert "merged into case 'CT_venous', which holds the same scan" in result.description()
    assert TrainingSet.open(root).cases == ["CT_venous"] and TrainingSet.open(root).verified_slices("CT_venous") == [1, 4]
    # The same scan in another voxel order (its DICOM series read back, a converter's LPS file with swapped
    # axes): found by its voxels in canonical order, its labels land on the stored case's voxels.
    swap = lambda a: np.ascontiguousarray(np.transpose(a[::-1], (1, 0, 2)))
    n0 = image.shape[0]
    lps = VolumeMeta(affine=np.array([[0., -1, 0, n0 - 1], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]),
                     spacing=(1.0, 1.0, 1.0))
    result = training_set.add_scan("from_dicom", swap(image), lps, swap(labels), LIVER, verified_slices=[3])
    assert (result.case, result.new_case, result.verified_slices) == ("CT_venous", False, 3)
    stored = label_file(root, "CT_venous")
    np.testing.assert_array_equal(stored[..., [1, 3, 4]], labels[..., [1, 3, 4]])
    assert (stored[..., [0, 2, 5]] == 3).all()
    assert TrainingSet.open(root).case_holding(swap(image), lps) == "CT_venous"
    # Under its own name in the other voxel order too (the DICOM series of a case added as NIfTI).
    result = training_set.add_scan("CT_venous", swap(image), lps, swap(labels), LIVER, verified_slices=[5])
    assert (result.case, result.new_case, result.verified_slices) == ("CT_venous", False, 4)
    assert TrainingSet.open(root).case_holding(swap(image), None) is None     # voxel order unknown: not matched
    # Another scan (one voxel differs) is a new case.
    other = image.copy()
    other[0, 0, 0] += 1
    assert training_set.add_scan("other", other, META, labels, LIVER, verified_slices=[0]).new_case
    # A set written before digests were kept: the stored images are read once, then recorded.
    manifest = json.loads((root / "dataset.json").read_text())
    recorded = manifest["medconddiff"].pop("image_sha256")
    assert sorted(recorded) == ["CT_venous", "other"]
    (root / "dataset.json").write_text(json.dumps(manifest))
    result = TrainingSet.open(root).add_scan("renamed", other, META, labels, LIVER, verified_slices=[5])
    assert (result.case, result.new_case) == ("other", False)
    assert json.loads((root / "dataset.json").read_text())["medconddiff"]["image_sha256"] == recorded
    # An older set holding one scan twice (two names): the summary says so, wherever it is shown.
    for folder, suffix in (("imagesTr", "_0000.nii.gz"), ("labelsTr", ".nii.gz")):
        (root / folder / f"dup{suffix}").write_bytes((root / folder / f"other{suffix}").read_bytes())
    manifest = json.loads((root / "dataset.json").read_text())
    manifest["numTraining"] = 3
    manifest["medconddiff"].pop("image_sha256")
    (root / "dataset.json").write_text(json.dumps(manifest))

    def unwritable(*args, **kwargs):
        raise PermissionError("read-only medium")

    monkeypatch.setattr("medconddiff.training_set.write_json_atomic", unwritable)
    assert TrainingSet.open(root).summary().same_scan == (("dup", "other"),)    # a read-only set: still told
    monkeypatch.undo()
    assert "image_sha256" not in json.loads((root / "dataset.json").read_text())["medconddiff"]
    summary = TrainingSet.open(root).summary()
    assert summary.same_scan == (("dup", "other"),) and "cases dup and other hold the same scan" in summary.text()
    # The digests read from its files are recorded at once: the next summary reads no image.
    assert sorted(json.loads((root / "dataset.json").read_text())["medconddiff"]["image_sha256"]) == \
        ["CT_venous", "dup", "other"]
    manifest = json.loads((root / "dataset.json").read_text())
    for suffix, folder in (("_0000.nii.gz", "imagesTr"), (".nii.gz", "labelsTr")):
        (root / folder / f"dup{suffix}").unlink()
    manifest["numTraining"] = 2
    (root / "dataset.json").write_text(json.dumps(manifest))
    assert TrainingSet.open(root).summary().same_scan == ()
    # The same voxels said to be 2 mm slices are another scan: a case of their own.
    thick = VolumeMeta(affine=np.diag([1.0, 1.0, 2.0, 1.0]), spacing=(1.0, 1.0, 2.0))
    assert training_set.add_scan("thick", image, thick, labels, LIVER, verified_slices=[0]).new_case
    assert training_set.case_holding(image, thick) == "thick" and training_set.case_holding(image, META) == "CT_venous"
    # Float voxels (MRI) are stored as float32 and found again the same way.
    mri = image.astype(np.float64) * 0.37 + 0.1
    first = training_set.add_scan("t1", mri, META, labels, LIVER, verified_slices=[0])
    again = TrainingSet.open(root).add_scan("t1_again", mri, META, labels, LIVER, verified_slices=[2])
    assert (first.new_case, again.case, again.new_case) == (True, "t1", False)
    manifest = json.loads((root / "dataset.json").read_text())
    manifest["medconddiff"]["image_sha256"]["gone"] = "0" * 64     # a case removed by hand: its digest is moot
    (root / "dataset.json").write_text(json.dumps(manifest))
    assert TrainingSet.open(root).case_holding(mri, META) == "t1"
    manifest["medconddiff"]["image_sha256"] = ["not", "a", "mapping"]
    (root / "dataset.json").write_text(json.dumps(manifest))
    with pytest.raises(TrainingSetError, match=r"image_sha256' must map case names to text"):
        TrainingSet.open(root)


def test_a_two_channel_scan_is_found_by_both_channels(tmp_path, scan):
    image, labels = scan
    t1, t2 = image * 0.5 + 3.25, image * -0.25                 # MRI-like float channels
    root = tmp_path / "mri"
    training_set = TrainingSet.create(root, LIVER, ("T1", "T2"))
    training_set.add_scan("patient_a", np.stack([t1, t2], -1), META, labels, LIVER, verified_slices=[1])
    again = training_set.add_scan("a_renamed", np.stack([t1, t2], -1), META, labels, LIVER, verified_slices=[2])
    assert (again.case, again.new_case) == ("patient_a", False)
    other_t2 = t2.copy()
    other_t2[3, 3, 3] += 1.0                                   # one voxel of the second channel differs
    assert training_set.add_scan("b", np.stack([t1, other_t2], -1), META, labels, LIVER, verified_slices=[0]).new_case
    assert TrainingSet.open(root).cases == ["b", "patient_a"]


def test_what_a_user_wrote_into_dataset_json_is_kept(tmp_path, scan):
    image, labels = scan
    root = tmp_path / "set"
    TrainingSet.create(root, LIVER).add_scan("a", image, META, labels, LIVER, verified_slices=[1])
    manifest = json.loads((root / "dataset.json").read_text())
    assert manifest["name"] == "set" and manifest["description"].startswith("sparse labels")
    manifest.update(name="Dataset042_Liver", description="our liver corrections", licence="CC-BY-4.0",
                    reference="ward 3 study")
    manifest["medconddiff"].pop("image_sha256")          # as an older release wrote it
    (root / "dataset.json").write_text(json.dumps(manifest))
    TrainingSet.open(root).summary()                      # records the digest it read
    TrainingSet.open(root).add_scan("b", image + 1, META, labels, LIVER, verified_slices=[2])
    after = json.loads((root / "dataset.json").read_text())
    assert {key: after[key] for key in ("name", "description", "licence", "reference")} == {
        "name": "Dataset042_Liver", "description": "our liver corrections", "licence": "CC-BY-4.0",
        "reference": "ward 3 study"}
    assert after["numTraining"] == 2 and sorted(after["medconddiff"]["image_sha256"]) == ["a", "b"]


def test_strokes_a_verified_voxel_mask_is_enough(tmp_path, scan):
    image, labels = scan
    training_set = TrainingSet.create(tmp_path / "set", LIVER)
    strokes = np.zeros(labels.shape, bool)
    strokes[20:30, 20:30, 3] = True
    training_set.add_scan("scan", image, META, labels, LIVER, verified_mask=strokes)
    stored = label_file(tmp_path / "set", "scan")
    np.testing.assert_array_equal(stored[strokes], labels[strokes])
    assert (stored[~strokes] == 3).all()
    assert training_set.summary().verified_slices == 1


def test_a_new_class_name_gets_the_next_value_and_every_label_file_follows_the_ignore_value(tmp_path, scan):
    image, labels = scan
    root = tmp_path / "set"
    training_set = TrainingSet.create(root, LIVER)
    training_set.add_scan("a", image, META, labels, LIVER, verified_slices=[0])
    before = label_file(root, "a")
    lesion = (labels == 2).astype(np.uint8)
    result = training_set.add_scan("b", image[::-1].copy(), META, lesion[::-1].copy(), ("background", "lesion"),
                                   verified_slices=[3])
    assert result.added_classes == ("lesion",) and result.rewritten_labels == 1
    manifest = json.loads((root / "dataset.json").read_text())
    assert manifest["labels"] == {"background": 0, "liver": 1, "tumour": 2, "lesion": 3, "ignore": 4}
    after = label_file(root, "a")
    np.testing.assert_array_equal(after[before == 3], 4)                   # old ignore → new ignore
    np.testing.assert_array_equal(after[before != 3], before[before != 3])  # classes untouched
    stored_b = label_file(root, "b")
    np.testing.assert_array_equal(np.unique(stored_b[..., 3]), np.unique(np.where(lesion[::-1][..., 3], 3, 0)))
    # A known name keeps its value, whatever position it has in the scan's own list.
    training_set.add_scan("c", image[:, ::-1].copy(), META, np.where(labels == 2, 1, 0)[:, ::-1].astype(np.uint8),
                          ("bg", "tumour"), verified_slices=[2])
    assert set(np.unique(label_file(root, "c"))) <= {0, 2, 4}
    assert training_set.class_names == ("background", "liver", "tumour", "lesion")
    # Another tool's spelling of a known class is that class (a SEG's 'Liver', a planning system's 'Tumor'),
    # not a new one competing with it.
    flipped, flipped_labels = image[::-1, ::-1].copy(), labels[::-1, ::-1].copy()
    result = training_set.add_scan("d", flipped, META, np.choose(flipped_labels, [0, 2, 1]).astype(np.uint8),
                                   ("background", "Tumor", "LIVER"), verified_slices=[1])
    assert result.added_classes == () and training_set.class_names == ("background", "liver", "tumour", "lesion")
    np.testing.assert_array_equal(label_file(root, "d")[..., 1], flipped_labels[..., 1])
    with pytest.raises(TrainingSetError, match="repeat a name"):
        training_set.add_scan("e", image, META, labels, ("background", "liver", "Liver"), verified_slices=[1])


def test_a_set_written_here_loads_for_training_with_ignore_voxels_marked(tmp_path, scan):
    image, labels = scan
    root = tmp_path / "set"
    training_set = TrainingSet.create(root, LIVER)
    training_set.add_scan("scan", image, META, labels, LIVER, verified_slices=[1, 4])
    data = TrainingData.from_sources(root)
    assert data.ignore_label == 3 and data.class_names == LIVER
    (case,) = data.load_cases(3)
    assert (case.labels[..., [0, 2, 3, 5]] == IGNORE_INDEX).all()
    np.testing.assert_array_equal(case.labels[..., 1], labels[..., 1])
    fingerprint = data.fingerprint(("CT",))
    assert fingerprint.class_voxels["liver"] == int((labels[..., [1, 4]] == 1).sum())
    # Loaded for a longer class list, by name.
    loaded = training_set.load_case("scan", ("background", "lesion", "liver", "tumour"))
    np.testing.assert_array_equal(loaded.labels[..., 1], np.select([labels[..., 1] == 1, labels[..., 1] == 2],
                                                                    [2, 3], 0))


def test_another_scan_under_a_taken_name_becomes_its_own_case(tmp_path, scan):
    """Two patients' folders each hold ct.nii.gz (TotalSegmentator, KiTS): napari names a case after the file
    alone, so the second was refused ('add this scan under another name', which napari cannot do)."""
    image, labels = scan
    root = tmp_path / "set"
    training_set = TrainingSet.create(root, LIVER)
    training_set.add_scan("ct", image, META, labels, LIVER, verified_slices=[1])
    first = label_file(root, "ct").copy()
    second = training_set.add_scan("ct", image + 100, META, labels, LIVER, verified_slices=[2])
    assert (second.case, second.new_case) == ("ct_2", True)
    assert second.description() == "added as a new case 'ct_2' ('ct' holds another scan)"
    np.testing.assert_array_equal(label_file(root, "ct"), first)           # the first patient's case untouched
    # The same voxels said to be another size are another scan too; a name differing only in case is taken
    # (one file on macOS and Windows).
    shifted = VolumeMeta(affine=np.diag([1.0, 1.0, 2.0, 1.0]), spacing=(1.0, 1.0, 2.0))
    assert training_set.add_scan("ct", image, shifted, labels, LIVER, verified_slices=[2]).case == "ct_3"
    assert training_set.add_scan("CT", image + 7, META, labels, LIVER, verified_slices=[2]).case == "CT_4"
    # Adding the second patient's scan again, under its file name, merges into the case that holds it.
    again = training_set.add_scan("ct", image + 100, META, labels, LIVER, verified_slices=[3])
    assert (again.case, again.new_case, again.verified_slices) == ("ct_2", False, 2)
    assert TrainingSet.open(root).cases == ["CT_4", "ct", "ct_2", "ct_3"]


def test_labels_read_as_floats_are_class_values_when_whole(tmp_path, scan):
    """load_volume reads a label file as float32, as the README's API example does: labels 0.0, 1.0, 2.0
    were refused as 'not whole numbers 0..2'."""
    image, labels = scan
    training_set = TrainingSet.create(tmp_path / "set", LIVER)
    training_set.add_scan("ct", image, META, labels.astype(np.float32), LIVER, verified_slices=[1, 4])
    np.testing.assert_array_equal(label_file(tmp_path / "set", "ct")[..., [1, 4]], labels[..., [1, 4]])


@pytest.mark.parametrize("change, message", [
    (lambda image, labels: (np.stack([image, image], -1), labels), r"dataset\.json: the set holds 1 channel"),
    (lambda image, labels: (image, labels[:-1]), r"labels \(63, 64, 6\) are not on the scan's grid"),
    (lambda image, labels: (image, labels + 3), r"labels must be whole numbers 0\.\.2"),
    (lambda image, labels: (image, labels * 0.75), r"the labels hold 0\.75, not a class value"),
    (lambda image, labels: (image, labels.astype(np.int16) - 1), r"the labels hold -1; class values are whole"),
])
def test_bad_scans_are_refused_with_one_line_and_nothing_changes(tmp_path, scan, change, message):
    image, labels = scan
    root = tmp_path / "set"
    training_set = TrainingSet.create(root, LIVER)
    training_set.add_scan("first", image, META, labels, LIVER, verified_slices=[1])
    before = snapshot(root)
    bad_image, bad_labels = change(image, labels)
    with pytest.raises(TrainingSetError, match=message) as caught:
        training_set.add_scan("second", bad_image, META, bad_labels, LIVER, verified_slices=[1])
    assert "\n" not in str(caught.value)
    for slices, complaint in (([9], r"slices \[9\] are outside its 6 axial slices"), ([], "nothing is verified")):
        with pytest.raises(TrainingSetError, match=complaint):
            training_set.add_scan("second", image, META, labels, LIVER, verified_slices=slices)
    with pytest.raises(TrainingSetError, match="'ignore'"):
        training_set.add_scan("second", image, META, labels, ("background", "ignore", "x"), verified_slices=[1])
    assert snapshot(root) == before


def test_a_failure_while_moving_files_into_place_restores_the_set(tmp_path, scan, monkeypatch):
    image, labels = scan
    root = tmp_path / "set"
    training_set = TrainingSet.create(root, LIVER)
    training_set.add_scan("a", image, META, labels, LIVER, verified_slices=[0])
    before = snapshot(root)
    real_replace = os.replace
    moves = []

    def failing_replace(source, target):
        moves.append(target)
        if str(target).endswith("dataset.json"):          # the last move of the add
            raise OSError("disk full")
        return real_replace(source, target)

    monkeypatch.setattr("medconddiff.training_set.os.replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        training_set.add_scan("b", image + 1, META, (labels == 2).astype(np.uint8), ("background", "lesion"),
                              verified_slices=[3])
    monkeypatch.undo()
    assert len(moves) > 3                                   # images and labels had been moved already
    assert snapshot(root) == before
    assert TrainingSet.open(root).cases == ["a"]


KILLED_WHILE_MOVING = """
import os, sys
import numpy as np
from medconddiff.training_set import TrainingSet
from tests.conftest import meta_1mm

root, arrays = sys.argv[1], np.load(sys.argv[2])
real_replace = os.replace

def replace(source, target):
    if os.path.basename(source).endswith("-a.nii.gz"):  # the new label, its old one already moved aside
        os._exit(3)                                      # killed: no exception handler runs
    real_replace(source, target)

os.replace = replace
TrainingSet.open(root).add_scan("a", arrays["image"], meta_1mm(), arrays["labels"],
                                ("background", "liver", "tumour"), verified_slices=[3])
"""


def test_an_add_killed_while_moving_its_files_is_finished_when_the_set_is_opened(tmp_path, scan):
    """A program killed between setting a label file aside and moving its replacement in left the
    case without a label; the next add emptied the staging folder that held both versions."""
    import subprocess
    import sys
    import warnings

    image, labels = scan
    root = tmp_path / "set"
    TrainingSet.create(root, LIVER).add_scan("a", image, META, labels, LIVER, verified_slices=[0])
    np.savez(tmp_path / "arrays.npz", image=image, labels=labels)
    killed = subprocess.run([sys.executable, "-c", KILLED_WHILE_MOVING, str(root), str(tmp_path / "arrays.npz")],
                            cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
    assert killed.returncode == 3, killed.stderr
    assert not (root / "labelsTr" / "a.nii.gz").exists()             # the state the kill left
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reopened = TrainingSet.open(root)
    assert any("finished an add that was stopped" in str(w.message) for w in caught)
    assert reopened.cases == ["a"] and reopened.verified_slices("a") == [0, 3]
    np.testing.assert_array_equal(label_file(root, "a")[..., [0, 3]], labels[..., [0, 3]])
    assert not (root / STAGING_FOLDER).exists()
    # The next add builds on the finished one.
    assert reopened.add_scan("a", image, META, labels, LIVER, verified_slices=[5]).verified_slices == 3
    # `train SET` reads the set through its nnU-Net layout: it finishes such an add first too.
    from medconddiff.training_data import TrainingData

    killed = subprocess.run([sys.executable, "-c", KILLED_WHILE_MOVING, str(root), str(tmp_path / "arrays.npz")],
                            cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
    assert killed.returncode == 3 and not (root / "labelsTr" / "a.nii.gz").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert [case.name for case in TrainingData.from_sources(root).cases] == ["a"]
    assert (root / "labelsTr" / "a.nii.gz").exists()


def test_folders_that_are_not_valid_sets_get_a_one_line_error_naming_the_file(tmp_path, scan):
    image, labels = scan
    with pytest.raises(TrainingSetError, match=r"not a training set \(no dataset\.json\)"):
        TrainingSet.open(tmp_path)
    root = tmp_path / "set"
    TrainingSet.create(root, LIVER).add_scan("a", image, META, labels, LIVER, verified_slices=[0])
    with pytest.raises(TrainingSetError, match="already a training set"):
        TrainingSet.create(root, LIVER)
    (tmp_path / "a file").write_text("x")
    with pytest.raises(TrainingSetError, match="is a file; choose a folder"):
        TrainingSet.create(tmp_path / "a file", LIVER)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(TrainingSetError, match="not an empty folder"):
        TrainingSet.create(tmp_path / "other", LIVER)
    manifest = json.loads((root / "dataset.json").read_text())

    def broken(**changes) -> None:
        (root / "dataset.json").write_text(json.dumps({**manifest, **changes}))

    # Another tool's dataset.json that miscounts is refused; this package's own set warns and takes the files
    # (test_a_case_deleted_by_hand_leaves_the_set_usable).
    (root / "dataset.json").write_text(json.dumps({**{k: v for k, v in manifest.items() if k != "medconddiff"},
                                                   "numTraining": 2}))
    with pytest.raises(Exception, match=r"dataset\.json: numTraining is 2 but 1 training cases"):
        TrainingSet.open(root)
    broken(labels={"background": 0, "liver": 1, "tumour": 2, "ignore": 2})
    with pytest.raises(Exception, match=r"dataset\.json: the 'ignore' label's id 2 is also class 'tumour'"):
        TrainingSet.open(root)
    broken(channel_names={"0": "CT", "1": "PET"})
    with pytest.raises(Exception, match=r"a_0001\.nii\.gz: channel file missing for case a"):
        TrainingSet.open(root)
    broken()
    nib.save(nib.Nifti1Image(np.zeros((64, 64, 5), np.uint8), np.eye(4)), str(root / "labelsTr" / "a.nii.gz"))
    with pytest.raises(TrainingSetError, match=r"labelsTr/a\.nii\.gz: shape \(64, 64, 5\).*not on the image's grid"):
        TrainingSet.open(root)


def test_case_headers_are_compared_in_millimetres(tmp_path, scan):
    """A hand-made case whose image counts metres and whose label counts mm lies on one grid; in a set in
    metres, a label half a millimetre off is off its grid (the tolerance was 1e-3 of the file's unit)."""
    root = tmp_path / "set"
    TrainingSet.create(root, LIVER)
    (root / "imagesTr").mkdir(exist_ok=True)
    (root / "labelsTr").mkdir(exist_ok=True)
    affine_mm = np.diag([0.8, 0.8, 2.5, 1.0])
    affine_mm[:3, 3] = [-20.0, 10.0, 30.0]

    def write(path, array, affine, unit):
        image = nib.Nifti1Image(array, affine)
        image.header.set_xyzt_units(unit)
        image.set_qform(affine, code=1)
        image.set_sform(affine, code=1)
        nib.save(image, str(path))

    metres = affine_mm.copy()
    metres[:3] /= 1000.0
    write(root / "imagesTr" / "m_0000.nii.gz", np.zeros((8, 8, 3), np.int16), metres, "meter")
    write(root / "labelsTr" / "m.nii.gz", np.zeros((8, 8, 3), np.uint8), affine_mm, "mm")
    manifest = json.loads((root / "dataset.json").read_text())
    manifest["numTraining"] = 1
    (root / "dataset.json").write_text(json.dumps(manifest))
    assert TrainingSet.open(root).cases == ["m"]
    shifted = metres.copy()
    shifted[0, 3] += 0.0005
    write(root / "labelsTr" / "m.nii.gz", np.zeros((8, 8, 3), np.uint8), shifted, "meter")
    with pytest.raises(TrainingSetError, match=r"labelsTr/m\.nii\.gz: .*not on the image's grid"):
        TrainingSet.open(root)


def test_case_ids_are_plain_and_headers_carry_no_free_text(tmp_path, scan):
    assert case_id_from_name("/data/scan 01 (copy).nii.gz") == "scan_01_copy"
    assert case_id_from_name("lung1_0000.nii.gz") == "lung1"
    with pytest.raises(TrainingSetError):
        case_id_from_name("...")
    image, labels = scan
    header = nib.Nifti1Header()
    header.set_data_shape(image.shape)
    header["descrip"] = b"Jane Doe 1970-01-01"
    header.extensions.append(nib.nifti1.Nifti1Extension(6, b"PatientName=Jane Doe"))
    meta = VolumeMeta(affine=np.eye(4), spacing=(1.0, 1.0, 1.0), header=header, source="/scans/Jane Doe.nii.gz")
    training_set = TrainingSet.create(tmp_path / "set", LIVER)
    training_set.add_scan("scan", image, meta, labels, LIVER, verified_slices=[0])
    for path in (tmp_path / "set").rglob("*.nii.gz"):
        assert b"Jane" not in gzip.decompress(path.read_bytes())     # neither in a text field nor an extension


def test_nnunet_v2_accepts_a_set_written_here(tmp_path, scan, monkeypatch):
    for variable in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(variable, str(tmp_path))
    verify = pytest.importorskip("nnunetv2.experiment_planning.verify_dataset_integrity")
    image, labels = scan
    root = tmp_path / "Dataset001_Sparse"
    training_set = TrainingSet.create(root, LIVER)
    training_set.add_scan("a", image, META, labels, LIVER, verified_slices=[1, 4])
    training_set.add_scan("b", image[::-1].copy(), META, (labels[::-1] == 2).astype(np.uint8),
                          ("background", "lesion"), verified_slices=[2])
    verify.verify_dataset_integrity(str(root), num_processes=1)     # raises on any broken rule
    assert not (root / STAGING_FOLDER).exists()


def test_the_finetune_command_takes_a_training_set_folder(tmp_path, tiny_checkpoint, scan, capsys):
    from medconddiff.checkpoint import load_checkpoint
    from medconddiff.cli import main

    image, labels = scan
    root = tmp_path / "set"
    TrainingSet.create(root, ("background", "lesion")).add_scan(
        "a", image, META, (labels == 2).astype(np.uint8), ("background", "lesion"), verified_slices=[1, 3])
    out = tmp_path / "tuned.safetensors"
    args = ["finetune", str(root), "--init", str(tiny_checkpoint), "--steps", "1", "--device", "cpu", "-o", str(out)]
    assert main(args) == 0
    assert "1 case, 2 verified slices" in capsys.readouterr().out
    checkpoint = load_checkpoint(out)
    assert checkpoint.config.model.class_names == ("background", "lesion")
    assert checkpoint.extra["training_set"]["verified_slices"] == {"a": 2}
    assert main([*args[:2], "--slices", "1", *args[2:-1], str(tmp_path / "x.safetensors")]) == 2
    assert "is a training-set folder" in capsys.readouterr().err
    assert main(["finetune", str(tmp_path), *args[2:-1], str(tmp_path / "x.safetensors")]) == 2
    assert "not a training set" in capsys.readouterr().err
    # --hold-back keeps one of the set's verified slices out and chooses the consensus on it (it used to
    # fail: it looked for the slice among the scans given besides the set, and there are none).
    held = tmp_path / "held.safetensors"
    assert main([*args[:-1], str(held), "--hold-back"]) == 0
    assert "slice 3 of case a is held back" in capsys.readouterr().out
    extra = load_checkpoint(held).extra
    assert extra["held_back"]["scan"] == "a" and extra["held_back"]["slice"] == 3
    assert extra["training_set"]["verified_slices"] == {"a": 1}
    assert extra["consensus_choice"]["basis"] == "1 corrected slice held back from training"
    assert extra["consensus_choice"]["slices"] == 1


def test_train_reads_only_the_verified_slices_of_a_set(tmp_path, scan):
    from medconddiff.train import build_datasets
    from tests.conftest import tiny_config

    image, labels = scan
    root = tmp_path / "set"
    TrainingSet.create(root, LIVER).add_scan("a", image, META, labels, LIVER, verified_slices=[2, 5])
    train_set, _ = build_datasets(tiny_config(), TrainingData.from_sources(root).load_cases(3))
    assert train_set.origin == [("a", 2), ("a", 5)]


def test_evaluate_scores_a_set_on_its_verified_voxels_only(tmp_path, tiny_checkpoint, scan, capsys):
    from medconddiff.cli import main

    image, labels = scan
    root = tmp_path / "set"
    TrainingSet.create(root, LIVER).add_scan("a", image, META, labels, LIVER, verified_slices=[2])
    report_path = tmp_path / "report.json"
    code = main(["evaluate", str(root), "--checkpoint", str(tiny_checkpoint), "--device", "cpu", "--steps", "2",
                 "--json", str(report_path)])
    assert code == 0, capsys.readouterr().err
    (case,) = json.loads(report_path.read_text())["volumes"].values()
    assert case["ignored_voxels"] == int(labels[..., [0, 1, 3, 4, 5]].size)
    scored = {name: m["reference_voxels"] for name, m in case["consensus"]["per_class"].items()}
    assert scored == {"liver": int((labels[..., 2] == 1).sum()), "tumour": int((labels[..., 2] == 2).sum())}


def test_two_programs_adding_to_one_set_keep_each_others_cases(tmp_path, scan):
    """Two napari windows (or napari and a script) opened the same set; each adds a scan."""
    image, labels = scan
    root = tmp_path / "set"
    TrainingSet.create(root, LIVER)
    first, second = TrainingSet.open(root), TrainingSet.open(root)
    first.add_scan("scan-a", image, META, labels, LIVER, verified_slices=[1])
    second.add_scan("scan-b", image + 1, META, labels, LIVER, verified_slices=[2], slicing="coronal")
    manifest = json.loads((root / "dataset.json").read_text())
    assert manifest["numTraining"] == 2 and manifest["medconddiff"]["slicing"] == {"scan-a": "axial",
                                                                                     "scan-b": "coronal"}
    assert TrainingSet.open(root).cases == ["scan-a", "scan-b"] == second.cases
    assert first.add_scan("scan-a", image, META, labels, LIVER, verified_slices=[3]).verified_slices == 2


def test_an_add_while_another_program_holds_the_set_waits_then_says_so_and_changes_nothing(tmp_path, scan,
                                                                                        monkeypatch):
    from filelock import FileLock

    from medconddiff import training_set as module

    image, labels = scan
    root = tmp_path / "set"
    TrainingSet.create(root, LIVER).add_scan("scan", image, META, labels, LIVER, verified_slices=[1])
    before = snapshot(root)
    monkeypatch.setattr(module, "LOCK_WAIT_SECONDS", 0.2)
    with FileLock(str(root / LOCK_FILE)):           # another program in the middle of an add
        with pytest.raises(TrainingSetError, match="another program has been adding to this training set"):
            TrainingSet.open(root).add_scan("other", image, META, labels, LIVER, verified_slices=[2])
    assert snapshot(root) == before


def test_the_add_to_set_command_adds_checked_slices_merges_and_refuses_without_writing(tmp_path, tiny_checkpoint,
                                                                                      scan, capsys):
    """`medconddiff add-to-set`: the widget's Add to training set, from the command line."""
    from medconddiff.cli import main

    image, labels = scan
    nib.save(nib.Nifti1Image(image.astype(np.int16), META.affine), str(tmp_path / "scan-01.nii.gz"))
    nib.save(nib.Nifti1Image(labels, META.affine), str(tmp_path / "corrected.nii.gz"))
    root = tmp_path / "set"

    def add(*extra: str) -> int:
        return main(["add-to-set", str(root), str(tmp_path / "scan-01.nii.gz"), str(tmp_path / "corrected.nii.gz"),
                     "--checkpoint", str(tiny_checkpoint), *extra])

    assert add("--slices", "1,4") == 0
    assert "added as a new case 'scan-01' (2 verified slice(s))" in capsys.readouterr().out
    training_set = TrainingSet.open(root)
    assert training_set.class_names == LIVER and training_set.channel_names == ("CT",)   # the checkpoint's
    stored = label_file(root, "scan-01")
    np.testing.assert_array_equal(stored[..., [1, 4]], labels[..., [1, 4]])
    assert (stored[..., [0, 2, 3, 5]] == 3).all()                  # nobody checked those: ignore

    assert add("--slices", "2") == 0                               # the same scan again: merged
    assert "merged into its case 'scan-01' (3 verified slice(s))" in capsys.readouterr().out
    np.testing.assert_array_equal(label_file(root, "scan-01")[..., [1, 2, 4]], labels[..., [1, 2, 4]])

    before = snapshot(root)
    assert add("--slices", "0", "--class-names", "background", "liver") == 2     # label 2 has no name
    assert "holds label 2 but 2 class names are known" in capsys.readouterr().err
    assert add("--slices", "0", "--channel-names", "T1", "T2") == 2
    assert "the scan has 1 channel(s), the set holds 2 (T1, T2): name the scan's channels" in capsys.readouterr().err
    nib.save(nib.Nifti1Image(np.stack([image, image], -1).astype(np.int16), META.affine),
             str(tmp_path / "two-channels.nii.gz"))
    assert main(["add-to-set", str(root), str(tmp_path / "two-channels.nii.gz"), str(tmp_path / "corrected.nii.gz"),
                 "--checkpoint", str(tiny_checkpoint), "--slices", "0"]) == 2
    assert "the scan has 2 channel(s), the set holds 1 (CT): add it to a set of 2-channel scans" in \
        capsys.readouterr().err
    assert add("--slices", "9") == 2                                # there are 6 slices
    capsys.readouterr()
    assert snapshot(root) == before
    with pytest.raises(SystemExit):
        add()                                                       # what was checked must be said
    assert "--slices" in capsys.readouterr().err


def test_add_to_set_reads_labels_stored_in_another_voxel_order_onto_the_scan(tmp_path, tiny_checkpoint, scan, capsys):
    """Labels drawn over another tool's copy of the scan (rows reversed, as dcm2niix stores a series) lie on the
    scan's grid: add-to-set, finetune and choose-consensus refused them as 'another affine' (evaluate read them)."""
    from medconddiff.cli import main

    image, labels = scan
    nib.save(nib.Nifti1Image(image.astype(np.int16), META.affine), str(tmp_path / "scan.nii.gz"))
    flip = np.eye(4)
    flip[1, 1], flip[1, 3] = -1, labels.shape[1] - 1
    nib.save(nib.Nifti1Image(np.ascontiguousarray(labels[:, ::-1]), META.affine @ flip), str(tmp_path / "drawn.nii.gz"))
    shifted = META.affine.copy()
    shifted[0, 3] += 3.0
    nib.save(nib.Nifti1Image(labels, shifted), str(tmp_path / "elsewhere.nii.gz"))

    def add(label_file_name: str) -> int:
        return main(["add-to-set", str(tmp_path / "set"), str(tmp_path / "scan.nii.gz"), str(tmp_path / label_file_name),
                     "--checkpoint", str(tiny_checkpoint), "--slices", "1,4"])

    assert add("drawn.nii.gz") == 0
    assert "drawn.nii.gz stores the scan's grid in another voxel order" in capsys.readouterr().err
    np.testing.assert_array_equal(label_file(tmp_path / "set", "scan")[..., [1, 4]], labels[..., [1, 4]])
    assert add("elsewhere.nii.gz") == 2                          # another place: still refused
    assert "does not lie on the scan's grid (another affine)" in capsys.readouterr().err


def test_an_mri_is_not_stored_as_ct_and_an_existing_set_keeps_its_own_classes(tmp_path, tiny_checkpoint, scan,
                                                                               capsys):
    """add-to-set took the CT model's channel name for an MRI (fine-tuning then read it through the CT window,
    96 % of its voxels saturated), and the model's classes for a set of 'lesion' (the lesion became 'liver')."""
    from medconddiff.cli import main
    from medconddiff.errors import ConfigError
    from medconddiff.finetune import finetune

    image, labels = scan
    mri = (image - image.min() + 35).astype(np.int16)                # no voxel below 0, as an MRI
    nib.save(nib.Nifti1Image(mri, META.affine), str(tmp_path / "mri.nii.gz"))
    nib.save(nib.Nifti1Image((labels > 0).astype(np.uint8), META.affine), str(tmp_path / "lesion.nii.gz"))
    root = tmp_path / "set"

    def add(*extra: str) -> int:
        return main(["add-to-set", str(root), str(tmp_path / "mri.nii.gz"), str(tmp_path / "lesion.nii.gz"),
                     "--checkpoint", str(tiny_checkpoint), "--slices", "1", *extra])

    assert add() == 2
    assert "not CT in Hounsfield units" in capsys.readouterr().err and not root.exists()
    assert add("--channel-names", "MRI", "--class-names", "background", "lesion") == 0
    capsys.readouterr()
    assert add() == 0                                               # no --class-names: the set's own
    assert "new class" not in capsys.readouterr().out
    assert TrainingSet.open(root).class_names == ("background", "lesion")
    # A set that calls an MRI 'CT' (written before, or by hand) is refused by the fine-tune, not clipped.
    ct_set = tmp_path / "ct_set"
    TrainingSet.create(ct_set, LIVER, ("CT",)).add_scan("mri", mri, META, labels, LIVER, verified_slices=[1])
    with pytest.raises(ConfigError, match="case mri of the training set has no voxel below 0"):
        finetune(tiny_checkpoint, [], training_set=TrainingSet.open(ct_set), steps=1, device="cpu", log=lambda _: None)


def test_a_set_that_cannot_be_written_is_one_line_not_an_internal_error(tmp_path, scan, monkeypatch):
    """A set on a read-only mount: the lock file cannot be made (OSError: Read-only file system)."""
    import errno

    from filelock import FileLock

    image, labels = scan
    root = tmp_path / "set"
    TrainingSet.create(root, LIVER).add_scan("a", image, META, labels, LIVER, verified_slices=[1])

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(FileLock, "acquire", read_only)
    with pytest.raises(TrainingSetError, match="cannot be changed here \\(Read-only file system\\)"):
        TrainingSet.open(root).add_scan("a", image, META, labels, LIVER, verified_slices=[2])
    assert TrainingSet.open(root).verified_slices("a") == [1]      # still read, as fine-tuning does
    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(TrainingSetError, match="cannot create a training set here"):
        TrainingSet.create(tmp_path / "new", LIVER)


def test_a_case_deleted_by_hand_leaves_the_set_usable(tmp_path, scan):
    """Deleting a case's files by hand locked the set against every command (numTraining, then the slicing
    record naming the vanished case), remove-from-set included."""
    import warnings

    image, labels = scan
    root = tmp_path / "set"
    training_set = TrainingSet.create(root, LIVER)
    training_set.add_scan("a", image, META, labels, LIVER, verified_slices=[1])
    training_set.add_scan("b", image + 1, META, labels, LIVER, verified_slices=[2], slicing="coronal")
    for path in [*root.glob("imagesTr/b_*.nii.gz"), root / "labelsTr" / "b.nii.gz"]:
        path.unlink()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reopened = TrainingSet.open(root)
    assert reopened.cases == ["a"] and any("numTraining is 2 but the folder holds 1" in str(w.message) for w in caught)
    reopened.add_scan("a", image, META, labels, LIVER, verified_slices=[3])     # the next change mends the record
    manifest = json.loads((root / "dataset.json").read_text())
    assert manifest["numTraining"] == 1 and manifest["medconddiff"]["slicing"] == {"a": "axial"}


def test_reading_another_tools_dataset_never_rewrites_its_dataset_json(tmp_path, scan):
    """An nnU-Net dataset made elsewhere (no record of ours, no ignore label) is only read by a summary, a
    listing or a fine-tune: its dataset.json stays byte for byte, and no lock file is left in it."""
    image, labels = scan
    root = tmp_path / "Dataset007_Theirs"
    for folder in ("imagesTr", "labelsTr"):
        (root / folder).mkdir(parents=True)
    nib.save(nib.Nifti1Image(image.astype(np.float32), np.eye(4)), str(root / "imagesTr" / "liver_0000.nii.gz"))
    nib.save(nib.Nifti1Image(labels.astype(np.uint8), np.eye(4)), str(root / "labelsTr" / "liver.nii.gz"))
    text = json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "tumour": 2},
                       "numTraining": 1, "file_ending": ".nii.gz", "name": "theirs"}, indent=4)
    (root / "dataset.json").write_text(text)
    opened = TrainingSet.open(root)
    assert "1 case" in opened.summary().text()
    assert opened.case_holding(image, META) == "liver"       # the digest is read, and kept in memory only
    assert (root / "dataset.json").read_text() == text
    assert sorted(p.name for p in root.iterdir()) == ["dataset.json", "imagesTr", "labelsTr"]


def test_the_same_voxels_at_another_spacing_are_not_called_the_same_scan(tmp_path, scan):
    """The summary's "hold the same scan (merge-cases merges them)" sent users to a merge that refuses: two
    cases of equal voxels but another spacing are two scans, as adding and merge-cases judge them."""
    image, labels = scan
    training_set = TrainingSet.create(tmp_path / "set", LIVER)
    training_set.add_scan("at_1mm", image, META, labels, LIVER, verified_slices=[1])
    finer = VolumeMeta(affine=np.diag([0.8, 0.8, 0.8, 1.0]), spacing=(0.8, 0.8, 0.8))
    result = training_set.add_scan("at_08mm", image, finer, labels, LIVER, verified_slices=[2])
    assert result.new_case
    assert TrainingSet.open(tmp_path / "set").summary().same_scan == ()


def test_two_adds_to_a_new_set_take_turns(tmp_path, tiny_checkpoint, scan, monkeypatch, capsys):
    """Another program creates the set between this add's look and its create: this add joins that set
    (it failed with "already a training set; open it")."""
    from medconddiff.cli import main

    image, labels = scan
    nib.save(nib.Nifti1Image(image.astype(np.int16), META.affine), str(tmp_path / "scan-02.nii.gz"))
    nib.save(nib.Nifti1Image(labels, META.affine), str(tmp_path / "corrected.nii.gz"))
    root = tmp_path / "new set"
    create = TrainingSet.create

    def the_other_program_first(folder, *args, **kwargs):
        other = create(folder, *args, **kwargs)
        other.add_scan("theirs", image, META, labels, LIVER, verified_slices=[0])
        return create(folder, *args, **kwargs)

    monkeypatch.setattr(TrainingSet, "create", staticmethod(the_other_program_first))
    assert main(["add-to-set", str(root), str(tmp_path / "scan-02.nii.gz"), str(tmp_path / "corrected.nii.gz"),
                 "--checkpoint", str(tiny_checkpoint), "--slices", "3"]) == 0, capsys.readouterr().err
    # The same scan: merged into the other program's case, both programs' slices kept.
    assert TrainingSet.open(root).summary().slices_by_case == {"theirs": 2}
