"""`medconddiff benchmark`: the quick run produces a complete, well-typed report (timings are never asserted)."""

from __future__ import annotations

import copy
import json
from numbers import Real

import pytest

from medconddiff import checkpoint as checkpoint_module
from medconddiff.benchmark import SCHEMA, TARGETS, BenchmarkOptions, format_report, load_bench_model
from medconddiff.benchmark_report import AT_LEAST, evaluate_targets
from medconddiff.cli import main
from medconddiff.config import ModelConfig


def _positive(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and value > 0


@pytest.fixture(scope="module")
def quick_report(tiny_checkpoint, tmp_path_factory):
    import nibabel as nib
    import numpy as np

    folder = tmp_path_factory.mktemp("bench")
    path = folder / "bench.json"
    # A real-size stand-in: a small LPS CT-like scan at 0.8 mm, its own row against the real-size target.
    scan = folder / "small_ct.nii.gz"
    volume = np.full((48, 40, 3), -1000, np.int16)
    volume[10:38, 8:32] = 40
    nib.save(nib.Nifti1Image(volume, np.diag([-0.8, -0.8, 2.0, 1.0])), str(scan))
    code = main(["benchmark", "--quick", "--quiet", "--device", "cpu", "--checkpoint", str(tiny_checkpoint),
                 "--steps-list", "1", "2", "--batch-sizes", "1", "2", "--volume-slices", "2", "--warmup", "0",
                 "--real-size", str(scan), "--json", str(path)])
    assert code == 0
    return json.loads(path.read_text())


def test_quick_benchmark_json_has_every_field(quick_report, tiny_checkpoint):
    report = quick_report
    assert report["schema"] == SCHEMA
    env = report["environment"]
    assert env["device"] == "cpu" and isinstance(env["device_name"], str) and env["device_name"]
    assert env["torch_threads"] >= 1 and env["cpu_count"] >= 1
    assert report["options"]["steps_list"] == [1, 2] and report["options"]["reference_steps"] == 2

    (model,) = report["models"]
    assert model["label"] == tiny_checkpoint.name and model["source"] == tiny_checkpoint.name   # not its folder
    assert model["random_weights"] is False and model["family"] == "pixel" and model["model_plane"] == [128, 128]
    assert _positive(model["checkpoint_load_seconds"])
    params = model["parameters"]
    assert set(params) >= {"backbone", "adapter", "denoiser", "total"}
    assert params["backbone"] + params["adapter"] + params["denoiser"] == params["total"]

    assert _positive(model["parts"]["encode_condition_s"]) and _positive(model["parts"]["denoise_s"])
    assert [entry["steps"] for entry in model["latency"]] == [1, 2]
    for entry in model["latency"]:
        assert entry["batch"] == 2
        assert _positive(entry["seconds_per_batch"]) and _positive(entry["ms_per_slice"])
        assert entry["ms_per_slice"] == pytest.approx(1e3 * entry["seconds_per_batch"] / 2)
        assert _positive(entry["parts_seconds"]) and isinstance(entry["overhead_fraction"], float)
    assert _positive(model["one_shot"]["ratio"]) and _positive(model["one_shot"]["ms_per_slice"])
    # On the CPU the target's overhead is measured inside the 2-step run: its network passes' host time.
    in_run = model["overhead_in_run"]
    assert in_run["steps"] == 2 and 0 < in_run["network_seconds"] < in_run["wall_seconds"]
    assert model["overhead_fraction"] == in_run["fraction"] >= 0
    assert in_run["fraction_parts_apart"] == model["latency"][-1]["overhead_fraction"]
    assert in_run["parts_seconds"]["denoise (denoiser passes)"] > 0
    assert sum(in_run["parts_seconds"].values()) <= in_run["wall_seconds"] * 1.01
    reuse = model["feature_reuse"]
    assert _positive(reuse["speedup"]) and _positive(reuse["reextract_seconds"]) and reuse["steps"] == 2
    adaptive = model["adaptive"]
    assert adaptive["max_steps"] == 2 and 1 <= adaptive["mean_steps"] <= 2 and _positive(adaptive["ratio"])
    finetune = model["finetune"]
    assert finetune["steps"] == 2 and finetune["slices"] == [40, 56, 88] and _positive(finetune["seconds_per_step"])
    assert finetune["seconds"] >= finetune["train_seconds"] > 0
    in_set = model["set_finetune"]
    # A set of 5 trains 3× the 3-slice steps, as a user's fine-tune on such a set does by default.
    assert in_set["steps"] == 6 and len(in_set["cases"]) == 5 and _positive(in_set["seconds_per_step"])
    assert all(len(slices) == 3 for slices in in_set["cases"].values())
    held_out = model["diffusion_check"]
    assert held_out["slices"] == [48, 50] and len(held_out["step_mean_dice"]) == 2
    rivals = [d for d in [*held_out["step_mean_dice"], held_out["one_shot"]] if d is not None]
    assert held_out["consensus_minus_best_of_steps_and_one_shot"] == pytest.approx(held_out["consensus"] - max(rivals))
    assert set(model["targets"]) == set(TARGETS)

    throughput = model["throughput"]
    assert [entry["batch_size"] for entry in throughput["by_batch_size"]] == [1, 2]
    assert throughput["best_batch_size"] in (1, 2)
    assert throughput["best_slices_per_second"] == max(e["slices_per_second"] for e in throughput["by_batch_size"])

    memory = model["memory"]
    assert memory["shape"] == [64, 64, 4] and memory["steps"] == 2 and memory["batch_size"] == 16
    # The kept trajectory is uint8 (steps, K, slices, h, w) on the model grid: 64 px at 0.7 mm = 45 px at 1 mm.
    assert memory["trajectory_shape"] == [2, 3, 4, 45, 45] and memory["trajectory_bytes"] == 2 * 3 * 4 * 45 * 45
    assert memory["peak_measure"] == "peak_rss" and memory["peak_bytes"] == memory["peak_rss_bytes"]
    assert memory["peak_rss_bytes"] >= memory["rss_after_model_load_bytes"] > 0
    assert memory["spacing"] == [0.7, 0.7, 1.0] and memory["model_plane"] == [45, 45] and memory["padded_plane"] == [64, 64]
    profile = memory["profile_seconds"]
    assert {"denoise (denoiser passes)", "encode_condition (backbone + adapter)"} <= set(profile)
    assert all(v >= 0 for v in profile.values()) and _positive(profile["denoise (denoiser passes)"])
    assert sum(profile.values()) == pytest.approx(memory["seconds"], rel=0.05)
    assert memory["run_increment_bytes"] == memory["peak_rss_bytes"] - memory["rss_after_model_load_bytes"]
    assert memory["cuda_max_allocated_bytes"] is None

    (real,) = model["real_size"]
    assert real["source"].endswith("small_ct.nii.gz") and real["shape"] == [48, 40, 3]
    assert real["spacing"] == pytest.approx([0.8, 0.8, 2.0]) and real["model_plane"] == [38, 32]
    assert _positive(real["seconds"]) and model["targets"]["real_size_seconds"]["value"] == real["seconds"]

    end_to_end = model["end_to_end"]
    assert end_to_end["shape"] == [128, 128, 128] and end_to_end["slices"] == 4
    assert end_to_end["seconds"] >= end_to_end["segment_seconds"] > 0

    assert set(model["targets"]) == set(TARGETS)
    # A quick run is not the workload the time targets are stated for: measured, no verdict, and why.
    other = {name for name, target in model["targets"].items() if target["workload"]}
    assert other == {"one_shot_ratio", "adaptive_ratio", "big_volume_seconds", "big_volume_peak_bytes",
                     "end_to_end_seconds", "finetune_seconds", "set_finetune_seconds"}
    assert model["targets"]["finetune_seconds"]["workload"] == "2 fine-tuning steps, not 200"
    assert all(model["targets"][name]["passed"] is None for name in other)
    # On the full workload every target gets its verdict by its own comparison.
    for name, target in evaluate_targets(model, "cpu").items():
        assert isinstance(target["passed"], bool)
        if name in AT_LEAST:     # lower bounds: the held-out margin and drift must reach 0
            assert target["threshold"] == 0.0 and target["passed"] == (target["value"] >= 0)
        else:
            assert _positive(target["threshold"]) and target["passed"] == (target["value"] <= target["threshold"])


def test_table_has_one_column_per_checkpoint_and_verdicts(quick_report):
    report = copy.deepcopy(quick_report)
    second = copy.deepcopy(report["models"][0])
    second["label"] = "latent-model"
    report["models"].append(second)
    text = format_report(report)
    header = next(line for line in text.splitlines() if "latent-model" in line and "pixel" not in line)
    assert report["models"][0]["label"] in header
    assert ("PASS" in text or "MISS" in text) and "torch threads" in text
    for start in ("2-step / one-shot", "fine-tune on a set of 5 cases"):   # a quick run: not the targets' workload
        line = next(line for line in text.splitlines() if line.startswith(start))
        assert line.count("(no verdict)") == 2 and "PASS" not in line and "MISS" not in line
    assert "no verdict where the run was not the target's workload: 2 fine-tuning steps, not 200; " in text
    for start in ("  consensus − max(best step, one-shot)", "  last step − first step", "  end to end, s; peak memory"):
        line = next(line for line in text.splitlines() if line.startswith(start))
        assert line.count("PASS") + line.count("MISS") == 2   # one verdict per column


def test_a_model_of_other_classes_skips_the_held_out_check(quick_report):
    report = copy.deepcopy(quick_report)
    report["models"][0]["diffusion_check"] = {"skipped": "classes ['background', 'lesion'] are not the sample's"}
    text = format_report(report)
    line = next(line for line in text.splitlines() if line.startswith("held-out sample 48:50"))
    assert "n/a (classes ['background', 'lesion']" in line


def test_missing_default_checkpoint_falls_back_to_random_default_config(monkeypatch, tmp_path):
    monkeypatch.setattr(checkpoint_module, "default_checkpoint_path", lambda: tmp_path / "absent.safetensors")
    bench = load_bench_model(None, "cpu")
    assert bench.random_weights and "random weights" in bench.label and "absent.safetensors" in bench.source
    assert bench.segmenter.config.model == ModelConfig() and bench.load_seconds is None


def test_cli_refuses_existing_json_and_bad_checkpoint(tmp_path, capsys):
    existing = tmp_path / "bench.json"
    existing.write_text("{}")
    assert main(["benchmark", "--quick", "--quiet", "--device", "cpu", "--json", str(existing)]) == 2
    assert "exists" in capsys.readouterr().err and existing.read_text() == "{}"
    assert main(["benchmark", "--quick", "--quiet", "--no-memory", "--device", "cpu",
                 "--checkpoint", str(tmp_path / "missing.safetensors")]) == 2
    assert "not found" in capsys.readouterr().err


def test_options_are_validated():
    with pytest.raises(ValueError, match="steps_list"):
        BenchmarkOptions(steps_list=(0, 10))
    with pytest.raises(ValueError, match="big_volume_shape"):
        BenchmarkOptions.quick(big_volume_shape=(64, 64))
    with pytest.raises(ValueError, match="heldout_slices"):
        BenchmarkOptions.quick(heldout_slices=(50, 48))
    with pytest.raises(ValueError, match="real-size scan"):
        BenchmarkOptions.quick(real_size=("/nowhere/ct.nii.gz",))


def _write_scan(folder, name, volume, labels):
    import nibabel as nib
    import numpy as np

    affine = np.diag([-1.0, -1.0, 1.0, 1.0])          # LPS at 1 mm
    image_path, label_path = folder / f"{name}.nii.gz", folder / f"{name}_labels.nii.gz"
    nib.save(nib.Nifti1Image(volume, affine), str(image_path))
    nib.save(nib.Nifti1Image(labels, affine), str(label_path))
    return image_path, label_path


def test_a_named_held_out_scan_is_scored_instead_of_the_sample(tiny_checkpoint, liver_volume, tmp_path):
    """A fine-tune's own held-out slices: the check runs on the user's scan and the table names it."""
    import numpy as np

    image, labels = liver_volume
    image_path, label_path = _write_scan(tmp_path, "held", image.astype(np.int16), labels.astype(np.uint8))
    path = tmp_path / "bench.json"
    code = main(["benchmark", "--quick", "--quiet", "--no-memory", "--device", "cpu", "--checkpoint",
                 str(tiny_checkpoint), "--finetune-steps", "0", "--heldout-scan", str(image_path), str(label_path),
                 "--heldout-slices", "1", "4", "--json", str(path)])
    assert code == 0
    report = json.loads(path.read_text())
    check = report["models"][0]["diffusion_check"]
    assert check["scan"] == "held.nii.gz" and check["slices"] == [1, 4]
    assert 0.0 <= check["consensus"] <= 1.0 and 0.0 <= check["one_shot"] <= 1.0
    assert 1 <= len(check["step_mean_dice"]) <= 2
    assert report["options"]["heldout_scan"] == [image_path.name, label_path.name]      # not their folder
    line = next(line for line in format_report(report).splitlines() if line.startswith("held-out held.nii.gz 1:4"))
    assert "n/a" not in line


def test_a_held_out_scan_the_model_cannot_score_is_reported_not_fatal(tiny_checkpoint, liver_volume, tmp_path):
    import numpy as np

    from medconddiff.benchmark import held_out_scan
    from medconddiff.benchmark_measures import measure_diffusion_check, sample_volume

    image, labels = liver_volume
    many = labels.astype(np.uint8).copy()
    many[0, 0, :] = 5                                   # a class the 3-class model does not have
    image_path, label_path = _write_scan(tmp_path, "other", image.astype(np.int16), many)
    options = BenchmarkOptions.quick(heldout_scan=(str(image_path), str(label_path)), heldout_slices=(0, 2))
    held = held_out_scan(options, *sample_volume())
    assert held.name == "other.nii.gz" and not held.bundled
    bench = load_bench_model(str(tiny_checkpoint), "cpu")
    check = measure_diffusion_check(bench.segmenter, held, options)
    assert check["scan"] == "other.nii.gz" and "label value 5" in check["skipped"]


def test_held_out_labels_stored_in_another_voxel_order_are_scored_where_they_lie(liver_volume, tmp_path):
    """The benchmark's held-out check reads labels as evaluate does: the image's grid stored flipped is moved onto
    the image's voxels, not compared voxel by voxel (that scored the bundled model 0.10 for evaluate's 0.87)."""
    import nibabel as nib
    import numpy as np

    from medconddiff.benchmark import held_out_scan
    from medconddiff.benchmark_measures import sample_volume

    image, labels = liver_volume
    image_path, _ = _write_scan(tmp_path, "scan", image.astype(np.int16), labels.astype(np.uint8))
    affine = nib.load(str(image_path)).affine
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = labels.shape[0] - 1                   # voxel i of the flipped file is voxel n-1-i of the image
    flipped_path = tmp_path / "flipped_labels.nii.gz"
    nib.save(nib.Nifti1Image(labels[::-1].astype(np.uint8), affine @ flip), str(flipped_path))
    options = BenchmarkOptions.quick(heldout_scan=(str(image_path), str(flipped_path)), heldout_slices=(0, 2))
    held = held_out_scan(options, *sample_volume())
    np.testing.assert_array_equal(held.labels, labels)


def test_a_wrong_held_out_pair_fails_before_anything_is_measured(tiny_checkpoint, liver_volume, tmp_path, capsys):
    import numpy as np

    image, labels = liver_volume
    image_path, _ = _write_scan(tmp_path, "scan", image.astype(np.int16), labels.astype(np.uint8))
    _, label_path = _write_scan(tmp_path, "cut", image[:, :, :3].astype(np.int16), labels[:, :, :3].astype(np.uint8))
    common = ["benchmark", "--quick", "--quiet", "--no-memory", "--device", "cpu", "--checkpoint", str(tiny_checkpoint)]
    assert main([*common, "--heldout-scan", str(image_path), str(label_path), "--heldout-slices", "0", "2"]) == 2
    assert "held-out labels cut_labels.nii.gz have shape (64, 64, 3)" in capsys.readouterr().err
    assert main([*common, "--heldout-scan", str(image_path), str(label_path)]) == 2
    assert "--heldout-slices" in capsys.readouterr().err
    with pytest.raises(ValueError, match="held-out scan file"):
        BenchmarkOptions.quick(heldout_scan=(str(image_path), str(tmp_path / "absent.nii.gz")))


def test_host_part_timer_splits_the_run_it_watches(tiny_checkpoint, liver_volume):
    """The CPU benchmark splits the measured run itself (a scaled-up sample overstated its fixed costs)."""
    from medconddiff.config import SamplingConfig
    from medconddiff.profiling import ENGINE_PARTS, HostPartTimer, engine_part
    from medconddiff.segmenter import Segmenter
    from tests.conftest import meta_1mm

    segmenter = Segmenter.from_checkpoint(tiny_checkpoint, device="cpu")
    image, _ = liver_volume
    with HostPartTimer() as timer:
        segmenter.segment(image, SamplingConfig(steps=3, adaptive=False), meta=meta_1mm())
        with pytest.raises(RuntimeError, match="already active"):
            HostPartTimer().__enter__()
    seconds = timer.seconds()
    assert set(seconds) == set(ENGINE_PARTS.values())
    for part in ("encode_condition (backbone + adapter)", "denoise (denoiser passes)", "scheduler steps",
                 "quantise kept steps", "fuse, resample to the scan, uncertainty"):
        assert _positive(seconds[part]), part
    assert sum(seconds.values()) <= timer.wall_seconds
    # Outside a timer a mark adds to nothing; a timer ends with its block.
    with engine_part("medconddiff.denoise"):
        pass
    assert timer.seconds() == seconds
