"""No patient identifier in what is written or shown by name: the CLI's default names for a DICOM input,
``benchmark``'s record, and napari's Fine-tune messages and proposed folders.

DICOM exports are filed in folders (and files) named after the patient (tests/dicom_helpers.py's
PATIENT_FOLDER); a name, a record or a message must not carry them on.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from medconddiff.cli import main
from tests.dicom_helpers import PATIENT, PATIENT_FOLDER, write_series

FAST = ("--steps", "2", "--seed", "1", "--quiet", "--device", "cpu", "--threads", "1")


def assert_no_patient_data(*texts: str) -> None:
    for text in texts:
        for value in PATIENT.values():
            assert value not in text, text
        assert "Zyxwvut" not in text and "Qqpatientname" not in text, text


def uid_tag(uid: str) -> str:
    return hashlib.sha1(uid.encode()).hexdigest()[:8]


@pytest.fixture
def small_ct(liver_volume):
    """(HU volume 32x32x3, RAS affine at 1 x 1 x 2.5 mm) of the bundled liver CT."""
    image, _ = liver_volume
    return image[16:48, 16:48, :3].astype(np.int16).astype(np.float32), np.diag([1.0, 1.0, 2.5, 1.0])


def test_a_dicom_folders_default_outputs_are_named_by_the_series_not_the_patients_folder(
        tmp_path, small_ct, tiny_checkpoint, capsys):
    """Two patients' series 1 'synthetic CT', each in a folder named after the patient, side by side:
    each is written beside its folder, named by the series and a hash of its UID (not the folder), and
    neither replaces the other; the sidecar and the console line name the series."""
    volume, affine = small_ct
    first, second = tmp_path / PATIENT_FOLDER, tmp_path / "DOE_Jane_PID-11111"
    uids = ["1.2.826.0.1.3680043.8.498.101", "1.2.826.0.1.3680043.8.498.202"]
    for folder, uid in zip((first, second), uids):
        write_series(folder, volume, affine, series_uid=uid, patient=PATIENT)
    for folder in (first, second):
        assert main(["segment", str(folder), "--checkpoint", str(tiny_checkpoint), *FAST]) == 0
    captured = capsys.readouterr()
    names = sorted(p.name for p in tmp_path.iterdir() if p.is_file())
    assert names == sorted(f"series1_synthetic_CT_{uid_tag(uid)}_seg.{ext}" for uid in uids
                           for ext in ("json", "nii.gz"))
    sidecar = (tmp_path / f"series1_synthetic_CT_{uid_tag(uids[0])}_seg.json").read_text()
    assert '"labels": "series1_synthetic_CT_' in sidecar
    assert_no_patient_data(sidecar, captured.err, captured.out.replace(str(first), "<given>"))
    assert f"series 1 'synthetic CT' in <given> -> " in captured.out.replace(str(first), "<given>")


def test_a_series_given_by_a_relative_path_is_written_and_shown_relative(tmp_path, small_ct, tiny_checkpoint,
                                                                           capsys, monkeypatch):
    """Inside the patient's folder, `segment CT` printed the output's absolute path (the patient's folder in
    it) and `segment .` in the series folder resolved links; outputs go beside the folder as typed."""
    volume, affine = small_ct
    patient = tmp_path / PATIENT_FOLDER
    write_series(patient / "CT", volume, affine, patient=PATIENT)
    monkeypatch.chdir(patient)
    assert main(["segment", "CT", "--checkpoint", str(tiny_checkpoint), *FAST]) == 0
    captured = capsys.readouterr()
    assert_no_patient_data(captured.out, captured.err)
    assert " -> series1_synthetic_CT_" in captured.out
    monkeypatch.chdir(patient / "CT")
    assert main(["segment", ".", "--checkpoint", str(tiny_checkpoint), "--overwrite", *FAST]) == 0
    captured = capsys.readouterr()
    assert " -> ../series1_synthetic_CT_" in captured.out
    assert not [p for p in (patient / "CT").iterdir() if "_seg" in p.name]        # beside the folder, not in it


def test_one_file_of_a_series_and_a_chosen_series_are_named_by_the_series(tmp_path, small_ct, tiny_checkpoint):
    """A file of the series named after the patient (as Siemens exports do), in a patient-named folder,
    and the series chosen with --series from that folder: both named by the series, beside the folder."""
    volume, affine = small_ct
    uid = "1.2.826.0.1.3680043.8.498.303"
    paths = write_series(tmp_path / PATIENT_FOLDER, volume, affine, series_uid=uid, series_number=3,
                         description="CT abdomen", prefix=f"{PATIENT_FOLDER}.CT.")
    expected = tmp_path / f"series3_CT_abdomen_{uid_tag(uid)}_seg.nii.gz"
    assert main(["segment", str(paths[1]), "--checkpoint", str(tiny_checkpoint), *FAST]) == 0
    assert expected.is_file()
    assert main(["segment", str(tmp_path / PATIENT_FOLDER), "--series", "3", "--overwrite",
                 "--checkpoint", str(tiny_checkpoint), *FAST]) == 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == [
        expected.name.replace(".nii.gz", ".json"), expected.name]


def test_a_cohort_of_patients_folders_records_series_names_in_its_table(tmp_path, small_ct, tiny_checkpoint,
                                                                         capsys):
    volume, affine = small_ct
    uid = "1.2.826.0.1.3680043.8.498.404"
    write_series(tmp_path / "in" / PATIENT_FOLDER, volume, affine, series_uid=uid, patient=PATIENT)
    write_series(tmp_path / "in" / "OTHER_PATIENT", volume, affine, series_uid=uid + "5", patient=PATIENT)
    assert main(["segment", str(tmp_path / "in" / PATIENT_FOLDER), str(tmp_path / "in" / "OTHER_PATIENT"),
                 "-o", str(tmp_path / "out"), "--checkpoint", str(tiny_checkpoint), *FAST]) == 0
    table = (tmp_path / "out" / "medconddiff_volumes.csv").read_text()
    assert f"series1_synthetic_CT_{uid_tag(uid)}," in table
    assert_no_patient_data(table, *(p.name for p in (tmp_path / "out").iterdir()))


def test_benchmark_records_and_prints_file_names_not_their_patients_folder(tmp_path, liver_volume, tiny_checkpoint,
                                                                           capsys, monkeypatch):
    """A fine-tuned checkpoint and its held-out scan in a folder named after the patient, the scan also
    the big volume and a real-size scan: the JSON report and the table name every file by its name."""
    import json
    import shutil

    import nibabel as nib

    from medconddiff import benchmark
    from medconddiff.benchmark_memory import memory_probe

    monkeypatch.setattr(benchmark, "run_memory_probe", memory_probe)    # in this process: the same report, sooner
    folder = tmp_path / PATIENT_FOLDER
    folder.mkdir()
    image, labels = liver_volume
    scan, truth = folder / "scan.nii.gz", folder / "labels.nii.gz"
    nib.save(nib.Nifti1Image(image[:, :, :3].astype(np.int16), np.eye(4)), str(scan))
    nib.save(nib.Nifti1Image(labels[:, :, :3].astype(np.uint8), np.eye(4)), str(truth))
    checkpoint = shutil.copy(tiny_checkpoint, folder / "ft.safetensors")
    out = tmp_path / "bench.json"
    assert main(["benchmark", "--quick", "--quiet", "--device", "cpu", "--checkpoint", str(checkpoint),
                 "--steps-list", "1", "--batch-sizes", "1", "--volume-slices", "2", "--warmup", "0",
                 "--sample-slices", "1", "--finetune-steps", "0", "--heldout-scan", str(scan), str(truth),
                 "--heldout-slices", "0", "2", "--big-volume", str(scan), "--real-size", str(scan),
                 "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    options, (model,) = report["options"], report["models"]
    assert options["checkpoints"] == ["ft.safetensors"] and options["heldout_scan"] == ["scan.nii.gz", "labels.nii.gz"]
    assert options["big_volume"] == "scan.nii.gz" and options["real_size"] == ["scan.nii.gz"]
    assert model["source"] == "ft.safetensors" and model["memory"]["source"] == "scan.nii.gz"
    assert [real["source"] for real in model["real_size"]] == ["scan.nii.gz"]
    captured = capsys.readouterr()
    assert_no_patient_data(out.read_text(), captured.out.replace(f"wrote {out}", ""), captured.err)


def read_only_below(monkeypatch, root):
    """os.access says nothing at or below ``root`` can be written, as on a CD (root ignores chmod)."""
    import os
    from pathlib import Path

    real_access = os.access

    def access(path, mode, *args, **kwargs):
        path = Path(path)
        if mode & os.W_OK and (path == root or root in path.parents):
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)


def test_napari_proposes_the_users_folders_when_the_series_folder_is_read_only(tmp_path, monkeypatch):
    """A series on a disc, filed under the patient's folder: Export and Fine-tune propose the home (the
    models folder) instead of beside the series, where saving could only fail."""
    from medconddiff.dicom_series import DicomSource
    from napari_medconddiff._export import default_export_path, default_finetune_path

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    disc = tmp_path / "cd"
    series = disc / PATIENT_FOLDER / "CT"
    series.mkdir(parents=True)
    (series / "IM0001").write_bytes(b"")
    source = DicomSource(series_uid="1.2.3", series_number=2, series_description="CT chest", modality="CT",
                         frame_of_reference_uid="", sop_instance_uids=("1.2.3.1",), files=(str(series / "IM0001"),),
                         frame_numbers=(None,))
    beside = disc / PATIENT_FOLDER
    assert default_export_path("x", str(series), source) == beside / "series2_CT_chest_seg.dcm"   # writable
    read_only_below(monkeypatch, disc)
    assert default_export_path("x", str(series), source) == tmp_path / "home" / "series2_CT_chest_seg.dcm"
    assert default_finetune_path("x", str(series / "IM0001"), source) == \
        tmp_path / "home" / ".medconddiff" / "models" / "series2_CT_chest_finetuned.safetensors"
    assert default_export_path("ct", str(disc / "ct.nii.gz")) == tmp_path / "home" / "ct_seg.nii.gz"
    assert default_finetune_path("ct", str(disc / "ct.nii.gz")) == \
        tmp_path / "home" / ".medconddiff" / "models" / "ct_finetuned.safetensors"


def test_fine_tunes_refused_save_paths_are_named_by_file_never_by_the_patients_folder(tmp_path, tiny_checkpoint,
                                                                                     monkeypatch):
    """What the status line and the notification say when the chosen file cannot be used."""
    import shutil

    from medconddiff.errors import UserInputError
    from napari_medconddiff._finetune_flow import FinetuneFlow, FinetuneSettings

    folder = tmp_path / PATIENT_FOLDER
    folder.mkdir()
    start = shutil.copy(tiny_checkpoint, folder / "ft.safetensors")
    shutil.copy(tiny_checkpoint, folder / "kept.safetensors")
    (folder / "notes.txt").write_text("")
    settings = FinetuneSettings(start=str(start), save_path=start, class_names=("background", "liver", "tumour"))

    def refusal(path) -> str:
        with pytest.raises(UserInputError) as info:
            FinetuneFlow._check_save_path(settings, path)
        return str(info.value)

    said = [refusal(start), refusal(folder / "kept.safetensors"), refusal(folder / "notes.txt" / "new.safetensors")]
    read_only_below(monkeypatch, folder)
    said.append(refusal(folder / "new.safetensors"))
    assert said == [
        "ft.safetensors is the checkpoint being fine-tuned; save the fine-tuned model under another name",
        "kept.safetensors exists; choose another name, or confirm replacing it in the save dialog",
        "notes.txt is a file, not a folder; choose another place for the fine-tuned model",
        "new.safetensors: cannot write into its folder (read-only, or permission denied); choose another place "
        "for the fine-tuned model"]
