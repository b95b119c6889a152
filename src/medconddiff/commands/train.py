"""Train a MedCondDiff (pixel) or LSegDiff (latent) model on labelled NIfTI volumes.

  medconddiff train DATASET_DIR -o runs/liver                 (Decathlon/nnU-Net layout or *_image/_label pairs)
  medconddiff train --pair img.nii.gz lbl.nii.gz -o runs/x --train-slices 0:40,80:128 --val-slices 48:72
  torchrun --nproc-per-node 2 -m medconddiff train DATASET_DIR -o runs/ddp   (DDP; gloo on CPU, NCCL on CUDA)
  medconddiff train ... --resume runs/liver/last.safetensors   (continue an interrupted run)

Writes OUTPUT/last.safetensors after every epoch (Ctrl-C saves it too), OUTPUT/final.safetensors at
the end and OUTPUT/log.jsonl (one JSON record per epoch: losses, lr, validation Dice per class).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..config import (DiffusionConfig, ExperimentConfig, ModelConfig, PreprocessConfig, TrainConfig,
                      add_dataclass_arguments, override_from_args)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", nargs="?", type=Path, help="dataset folder")
    parser.add_argument("--pair", nargs=2, action="append", type=Path, metavar=("IMAGE", "LABEL"),
                        help="an image/label pair (repeatable), instead of or besides a folder")
    parser.add_argument("-o", "--output", type=Path, required=True, help="output folder for checkpoints and log")
    parser.add_argument("--train-slices", help="slice ranges used for training, e.g. 0:40,80:128 (default: all)")
    parser.add_argument("--val-slices", help="slice ranges scored for validation Dice, e.g. 48:72")
    parser.add_argument("--resume", type=Path, help="continue from a last.safetensors of an earlier run")
    parser.add_argument("--init", type=Path, help="start from the weights of a checkpoint (fine-tuning)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--max-minutes", type=float, help="stop after the epoch that passes this wall time")
    parser.add_argument("--export-half", type=Path, help="also write the final EMA weights in fp16 here (for shipping)")
    parser.add_argument("--overwrite", action="store_true", help="allow an output folder with a final checkpoint")
    for cls in (ModelConfig, DiffusionConfig, PreprocessConfig, TrainConfig):
        add_dataclass_arguments(parser, cls, title=cls.__name__.replace("Config", "").lower())


def build_config(args: argparse.Namespace) -> ExperimentConfig:
    if args.resume is not None:
        from ..checkpoint import load_checkpoint

        base = load_checkpoint(args.resume).config
    else:
        base = ExperimentConfig()
    return ExperimentConfig(model=override_from_args(base.model, args),
                            diffusion=override_from_args(base.diffusion, args),
                            preprocess=override_from_args(base.preprocess, args),
                            train=override_from_args(base.train, args))


def run(args: argparse.Namespace) -> int:
    from ..datasets import discover_pairs, load_case, parse_ranges
    from ..train import Trainer, build_datasets

    config = build_config(args)
    pairs = list(discover_pairs(args.dataset)) if args.dataset else []
    pairs += [tuple(p) for p in (args.pair or [])]
    if not pairs:
        raise ValueError("no training data: give a dataset folder or --pair IMAGE LABEL")
    final = args.output / "final.safetensors"
    if final.exists() and not (args.overwrite or args.resume):
        raise FileExistsError(f"{final} exists; pass --overwrite or choose another --output")
    cases = [load_case(Path(image), Path(label), config.model.num_classes) for image, label in pairs]
    train_set, val_set = build_datasets(config, cases, parse_ranges(args.train_slices), parse_ranges(args.val_slices))
    args.output.mkdir(parents=True, exist_ok=True)
    log_file = open(args.output / "log.jsonl", "a")

    def log(message: str) -> None:
        print(message, flush=True)
        if message.startswith("{"):
            log_file.write(message + "\n")
            log_file.flush()

    # On resume the weights are loaded before any family-specific preparation (LSegDiff then keeps
    # its trained VAE instead of training a new one), and resume() restores the rest of the state.
    trainer = Trainer(config, train_set, args.output, device=args.device, val_set=val_set, log=log,
                      init_from=args.resume or args.init)
    if args.resume is not None:
        trainer.resume(args.resume)
    try:
        path = trainer.fit(max_seconds=args.max_minutes * 60 if args.max_minutes else None)
    finally:
        log_file.close()
    if args.export_half and trainer.dist.is_main:
        from ..checkpoint import save_checkpoint

        metadata = {"trained_on": [str(p[0].name) for p in pairs], "train_slices": args.train_slices,
                    "history": trainer.history[-1:]}
        save_checkpoint(args.export_half, trainer.weights_to_save(), config, extra=metadata, half=True,
                        overwrite=args.overwrite)
        print(f"exported fp16 weights to {args.export_half}")
    if trainer.dist.is_main:
        (args.output / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    return 0 if path else 1
