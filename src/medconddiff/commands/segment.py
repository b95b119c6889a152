"""Segment NIfTI scans with a MedCondDiff/LSegDiff checkpoint.

  medconddiff segment scan.nii.gz -o scan_seg.nii.gz
  medconddiff segment scans/ -o results/            (a folder in, a folder out)
  torchrun --nproc-per-node 4 -m medconddiff segment scans/ -o results/   (scans shared across ranks)

Writes the consensus labels (uint8, the scan's affine), optionally the uncertainty map and the
per-step x̂0 labels (4-D, step axis last), and a JSON sidecar with everything needed to reproduce it.
Existing files are never overwritten unless --overwrite is given; every file is written atomically.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from ..config import SamplingConfig, add_dataclass_arguments, override_from_args

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", type=Path, nargs="?", help="a NIfTI scan or a folder of them "
                        "(default: the bundled sample scan)")
    parser.add_argument("-o", "--output", type=Path, help="output .nii.gz (or folder for a folder input); "
                        "default: <input>_seg.nii.gz next to the input, or ./ for the sample")
    parser.add_argument("--checkpoint", help="checkpoint .safetensors, or a bundled model: medconddiff-liver "
                        "(default), lsegdiff-liver")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--channel", type=int, help="for 4-D scans: which volume of the 4th axis to segment")
    parser.add_argument("--slices", help="START:STOP range of slices along the model's slicing axis")
    parser.add_argument("--save-uncertainty", action="store_true", help="also write <output>_uncertainty.nii.gz")
    parser.add_argument("--save-trajectory", action="store_true",
                        help="also write <output>_trajectory.nii.gz: the x̂0 labels of every step (step axis last)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice; 1 is "
                        "steadier on a machine shared with other jobs)")
    add_dataclass_arguments(parser, SamplingConfig, title="sampling")


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


def strip_nifti_suffix(path: Path) -> str:
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def output_paths(output: Path) -> dict[str, Path]:
    stem = strip_nifti_suffix(output)
    return {
        "labels": output,
        "uncertainty": output.with_name(f"{stem}_uncertainty.nii.gz"),
        "trajectory": output.with_name(f"{stem}_trajectory.nii.gz"),
        "sidecar": output.with_name(f"{stem}.json"),
    }


def plan_jobs(args: argparse.Namespace) -> list[tuple[Path, Path]]:
    """(input, output) pairs; for torchrun, only this rank's share of them."""
    from ..nifti import sample_scan_path

    source = args.input or sample_scan_path()
    if source.is_dir():
        scans = sorted(p for p in source.iterdir() if p.name.endswith(NIFTI_SUFFIXES))
        if not scans:
            raise ValueError(f"no .nii/.nii.gz files in {source}")
        if args.output is None:
            raise ValueError("a folder input needs -o OUTPUT_FOLDER")
        jobs = [(scan, args.output / f"{strip_nifti_suffix(scan)}_seg.nii.gz") for scan in scans]
    else:
        default = (Path.cwd() if args.input is None else source.parent) / f"{strip_nifti_suffix(source)}_seg.nii.gz"
        jobs = [(source, args.output or default)]
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    return jobs[rank::world]


def check_outputs_free(paths: dict[str, Path], wanted: list[str], overwrite: bool) -> None:
    if overwrite:
        return
    for key in wanted:
        if paths[key].exists():
            raise FileExistsError(f"{paths[key]} exists; pass --overwrite to replace it")


def trajectory_volume(result, shape_sf: tuple[int, ...]) -> np.ndarray:
    """Per-step arg-max labels at scan resolution, (S, *volume) in the result's slice-first order."""
    from ..segmenter import labels_at

    steps = result.trajectory.shape[0]
    out = np.zeros((steps,) + shape_sf, np.uint8)
    for position, index in enumerate(result.slice_indices):
        out[:, index] = labels_at(result.trajectory[:, :, position], shape_sf[1:])
    return out


def class_volumes_ml(labels: np.ndarray, spacing: tuple[float, ...], class_names: tuple[str, ...]) -> dict:
    voxel_ml = float(np.prod(spacing[:3])) / 1000.0
    counts = np.bincount(labels.ravel(), minlength=len(class_names))
    return {name: {"voxels": int(counts[i]), "ml": round(counts[i] * voxel_ml, 3)}
            for i, name in enumerate(class_names)}


def segment_one(segmenter, scan: Path, output: Path, sampling: SamplingConfig, args: argparse.Namespace) -> dict:
    from ..nifti import load_volume, save_volume, write_json_atomic

    wanted = ["labels", "sidecar"] + [k for k in ("uncertainty", "trajectory") if getattr(args, f"save_{k}")]
    paths = output_paths(output)
    check_outputs_free(paths, wanted, args.overwrite)
    volume, meta = load_volume(scan, channel=args.channel)
    axis = segmenter.config.preprocess.slice_axis
    slices = parse_slice_range(args.slices, volume.shape[axis])
    started = time.perf_counter()
    run = segmenter.run(volume, sampling, slices)
    bar = None if args.quiet else _progress_bar(len(run), scan.name)
    for event in run:
        if bar is not None and hasattr(event, "completed"):
            bar.n = event.completed
            bar.refresh()
    if bar is not None:
        bar.close()
    result = run.result
    seconds = time.perf_counter() - started
    output.parent.mkdir(parents=True, exist_ok=True)
    save_volume(paths["labels"], result.labels, meta, overwrite=args.overwrite, dtype=np.uint8)
    if args.save_uncertainty:
        save_volume(paths["uncertainty"], result.uncertainty, meta, overwrite=args.overwrite, dtype=np.float32)
    if args.save_trajectory:
        shape_sf = np.moveaxis(result.labels, axis, 0).shape
        steps_sf = trajectory_volume(result, shape_sf)  # (S, slice, a, b)
        steps_volume = np.moveaxis(np.moveaxis(steps_sf, 1, axis + 1), 0, -1)  # (*volume, S)
        save_volume(paths["trajectory"], steps_volume, meta, overwrite=args.overwrite, dtype=np.uint8)
    sidecar = {
        "input": str(scan.resolve()),
        "outputs": {k: str(paths[k].resolve()) for k in wanted if k != "sidecar"},
        "input_shape": list(volume.shape),
        "slices": [int(result.slice_indices[0]), int(result.slice_indices[-1]) + 1],
        "seconds": round(seconds, 3),
        "class_names": list(result.class_names),
        "class_volumes": class_volumes_ml(result.labels, meta.spacing, result.class_names),
        "affine": meta.to_dict()["affine"],
        **result.provenance,
    }
    write_json_atomic(paths["sidecar"], sidecar, overwrite=args.overwrite)
    return sidecar


def _progress_bar(total: int, name: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=f"segmenting {name}", unit="slice", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    from ..segmenter import Segmenter

    sampling = override_from_args(SamplingConfig(), args)
    jobs = plan_jobs(args)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    device = args.device
    if device == "auto" and "LOCAL_RANK" in os.environ:
        import torch

        if torch.cuda.is_available():
            device = f"cuda:{int(os.environ['LOCAL_RANK']) % torch.cuda.device_count()}"
    segmenter = Segmenter.from_checkpoint(args.checkpoint, device=device)
    for scan, output in jobs:
        sidecar = segment_one(segmenter, scan, output, sampling, args)
        volumes = ", ".join(f"{name} {v['ml']} ml" for name, v in sidecar["class_volumes"].items()
                            if name != sidecar["class_names"][0])
        print(f"{scan} -> {output} ({sidecar['seconds']:.1f} s; {volumes})")
    return 0
