"""Outputs never replace what the user did not ask to replace, and a failed or stopped write loses nothing:
--skip-existing and a user's own labels, an interrupted --overwrite, DICOM inputs as outputs, train's record
and log, late target checks, full or failing disks, durability, dangling links, and what check_target says."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medconddiff.atomic import atomic_write, check_target, write_json_atomic
from medconddiff.cli import main
from medconddiff.errors import StorageError
from tests.test_cli import scan, segment, table_rows  # noqa: F401 - scan is a fixture

PATIENT_FOLDER = "Zyxwvut_Qqpatientname_PID-98765-XQ"


def hidden_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def user_labels(path: Path, like: Path) -> bytes:
    """A user's own labels file (no sidecar), as one drawn in another program and saved under the usual name."""
    image = nib.load(str(like))
    nib.save(nib.Nifti1Image(np.ones(image.shape, np.uint8), image.affine), str(path))
    return path.read_bytes()


# 1. --skip-existing takes only its own unfinished outputs for something to redo.

def test_skip_existing_never_replaces_a_labels_file_this_program_did_not_write(scan, tmp_path, tiny_checkpoint,
                                                                                capsys):
    mine = user_labels(tmp_path / "scan_seg.nii.gz", scan)
    assert segment(scan, "--checkpoint", tiny_checkpoint, "--skip-existing") == 0
    err = capsys.readouterr().err
    assert (tmp_path / "scan_seg.nii.gz").read_bytes() == mine and not (tmp_path / "scan_seg.json").exists()
    assert "scan: skipped: scan_seg.nii.gz exists without the sidecar" in err and "--overwrite" in err

    # In a cohort: the user's file stays, the table says why, the other scan is segmented.
    folder, results = tmp_path / "cohort", tmp_path / "results"
    folder.mkdir()
    results.mkdir()
    for name in "ab":
        (folder / f"{name}.nii.gz").write_bytes(scan.read_bytes())
    mine = user_labels(results / "a_seg.nii.gz", scan)
    args = (folder, "-o", results, "--checkpoint", tiny_checkpoint, "--slices", "0:1")
    assert segment(*args, "--skip-existing") == 0
    captured = capsys.readouterr()
    assert (results / "a_seg.nii.gz").read_bytes() == mine and (results / "b_seg.json").is_file()
    assert "1 done, 1 skipped, 0 failed of 2" in captured.out
    rows = {row["scan"]: row for row in table_rows(results / "medconddiff_volumes.csv")}
    assert rows["a"]["status"] == "skipped" and rows["a"]["note"].startswith("a_seg.nii.gz exists without")
    assert hidden_files(results) == []


def _disk_full_at(name):
    from medconddiff import nifti

    real_save = nifti.save_volume

    def save(path, *args, **kwargs):
        if Path(path).name == name:
            def fill(tmp):
                Path(tmp).write_bytes(b"\0" * 100)
                raise OSError(errno.ENOSPC, "No space left on device")
            return atomic_write(path, fill, overwrite=True)
        return real_save(path, *args, **kwargs)
    return save


def test_a_failed_overwrite_leaves_the_earlier_labels_with_their_sidecar(scan, tmp_path, tiny_checkpoint, capsys,
                                                                         monkeypatch):
    from medconddiff import nifti

    out = tmp_path / "seg.nii.gz"
    args = (scan, "-o", out, "--checkpoint", tiny_checkpoint, "--slices", "0:1", "--save-uncertainty")
    assert segment(*args) == 0
    before = {name: (tmp_path / name).read_bytes() for name in ("seg.nii.gz", "seg.json", "seg_uncertainty.nii.gz")}
    capsys.readouterr()
    for stopped_at in ("seg.nii.gz", "seg_uncertainty.nii.gz"):       # before and after the new labels are written
        monkeypatch.setattr(nifti, "save_volume", _disk_full_at(stopped_at))
        assert segment(*args, "--overwrite", "--seed", "5") == 2
        monkeypatch.undo()
        err = capsys.readouterr().err.strip()
        assert err == (f"medconddiff segment: error: cannot write {stopped_at}: the disk is full (no space left on "
                       "device); free space and run again"), err
        assert {name: (tmp_path / name).read_bytes() for name in before} == before
        assert hidden_files(tmp_path) == []                       # no marker (nothing was replaced), no staged file


# 3. A DICOM input's files and folder are inputs.

def test_no_output_replaces_or_joins_the_files_of_a_dicom_series_read(tmp_path, liver_volume, tiny_checkpoint, capsys):
    from tests.dicom_helpers import write_series

    image, _ = liver_volume
    series = tmp_path / "series"
    paths = write_series(series, image.astype(np.float32), np.diag([1.0, 1.0, 2.5, 1.0]))
    before = {p.name: p.read_bytes() for p in series.iterdir()}
    one = paths[2]
    for given in (series, paths[0]):         # the folder, or one of its files (which reads the whole series)
        for target, said in ((one, "which is an input"), (series / "seg.nii.gz", "into the DICOM folder series"),
                             (series / "seg.dcm", "into the DICOM folder series")):
            assert segment(given, "-o", target, "--checkpoint", tiny_checkpoint, "--overwrite") == 2
            err = capsys.readouterr().err.strip()
            assert said in err and len(err.splitlines()) == 1, err
    assert {p.name: p.read_bytes() for p in series.iterdir()} == before
    assert segment(series, "-o", tmp_path / "seg.nii.gz", "--checkpoint", tiny_checkpoint, "--slices", "0:1") == 0


# 4. train keeps an earlier run's record and log.

TINY_TRAIN = ["--backbone", "pvt_v2_b0", "--denoiser-channels", "16", "--stem-channels", "8", "--time-embed-dim",
              "32", "--num-train-timesteps", "100", "--epochs", "1", "--iterations-per-epoch", "1",
              "--train-batch-size", "2", "--patch-size", "32", "--val-every", "0", "--device", "cpu"]


@pytest.fixture
def pair(tmp_path, liver_volume):
    image, labels = liver_volume
    nib.save(nib.Nifti1Image(image.astype(np.int16), np.eye(4)), str(tmp_path / "img.nii.gz"))
    nib.save(nib.Nifti1Image(labels.astype(np.uint8), np.eye(4)), str(tmp_path / "lbl.nii.gz"))
    return ["--pair", str(tmp_path / "img.nii.gz"), str(tmp_path / "lbl.nii.gz")]


@pytest.mark.parametrize("own", ["config.json", "log.jsonl"])
def test_train_refuses_a_folder_with_an_earlier_record_or_log_and_starts_a_fresh_log(tmp_path, pair, capsys, own):
    run = tmp_path / "run"
    run.mkdir()
    (run / own).write_text('{"my": "own notes"}\n')
    assert main(["train", *pair, *TINY_TRAIN, "-o", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"{own} exists" in err and "--overwrite" in err and "--resume" not in err
    assert sorted(p.name for p in run.iterdir()) == [own] and (run / own).read_text() == '{"my": "own notes"}\n'
    assert main(["train", *pair, *TINY_TRAIN, "-o", str(run), "--overwrite"]) == 0
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert len(log) == 1 and "my" not in log[0] and log[0]["epoch"] == 1
    assert "my" not in json.loads((run / "config.json").read_text())


# 5. Targets are checked before the long work.

def test_benchmark_plan_and_train_check_their_targets_before_the_work(tmp_path, pair, capsys, monkeypatch):
    import medconddiff.benchmark as benchmark_module
    import medconddiff.dataset_layout as layout_module

    worked = []
    monkeypatch.setattr(benchmark_module, "run_benchmark", lambda *a, **k: worked.append("benchmark"))
    monkeypatch.setattr(layout_module, "describe_dataset", lambda *a, **k: worked.append("plan"))
    assert main(["benchmark", "--quick", "--json", str(tmp_path / "missing" / "b.json")]) == 2
    assert "b.json: its folder does not exist" in capsys.readouterr().err
    assert main(["plan", str(tmp_path), "--json", str(tmp_path / "missing" / "p.json")]) == 2
    assert "p.json: its folder does not exist" in capsys.readouterr().err
    assert worked == []
    half = tmp_path / "half.safetensors"
    half.write_bytes(b"precious")
    assert main(["train", *pair, *TINY_TRAIN, "-o", str(tmp_path / "run"), "--export-half", str(half)]) == 2
    assert "--export-half half.safetensors already exists" in capsys.readouterr().err
    assert half.read_bytes() == b"precious" and not (tmp_path / "run").exists()


# 6. A full, read-only or failing disk is one line naming the file; a cohort stops at a full disk.

@pytest.mark.parametrize("code, said", [(errno.ENOSPC, "the disk is full"), (errno.EDQUOT, "quota"),
                                        (errno.EXDEV, "across file systems"), (errno.EROFS, "read-only"),
                                        (errno.EIO, "input/output error")])
def test_storage_errors_are_one_line_naming_the_file_not_its_folder(tmp_path, code, said):
    folder = tmp_path / PATIENT_FOLDER
    folder.mkdir()

    def failing(tmp):
        raise OSError(code, os.strerror(code), str(tmp))

    with pytest.raises(StorageError) as info:
        atomic_write(folder / "seg.nii.gz", failing)
    assert str(info.value).startswith("cannot write seg.nii.gz: ") and said in str(info.value)
    assert info.value.errno == code and PATIENT_FOLDER not in str(info.value)
    assert list(folder.iterdir()) == []


def test_a_storage_error_met_outside_atomic_write_is_one_line_too(tmp_path):
    from medconddiff.commands.common import failure_report

    error = OSError(errno.EROFS, "Read-only file system", str(tmp_path / PATIENT_FOLDER / "out"))
    assert failure_report(error, "medconddiff segment: error") == (
        "medconddiff segment: error: cannot read or write out: the file system is read-only; write it elsewhere", 2)


def test_a_checkpoint_on_a_full_disk_is_one_line(tmp_path):
    from safetensors import SafetensorError

    def failing(tmp):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    with pytest.raises(StorageError, match=r"^cannot write last\.safetensors: the disk is full"):
        atomic_write(tmp_path / "last.safetensors", failing)


def test_a_cohort_stops_at_a_full_disk(scan, tmp_path, tiny_checkpoint, capsys, monkeypatch):
    import medconddiff.segmenter as segmenter_module
    from medconddiff import nifti

    folder, results = tmp_path / "cohort", tmp_path / "results"
    folder.mkdir()
    for name in "abc":
        (folder / f"{name}.nii.gz").write_bytes(scan.read_bytes())
    sampled = []
    real_run = segmenter_module.Segmenter.run
    monkeypatch.setattr(segmenter_module.Segmenter, "run", lambda self, *a, **k: sampled.append(1) or
                        real_run(self, *a, **k))
    monkeypatch.setattr(nifti, "save_volume", _disk_full_at("a_seg.nii.gz"))
    assert segment(folder, "-o", results, "--checkpoint", tiny_checkpoint, "--slices", "0:1") == 1
    captured = capsys.readouterr()
    assert len(sampled) == 1
    lines = captured.err.strip().splitlines()
    assert lines[0] == "a: FAILED: cannot write a_seg.nii.gz: the disk is full (no space left on device); free space " \
                       "and run again"
    assert lines[1].startswith("stopping: no space is left for outputs; 2 scan(s) not segmented") and len(lines) == 2
    assert "0 done, 0 skipped, 3 failed of 3" in captured.out
    rows = {row["scan"]: row for row in table_rows(results / "medconddiff_volumes.csv")}
    assert rows["c"]["status"] == "failed" and rows["c"]["note"] == "not segmented: the disk was full"


# 7. Durability: the written file and the rename reach the disk.

def test_atomic_write_fsyncs_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(
        "folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file") or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append("rename") or real_replace(a, b))
    atomic_write(tmp_path / "seg.nii.gz", lambda tmp: Path(tmp).write_bytes(b"labels"))
    assert events == ["file", "rename", "folder"]
    events.clear()
    write_json_atomic(tmp_path / "seg.json", {"a": 1})
    assert events == ["file", "rename", "folder"]


# 8. A link that leads nowhere is still the user's.

def test_a_dangling_link_is_not_replaced_without_overwrite(scan, tmp_path, tiny_checkpoint, capsys):
    link = tmp_path / "case_seg.nii.gz"
    link.symlink_to(tmp_path / "offline_share" / "case_seg.nii.gz")
    with pytest.raises(FileExistsError, match="a link to a file that is not there now"):
        atomic_write(link, lambda tmp: Path(tmp).write_bytes(b"x"))
    assert segment(scan, "-o", link, "--checkpoint", tiny_checkpoint) == 2
    assert "case_seg.nii.gz" in capsys.readouterr().err
    assert link.is_symlink() and os.readlink(link) == str(tmp_path / "offline_share" / "case_seg.nii.gz")
    atomic_write(link, lambda tmp: Path(tmp).write_bytes(b"x"), overwrite=True)
    assert not link.is_symlink() and link.read_bytes() == b"x"


# 9. check_target names the file, never its folder.

def test_check_target_names_the_file_and_only_says_its_folder(tmp_path):
    folder = tmp_path / PATIENT_FOLDER
    folder.mkdir()
    (folder / "seg.nii.gz").write_bytes(b"x")
    (folder / "afile").write_bytes(b"x")
    (folder / "adir.nii.gz").mkdir()
    cases = [(folder / "seg.nii.gz", {}, FileExistsError, "seg.nii.gz already exists; pass --overwrite"),
             (folder / "adir.nii.gz", {}, IsADirectoryError, "adir.nii.gz is a directory"),
             (folder / "missing" / "x.json", {}, FileNotFoundError, "x.json: its folder does not exist"),
             (folder / "afile" / "x.json", {"creates_folders": True}, NotADirectoryError,
              "x.json: a folder on its way is a file, so no folder can be made there")]
    for path, options, kind, said in cases:
        with pytest.raises(kind) as info:
            check_target(path, False, **options)
        assert str(info.value).startswith(said) and PATIENT_FOLDER not in str(info.value)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "access", lambda *a: False)          # a folder the user cannot write into
        with pytest.raises(PermissionError) as info:
            check_target(folder / "new.json", False)
    assert str(info.value) == "new.json: cannot write into its folder (permission denied)"
