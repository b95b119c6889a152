"""Fine-tune a model on a few labelled slices of your own scan (the napari Fine-tune button's path).

  medconddiff finetune scan.nii.gz corrected_labels.nii.gz --slices 31,33,40-42 -o scan_finetuned.safetensors
  medconddiff finetune scan.nii.gz labels.nii.gz --slices labelled --init lsegdiff-liver --class-names background lesion
  medconddiff finetune brain_t1.nii.gz labels.nii.gz --slices 60,90,120 --channel-names T1 \
      --class-names background "grey matter" "white matter" -o t1.safetensors

Starts from --init (default: the bundled default model) with its architecture and preprocessing
plan; trains --steps optimizer steps (seeded, augmentation on) on the given canonical slices (along
the model's slicing direction; 'labelled' = every slice with a non-zero label); saves a checkpoint
that records what it was fine-tuned from and on which slices. Label values beyond the start model's
classes need names (--class-names, background first); a different class list re-initialises only
the class-dependent layers. A scan of another kind than the start model's (an MRI for the bundled
CT model) needs its channels named (--channel-names T1): its intensities are then z-scored per scan
instead of clipped to the CT window. Ctrl-C stops after the current step and still saves.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", type=Path, help="the scan (NIfTI; 4-D or one file per channel: see --channel-file)")
    parser.add_argument("labels", type=Path, help="its labels (corrected slices), on the scan's grid")
    parser.add_argument("--channel-file", type=Path, action="append", default=[],
                        help="further channel files of a multi-channel scan, in the model's channel order")
    parser.add_argument("--slices", required=True, help="canonical slices to learn: '31,33,40-42' or 'labelled'")
    parser.add_argument("-o", "--output", type=Path, required=True, help="checkpoint to write (.safetensors)")
    parser.add_argument("--init", default="default", help="start checkpoint: a file or a bundled model "
                        "(default, medconddiff-liver, lsegdiff-liver); default: the bundled default model")
    parser.add_argument("--class-names", nargs="+", help="class names, background first (default: the start "
                        "model's)")
    parser.add_argument("--channel-names", nargs="+", help="what the scan's channels are when not what the start "
                        "model took, e.g. T1 for an MRI and a CT model: a channel of another kind (CT or not) "
                        "gets its kind's intensity scheme (CT: the HU window; others: per-scan z-scores)")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps (default: 200)")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights, crops and augmentation (default: 0)")
    parser.add_argument("--batch-size", type=int, help="crops per step (default: 4)")
    parser.add_argument("--lr", type=float, help="learning rate (default: 3e-4)")
    parser.add_argument("--no-augment", action="store_true", help="train without augmentation")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.add_argument("--quiet", action="store_true", help="no per-step progress")


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import load_checkpoint
    from ..finetune import LabelledScan, finetune
    from ..nifti import load_channels, load_labels, load_volume

    if args.output.exists() and not args.overwrite:
        raise FileExistsError(f"{args.output} exists; pass --overwrite to replace it")
    if not args.output.name.endswith(".safetensors"):
        raise ValueError(f"{args.output}: the checkpoint name must end with .safetensors")
    start = load_checkpoint(args.init, allow_legacy=True)
    files = [args.image, *args.channel_file]
    channels = len(args.channel_names) if args.channel_names else start.config.plan.num_channels
    if channels == 1 and len(files) == 1:
        image, meta = load_volume(args.image)
    else:
        image, meta = load_channels(files)
    labels, label_meta = load_labels(args.labels)
    if labels.shape != image.shape[:3]:
        raise ValueError(f"{args.labels} has shape {labels.shape}, the scan {image.shape[:3]}")
    import numpy as np

    if not np.allclose(label_meta.affine, meta.affine, atol=1e-3):
        raise ValueError(f"{args.labels} does not lie on the scan's grid (another affine)")
    if args.slices.strip().lower() == "labelled":
        from ..preprocess import ScanPreprocessor

        geometry = ScanPreprocessor(start.config.plan).geometry(image.shape[:3], meta)
        view = geometry.slice_view(labels)
        slices = [i for i in range(geometry.n_slices) if view[i].any()]
        if not slices:
            raise ValueError(f"{args.labels} has no labelled slice")
    else:
        from ..slice_lists import parse_slice_list

        slices = parse_slice_list(args.slices)
        if not slices or min(slices) < 0:
            raise ValueError(f"--slices names no valid slice: {args.slices!r}")
    name = args.image.name.split(".")[0]
    run_ = finetune(start, [LabelledScan(name, image, meta, labels, slices)], class_names=args.class_names,
                    channel_names=args.channel_names, steps=args.steps, seed=args.seed, augment=not args.no_augment,
                    batch_size=args.batch_size,
                    lr=args.lr, device=args.device)
    print(f"fine-tuning on {len(slices)} slice(s) of {name}: {', '.join(map(str, slices))}")
    started = time.perf_counter()
    interrupted = False
    try:
        for event in run_:
            if not args.quiet and (event.step % 10 == 0 or event.step == event.total_steps):
                print(f"step {event.step}/{event.total_steps}  loss {event.losses['loss']:.4f}  "
                      f"({time.perf_counter() - started:.0f} s)", flush=True)
    except KeyboardInterrupt:
        interrupted = True
        print(f"interrupted after step {run_.completed_steps}: saving what was learned", file=sys.stderr)
    if run_.completed_steps == 0:
        raise ValueError("stopped before the first step; nothing to save")
    path = run_.save(args.output, overwrite=args.overwrite)
    print(f"saved {path} ({run_.completed_steps} steps in {time.perf_counter() - started:.1f} s)")
    return 130 if interrupted else 0
