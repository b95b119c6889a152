"""Train a MedCondDiff (pixel) or LSegDiff (latent) model on labelled scans, or fine-tune one.

  medconddiff train DATASET_DIR -o runs/liver          (Decathlon v1, nnU-Net v2, or *_image/_label pairs)
  medconddiff train DATASET_DIR --init default -o runs/ft     (fine-tune the bundled model on your data)
  medconddiff train --pair img.nii.gz lbl.nii.gz -o runs/x --train-slices 0:40,80:128 --val-slices 48-71
  torchrun --nproc-per-node 2 -m medconddiff train DATASET_DIR -o runs/ddp   (DDP; gloo on CPU, NCCL on CUDA)
  medconddiff train ... --resume runs/liver/last.safetensors   (continue an interrupted run)

What the dataset says (dataset.json: class names, channels and their modality) is not repeated in
flags; a flag that contradicts it is an error. Without --init the preprocessing plan (slicing,
target spacing, intensity per channel) comes from the dataset's fingerprint (see `medconddiff plan`);
with --init the architecture and geometry come from the start checkpoint, and only class-dependent
layers are re-initialised when the class list differs. Slice lists count canonical slices along the
plan's direction (axial: inferior → superior), written as in every command: A-B inclusive, A:B
half-open as in Python.

Writes OUTPUT/last.safetensors after every epoch (Ctrl-C saves it too), OUTPUT/final.safetensors at
the end, OUTPUT/log.jsonl (one JSON record per epoch) and OUTPUT/config.json (config, fingerprint).
With --val-slices, final.safetensors also records the consensus fusion and step cap that those slices
(never trained on) support, which `--consensus auto` (the default) then uses.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from ..config import DiffusionConfig, ModelConfig, PreprocessPlan, TrainConfig, add_dataclass_arguments
from .common import SLICES_HELP, check_device

SECTIONS = {"model": ModelConfig, "diffusion": DiffusionConfig, "plan": PreprocessPlan, "train": TrainConfig}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", nargs="?", type=Path, help="dataset folder")
    parser.add_argument("--pair", nargs=2, action="append", type=Path, metavar=("IMAGE", "LABEL"),
                        help="an image/label pair (repeatable), instead of or besides a folder")
    parser.add_argument("-o", "--output", type=Path, required=True, help="output folder for checkpoints and log")
    parser.add_argument("--train-slices", help=f"train on these {SLICES_HELP}, in every case (default: all)")
    parser.add_argument("--val-slices", help=f"score validation Dice on these {SLICES_HELP}, in every case "
                        "(default: no validation); after training, the final checkpoint's consensus and step cap "
                        "are chosen on them (as choose-consensus does)")
    parser.add_argument("--resume", type=Path, help="continue from a last.safetensors of an earlier run")
    parser.add_argument("--init", help="start from a checkpoint's weights (fine-tuning): a file, or a bundled "
                        "model: default, medconddiff-liver, lsegdiff-liver")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--max-minutes", type=_minutes, help="stop after the epoch that passes this wall time")
    parser.add_argument("--export-half", type=Path, help="also write the final EMA weights in fp16 here (for shipping)")
    parser.add_argument("--overwrite", action="store_true",
                        help="allow an output folder with an earlier run's checkpoints")
    for section, cls in SECTIONS.items():
        add_dataclass_arguments(parser, cls, title=section)


def run(args: argparse.Namespace) -> int:
    from ..atomic import check_target
    from ..checkpoint import load_checkpoint
    from ..experiment import ConfigConflict, given_flags, training_config
    from ..train import Trainer, build_datasets
    from ..training_data import TrainingData

    check_device(args.device)
    if args.export_half is not None:
        # Before the training, not after it (save_checkpoint makes missing folders).
        check_target(args.export_half, args.overwrite, "--export-half", creates_folders=True)
    train_ranges, val_ranges = (TrainingData.ranges(args.train_slices, "--train-slices"),
                                TrainingData.ranges(args.val_slices, "--val-slices"))
    data = TrainingData.from_sources(args.dataset, [tuple(p) for p in (args.pair or [])],
                                     channel_names=args.channel_names)
    # Resuming the run of this very folder continues it (its log goes on); resuming another run's checkpoint into
    # a folder that holds a run of its own would replace that one.
    resuming_here = args.resume is not None and Path(args.resume).resolve().parent == args.output.resolve()
    _check_earlier_run(args.output, args.overwrite or resuming_here)
    flags = given_flags(args, SECTIONS)
    if args.resume is not None:
        start = load_checkpoint(args.resume)
        config = training_config(flags={k: v for k, v in flags.items() if k != "train"}, start=start,
                                 class_names=data.class_names, channel_names=data.channel_names,
                                 dataset_label=data.label, reorder_channels=True)
        if config.model.class_names != start.config.model.class_names or config.plan != start.config.plan:
            raise ConfigConflict(f"{args.resume} was trained with other classes or another plan; it cannot be resumed "
                                 "on this data")
        # Resuming continues the same run: its own config (backbone weights source included), new train flags.
        model = start.config.model
        if model.backbone_weights and not Path(model.backbone_weights).is_file():
            # The checkpoint holds the trained backbone; its pretrained source is only the record of where it began.
            print(f"note: {model.backbone_weights} (the pretrained backbone this run began from) is not here; the "
                  "resumed weights do not need it", file=sys.stderr)
            model = dataclasses.replace(model, backbone_weights=None)
        config = type(config)(model=model, diffusion=start.config.diffusion, plan=start.config.plan,
                              train=_override(start.config.train, flags["train"]))
    else:
        start = load_checkpoint(args.init, allow_legacy=True) if args.init else None
        dataset_plan = data.plan(base=start.config.plan if start else None) if data.has_labels else None
        class_names = data.class_names
        if class_names is None and start is None and "class_names" not in flags["model"]:
            class_names = data.derived_class_names()
            print(f"class names not stated by the data: {', '.join(class_names)} (name them with --class-names)")
        config = training_config(flags=flags, start=start, class_names=class_names,
                                 channel_names=data.channel_names, dataset_plan=dataset_plan,
                                 dataset_label=data.label, reorder_channels=True)
    cases = data.load_cases(config.model.num_classes, config.plan.channel_names)
    if val_ranges is not None:
        _check_slices_of_every_case(config.plan, cases, val_ranges)
    train_set, validation = build_datasets(config, cases, train_ranges, val_ranges)
    args.output.mkdir(parents=True, exist_ok=True)
    # Opened at its first record (only the main process writes one): under torchrun another rank checks the folder
    # for an earlier run's files meanwhile. A new run starts a new log; a resumed one adds to its own.
    log_file = None

    def log(message: str) -> None:
        nonlocal log_file
        print(message, flush=True)
        if message.startswith("{"):
            if log_file is None:
                log_file = open(args.output / "log.jsonl", "a" if resuming_here else "w", encoding="utf-8")
            log_file.write(message + "\n")
            log_file.flush()

    log(f"data: {data.summary(cases)}")
    source = (data.label if data.class_names else "--class-names" if "class_names" in flags["model"]
              else "the start checkpoint" if start is not None else "the label values")
    log(f"classes: {', '.join(config.model.class_names)} (from {source})")
    log(f"plan: {json.dumps(_plan_record(config.plan))}")
    provenance = {"trained_on": [case.name for case in cases], "train_slices": args.train_slices,
                  "dataset": data.label, "fingerprint": data.fingerprint_record(),
                  # A resumed run began where the run it continues began.
                  "init_from": (start.extra.get("init_from") if args.resume is not None
                                else _start_record(start) if start is not None else None)}
    # On resume the weights are loaded before any family-specific preparation (LSegDiff then keeps
    # its trained VAE instead of training a new one), and resume() restores the rest of the state.
    trainer = Trainer(config, train_set, args.output, device=args.device, validation=validation, log=log,
                      init_from=start, provenance=provenance)
    if args.resume is not None:
        trainer.resume(args.resume)
    try:
        path = trainer.fit(max_seconds=args.max_minutes * 60 if args.max_minutes else None)
    finally:
        if log_file is not None:
            log_file.close()
    if args.export_half and trainer.dist.is_main:
        from ..checkpoint import save_checkpoint

        save_checkpoint(args.export_half, trainer.weights_to_save(), config,
                        extra={**provenance, "history": trainer.history[-1:], **trainer.final_records}, half=True,
                        overwrite=args.overwrite)
        print(f"exported fp16 weights to {args.export_half}")
    if trainer.dist.is_main:
        from ..atomic import atomic_write

        # The run's own record, replaced with its checkpoint (a run refused over another's final checkpoint
        # never gets here); atomic, so an interrupted write leaves the previous record whole. Serialised
        # first, as the checkpoint's record is (NaN allowed), so a failure cannot touch the file.
        text = json.dumps({**config.to_dict(), "provenance": provenance}, indent=2)
        atomic_write(args.output / "config.json", lambda tmp: tmp.write_text(text, encoding="utf-8"),
                     overwrite=True, suffix=".json")
    return 0 if path else 1


def _minutes(text: str) -> float:
    """--max-minutes: a positive, finite number of minutes (0 ran without a limit, a negative one stopped after
    the first epoch, without a word)."""
    import math

    try:
        minutes = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of minutes") from None
    if not (math.isfinite(minutes) and minutes > 0):
        raise argparse.ArgumentTypeError(f"{text} minutes: give a positive number (leave the flag out for no limit)")
    return minutes


#: An earlier run's files in an output folder: its checkpoints (the last one is what --resume continues), its record
#: and its log. Replaced only when asked.
RUN_FILES = ("final.safetensors", "last.safetensors", "config.json", "log.jsonl")


def _check_earlier_run(output: Path, replace: bool) -> None:
    earlier = [output / name for name in RUN_FILES if (output / name).exists()]
    if earlier and not replace:
        resume = (f"pass --resume {output / 'last.safetensors'} to continue it, "
                  if (output / "last.safetensors").exists() else "")
        raise FileExistsError(f"{earlier[0]} exists (an earlier run's); {resume}pass --overwrite to replace it, or "
                              "choose another --output")


def _check_slices_of_every_case(plan: PreprocessPlan, cases, ranges) -> None:
    """Validation reads its slices only when it first runs, an epoch into training: a --val-slices
    outside a case must fail now, not after the first epoch (or never, with --val-every 0)."""
    from ..datasets import range_indices
    from ..preprocess import ScanPreprocessor

    preprocessor = ScanPreprocessor(plan)
    for case in cases:
        range_indices(ranges, preprocessor.geometry(case.image.shape[:3], case.meta).n_slices, case.name)


def _override(config, changes: dict):
    import dataclasses

    return dataclasses.replace(config, **changes)


def _plan_record(plan: PreprocessPlan) -> dict:
    import dataclasses

    return dataclasses.asdict(plan)


def _start_record(start) -> dict:
    from ..outputs import recorded_name

    # By file name: the checkpoint may lie in a folder named after a patient (see recorded_name).
    return {"path": recorded_name(start.path), "sha256": start.sha256, "classes": list(start.config.model.class_names)}
