"""`medconddiff segment`, `evaluate`, `finetune` and `choose-consensus` on DICOM series: folders, several
series, DICOM SEG in and out, bad input.

Series are written with pydicom (tests/dicom_helpers.py) from a 64x64x6 cut of the bundled liver CT,
segmented by the bundled model on two slices.
"""

from __future__ import annotations

import hashlib
import json
import shutil

import nibabel as nib
import numpy as np
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from medconddiff.cli import main
from medconddiff.dicom_seg import read_dicom_seg, write_dicom_seg
from medconddiff.dicom_series import DicomError, list_series, read_dicom_series
from medconddiff.nifti import load_labels, load_volume, sample_label_path, sample_scan_path
from tests.dicom_helpers import (PATIENT, PATIENT_FOLDER, counted_folder_scans, write_echoes, write_media,
                                 write_rtstruct, write_series)

CUT = (slice(56, 120), slice(16, 80), slice(60, 66))
FAST = ("--steps", "2", "--seed", "1", "--quiet", "--device", "cpu", "--threads", "1")


@pytest.fixture(scope="module")
def cut():
    """(HU volume, labels, RAS affine) of a cut of the bundled scan: stored as DICOM usually is (LPS
    voxel order, 1 x 1 x 2.5 mm), so rows and columns run against RAS."""
    volume, _ = load_volume(sample_scan_path())
    labels, _ = load_labels(sample_label_path())
    affine = np.diag([-1.0, -1.0, 2.5, 1.0])
    affine[:3, 3] = [120.0, 95.0, -310.0]
    return volume[CUT].astype(np.int16).astype(np.float32), labels[CUT].copy(), affine


def segment(*args):
    return main(["segment", *map(str, args), *FAST])


def assert_no_patient_data(*texts: str) -> None:
    for text in texts:
        for value in PATIENT.values():
            assert value not in text
        assert "Zyxwvut" not in text and "Qqpatientname" not in text


def without_paths_given(text: str, *paths) -> str:
    """The terminal text with the paths the user typed taken out: the terminal repeats them as given,
    folder names included; anything else naming the patient is a leak."""
    for path in sorted(map(str, paths), key=len, reverse=True):
        text = text.replace(path, "<given>")
    return text


def one_line_failures(err: str) -> list[str]:
    lines = [line for line in err.splitlines() if line.strip()]
    failed = [line for line in lines if ": FAILED: " in line]
    # Every line is a failure or a note: a failure never spills over onto a second line.
    assert all(": FAILED: " in line or "note: " in line for line in lines), err
    return failed


def test_a_dicom_folder_segments_like_the_same_scan_as_nifti_and_writes_a_seg(tmp_path, cut, capsys):
    volume, _, affine = cut
    nifti = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(volume.astype(np.int16), affine), str(nifti))
    series = tmp_path / PATIENT_FOLDER / "CT_ABDOMEN"
    write_series(series, volume, affine, description="CT abdomen")
    uid = list_series(series)[0].uid

    assert segment(nifti, "-o", tmp_path / "from_nifti.nii.gz", "--slices", "2:4") == 0
    assert segment(series, "-o", tmp_path / "from_dicom.nii.gz", "--slices", "2:4") == 0
    assert segment(series, "-o", tmp_path / "seg.dcm", "--slices", "2:4") == 0
    captured = capsys.readouterr()

    expected = nib.load(str(tmp_path / "from_nifti.nii.gz"))
    labels = nib.load(str(tmp_path / "from_dicom.nii.gz"))
    np.testing.assert_allclose(labels.affine, expected.affine, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(labels.dataobj), np.asarray(expected.dataobj))
    assert np.asarray(expected.dataobj).max() >= 1                        # the comparison is not of empty masks
    np.testing.assert_array_equal(read_dicom_seg(tmp_path / "seg.dcm", series), np.asarray(expected.dataobj))

    for name in ("from_dicom.json", "seg.json"):
        text = (tmp_path / name).read_text()
        record = json.loads(text)
        assert record["dicom_source"]["series_instance_uid"] == uid
        assert record["dicom_source"]["series_description"] == "CT abdomen"
        assert len(record["dicom_source"]["sop_instance_uids"]) == 6
        assert_no_patient_data(text)
    assert "from_nifti" not in json.loads((tmp_path / "from_nifti.json").read_text()).get("dicom_source", "")
    # Records name the series and their own files, never the patient's folder.
    assert json.loads((tmp_path / "seg.json").read_text())["input"] == "series 1 'CT abdomen'"
    assert json.loads((tmp_path / "seg.json").read_text())["outputs"] == {"labels": "seg.dcm"}
    assert_no_patient_data(without_paths_given(captured.out, series), without_paths_given(captured.err, series))

    # An existing SEG is kept unless --overwrite.
    before = (tmp_path / "seg.dcm").read_bytes()
    assert segment(series, "-o", tmp_path / "seg.dcm", "--slices", "2:4") == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "seg.dcm").read_bytes() == before


def test_a_seg_needs_a_dicom_input(tmp_path, cut, capsys):
    volume, _, affine = cut
    nifti = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(volume.astype(np.int16), affine), str(nifti))
    assert segment(nifti, "-o", tmp_path / "seg.dcm") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "a DICOM SEG references the DICOM series it segments" in err
    assert not (tmp_path / "seg.dcm").exists()
    assert segment(nifti, "--series", "2", "-o", tmp_path / "seg.nii.gz") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--series and --all-series choose DICOM series" in err


def test_notes_name_images_not_the_patients_folders_or_files(tmp_path, cut, capsys):
    """An export nests each patient's series in folders named after the patient, and a Siemens export names
    each file after the patient too: what was left out is named by series and instance number (files
    without a header are counted), on the terminal and in the sidecar, never by path or file name."""
    volume, _, affine = cut
    export = tmp_path / "export"
    series = export / PATIENT_FOLDER / "CT"
    write_series(series, volume, affine, series_number=2, description="CT venous", prefix="v")
    write_series(series, volume[:, :, :1], affine, series_uid=list_series(series)[0].uid, series_number=2,
                 description="CT venous", prefix="scout", image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    for number, path in enumerate(sorted(series.iterdir()), start=1):
        path.rename(series / f"{PATIENT_FOLDER}.CT.VENOUS.0002.{number:04d}.IMA")
    (series / f"{PATIENT_FOLDER}.txt").write_text("not DICOM")

    assert segment(export, "-o", tmp_path / "seg.nii.gz", "--slices", "2:3") == 0
    captured = capsys.readouterr()
    notes = json.loads((tmp_path / "seg.json").read_text())["dicom_source"]["notes"]
    assert "skipped 1 file(s) that are not DICOM" in notes
    assert "series 2 'CT venous': left out 1 localizer image(s): series 2 image 1" in notes
    assert_no_patient_data((tmp_path / "seg.json").read_text(), without_paths_given(captured.err, export))


def test_several_series_are_listed_and_chosen_or_all_segmented(tmp_path, cut, capsys):
    volume, _, affine = cut
    export = tmp_path / "export"
    write_series(export, volume, affine, series_number=2, description="CT venous", prefix="v")
    write_series(export, volume[:, :, :4], affine, series_number=5, description="CT/arterial: thin", prefix="a")
    # A scout series (one image, marked LOCALIZER) and a scout inside series 5, as scanners export them.
    write_series(export, volume[:, :, :1], affine, series_number=1, description="Scout", prefix="s",
                 image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    series5 = next(info for info in list_series(export) if info.number == 5)
    write_series(export, volume[:, :, :1], affine, series_uid=series5.uid,
                 series_number=5, description="CT/arterial: thin", prefix="loc",
                 image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))

    assert segment(export, "-o", tmp_path / "x.nii.gz") == 2
    err = capsys.readouterr().err
    first, *listing = err.strip().splitlines()
    assert "holds 3 DICOM series: choose one with --series N|UID, or segment each with --all-series" in first
    assert [line.split(":")[0].strip() for line in listing] == ["series 1 'Scout'", "series 2 'CT venous'",
                                                                 "series 5 'CT/arterial"]
    assert "CT, 6 image(s) 64x64" in listing[1] and "1 localizer image(s)" in listing[2]
    assert not (tmp_path / "x.nii.gz").exists()

    assert segment(export, "--series", "5", "-o", tmp_path / "five.nii.gz", "--slices", "1:3") == 0
    captured = capsys.readouterr()
    assert "left out 1 localizer image(s)" in captured.err                  # the scout note
    record = json.loads((tmp_path / "five.json").read_text())
    assert record["dicom_source"]["series_number"] == 5 and record["input_shape"] == [64, 64, 4]
    assert segment(export, "--series", series5.uid, "-o", tmp_path / "five_by_uid.nii.gz", "--slices", "1:3") == 0
    np.testing.assert_array_equal(nib.load(str(tmp_path / "five_by_uid.nii.gz")).get_fdata(),
                                  nib.load(str(tmp_path / "five.nii.gz")).get_fdata())

    results = tmp_path / "results"
    with counted_folder_scans() as scans:
        assert segment(export, "--all-series", "-o", results, "--slices", "1:3", "--output-format", "dicom-seg") == 0
    assert len(scans) == 1        # the folder's headers are read once, not once per series
    captured = capsys.readouterr()
    assert sorted(p.name for p in results.iterdir()) == [
        "medconddiff_volumes.csv", "series2_CT_venous_seg.dcm", "series2_CT_venous_seg.json",
        "series5_CT_arterial_thin_seg.dcm", "series5_CT_arterial_thin_seg.json"]
    assert "series 1 'Scout': note: skipped: every image is a localizer (scout)" in captured.err
    assert "2 done, 0 skipped, 0 failed of 2" in captured.out
    labels = read_dicom_seg(results / "series5_CT_arterial_thin_seg.dcm", export, series=5)
    np.testing.assert_array_equal(labels, nib.load(str(tmp_path / "five.nii.gz")).get_fdata())
    for path in [tmp_path / "five.json", *results.glob("*.json"), results / "medconddiff_volumes.csv"]:
        assert_no_patient_data(path.read_text())
    assert_no_patient_data(err, captured.out, captured.err)


def test_bad_series_fail_one_line_each_and_the_others_go_on(tmp_path, cut, capsys):
    volume, _, affine = cut
    export = tmp_path / "export"
    write_series(export / "good", volume, affine, series_number=1, description="good")
    truncated = write_series(export / "cut", volume, affine, series_number=2, description="cut short")
    truncated[3].write_bytes(truncated[3].read_bytes()[:-300])
    write_series(export / "single", volume[:, :, :1], affine, series_number=3, description="one image")
    uid = generate_uid()
    write_series(export / "sizes", volume[:, :, :3], affine, series_uid=uid, series_number=4, prefix="a")
    shifted = affine.copy()
    shifted[:3, 3] = (affine @ [0, 0, 3, 1])[:3]
    write_series(export / "sizes", volume[:, :40, 3:], shifted, series_uid=uid, series_number=4, prefix="b")
    shutil.copy(get_testdata_file("SC_rgb_small_odd.dcm"), export / "capture.dcm")
    results = tmp_path / "results"

    assert segment(export, "--all-series", "-o", results, "--slices", "0:2") == 1
    captured = capsys.readouterr()
    failed = one_line_failures(captured.err)
    assert len(failed) == 4, captured.err
    assert any(line.startswith("series2_cut_short: FAILED:") and "truncated" in line for line in failed)
    assert any(line.startswith("series3_one_image: FAILED:") and "has one image: not a volume" in line
               for line in failed)
    assert any(line.startswith("series4_synthetic_CT: FAILED:") and "different sizes" in line for line in failed)
    assert any("series 1 image 1 is a colour image (RGB" in line for line in failed)
    assert "1 done, 0 skipped, 4 failed of 5" in captured.out
    assert sorted(p.name for p in results.glob("*.nii.gz")) == ["series1_good_seg.nii.gz"]
    assert_no_patient_data(captured.out, captured.err)

    # One file given alone is a 2-D image, segmented as such.
    single = next((export / "single").iterdir())
    assert segment(single, "-o", tmp_path / "single.nii.gz") == 0
    assert nib.load(str(tmp_path / "single.nii.gz")).shape == (64, 64)


def test_folders_without_dicom_or_with_dicom_and_nifti_are_refused_in_one_line(tmp_path, cut, capsys):
    volume, _, affine = cut
    empty = tmp_path / "notes"
    empty.mkdir()
    (empty / "readme.txt").write_text("export notes")
    assert segment(empty, "-o", tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no NIfTI (.nii/.nii.gz) files and no DICOM files" in err

    both = tmp_path / "both"
    write_series(both / "dicom", volume, affine)
    nib.save(nib.Nifti1Image(volume.astype(np.int16), affine), str(both / "scan.nii.gz"))
    assert segment(both, "-o", tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds both NIfTI files (e.g. scan.nii.gz) and DICOM files" in err


def series_with_labels(folder, cut, seg_name: str):
    """``folder/PATIENT_FOLDER`` (the cut as DICOM, in a folder named after the patient),
    ``folder/labels.nii.gz`` on its voxels and ``folder/seg_name``, a DICOM SEG of the same labels;
    returns the series folder."""
    volume, labels, affine = cut
    series = folder / PATIENT_FOLDER
    write_series(series, volume, affine)
    scan = read_dicom_series(series)
    nib.save(nib.Nifti1Image(labels, scan.meta.affine), str(folder / "labels.nii.gz"))
    write_dicom_seg(folder / seg_name, labels, scan.source, ("background", "liver", "tumour"))
    return series


def test_evaluate_a_dicom_series_against_nifti_labels_or_a_seg(tmp_path, cut, capsys):
    volume, labels, affine = cut
    series = series_with_labels(tmp_path, cut, "reference.dcm")
    scores = {}
    for label in ("labels.nii.gz", "reference.dcm"):
        json_path = tmp_path / f"{label}.json"
        code = main(["evaluate", "--image", str(series), "--label", str(tmp_path / label), "--slices", "2:4",
                     "--steps", "2", "--device", "cpu", "--json", str(json_path)])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        report = json.loads(json_path.read_text())
        assert_no_patient_data(json_path.read_text(), without_paths_given(captured.out, series),
                               without_paths_given(captured.err, series))
        (case,) = report["volumes"].values()
        scores[label] = case["consensus"]
    assert scores["labels.nii.gz"] == scores["reference.dcm"]
    assert scores["reference.dcm"]["per_class"]["liver"]["dice"] > 0

    nifti = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(volume.astype(np.int16), affine), str(nifti))
    capsys.readouterr()
    assert main(["evaluate", "--image", str(nifti), "--label", str(tmp_path / "reference.dcm")]) == 2
    assert "--image must be that DICOM series" in capsys.readouterr().err


def test_a_planning_structure_sets_target_alone_joins_a_set_and_trains_a_fine_tune(tmp_path, cut, capsys,
                                                                                    tiny_checkpoint):
    """A planning system's RTSTRUCT holds an External on every slice and organs at risk beside the target:
    --keep-classes GTV=lesion learns the target alone, from the slices it is drawn on."""
    from medconddiff.checkpoint import load_checkpoint
    from medconddiff.training_set import TrainingSet

    volume, _, affine = cut
    paths = write_series(tmp_path / "CT", volume, affine)
    body = np.array([(1.5, 1.5), (60.5, 1.5), (60.5, 60.5), (1.5, 60.5)])
    square = np.array([(9.5, 9.5), (30.5, 9.5), (30.5, 30.5), (9.5, 30.5)])
    cord = np.array([(40.5, 40.5), (45.5, 40.5), (45.5, 45.5), (40.5, 45.5)])
    slices = range(volume.shape[2])
    write_rtstruct(tmp_path / "RS.dcm", paths, affine, [("External", [(k, body) for k in slices]),
                                                        ("SpinalCord", [(k, cord) for k in slices]),
                                                        ("GTV", [(2, square), (3, square)])])
    assert main(["add-to-set", str(tmp_path / "set"), str(tmp_path / "CT"), str(tmp_path / "RS.dcm"),
                 "--slices", "labelled", "--keep-classes", "GTV=lesion"]) == 0
    err = capsys.readouterr().err
    training_set = TrainingSet.open(tmp_path / "set")
    (case,) = training_set.cases
    assert training_set.class_names == ("background", "lesion") and training_set.verified_slices(case) == [2, 3]
    assert "left out (counted as background): 'External', 'SpinalCord'" in err
    out = tmp_path / "gtv.safetensors"
    assert main(["finetune", str(tmp_path / "CT"), str(tmp_path / "RS.dcm"), "--slices", "labelled", "--init",
                 str(tiny_checkpoint), "--keep-classes", "GTV=lesion", "--steps", "1", "--device", "cpu", "--quiet",
                 "-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert load_checkpoint(out).config.model.class_names == ("background", "lesion")
    assert "fine-tuning on 2 slice(s)" in captured.out and "2, 3" in captured.out
    # Leaving out a class the model learns is said: its voxels would be learned as background.
    assert main(["add-to-set", str(tmp_path / "set2"), str(tmp_path / "CT"), str(tmp_path / "RS.dcm"),
                 "--slices", "labelled", "--keep-classes", "GTV", "--class-names", "background", "liver", "cord",
                 "GTV"]) == 0
    assert "'liver' is a class the model already learns" in capsys.readouterr().err
    # Without it, the body outline is named as what it is: a class on every slice.
    assert main(["finetune", str(tmp_path / "CT"), str(tmp_path / "RS.dcm"), "--slices", "labelled", "--init",
                 str(tiny_checkpoint), "--steps", "1", "--device", "cpu", "--quiet", "-o", str(out),
                 "--overwrite"]) == 0
    assert "'External' looks like a body outline" in capsys.readouterr().err
    assert main(["add-to-set", str(tmp_path / "set3"), str(tmp_path / "CT"), str(tmp_path / "RS.dcm"),
                 "--slices", "labelled", "--keep-classes", "PTV"]) == 2
    assert "the labels have no class 'PTV' (their classes: External, SpinalCord, GTV)" in capsys.readouterr().err


def test_segment_writes_an_rt_structure_set_that_reads_back_as_the_labels(tmp_path, cut, capsys):
    """For planning systems that import contours but not SEG: one ROI per class, every contour on its image."""
    import pydicom

    from medconddiff.dicom_rtstruct import read_rtstruct

    volume, _, affine = cut
    paths = write_series(tmp_path / PATIENT_FOLDER, volume, affine)
    assert segment(tmp_path / PATIENT_FOLDER, "-o", tmp_path / "labels.nii.gz") == 0
    assert segment(tmp_path / PATIENT_FOLDER, "-o", tmp_path / "contours.dcm", "--output-format",
                   "dicom-rtstruct") == 0
    captured = capsys.readouterr()
    series = tmp_path / PATIENT_FOLDER
    assert_no_patient_data(without_paths_given(captured.out, series), without_paths_given(captured.err, series))
    written = pydicom.dcmread(tmp_path / "contours.dcm")
    assert written.Modality == "RTSTRUCT" and written.PatientID == PATIENT["PatientID"]   # in the file, as DICOM asks
    assert [roi.ROIName for roi in written.StructureSetROISequence] == ["liver", "tumour"]
    slice_uids = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}
    referenced = {str(c.ContourImageSequence[0].ReferencedSOPInstanceUID)
                  for roi in written.ROIContourSequence for c in roi.ContourSequence}
    assert referenced and referenced <= slice_uids
    scan = read_dicom_series(tmp_path / PATIENT_FOLDER)
    back = read_rtstruct(tmp_path / "contours.dcm", scan)
    expected = np.asarray(nib.load(str(tmp_path / "labels.nii.gz")).dataobj)
    assert expected.any()
    np.testing.assert_array_equal(back.labels, expected)
    # A NIfTI input has no images to reference.
    nifti = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(volume.astype(np.int16), affine), str(nifti))
    assert segment(nifti, "-o", tmp_path / "x.dcm", "--output-format", "dicom-rtstruct") == 2


def test_evaluate_matches_a_segs_classes_to_the_models_by_name_or_by_the_users_pairs(tmp_path, cut, capsys):
    volume, labels, _ = cut
    series = series_with_labels(tmp_path, cut, "reference.dcm")
    source = read_dicom_series(series).source
    swapped = np.choose(labels, [0, 2, 1]).astype(np.uint8)     # liver written as 2, tumour as 1
    write_dicom_seg(tmp_path / "swapped.dcm", swapped, source, ("background", "Tumor", "Liver"))
    write_dicom_seg(tmp_path / "planning.dcm", swapped, source, ("background", "GTV", "Liver"))

    def scores(label, *extra):
        json_path = tmp_path / f"{label}.json"
        code = main(["evaluate", "--image", str(series), "--label", str(tmp_path / label), "--slices", "2:4",
                     "--steps", "2", "--device", "cpu", "--json", str(json_path), "--overwrite", *extra])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        (case,) = json.loads(json_path.read_text())["volumes"].values()
        return case, captured.err

    reference, _ = scores("labels.nii.gz")
    by_name, err = scores("swapped.dcm")
    assert by_name["consensus"] == reference["consensus"] and reference["consensus"]["per_class"]["liver"]["dice"] > 0
    assert by_name["reference_classes"] == {"matched_by": "name", "pairs": {"Tumor": "tumour", "Liver": "liver"}}
    assert "Tumor → tumour, Liver → liver" in err
    # A target volume is no class name the model knows: without a pair it is background, and tumour goes unscored.
    unpaired, err = scores("planning.dcm")
    assert "'GTV' is none of the model's classes: counted as background" in err and "does not label 'tumour'" in err
    assert unpaired["consensus"]["per_class"]["liver"] == reference["consensus"]["per_class"]["liver"]
    paired, _ = scores("planning.dcm", "--class-map", "GTV=tumour")
    assert paired["consensus"] == reference["consensus"] and paired["reference_classes"]["matched_by"] == "map"
    assert main(["evaluate", "--image", str(series), "--label", str(tmp_path / "planning.dcm"),
                 "--class-map", "GTV=spleen", "--steps", "1", "--device", "cpu"]) == 2
    assert "the model has no class 'spleen' (its classes: background, liver, tumour)" in capsys.readouterr().err
    # choose-consensus scores the same way: the swapped SEG chooses as the NIfTI labels do.
    from medconddiff.checkpoint import load_checkpoint

    choices = {}
    for label in ("labels.nii.gz", "swapped.dcm"):
        out = tmp_path / f"chosen_{label}.safetensors"
        assert main(["choose-consensus", str(series), str(tmp_path / label), "--slices", "2:4", "--device", "cpu",
                     "-o", str(out)]) == 0
        choices[label] = load_checkpoint(out).extra["consensus_choice"]
    assert "Tumor → tumour" in capsys.readouterr().err
    assert choices["swapped.dcm"]["step_dice"] == choices["labels.nii.gz"]["step_dice"]
    assert choices["swapped.dcm"]["method"] == choices["labels.nii.gz"]["method"]


def test_finetune_and_choose_consensus_on_a_dicom_series_with_a_seg_or_nifti_labels(tmp_path, cut, capsys,
                                                                                      tiny_checkpoint):
    from medconddiff.checkpoint import load_checkpoint

    volume, _, affine = cut
    series = series_with_labels(tmp_path, cut, "corrections.dcm")
    tuned = {}
    for label in ("corrections.dcm", "labels.nii.gz"):
        out = tmp_path / f"{label}.safetensors"
        code = main(["finetune", str(series), str(tmp_path / label), "--slices", "labelled", "--init",
                     str(tiny_checkpoint), "--steps", "2", "--device", "cpu", "--quiet", "-o", str(out)])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        assert_no_patient_data(without_paths_given(captured.out, series), without_paths_given(captured.err, series),
                               json.dumps(load_checkpoint(out).extra))
        assert "of series 1 'synthetic CT':" in captured.out      # named by the series, never the patient
        assert load_checkpoint(out).extra["finetuned_on"][0]["scan"] == "series 1 'synthetic CT'"
        tuned[label] = load_checkpoint(out).state_dict
    # The SEG is read onto the series' voxels: the same labels, so the same seeded weights.
    assert all(bool((tuned["corrections.dcm"][k] == v).all()) for k, v in tuned["labels.nii.gz"].items())

    chosen = tmp_path / "chosen.safetensors"
    code = main(["choose-consensus", str(series), str(tmp_path / "corrections.dcm"), "--slices", "2:4",
                 "--checkpoint", str(tiny_checkpoint), "--device", "cpu", "-o", str(chosen)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert load_checkpoint(chosen).extra["consensus_choice"]["slices"] == 2
    assert_no_patient_data(without_paths_given(captured.out, series), without_paths_given(captured.err, series),
                           json.dumps(load_checkpoint(chosen).extra))

    # A SEG belongs to a DICOM series; channel files to NIfTI scans.
    nifti = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(volume.astype(np.int16), affine), str(nifti))
    assert main(["finetune", str(nifti), str(tmp_path / "corrections.dcm"), "--slices", "labelled",
                 "-o", str(tmp_path / "x.safetensors")]) == 2
    assert "the scan must be that DICOM series" in capsys.readouterr().err
    assert main(["finetune", str(series), str(tmp_path / "labels.nii.gz"), "--slices", "labelled", "--channel-file",
                 str(nifti), "-o", str(tmp_path / "x.safetensors")]) == 2
    assert "a DICOM series is one channel" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


def test_a_multi_echo_series_segments_echo_by_echo(tmp_path, cut, capsys):
    volume, _, affine = cut
    mri = tmp_path / "mri"
    write_echoes(mri, [volume, volume * 0.5], affine, description="T2 dual echo")
    out = tmp_path / "out"
    out.mkdir()
    assert segment(mri, "--all-series", "-o", out) == 0, capsys.readouterr().err
    names = sorted(p.name for p in out.glob("*.nii.gz"))
    assert names == ["series1_T2_dual_echo_echo_1_seg.nii.gz", "series1_T2_dual_echo_echo_2_seg.nii.gz"]
    assert segment(mri, "-o", tmp_path / "x.nii.gz") == 2
    assert "(echo 2)" in capsys.readouterr().err
    uid = list_series(mri)[0].uid.split("#")[0]
    assert segment(mri, "--series", uid, "-o", tmp_path / "x.nii.gz") == 2
    assert "2 series have number or UID" in capsys.readouterr().err
    assert segment(mri, "--series", f"{uid}#echo_2", "-o", tmp_path / "echo2.nii.gz") == 0



def test_an_enhanced_multiframe_file_of_two_echoes_segments_echo_by_echo_and_sends_a_seg_of_one(tmp_path, cut,
                                                                                                 capsys):
    """One file holding both echoes (frames at the same positions) is chosen from as a folder's series are:
    it used to be read as one series and refused; each echo's outputs are named by the echo, and the SEG of
    one echo reads back onto that echo alone."""
    import highdicom as hd
    import pydicom

    volume, _, affine = cut
    write_echoes(tmp_path / "mri", [volume, volume * 0.5], affine, description="T2 dual echo",
                 study_uid=generate_uid(), frame_uid=generate_uid())
    single = sorted((pydicom.dcmread(p) for p in (tmp_path / "mri").iterdir()),
                    key=lambda d: (float(d.ImagePositionPatient[2]), int(d.EchoNumbers)))
    dual = tmp_path / "dual.dcm"
    hd.legacy.LegacyConvertedEnhancedCTImage(single, series_instance_uid=hd.UID(), series_number=4,
                                             sop_instance_uid=hd.UID(), instance_number=1).save_as(dual)
    assert segment(dual, "-o", tmp_path / "x.nii.gz") == 2
    err = capsys.readouterr().err
    assert "dual.dcm holds 2 DICOM series: choose one with --series N|UID, or segment each with --all-series" in err
    assert not (tmp_path / "x.nii.gz").exists()
    out = tmp_path / "out"
    assert segment(dual, "--all-series", "-o", out) == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.glob("*.nii.gz")) == [
        "series4_T2_dual_echo_enhanced_conversion_echo_1_seg.nii.gz",
        "series4_T2_dual_echo_enhanced_conversion_echo_2_seg.nii.gz"]
    echo_1, echo_2 = list_series(dual)
    assert segment(dual, "--series", echo_2.uid) == 0
    said = capsys.readouterr().out
    assert "series 4 'T2 dual echo (enhanced conversion)' (echo 2) in " in said
    tag = hashlib.sha1(echo_2.uid.encode()).hexdigest()[:8]      # named by the part, not by the file
    assert (tmp_path / f"series4_T2_dual_echo_enhanced_conversion_echo_2_{tag}_seg.nii.gz").exists()
    assert segment(dual, "--series", echo_2.uid, "-o", tmp_path / "echo2.dcm") == 0
    labels, _ = load_labels(out / "series4_T2_dual_echo_enhanced_conversion_echo_2_seg.nii.gz")
    np.testing.assert_array_equal(read_dicom_seg(tmp_path / "echo2.dcm", dual, series=echo_2.uid), labels)
    with pytest.raises(DicomError, match=r"references none of the frames of .*\(echo 1\)"):
        read_dicom_seg(tmp_path / "echo2.dcm", dual, series=echo_1.uid)

def test_add_to_set_takes_a_dicom_series_and_its_seg_and_keeps_two_patients_apart(tmp_path, cut, capsys,
                                                                                   tiny_checkpoint):
    """The clinical loop from the command line: a SEG sent back for a series becomes a case of a training set,
    named by the series and its UID (two patients' "series 1 'synthetic CT'" are two cases), never by the
    patient or their folder."""
    from medconddiff.training_set import TrainingSet

    volume, labels, affine = cut
    labelled, unlabelled = [2, 4], [0, 1, 3, 5]
    checked = labels.copy()
    checked[..., unlabelled] = 0                                     # the user corrected slices 2 and 4
    other = tmp_path / "other patient"
    series = series_with_labels(tmp_path, cut, "corrections.dcm")
    # Another patient: same series number and description, another UID, other voxels.
    series_b = series_with_labels(other, (volume + 7, labels, affine), "corrections.dcm")
    # The first patient's series exported again (an anonymiser gives it new UIDs): the same voxels.
    again = tmp_path / "re-export"
    series_again = series_with_labels(again, cut, "corrections.dcm")
    for folder, given in ((tmp_path, series), (other, series_b), (again, series_again)):
        write_dicom_seg(folder / "checked.dcm", checked, read_dicom_series(given).source,
                        ("background", "liver", "tumour"))
    root = tmp_path / "set"
    outputs = []
    for folder, given in ((tmp_path, series), (other, series_b), (tmp_path, series), (again, series_again)):
        code = main(["add-to-set", str(root), str(given), str(folder / "checked.dcm"), "--slices", "labelled",
                     "--checkpoint", str(tiny_checkpoint)])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        assert_no_patient_data(without_paths_given(captured.out, given, root), captured.err)
        outputs.append(captured.out)
    training_set = TrainingSet.open(root)
    assert len(training_set.cases) == 2 and all(c.startswith("series1_synthetic_CT_") for c in training_set.cases)
    assert "added as a new case" in outputs[1] and "merged into its case" in outputs[2]
    assert "which holds the same scan" in outputs[3]                  # the re-export is not a third case
    assert training_set.class_names == ("background", "liver", "tumour")        # the SEG's segment labels
    # The SEG's labels on the slices that hold any, the set's ignore (3) on the rest (both patients' SEGs
    # hold the same labels on the same cut).
    assert all(labels[..., k].any() for k in labelled)
    for case in training_set.cases:
        stored = np.asarray(nib.load(str(root / "labelsTr" / f"{case}.nii.gz")).dataobj)
        np.testing.assert_array_equal(stored[..., labelled], labels[..., labelled])
        assert (stored[..., unlabelled] == 3).all()
    files = [str(p.relative_to(root)) for p in root.rglob("*")]
    assert_no_patient_data(*files, (root / "dataset.json").read_text(), *[
        str(nib.load(str(p)).header["descrip"]) for p in root.rglob("*.nii.gz")])
    # The set is what finetune learns from.
    assert main(["finetune", str(root), "--init", str(tiny_checkpoint), "--steps", "1", "--device", "cpu",
                 "--quiet", "-o", str(tmp_path / "from_set.safetensors")]) == 0
    assert "2 cases" in capsys.readouterr().out


def test_a_cds_dicomdir_segments_its_folder_written_beside_it(tmp_path, cut, capsys):
    volume, _, affine = cut
    dicomdir = write_media(tmp_path / "CD", write_series(tmp_path / "exported", volume, affine))
    assert segment(dicomdir) == 0
    captured = capsys.readouterr()
    tag = hashlib.sha1(list_series(dicomdir)[0].uid.encode()).hexdigest()[:8]
    written = nib.load(str(tmp_path / f"series1_synthetic_CT_{tag}_seg.nii.gz"))   # named by the series, beside the CD
    assert written.shape == volume.shape and not list((tmp_path / "CD").glob("*seg*"))
    assert "Media Storage Directory" not in captured.err         # the index is expected there, not a skipped file
    np.testing.assert_array_equal(read_dicom_series(dicomdir).volume, read_dicom_series(tmp_path / "exported").volume)


def test_one_file_of_a_series_segments_the_series_written_beside_its_folder(tmp_path, cut, capsys):
    volume, _, affine = cut
    paths = write_series(tmp_path / "CT_SERIES", volume, affine)
    assert segment(paths[2]) == 0
    captured = capsys.readouterr()
    tag = hashlib.sha1(list_series(paths[2])[0].uid.encode()).hexdigest()[:8]
    assert nib.load(str(tmp_path / f"series1_synthetic_CT_{tag}_seg.nii.gz")).shape == volume.shape
    assert not list((tmp_path / "CT_SERIES").glob("*seg*"))
    assert f"the file given is one of {volume.shape[2]} files of its series" in captured.err


def test_an_rt_structure_sets_contoured_slices_join_a_training_set_and_name_a_fine_tunes_classes(
        tmp_path, cut, capsys, tiny_checkpoint):
    from medconddiff.training_set import TrainingSet

    volume, _, affine = cut
    paths = write_series(tmp_path / "CT", volume, affine)
    square = np.array([(9.5, 9.5), (30.5, 9.5), (30.5, 30.5), (9.5, 30.5)])      # voxels 10..30 in i and j
    write_rtstruct(tmp_path / "RS.dcm", paths, affine, [("GTV", [(2, square), (3, square)]), ("empty", [])])
    assert main(["add-to-set", str(tmp_path / "set"), str(tmp_path / "CT"), str(tmp_path / "RS.dcm"),
                 "--slices", "labelled"]) == 0
    captured = capsys.readouterr()
    training_set = TrainingSet.open(tmp_path / "set")
    (case,) = training_set.cases
    assert training_set.class_names[:2] == ("background", "GTV") and training_set.verified_slices(case) == [2, 3]
    assert "left out ROI 'empty'" in captured.err and "lesion" not in training_set.class_names
    assert_no_patient_data(captured.out, captured.err)
    # Fine-tuned on it directly, the model learns the ROIs' names (not the start model's classes).
    from medconddiff.checkpoint import load_checkpoint

    out = tmp_path / "gtv.safetensors"
    assert main(["finetune", str(tmp_path / "CT"), str(tmp_path / "RS.dcm"), "--slices", "labelled", "--init",
                 str(tiny_checkpoint), "--steps", "1", "--device", "cpu", "--quiet", "-o", str(out)]) == 0
    assert load_checkpoint(out).config.model.class_names == ("background", "GTV")


def test_segment_refuses_a_seg_it_cannot_write_before_sampling(tmp_path, cut, tiny_checkpoint, capsys, monkeypatch):
    """A 2-D image without a Frame of Reference UID: `-o x.dcm` was refused only after the whole run."""
    import pydicom

    from medconddiff.segmenter import Segmenter

    volume, _, affine = cut
    path = write_series(tmp_path / "flat", volume[:, :, :1], affine)[0]
    dataset = pydicom.dcmread(path)
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "FrameOfReferenceUID"):
        delattr(dataset, keyword)
    dataset.save_as(path, enforce_file_format=True)

    def never(*args, **kwargs):
        raise AssertionError("sampled before refusing the output")

    monkeypatch.setattr(Segmenter, "run", never)
    assert segment(path, "-o", tmp_path / "x.dcm", "--checkpoint", tiny_checkpoint) == 2
    assert "has no Frame of Reference UID" in capsys.readouterr().err and not (tmp_path / "x.dcm").exists()
