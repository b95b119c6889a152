"""Segment NIfTI scans with a MedCondDiff/LSegDiff checkpoint.

  medconddiff segment scan.nii.gz -o scan_seg.nii.gz
  medconddiff segment scans/ -o results/ [--skip-existing]     (a cohort: a folder in, a folder out)
  medconddiff segment flair.nii.gz t1.nii.gz t1c.nii.gz t2.nii.gz -o seg.nii.gz --checkpoint brats.safetensors
  torchrun --nproc-per-node 4 -m medconddiff segment scans/ -o results/   (scans shared across ranks)

Scans are segmented in any orientation and at any voxel size: the checkpoint's plan reorients each
to canonical, resamples its slices to the plan's spacing and maps the result back, so the output
lies on the scan's own grid with its affine. A multi-channel model takes one 4-D file per scan, or
one file per channel (in a folder: nnU-Net naming, CASE_0000.nii.gz, CASE_0001.nii.gz, …).

Writes the consensus labels (uint8, the scan's affine), optionally the uncertainty map and the
per-step x̂0 labels (4-D, step axis last), and a JSON sidecar with everything needed to reproduce it.
Existing files are never overwritten unless --overwrite is given; every file is written atomically.
In a cohort a scan that cannot be read or segmented is reported in one line and the others go on;
the summary counts done / skipped / failed and the exit status is 1 if any failed.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..config import SamplingConfig, add_dataclass_arguments, override_from_args
from ..nifti import NIFTI_SUFFIXES
from ..outputs import default_output, output_paths, segmentation_record, strip_nifti_suffix, trajectory_volume

OPTIONAL_OUTPUTS = ("uncertainty", "trajectory")
_CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", type=Path, nargs="*", help="NIfTI scan(s) or a folder of them (default: the "
                        "bundled sample scan); for a multi-channel model, one file per channel of one scan")
    parser.add_argument("-o", "--output", type=Path, help="output .nii.gz (a folder for a cohort); default: "
                        "<input>_seg.nii.gz next to the input, or ./ for the sample")
    parser.add_argument("--checkpoint", help="checkpoint .safetensors, or a bundled model: medconddiff-liver "
                        "(default), lsegdiff-liver")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--channel", type=int, help="for 4-D scans and a one-channel model: which volume of "
                        "the 4th axis to segment")
    parser.add_argument("--slices", help="START:STOP range of canonical slices along the model's slicing "
                        "direction (axial: counted from inferior)")
    parser.add_argument("--save-uncertainty", action="store_true", help="also write <output>_uncertainty.nii.gz")
    parser.add_argument("--save-trajectory", action="store_true",
                        help="also write <output>_trajectory.nii.gz: the x̂0 labels of every step (step axis last)")
    existing = parser.add_mutually_exclusive_group()
    existing.add_argument("--overwrite", action="store_true", help="replace existing output files")
    existing.add_argument("--skip-existing", action="store_true",
                          help="skip scans whose outputs exist (resume an interrupted cohort)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice; 1 is "
                        "steadier on a machine shared with other jobs)")
    add_dataclass_arguments(parser, SamplingConfig, title="sampling")


@dataclass(frozen=True)
class ScanJob:
    """One scan to segment: its file(s) (one per channel, or one) and where its labels go."""

    name: str
    files: tuple[Path, ...]
    output: Path


def parse_slice_range(text: str | None, length: int) -> range | None:
    if not text:
        return None
    try:
        start_text, stop_text = text.split(":")
        start = int(start_text) if start_text else 0
        stop = int(stop_text) if stop_text else length
    except ValueError:
        raise ValueError(f"--slices must look like START:STOP, got {text!r}") from None
    if not 0 <= start < stop <= length:
        raise ValueError(f"--slices {text} is outside [0, {length}] or empty")
    return range(start, stop)


def _nifti_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(NIFTI_SUFFIXES)
                  and not p.name.startswith("."))


def group_channel_files(files: list[Path], channels: int) -> list[tuple[str, tuple[Path, ...]]]:
    """(case name, files) per scan: nnU-Net's CASE_0000… grouping for several channels, else one file each."""
    if channels == 1:
        return [(strip_nifti_suffix(f), (f,)) for f in files]
    groups: dict[str, dict[int, Path]] = {}
    singles = []
    for f in files:
        match = _CHANNEL_FILE.match(strip_nifti_suffix(f))
        if match:
            groups.setdefault(match["case"], {})[int(match["channel"])] = f
        else:
            singles.append((strip_nifti_suffix(f), (f,)))   # a 4-D file holding every channel
    scans = list(singles)
    for case, by_channel in sorted(groups.items()):
        if sorted(by_channel) == list(range(channels)):
            scans.append((case, tuple(by_channel[c] for c in range(channels))))
        else:
            # Reported as a failed scan with a clear reason, not silently dropped.
            scans.append((case, tuple(by_channel[c] for c in sorted(by_channel))))
    return sorted(scans)


def plan_jobs(inputs: list[Path], output: Optional[Path], channels: int) -> list[ScanJob]:
    """The scans to segment (for torchrun, only this rank's share)."""
    from ..nifti import sample_scan_path

    if not inputs:
        sample = sample_scan_path()
        jobs = [ScanJob(strip_nifti_suffix(sample), (sample,), output or default_output(sample, Path.cwd()))]
    elif len(inputs) == 1 and inputs[0].is_dir():
        folder = inputs[0]
        files = _nifti_files(folder)
        if not files:
            raise ValueError(f"no .nii/.nii.gz files in {folder}")
        if output is None:
            raise ValueError("a folder input needs -o OUTPUT_FOLDER")
        if output.exists() and not output.is_dir():
            raise ValueError(f"{output} is a file; a folder input needs an output folder")
        jobs = [ScanJob(name, group, output / f"{name}_seg.nii.gz") for name, group in group_channel_files(files, channels)]
    elif channels > 1 and len(inputs) == channels:
        name = strip_nifti_suffix(inputs[0])
        name = _CHANNEL_FILE.match(name)["case"] if _CHANNEL_FILE.match(name) else name
        jobs = [ScanJob(name, tuple(inputs), output or default_output(inputs[0].with_name(name + ".nii.gz")))]
    elif len(inputs) == 1:
        jobs = [ScanJob(strip_nifti_suffix(inputs[0]), (inputs[0],), output or default_output(inputs[0]))]
    else:
        if channels > 1:
            raise ValueError(f"the model expects {channels} channels: give one file per channel ({channels} files), "
                             "one 4-D file, or a folder")
        if output is None or (output.exists() and not output.is_dir()) or output.name.lower().endswith(NIFTI_SUFFIXES):
            raise ValueError("several scans need -o OUTPUT_FOLDER")
        jobs = [ScanJob(strip_nifti_suffix(p), (p,), output / f"{strip_nifti_suffix(p)}_seg.nii.gz") for p in inputs]
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    return jobs[rank::world]


def wanted_outputs(args: argparse.Namespace) -> list[str]:
    return ["labels", "sidecar"] + [k for k in OPTIONAL_OUTPUTS if getattr(args, f"save_{k}")]


def outputs_exist(paths: dict[str, Path], wanted: list[str]) -> list[Path]:
    return [paths[key] for key in wanted if paths[key].exists()]


def load_scan(job: ScanJob, channels: int, channel: Optional[int]):
    """(array, meta) of a job: file order, channels last for a multi-channel model."""
    from ..nifti import load_channels, load_volume

    if channels == 1:
        if len(job.files) != 1:
            raise ValueError(f"{job.name}: a one-channel model takes one file per scan, got {len(job.files)}")
        return load_volume(job.files[0], channel=channel)
    if channel is not None:
        raise ValueError("--channel picks one volume for a one-channel model; this model takes "
                         f"{channels} channels")
    volume, meta = load_channels(job.files)
    if volume.shape[3] != channels:
        raise ValueError(f"{job.name}: the model expects {channels} channels, the scan has {volume.shape[3]} "
                         f"({', '.join(f.name for f in job.files)})")
    return volume, meta


def segment_one(segmenter, job: ScanJob, sampling: SamplingConfig, args: argparse.Namespace) -> dict:
    from ..nifti import save_volume, write_json_atomic

    wanted = wanted_outputs(args)
    paths = output_paths(job.output)
    if not args.overwrite:
        existing = outputs_exist(paths, wanted)
        if existing:
            raise FileExistsError(f"{existing[0]} exists; pass --overwrite to replace it or --skip-existing")
    volume, meta = load_scan(job, segmenter.plan.num_channels, args.channel)
    geometry = segmenter.preprocessor.geometry(volume.shape[:3], meta)
    slices = parse_slice_range(args.slices, geometry.n_slices)
    started = time.perf_counter()
    run = segmenter.run(volume, sampling, slices, meta=meta)
    for note in run.geometry.notes:
        print(f"{job.name}: note: {note}", file=sys.stderr)
    bar = None if args.quiet else _progress_bar(len(run), job.name)
    for event in run:
        if bar is not None and hasattr(event, "completed"):
            bar.n = event.completed
            bar.refresh()
    if bar is not None:
        bar.close()
    result = run.result
    seconds = time.perf_counter() - started
    job.output.parent.mkdir(parents=True, exist_ok=True)
    save_volume(paths["labels"], result.labels, meta, overwrite=args.overwrite, dtype=np.uint8)
    if args.save_uncertainty:
        save_volume(paths["uncertainty"], result.uncertainty, meta, overwrite=args.overwrite, dtype=np.float32)
    if args.save_trajectory:
        save_volume(paths["trajectory"], trajectory_volume(result), meta, overwrite=args.overwrite, dtype=np.uint8)
    record = segmentation_record(result, meta, result.labels, source=", ".join(str(f.resolve()) for f in job.files),
                                 outputs={k: str(paths[k].resolve()) for k in wanted if k != "sidecar"},
                                 seconds=seconds)
    write_json_atomic(paths["sidecar"], record, overwrite=args.overwrite)
    return record


def _progress_bar(total: int, name: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=f"segmenting {name}", unit="slice", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    from ..cli import user_error_types
    from ..segmenter import Segmenter

    sampling = override_from_args(SamplingConfig(), args)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    device = args.device
    if device == "auto" and "LOCAL_RANK" in os.environ:
        import torch

        if torch.cuda.is_available():
            device = f"cuda:{int(os.environ['LOCAL_RANK']) % torch.cuda.device_count()}"
    segmenter = Segmenter.from_checkpoint(args.checkpoint, device=device)
    segmenter.config.check_sampling(sampling)
    jobs = plan_jobs(list(args.input), args.output, segmenter.plan.num_channels)
    cohort = len(jobs) > 1 or (len(args.input) == 1 and args.input[0].is_dir())
    if cohort and not (args.overwrite or args.skip_existing):
        # Checked before any work: a long cohort run must not end in a column of "exists" failures.
        existing = [job for job in jobs if outputs_exist(output_paths(job.output), wanted_outputs(args))]
        if existing:
            raise FileExistsError(f"{len(existing)} of {len(jobs)} scans already have outputs (e.g. "
                                  f"{existing[0].output}); pass --skip-existing to resume the cohort or "
                                  "--overwrite to replace them")
    done, skipped, failed = 0, 0, 0
    for job in jobs:
        if args.skip_existing and outputs_exist(output_paths(job.output), wanted_outputs(args)):
            print(f"{job.name}: skipped (outputs exist)")
            skipped += 1
            continue
        try:
            record = segment_one(segmenter, job, sampling, args)
        except (KeyboardInterrupt, SystemExit):
            raise
        except user_error_types() + (OSError, RuntimeError, MemoryError) as error:
            if not cohort:
                raise
            print(f"{job.name}: FAILED: {error}", file=sys.stderr)
            failed += 1
            continue
        done += 1
        names = record["class_names"]
        volumes = ", ".join(f"{name} {v['ml']} ml" for name, v in record["class_volumes"].items() if name != names[0])
        print(f"{', '.join(str(f) for f in job.files)} -> {job.output} ({record['seconds']:.1f} s; {volumes})")
    if cohort:
        rank = f" (rank {os.environ['RANK']})" if "RANK" in os.environ else ""
        print(f"summary{rank}: {done} done, {skipped} skipped, {failed} failed of {len(jobs)} scan(s)")
    return 1 if failed else 0
