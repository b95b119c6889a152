"""Score a checkpoint on labelled volumes: Dice, IoU, HD95 per class (background excluded).

  medconddiff evaluate --image liver_image.nii.gz --label liver_label.nii.gz --slices 48:72
  medconddiff evaluate DATASET_DIR --json scores.json

Also reports the Dice of each step's x̂0, of the consensus and of a one-shot forward, and the AUROC
of the uncertainty map for flagging wrong voxels. --slices restricts scoring to a slab along the
model's slicing axis (the held-out slab of the bundled model's training, for instance).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from ..config import SamplingConfig, add_dataclass_arguments, override_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", nargs="?", type=Path, help="dataset folder (instead of --image/--label)")
    parser.add_argument("--image", type=Path, help="a scan")
    parser.add_argument("--label", type=Path, help="its reference labels")
    parser.add_argument("--checkpoint", help="checkpoint .safetensors, or a bundled model: medconddiff-liver "
                        "(default), lsegdiff-liver")
    parser.add_argument("--slices", help="START:STOP slab along the slicing axis to score (default: all)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--json", type=Path, help="write the full report as JSON here")
    add_dataclass_arguments(parser, SamplingConfig, title="sampling")


def _fmt(value: float) -> str:
    return "  n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def print_report(name: str, report: dict) -> None:
    consensus, one_shot = report["consensus"], report["one_shot"]
    print(f"\n{name}: {report['n_slices']} slices, {report['sampling']['steps']} steps, "
          f"consensus={report['sampling']['consensus']} (means over foreground classes; background excluded)")
    print(f"{'class':<14}{'Dice':>8}{'IoU':>8}{'HD95 mm':>9}{'1-shot Dice':>13}")
    for cls, m in consensus["per_class"].items():
        print(f"{cls:<14}{_fmt(m['dice']):>8}{_fmt(m['iou']):>8}{_fmt(m['hd95_mm']):>9}"
              f"{_fmt(one_shot['per_class'][cls]['dice']):>13}")
    mean = consensus["mean_foreground"]
    print(f"{'mean (fg)':<14}{_fmt(mean['dice']):>8}{_fmt(mean['iou']):>8}{_fmt(mean['hd95_mm']):>9}"
          f"{_fmt(one_shot['mean_foreground']['dice']):>13}")
    steps = ", ".join(f"{d:.3f}" for d in report["step_mean_dice"])
    print(f"per-step x̂0 mean Dice: [{steps}]; best step {report['best_step']['index']} "
          f"({report['best_step']['mean_dice']:.4f}); consensus {mean['dice']:.4f}")
    print(f"uncertainty AUROC for wrong voxels: {_fmt(report['uncertainty_auroc'])} "
          f"(error fraction {report['error_fraction']:.4f})")


def run(args: argparse.Namespace) -> int:
    from ..commands.segment import parse_slice_range
    from ..datasets import discover_pairs
    from ..evaluation import evaluate_volume
    from ..nifti import load_labels, load_volume
    from ..segmenter import Segmenter

    if args.dataset:
        pairs = discover_pairs(args.dataset)
    elif args.image and args.label:
        pairs = [(args.image, args.label)]
    else:
        raise ValueError("give a dataset folder or --image and --label")
    sampling = override_from_args(SamplingConfig(), args)
    segmenter = Segmenter.from_checkpoint(args.checkpoint, device=args.device)
    reports = {}
    for image_path, label_path in pairs:
        image, meta = load_volume(image_path)
        labels, _ = load_labels(label_path)
        slices = parse_slice_range(args.slices, image.shape[segmenter.config.preprocess.slice_axis])
        report = evaluate_volume(segmenter, image, labels, meta.spacing, sampling, slices)
        report["image"], report["label"] = str(image_path), str(label_path)
        report["slices"] = args.slices or "all"
        reports[Path(image_path).name] = report
        print_report(Path(image_path).name, report)
    output = {"checkpoint": str(segmenter.checkpoint_path), "checkpoint_sha256": segmenter.checkpoint_sha256,
              "volumes": reports}
    if args.json:
        from ..nifti import write_json_atomic

        write_json_atomic(args.json, output, overwrite=True)
    return 0
