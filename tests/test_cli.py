"""`medconddiff segment` end to end on a real scan cut, and every bad input the issue names."""

import gzip
import json

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


def test_folder_in_folder_out(scan, tmp_path, tiny_checkpoint, capsys):
    folder = tmp_path / "scans"
    folder.mkdir()
    for name in ("a", "b"):
        (folder / f"{name}.nii.gz").write_bytes(scan.read_bytes())
    assert segment(folder, "-o", tmp_path / "results", "--checkpoint", tiny_checkpoint, "--slices", "0:2") == 0
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["a_seg.json", "a_seg.nii.gz",
                                                                        "b_seg.json", "b_seg.nii.gz"]
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
