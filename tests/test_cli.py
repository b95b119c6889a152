"""`medconddiff segment` end to end on a real scan cut, and every bad input the issue names."""

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medconddiff.cli import main


@pytest.fixture
def scan(tmp_path, liver_volume):
    """The real liver CT cut, saved with a non-trivial affine (spacing, flip, offset)."""
    image, _ = liver_volume
    affine = np.diag([-0.8, 0.8, 2.5, 1.0])
    affine[:3, 3] = [10.0, -20.0, 30.0]
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(image.astype(np.int16), affine), str(path))
    return path


def segment(*args):
    return main(["segment", *map(str, args), "--steps", "2", "--quiet", "--device", "cpu"])


def test_segment_writes_labels_uncertainty_trajectory_and_sidecar(scan, tmp_path, tiny_checkpoint, capsys):
    out = tmp_path / "out" / "seg.nii.gz"
    code = segment(scan, "-o", out, "--checkpoint", tiny_checkpoint, "--save-uncertainty", "--save-trajectory",
                   "--seed", "3", "--consensus", "vote_gated")
    assert code == 0, capsys.readouterr().err
    source = nib.load(str(scan))
    labels = nib.load(str(out))
    assert labels.shape == source.shape
    np.testing.assert_allclose(labels.affine, source.affine)
    assert labels.get_data_dtype() == np.uint8 and np.asarray(labels.dataobj).max() < 3
    assert labels.header.get_intent()[0] == "label"                 # viewers open it as a label map
    unc = nib.load(str(tmp_path / "out" / "seg_uncertainty.nii.gz"))
    assert unc.shape == source.shape
    trajectory = nib.load(str(tmp_path / "out" / "seg_trajectory.nii.gz"))
    assert trajectory.shape == source.shape + (2,)
    sidecar = json.loads((tmp_path / "out" / "seg.json").read_text())
    assert sidecar["sampling"]["seed"] == 3 and sidecar["sampling"]["consensus"] == "vote_gated"
    assert len(sidecar["checkpoint_sha256"]) == 64 and sidecar["input_shape"] == list(source.shape)
    assert set(sidecar["class_volumes"]) == {"background", "liver", "tumour"}
    assert sidecar["geometry"]["file_axis_codes"] == ["L", "A", "S"] and sidecar["geometry"]["slicing"] == "axial"
    assert sidecar["plan"]["target_spacing"] == [1.0, 1.0]
    # Files by name, never by folder (a folder may be named after the patient).
    assert sidecar["input"] == scan.name and sidecar["checkpoint"] == tiny_checkpoint.name
    assert sidecar["outputs"] == {"labels": "seg.nii.gz", "uncertainty": "seg_uncertainty.nii.gz",
                                  "trajectory": "seg_trajectory.nii.gz"}
    assert str(tmp_path) not in json.dumps(sidecar)

    # The files hold what the Python API computes for the same scan and settings.
    from medconddiff.config import SamplingConfig
    from medconddiff.nifti import load_volume
    from medconddiff.segmenter import Segmenter

    volume, meta = load_volume(scan)
    result = Segmenter.from_checkpoint(tiny_checkpoint, device="cpu").segment(
        volume, SamplingConfig(steps=2, seed=3, consensus="vote_gated"), meta=meta)
    np.testing.assert_array_equal(np.asarray(labels.dataobj), result.labels)
    steps = np.asarray(trajectory.dataobj)
    for step in range(2):
        np.testing.assert_array_equal(result.slice_view(steps[..., step]), result.step_labels_on_scan(step))
    total = sum(v["voxels"] for v in sidecar["class_volumes"].values())
    assert total == int(np.prod(source.shape))
    assert sidecar["class_volumes"]["liver"]["voxels"] == int((result.labels == 1).sum())


def test_existing_output_is_not_overwritten(scan, tmp_path, tiny_checkpoint, capsys):
    out = tmp_path / "seg.nii.gz"
    out.write_bytes(b"user data")
    assert segment(scan, "-o", out, "--checkpoint", tiny_checkpoint) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"user data"
    assert segment(scan, "-o", out, "--checkpoint", tiny_checkpoint, "--overwrite") == 0
    assert nib.load(str(out)).shape == nib.load(str(scan)).shape


def test_no_output_replaces_an_input_or_another_scans_output_even_with_overwrite(scan, tmp_path, tiny_checkpoint,
                                                                                 capsys):
    before = scan.read_bytes()
    assert segment(scan, "-o", scan, "--checkpoint", tiny_checkpoint, "--overwrite") == 2
    assert "which is an input" in capsys.readouterr().err and scan.read_bytes() == before
    for folder in ("d1", "d2"):          # two patients' scans of one file name
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "scan.nii.gz").write_bytes(before)
    out = tmp_path / "out"
    assert segment(tmp_path / "d1" / "scan.nii.gz", tmp_path / "d2" / "scan.nii.gz", "-o", out,
                   "--checkpoint", tiny_checkpoint, "--overwrite") == 2
    assert "would both write" in capsys.readouterr().err and not out.exists()


def test_folder_in_folder_out(scan, tmp_path, tiny_checkpoint, capsys):
    folder = tmp_path / "scans"
    folder.mkdir()
    for name in ("a", "b"):
        (folder / f"{name}.nii.gz").write_bytes(scan.read_bytes())
    assert segment(folder, "-o", tmp_path / "results", "--checkpoint", tiny_checkpoint, "--slices", "0:2") == 0
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["a_seg.json", "a_seg.nii.gz",
                                                                        "b_seg.json", "b_seg.nii.gz",
                                                                        "medconddiff_volumes.csv"]
    assert "2 done, 0 skipped, 0 failed" in capsys.readouterr().out


def test_a_cohort_survives_a_corrupt_scan_and_resumes_with_skip_existing(scan, tmp_path, tiny_checkpoint, capsys):
    folder = tmp_path / "cohort"
    folder.mkdir()
    data = scan.read_bytes()
    (folder / "a.nii.gz").write_bytes(data)
    (folder / "b.nii.gz").write_bytes(data[: len(data) // 2])      # truncated, in the middle of the cohort
    (folder / "c.nii.gz").write_bytes(data)
    results = tmp_path / "results"
    args = (folder, "-o", results, "--checkpoint", tiny_checkpoint, "--slices", "0:1")
    assert segment(*args) == 1
    captured = capsys.readouterr()
    failures = [line for line in captured.err.splitlines() if "FAILED" in line]
    assert len(failures) == 1 and failures[0].startswith("b: FAILED:") and "truncated" in failures[0]
    assert "2 done, 0 skipped, 1 failed of 3" in captured.out
    assert sorted(p.name for p in results.glob("*.nii.gz")) == ["a_seg.nii.gz", "c_seg.nii.gz"]
    before = (results / "a_seg.nii.gz").stat().st_mtime_ns

    (folder / "b.nii.gz").write_bytes(data)                          # the user fixes the scan
    assert segment(*args) == 2                                      # outputs exist: refused, nothing lost
    assert "--skip-existing" in capsys.readouterr().err
    assert segment(*args, "--skip-existing") == 0
    assert "1 done, 2 skipped, 0 failed of 3" in capsys.readouterr().out
    assert (results / "a_seg.nii.gz").stat().st_mtime_ns == before
    assert (results / "b_seg.nii.gz").is_file()
    # The table tables every scan, the skipped ones from their sidecars.
    rows = {row["scan"]: row for row in table_rows(results / "medconddiff_volumes.csv")}
    assert [rows[name]["status"] for name in "abc"] == ["skipped", "done", "skipped"]
    for name in "abc":
        volumes = json.loads((results / f"{name}_seg.json").read_text())["class_volumes"]
        assert rows[name]["liver ml"] == f"{volumes['liver']['ml']:.3f}" and rows[name]["slices"] == "1"


def test_a_run_stopped_while_writing_is_finished_by_skip_existing_and_leaves_no_stale_sidecar(
        scan, tmp_path, tiny_checkpoint, capsys, monkeypatch):
    """Ctrl-C between the labels and the sidecar left labels alone, which --skip-existing took for a finished
    scan; an interrupted --overwrite left the new labels beside the old sidecar (another seed, other slices).
    Outputs are now staged and moved together: a stop while writing them leaves the earlier ones whole, and a
    stop while moving them leaves the pending marker, for --skip-existing to segment the scan again."""
    folder, results = tmp_path / "cohort", tmp_path / "results"
    folder.mkdir()
    for name in "ab":
        (folder / f"{name}.nii.gz").write_bytes(scan.read_bytes())
    args = (folder, "-o", results, "--checkpoint", tiny_checkpoint, "--slices", "0:1", "--save-uncertainty")
    assert segment(*args) == 0
    old_sidecar = json.loads((results / "b_seg.json").read_text())
    old_labels = (results / "b_seg.nii.gz").read_bytes()
    from medconddiff import nifti

    real_save = nifti.save_volume

    def stopped_at_b_uncertainty(path, *a, **k):
        if Path(path).name == "b_seg_uncertainty.nii.gz":
            raise KeyboardInterrupt
        return real_save(path, *a, **k)

    monkeypatch.setattr(nifti, "save_volume", stopped_at_b_uncertainty)
    assert segment(*args, "--overwrite", "--seed", "7") == 130          # Ctrl-C
    monkeypatch.undo()
    assert (results / "b_seg.nii.gz").read_bytes() == old_labels                      # the earlier outputs, whole
    assert json.loads((results / "b_seg.json").read_text()) == old_sidecar
    assert old_sidecar["sampling"]["seed"] == 0
    assert not [p.name for p in results.iterdir() if p.name.startswith(".")]
    import os

    real_replace = os.replace

    def stopped_before_b_sidecar(source, target):
        if Path(target) == results / "b_seg.json":
            raise KeyboardInterrupt
        return real_replace(source, target)

    monkeypatch.setattr(os, "replace", stopped_before_b_sidecar)
    assert segment(*args, "--overwrite", "--seed", "7") == 130          # Ctrl-C while moving b's outputs
    monkeypatch.undo()
    assert (results / ".b_seg.nii.gz.medconddiff-pending").exists()
    capsys.readouterr()
    assert segment(*args, "--skip-existing", "--seed", "7") == 0
    captured = capsys.readouterr()
    assert "1 done, 1 skipped, 0 failed of 2" in captured.out
    assert "b: a run stopped while writing its outputs" in captured.err
    assert json.loads((results / "b_seg.json").read_text())["sampling"]["seed"] == 7
    assert not [p.name for p in results.iterdir() if p.name.startswith(".")]       # marker and staging gone


def test_a_cohort_written_into_its_own_folder_resumes_without_taking_its_results_for_scans(scan, tmp_path,
                                                                                           tiny_checkpoint, capsys):
    folder = tmp_path / "cohort"
    folder.mkdir()
    for name in "ab":
        (folder / f"{name}.nii.gz").write_bytes(scan.read_bytes())
    args = (folder, "-o", folder, "--checkpoint", tiny_checkpoint, "--slices", "0:1", "--save-uncertainty")
    assert segment(*args) == 0
    capsys.readouterr()
    assert segment(*args, "--skip-existing") == 0             # was: "a would write a_seg.nii.gz, which is an input"
    captured = capsys.readouterr()
    assert "0 done, 2 skipped, 0 failed of 2" in captured.out
    assert "left out 4 file(s) that earlier runs wrote here" in captured.err


def table_rows(path):
    import csv

    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_a_cohort_tables_each_scan_and_why_one_failed(scan, tmp_path, tiny_checkpoint, capsys):
    folder = tmp_path / "cohort"
    folder.mkdir()
    data = scan.read_bytes()
    (folder / "a.nii.gz").write_bytes(data)
    (folder / "b.nii.gz").write_bytes(data[: len(data) // 2])
    results = tmp_path / "results"
    args = (folder, "-o", results, "--checkpoint", tiny_checkpoint, "--slices", "0:2")
    assert segment(*args) == 1
    assert "class volumes of every scan" in capsys.readouterr().out
    table = results / "medconddiff_volumes.csv"
    a, b = table_rows(table)
    assert list(a) == ["scan", "labels", "status", "slices", "complete", "seconds", "liver ml", "tumour ml", "note"]
    labels = nib.load(str(results / "a_seg.nii.gz"))
    voxel_ml = float(np.prod(labels.header.get_zooms()[:3])) / 1000
    counts = np.bincount(np.asarray(labels.dataobj, np.uint8).ravel(), minlength=3)
    assert (a["scan"], a["labels"], a["status"], a["slices"], a["complete"], a["note"]) == (
        "a", "a_seg.nii.gz", "done", "2", "True", "")
    assert float(a["liver ml"]) == pytest.approx(counts[1] * voxel_ml, abs=1e-3)
    assert float(a["tumour ml"]) == pytest.approx(counts[2] * voxel_ml, abs=1e-3)
    assert b["status"] == "failed" and "truncated" in b["note"] and not b["note"].startswith("b:")
    assert b["liver ml"] == ""
    # A table left from an earlier run is the user's until they say otherwise.
    (results / "a_seg.nii.gz").unlink()
    (results / "a_seg.json").unlink()
    table.write_text("someone's notes")
    assert segment(*args) == 2
    assert "medconddiff_volumes.csv exists" in capsys.readouterr().err
    assert table.read_text() == "someone's notes" and not (results / "a_seg.nii.gz").exists()


def test_a_multi_channel_model_takes_a_4d_file_or_one_file_per_channel(tmp_path, liver_volume, capsys):
    from medconddiff.config import PreprocessPlan
    from tests.conftest import save_tiny, tiny_config

    plan = PreprocessPlan(channel_names=("FLAIR", "T1"), intensity=("zscore",))
    checkpoint = save_tiny(tmp_path / "mri.safetensors", tiny_config(plan=plan))
    image, _ = liver_volume
    four_d = tmp_path / "case.nii.gz"
    nib.save(nib.Nifti1Image(np.stack([image, 2 * image], -1).astype(np.float32), np.eye(4)), str(four_d))
    assert segment(four_d, "-o", tmp_path / "a.nii.gz", "--checkpoint", checkpoint, "--slices", "0:2") == 0
    channel_files = []
    for c, factor in enumerate((1, 2)):
        channel_files.append(tmp_path / f"case_000{c}.nii.gz")
        nib.save(nib.Nifti1Image((factor * image).astype(np.float32), np.eye(4)), str(channel_files[-1]))
    assert segment(*channel_files, "-o", tmp_path / "b.nii.gz", "--checkpoint", checkpoint, "--slices", "0:2") == 0
    np.testing.assert_array_equal(nib.load(str(tmp_path / "a.nii.gz")).get_fdata(),
                                  nib.load(str(tmp_path / "b.nii.gz")).get_fdata())
    one_channel = tmp_path / "t1.nii.gz"
    nib.save(nib.Nifti1Image(image.astype(np.float32), np.eye(4)), str(one_channel))
    assert segment(one_channel, "-o", tmp_path / "c.nii.gz", "--checkpoint", checkpoint) == 2
    err = capsys.readouterr().err
    assert "expects 2 channels" in err and "1" in err


@pytest.mark.parametrize("flags, message", [
    (["--scheduler", "ddpm", "--eta", "0.5"], "eta applies to the DDIM scheduler only"),
    (["--eta", "-1"], "eta must be 0 or more"),
    (["--steps", "101"], "cannot exceed the 100 timesteps"),
    (["--skip-first", "5"], "skip_first must be in"),
    (["--threads", "-1"], "--threads must be at least 1"),
    (["--device", "mps"], "this tool runs on cpu or cuda"),
])
def test_invalid_settings_are_one_clear_line(scan, tmp_path, tiny_checkpoint, capsys, flags, message):
    out = tmp_path / "seg.nii.gz"
    # After segment()'s own --steps 2, so these flags win.
    assert main(["segment", str(scan), "-o", str(out), "--checkpoint", str(tiny_checkpoint), "--quiet", "--steps", "2",
                 *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


def bad_files(tmp_path, scan):
    truncated = tmp_path / "truncated.nii.gz"
    data = scan.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    not_nifti = tmp_path / "notes.nii.gz"
    not_nifti.write_bytes(gzip.compress(b"this is a text file, not an image"))
    text = tmp_path / "plain.nii"
    text.write_text("hello")
    return {"missing": tmp_path / "missing.nii.gz", "truncated": truncated, "not a NIfTI": not_nifti,
            "text": text}


def test_bad_inputs_fail_cleanly_without_partial_output(scan, tmp_path, tiny_checkpoint, capsys):
    for name, path in bad_files(tmp_path, scan).items():
        out = tmp_path / f"out_{name.replace(' ', '_')}.nii.gz"
        assert segment(path, "-o", out, "--checkpoint", tiny_checkpoint) == 2, name
        err = capsys.readouterr().err.strip()
        assert err.startswith("medconddiff segment: error:") and len(err.splitlines()) == 1, err
        assert not out.exists()
        assert not any(p.name.startswith(".") for p in tmp_path.iterdir()), "temp files left behind"


def test_four_d_scan_needs_a_channel(tmp_path, tiny_checkpoint, liver_volume, capsys):
    image, _ = liver_volume
    path = tmp_path / "four_d.nii.gz"
    nib.save(nib.Nifti1Image(np.stack([image, image * 0.5], axis=-1).astype(np.float32), np.eye(4)), str(path))
    out = tmp_path / "seg.nii.gz"
    assert segment(path, "-o", out, "--checkpoint", tiny_checkpoint) == 2
    assert "channel=0..1" in capsys.readouterr().err
    assert not out.exists()
    assert segment(path, "-o", out, "--checkpoint", tiny_checkpoint, "--channel", "1") == 0
    assert nib.load(str(out)).shape == image.shape


def test_two_d_scan_is_one_slice(tmp_path, tiny_checkpoint, liver_volume):
    image, _ = liver_volume
    path = tmp_path / "slice.nii.gz"
    nib.save(nib.Nifti1Image(image[..., 0].astype(np.float32), np.diag([0.7, 0.7, 1, 1])), str(path))
    out = tmp_path / "slice_seg.nii.gz"
    assert segment(path, "-o", out, "--checkpoint", tiny_checkpoint) == 0
    assert nib.load(str(out)).shape == image.shape[:2]


def test_nan_and_constant_volumes(tmp_path, tiny_checkpoint, liver_volume, capsys):
    image, _ = liver_volume
    nan_scan = image.astype(np.float32).copy()
    nan_scan[:4] = np.nan
    for name, data in {"nan": nan_scan, "constant": np.full(image.shape, -1000.0, np.float32)}.items():
        path = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
        assert segment(path, "-o", tmp_path / f"{name}_seg.nii.gz", "--checkpoint", tiny_checkpoint) == 0
    all_nan = tmp_path / "all_nan.nii.gz"
    nib.save(nib.Nifti1Image(np.full((8, 8, 2), np.nan, np.float32), np.eye(4)), str(all_nan))
    assert segment(all_nan, "-o", tmp_path / "x.nii.gz", "--checkpoint", tiny_checkpoint) == 2
    assert "finite" in capsys.readouterr().err


def test_an_output_folder_that_cannot_be_made_fails_before_any_sampling(scan, tmp_path, tiny_checkpoint, capsys,
                                                                         monkeypatch):
    import medconddiff.segmenter as segmenter_module

    blocker = tmp_path / "results"
    blocker.write_text("a file where the output folder would go")
    sampled = []
    monkeypatch.setattr(segmenter_module.Segmenter, "run", lambda *a, **k: sampled.append(1))
    assert segment(scan, "-o", blocker / "ct" / "seg.nii.gz", "--checkpoint", tiny_checkpoint) == 2
    assert "cannot create the output folder" in capsys.readouterr().err
    assert not sampled
    assert segment(scan, "-o", blocker / "seg.nii.gz", "--checkpoint", tiny_checkpoint) == 2
    assert "it is a file, not a folder" in capsys.readouterr().err
    assert not sampled and blocker.read_text().startswith("a file")


def test_wrong_checkpoint(scan, tmp_path, capsys):
    bogus = tmp_path / "model.safetensors"
    bogus.write_bytes(np.random.default_rng(0).bytes(256))
    out = tmp_path / "seg.nii.gz"
    assert segment(scan, "-o", out, "--checkpoint", bogus) == 2
    assert "checkpoint" in capsys.readouterr().err
    assert not out.exists()


def test_flags_come_from_the_dataclasses(capsys):
    with pytest.raises(SystemExit):
        main(["segment", "--help"])
    text = capsys.readouterr().out
    for flag in ("--steps", "--consensus", "--skip-first", "--num-seeds", "--seed", "--scheduler", "--eta"):
        assert flag in text
    with pytest.raises(SystemExit):
        main(["segment", "--consensus", "median"])


# ----------------------------------------------------------------------------- one slice syntax

def test_segment_slices_written_inclusive_or_half_open_give_identical_output(scan, tmp_path, tiny_checkpoint, capsys):
    """`--slices 1-3` (inclusive) and `--slices 1:4` (half-open) are the same three slices."""
    outputs = {}
    for name, slices in (("dash", "1-3"), ("colon", "1:4"), ("list", "1, 2:4")):
        out = tmp_path / f"{name}.nii.gz"
        assert segment(scan, "-o", out, "--checkpoint", tiny_checkpoint, "--slices", slices,
                       "--save-uncertainty") == 0, capsys.readouterr().err
        sidecar = json.loads((tmp_path / f"{name}.json").read_text())
        outputs[name] = (np.asarray(nib.load(str(out)).dataobj),
                         np.asarray(nib.load(str(tmp_path / f"{name}_uncertainty.nii.gz")).dataobj),
                         sidecar["slices"])
    for name in ("colon", "list"):
        np.testing.assert_array_equal(outputs[name][0], outputs["dash"][0])
        np.testing.assert_array_equal(outputs[name][1], outputs["dash"][1])
        assert outputs[name][2] == outputs["dash"][2] == [1, 2, 3]


@pytest.mark.parametrize("slices, message", [
    ("4-6", "slice(s) 6 are outside the 6 slices of scan (0 to 5)"),
    ("2:9", "outside the 6 slices"),
    ("3-1", "is empty"),
    ("-2", "negative indices are not accepted"),
])
def test_bad_slice_lists_are_one_line_naming_the_flag(scan, tmp_path, tiny_checkpoint, capsys, slices, message):
    out = tmp_path / "seg.nii.gz"
    assert segment(scan, "-o", out, "--checkpoint", tiny_checkpoint, f"--slices={slices}") == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "--slices" in err and len(err.splitlines()) == 1, err
    assert not out.exists()


# ----------------------------------------------------------------------------- user errors vs bugs

def _bug(*args, **kwargs):
    raise ValueError("bug")


def test_a_bug_keeps_its_traceback_and_exits_1(scan, tmp_path, tiny_checkpoint, capsys, monkeypatch):
    from medconddiff.segmenter import Segmenter

    monkeypatch.setattr(Segmenter, "run", _bug)
    assert segment(scan, "-o", tmp_path / "seg.nii.gz", "--checkpoint", tiny_checkpoint) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "ValueError: bug" in err
    assert "internal error" in err.splitlines()[-1]
    assert not (tmp_path / "seg.nii.gz").exists()


def test_user_errors_stay_one_line_with_exit_2(scan, tmp_path, tiny_checkpoint, capsys):
    out = tmp_path / "seg.nii.gz"
    (tmp_path / "folder.nii.gz").mkdir()
    for flags, message in ((["--device", "gpu"], "--device 'gpu' is not a device"),
                           (["--steps", "0"], "steps must be at least 1"),
                           (["-o", tmp_path / "seg.txt"], "must end with .nii or .nii.gz"),
                           (["-o", tmp_path / "folder.nii.gz", "--overwrite"], "is a folder")):
        # Not through segment(): its own --device cpu would come last and win.
        assert main(["segment", str(scan), "-o", str(out), "--checkpoint", str(tiny_checkpoint), "--quiet",
                     "--steps", "2", *map(str, flags)]) == 2, flags
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert not out.exists() and not (tmp_path / "seg.txt").exists()
    # The Python API says the same in one line, not with torch's RuntimeError.
    from medconddiff.errors import ConfigError
    from medconddiff.segmenter import Segmenter

    with pytest.raises(ConfigError, match="'gpu' is not a device"):
        Segmenter.from_checkpoint(tiny_checkpoint, device="gpu")


def test_in_a_cohort_a_bug_is_reported_with_its_traceback_and_the_others_go_on(scan, tmp_path, tiny_checkpoint,
                                                                               capsys, monkeypatch):
    from medconddiff.segmenter import Segmenter

    folder = tmp_path / "cohort"
    folder.mkdir()
    for name in ("a", "b", "c"):
        (folder / f"{name}.nii.gz").write_bytes(scan.read_bytes())
    real_run = Segmenter.run
    calls = []

    def run_with_a_bug_on_the_second_scan(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("shape bug deep inside")
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(Segmenter, "run", run_with_a_bug_on_the_second_scan)
    assert segment(folder, "-o", tmp_path / "results", "--checkpoint", tiny_checkpoint, "--slices", "0:1") == 1
    captured = capsys.readouterr()
    assert "Traceback (most recent call last)" in captured.err and "ValueError: shape bug deep inside" in captured.err
    failures = [line for line in captured.err.splitlines() if "FAILED" in line]
    assert len(failures) == 1 and failures[0].startswith("b: FAILED: internal error")
    assert "2 done, 0 skipped, 1 failed of 3" in captured.out
    assert sorted(p.name for p in (tmp_path / "results").glob("*.nii.gz")) == ["a_seg.nii.gz", "c_seg.nii.gz"]
    notes = {row["scan"]: row["note"] for row in table_rows(tmp_path / "results" / "medconddiff_volumes.csv")}
    assert notes["b"].startswith("internal error (ValueError: shape bug deep inside)")    # not "Traceback (most …"


@pytest.fixture
def pairs_dataset(tmp_path, liver_volume):
    image, labels = liver_volume
    folder = tmp_path / "pairs"
    folder.mkdir()
    for name in ("case1", "case2"):
        nib.save(nib.Nifti1Image(image.astype(np.int16), np.eye(4)), str(folder / f"{name}_image.nii.gz"))
        nib.save(nib.Nifti1Image(labels.astype(np.uint8), np.eye(4)), str(folder / f"{name}_label.nii.gz"))
    return folder


def test_evaluate_reports_a_bug_with_its_traceback_and_a_user_error_in_one_line(pairs_dataset, tiny_checkpoint,
                                                                               capsys, monkeypatch):
    import medconddiff.evaluation

    base = ["evaluate", str(pairs_dataset), "--checkpoint", str(tiny_checkpoint), "--device", "cpu", "--steps", "2"]
    assert main([*base, "--slices", "0:9"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "case1" in err and "outside the 6 slices" in err, err
    monkeypatch.setattr(medconddiff.evaluation, "evaluate_volume", _bug)
    assert main(base) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "ValueError: bug" in err


def test_the_cli_error_type_is_the_project_s_user_error():
    from medconddiff.cli import UserError, user_error_types as cli_user_error_types
    from medconddiff.errors import UserInputError, user_error_types

    assert UserError is UserInputError and cli_user_error_types is user_error_types
    assert ValueError not in user_error_types() and RuntimeError not in user_error_types()


def test_benchmark_settings_are_user_errors(capsys):
    assert main(["benchmark", "--quick", "--repeats", "0", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "repeats must be at least 1" in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("build", [
    lambda: __import__("medconddiff.config", fromlist=["x"]).SamplingConfig(steps=0),
    lambda: __import__("medconddiff.config", fromlist=["x"]).PreprocessPlan(slicing="oblique"),
    lambda: __import__("medconddiff.config", fromlist=["x"]).ModelConfig(family="voxel"),
    lambda: __import__("medconddiff.config", fromlist=["x"]).DiffusionConfig(schedule="cubic"),
    lambda: __import__("medconddiff.config", fromlist=["x"]).TrainConfig(patch_size=30),
    lambda: __import__("medconddiff.config", fromlist=["x"]).dataclass_from_dict(
        __import__("medconddiff.config", fromlist=["x"]).SamplingConfig, {"stepz": 3}),
    lambda: __import__("medconddiff.finetune", fromlist=["x"]).channel_names_of_kind("PET", ("CT",)),
    lambda: __import__("medconddiff.training_data", fromlist=["x"]).TrainingData.from_sources(None, []),
])
def test_settings_a_user_can_get_wrong_raise_a_config_error(build):
    from medconddiff.errors import ConfigError

    with pytest.raises(ConfigError):
        build()


# ----------------------------------------------------------------------------- import structure

COMMAND_MODULES = ("segment", "train", "finetune", "evaluate", "benchmark", "plan", "common")


@pytest.mark.parametrize("name", COMMAND_MODULES)
def test_each_command_module_imports_alone_without_the_cli_or_another_command(name):
    """`commands/*` share helpers through commands/common.py only: no module (even inside a function)
    imports medconddiff.cli, which loads the commands, or another command module."""
    import ast
    import subprocess
    import sys
    from pathlib import Path

    import medconddiff.commands

    source = Path(medconddiff.commands.__file__).parent / f"{name}.py"
    imported = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = ["medconddiff", "commands"][: 2 - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            imported.add(module)
            imported.update(f"{module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
    allowed = {"medconddiff.commands.common", f"medconddiff.commands.{name}"}
    forbidden = {m for m in imported if m == "medconddiff.cli"
                 or (m.startswith("medconddiff.commands.") and m.split(".")[2] in COMMAND_MODULES
                     and ".".join(m.split(".")[:3]) not in allowed)}
    assert not forbidden, f"commands/{name}.py imports {sorted(forbidden)}"

    check = (f"import sys, medconddiff.commands.{name} as m; m.add_arguments if {name!r} != 'common' else None; "
             "print(sorted(k for k in sys.modules if k == 'medconddiff.cli' or (k.startswith('medconddiff.commands.') "
             f"and k not in ('medconddiff.commands.common', 'medconddiff.commands.{name}'))))")
    loaded = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]", f"importing commands/{name}.py loads {loaded}"


def test_train_reads_slice_lists_like_every_other_command(tmp_path, liver_volume, capsys):
    image, labels = liver_volume
    nib.save(nib.Nifti1Image(image.astype(np.int16), np.eye(4)), str(tmp_path / "img.nii.gz"))
    nib.save(nib.Nifti1Image(labels.astype(np.uint8), np.eye(4)), str(tmp_path / "lbl.nii.gz"))
    tiny = ["--pair", str(tmp_path / "img.nii.gz"), str(tmp_path / "lbl.nii.gz"), "--backbone", "pvt_v2_b0",
            "--denoiser-channels", "16", "--stem-channels", "8", "--time-embed-dim", "32", "--num-train-timesteps",
            "100", "--epochs", "1", "--iterations-per-epoch", "1", "--train-batch-size", "2", "--patch-size", "32",
            "--val-every", "0", "--device", "cpu"]
    for flags, message in ((["--train-slices", "0:2,,x"], "--train-slices '0:2,,x': cannot read 'x'"),
                           (["--val-slices", "4-9"],
                            "--val-slices '4-9': slice(s) 6–9 are outside the 6 slices of img"),
                           (["--train-slices", "0-9"], "outside the 6 slices of img")):
        assert main(["train", *tiny, "-o", str(tmp_path / "bad"), *flags]) == 2, flags
        assert not (tmp_path / "bad").exists()
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert main(["train", *tiny, "-o", str(tmp_path / "run"), "--train-slices", "0-1, 4:6"]) == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["provenance"]["train_slices"] == "0-1, 4:6"


def test_the_command_line_prints_this_packages_warnings_as_one_plain_line():
    import warnings

    from medconddiff import cli, preprocess

    with cli._plain_warnings():
        ours = warnings.formatwarning("1 NaN/Inf voxels were replaced", UserWarning, preprocess.__file__, 291)
        theirs = warnings.formatwarning("old API", FutureWarning, warnings.__file__, 7)
    assert ours == "medconddiff: warning: 1 NaN/Inf voxels were replaced\n"
    assert "FutureWarning: old API" in theirs and warnings.__file__ in theirs
    assert warnings.formatwarning("x", UserWarning, preprocess.__file__, 1) != ours   # restored afterwards


def test_importing_timm_prints_no_deprecation_a_user_cannot_act_on():
    """timm's import raises torch's torch.jit.interface FutureWarning; every run printed it at the top."""
    import subprocess
    import sys

    code = "from medconddiff.backbone import import_timm; import_timm()"
    done = subprocess.run([sys.executable, "-W", "error::FutureWarning", "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_outputs_keep_the_scans_geometry_but_not_its_header_text(tmp_path, liver_volume, tiny_checkpoint, capsys):
    """Converters write what they like into a NIfTI's free-text fields (acquisition times, at times a
    name): the labels and maps made from a scan carry its geometry and codes, not that text."""
    image, _ = liver_volume
    affine = np.diag([-0.8, 0.8, 2.5, 1.0])
    scan_image = nib.Nifti1Image(image.astype(np.int16), affine)
    scan_image.header["descrip"] = b"Zyxwvut^Qqpatientname 19230417 TE=2.5"
    scan_image.header["aux_file"] = b"PID-98765-XQ"
    # A comment extension (ecode 6), where converters also keep whole DICOM headers (ecode 2).
    scan_image.header.extensions.append(nib.nifti1.Nifti1Extension(6, b"PatientName=Zyxwvut^Qqpatientname"))
    scan_image.header.set_qform(affine, code=1)
    nib.save(scan_image, str(tmp_path / "scan.nii.gz"))
    out = tmp_path / "seg.nii.gz"
    assert segment(tmp_path / "scan.nii.gz", "-o", out, "--checkpoint", tiny_checkpoint, "--slices", "1:3",
                   "--save-uncertainty", "--save-trajectory") == 0, capsys.readouterr().err
    for name in ("seg.nii.gz", "seg_uncertainty.nii.gz", "seg_trajectory.nii.gz"):
        header = nib.load(str(tmp_path / name)).header
        assert header["descrip"].tobytes().strip(b"\0") == b"" and header["aux_file"].tobytes().strip(b"\0") == b""
        assert len(header.extensions) == 0
        assert b"Zyxwvut" not in gzip.decompress((tmp_path / name).read_bytes())
        np.testing.assert_allclose(header.get_best_affine(), affine)
        assert int(header["qform_code"]) == 1


# ----------------------------------------------------------------------------- damaged or unusual input files


def _one_line_error(capsys):
    err = capsys.readouterr().err.strip()
    assert err.startswith("medconddiff segment: error:") and len(err.splitlines()) == 1, err
    assert "internal error" not in err and "Traceback" not in err, err
    return err


def test_a_scan_whose_gzip_stream_has_a_flipped_byte_is_refused(scan, tmp_path, tiny_checkpoint, capsys):
    """Such a file used to be segmented with half its voxels wrong and exit 0 (gzip's CRC unread)."""
    whole = scan.read_bytes()
    source = np.asanyarray(nib.load(str(scan)).dataobj)
    damaged = tmp_path / "damaged.nii.gz"
    for position in range(len(whole) // 2, len(whole) // 2 + 64):     # one that nibabel alone reads silently
        flipped = bytearray(whole)
        flipped[position] ^= 0xFF
        damaged.write_bytes(bytes(flipped))
        try:
            if not np.array_equal(np.asanyarray(nib.load(str(damaged)).dataobj), source):
                break
        except Exception:
            continue
    else:
        pytest.fail("no flipped byte that nibabel reads silently")
    out = tmp_path / "seg.nii.gz"
    assert segment(damaged, "-o", out, "--checkpoint", tiny_checkpoint) == 2
    assert "damaged.nii.gz: compressed data are corrupt" in _one_line_error(capsys)
    assert not out.exists()


@pytest.mark.parametrize("srow_x", [[0.0, 0.0, 0.0, 0.0], [float("nan"), 0.0, 0.0, 0.0]], ids=["singular", "nan"])
def test_a_scan_with_a_singular_or_nan_affine_is_segmented_in_voxel_order(tmp_path, liver_volume, tiny_checkpoint,
                                                                          capsys, srow_x):
    """README: processed in voxel order with a warning, written back with codes 0 (was an internal error)."""
    image, _ = liver_volume
    header = nib.Nifti1Header()
    header.set_data_shape(image.shape)
    header.set_data_dtype(np.int16)
    header.set_zooms((0.8, 0.8, 2.5))
    header["sform_code"], header["qform_code"] = 1, 0
    header["srow_x"], header["srow_y"], header["srow_z"] = srow_x, [0, 0.8, 0, 0], [0, 0, 2.5, 0]
    path = tmp_path / "bad_affine.nii.gz"
    nib.save(nib.Nifti1Image(image.astype(np.int16), None, header=header), str(path))
    out = tmp_path / "seg.nii.gz"
    assert main(["segment", str(path), "-o", str(out), "--checkpoint", str(tiny_checkpoint), "--steps", "2",
                 "--device", "cpu"]) == 0, capsys.readouterr().err
    # The command's own note (a Python warning saying the same reaches stderr only outside pytest's capture).
    assert "voxel axes taken as R, A, S" in capsys.readouterr().err
    written = nib.load(str(out))
    assert (int(written.header["sform_code"]), int(written.header["qform_code"])) == (0, 0)
    assert written.header.get_zooms() == pytest.approx((0.8, 0.8, 2.5))
    assert json.loads((tmp_path / "seg.json").read_text())["affine_known"] is False


def test_a_scan_stored_in_metres_is_segmented_like_the_same_scan_in_mm(scan, tmp_path, tiny_checkpoint, capsys):
    """xyzt_units 'meter' used to be ignored: 0.0008 'mm' voxels, a 1-pixel slice, 0.0 ml and exit 0."""
    in_mm = nib.load(str(scan))
    metre_affine = in_mm.affine.copy()
    metre_affine[:3] /= 1000.0
    in_metres = nib.Nifti1Image(np.asanyarray(in_mm.dataobj), metre_affine)
    in_metres.header.set_xyzt_units("meter")
    metre_path = tmp_path / "metres.nii.gz"
    nib.save(in_metres, str(metre_path))
    assert segment(scan, "-o", tmp_path / "mm_seg.nii.gz", "--checkpoint", tiny_checkpoint) == 0
    assert segment(metre_path, "-o", tmp_path / "m_seg.nii.gz", "--checkpoint", tiny_checkpoint) == 0, \
        capsys.readouterr().err
    from_mm, from_metres = nib.load(str(tmp_path / "mm_seg.nii.gz")), nib.load(str(tmp_path / "m_seg.nii.gz"))
    np.testing.assert_array_equal(np.asanyarray(from_metres.dataobj), np.asanyarray(from_mm.dataobj))
    np.testing.assert_allclose(from_metres.affine, in_mm.affine, atol=1e-4)    # in mm, where the scan lies
    assert from_metres.header.get_xyzt_units()[0] == "mm"
    volumes = [json.loads((tmp_path / name).read_text())["class_volumes"] for name in ("mm_seg.json", "m_seg.json")]
    assert volumes[0] == volumes[1]


@pytest.mark.parametrize("voxel_mm", [0.0008, 800.0], ids=["metres-as-mm", "microns-as-mm"])
def test_an_implausible_voxel_size_is_refused_naming_the_spacing(scan, tmp_path, tiny_checkpoint, capsys, voxel_mm):
    """Units lost on the way (metres or microns written as mm): a slice of under a pixel, or one so large
    that it ran out of memory. Refused before any sampling, in one line naming the voxel size."""
    image = nib.load(str(scan))
    path = tmp_path / "odd_units.nii.gz"
    nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj), np.diag([voxel_mm, voxel_mm, voxel_mm, 1.0])), str(path))
    out = tmp_path / "seg.nii.gz"
    assert segment(path, "-o", out, "--checkpoint", tiny_checkpoint) == 2
    err = _one_line_error(capsys)
    assert f"{voxel_mm:.4g} × {voxel_mm:.4g} mm" in err and "voxel size" in err, err
    assert not out.exists()


@pytest.mark.parametrize("dims, message", [((30000, 30000, 30000), "header is damaged"),
                                           ((64, -64, 6), "negative image size")], ids=["huge", "negative"])
def test_a_damaged_uncompressed_header_is_one_line_not_out_of_memory(scan, tmp_path, tiny_checkpoint, capsys,
                                                                     dims, message):
    import struct

    path = tmp_path / "damaged.nii"
    nib.save(nib.load(str(scan)), str(path))
    raw = bytearray(path.read_bytes())
    struct.pack_into("<8h", raw, 40, 3, *dims, 1, 1, 1, 1)
    path.write_bytes(bytes(raw))
    assert segment(path, "-o", tmp_path / "seg.nii.gz", "--checkpoint", tiny_checkpoint) == 2
    assert message in _one_line_error(capsys)


def _edited_checkpoint(source, target, *, config_edit=None, tensor_edit=None):
    """A copy of a checkpoint with its config JSON or its tensors changed, as a hand edit or a bad disk would."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(source), framework="pt") as reader:
        metadata, state = dict(reader.metadata()), {key: reader.get_tensor(key) for key in reader.keys()}
    if config_edit:
        config = json.loads(metadata["config"])
        config_edit(config)
        metadata["config"] = json.dumps(config)
    if tensor_edit:
        state = {key: tensor_edit(value) for key, value in state.items()}
    save_file(state, str(target), metadata=metadata)
    return target


def test_a_checkpoint_config_field_of_the_wrong_type_is_a_checkpoint_error(scan, tmp_path, tiny_checkpoint, capsys):
    def fractional_timesteps(config):
        config["diffusion"]["num_train_timesteps"] = 1000.5

    edited = _edited_checkpoint(tiny_checkpoint, tmp_path / "edited.safetensors", config_edit=fractional_timesteps)
    assert segment(scan, "-o", tmp_path / "seg.nii.gz", "--checkpoint", edited) == 2
    err = _one_line_error(capsys)
    assert "edited.safetensors" in err and "num_train_timesteps must be an integer, got 1000.5" in err, err


def test_a_checkpoint_with_nan_weights_is_refused(scan, tmp_path, tiny_checkpoint, capsys):
    """It used to segment every scan as background and exit 0."""
    import torch

    from medconddiff.checkpoint import CheckpointError, load_checkpoint

    def poisoned(tensor):
        return torch.full_like(tensor, float("nan")) if tensor.is_floating_point() else tensor

    nan_weights = _edited_checkpoint(tiny_checkpoint, tmp_path / "nan.safetensors", tensor_edit=poisoned)
    out = tmp_path / "seg.nii.gz"
    assert segment(scan, "-o", out, "--checkpoint", nan_weights) == 2
    assert "nan.safetensors: tensor" in _one_line_error(capsys) and not out.exists()
    one_inf = _edited_checkpoint(tiny_checkpoint, tmp_path / "inf.safetensors",
                                 tensor_edit=lambda t: t.clone().fill_(float("inf")) if t.ndim == 1 and
                                 t.is_floating_point() else t)
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        load_checkpoint(one_inf)
    load_checkpoint(tiny_checkpoint)          # an intact checkpoint loads


@pytest.mark.parametrize("cls_name, data, message", [
    ("DiffusionConfig", {"num_train_timesteps": 1000.5}, "DiffusionConfig.num_train_timesteps must be an integer"),
    ("DiffusionConfig", {"num_train_timesteps": True}, "must be an integer"),
    ("DiffusionConfig", {"beta_start": "0.0001"}, "DiffusionConfig.beta_start must be a number"),
    ("PreprocessPlan", {"target_spacing": [1.0]}, "target_spacing must be a list of 2 numbers"),
    ("PreprocessPlan", {"channel_names": "CT"}, "channel_names must be a list of strings"),
    ("ModelConfig", {"denoiser_channels": [32, 48.5]}, "denoiser_channels must be a list of integers"),
    ("ModelConfig", {"backbone_weights": 7}, "backbone_weights must be a string or null"),
    ("TrainConfig", {"augment": 1}, "TrainConfig.augment must be true or false"),
])
def test_config_fields_read_from_a_dict_are_type_checked(cls_name, data, message):
    from medconddiff import config
    from medconddiff.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        config.dataclass_from_dict(getattr(config, cls_name), data)


def test_config_fields_read_from_a_dict_keep_whole_numbers_and_tuples():
    from medconddiff.config import DiffusionConfig, PreprocessPlan, TrainConfig, dataclass_from_dict

    diffusion = dataclass_from_dict(DiffusionConfig, {"num_train_timesteps": 1000.0})
    assert (diffusion.num_train_timesteps, type(diffusion.num_train_timesteps)) == (1000, int)
    train = dataclass_from_dict(TrainConfig, {"lr": 1})
    assert (train.lr, type(train.lr)) == (1.0, float)
    plan = dataclass_from_dict(PreprocessPlan, {"target_spacing": [1, 2], "intensity": ["zscore"]})
    assert plan.target_spacing == (1.0, 2.0) and plan.intensity == ("zscore",)


def test_a_skip_first_beyond_the_steps_the_bundled_model_takes_is_said_and_recorded(tmp_path, capsys):
    """The bundled model stops each slice after its recorded cap of 2 steps: --consensus mean --skip-first 5
    gave the last step's labels while the console and the sidecar said 'mean, skip_first 5'."""
    from medconddiff.nifti import sample_scan_path

    out = tmp_path / "seg.nii.gz"
    assert main(["segment", str(sample_scan_path()), "-o", str(out), "--slices", "60", "--consensus", "mean",
                 "--skip-first", "5", "--quiet", "--device", "cpu"]) == 0
    expected = ("skip-first 5: 1 of 1 slice(s) took 5 step(s) or fewer (a step cap or adaptive stopping), so "
                "their consensus is their last step alone, not a mean of steps")
    assert expected in capsys.readouterr().err
    assert json.loads((tmp_path / "seg.json").read_text())["skip_first_note"] == expected
