"""Fine-tune a model on a few labelled slices of your own scan (the napari Fine-tune button's path).

  medconddiff finetune scan.nii.gz corrected_labels.nii.gz --slices 31,33,40-42 -o scan_finetuned.safetensors
  medconddiff finetune scan.nii.gz corrected_labels.nii.gz --slices 31,33,40:43 -o ...   (the same slices)
  medconddiff finetune scan.nii.gz labels.nii.gz --slices labelled --init lsegdiff-liver --class-names background lesion
  medconddiff finetune brain_t1.nii.gz labels.nii.gz --slices 60,90,120 --channel-names T1 \\
      --class-names background "grey matter" "white matter" -o t1.safetensors
  medconddiff finetune SERIES_DIR corrections.dcm --slices labelled -o ct_finetuned.safetensors
      (a DICOM series and a DICOM SEG of it, e.g. the plugin's export; or NIfTI labels on its voxels)
  medconddiff finetune SERIES_DIR RS.dcm --keep-classes GTV=lesion --slices labelled -o gtv.safetensors
      (an RT structure set: only its GTV, learned as 'lesion'; the External and the rest count as background)
  medconddiff finetune my_training_set/ -o model.safetensors --init default --replay
      (a training-set folder: every verified voxel of every case; --replay also trains on the bundled
      model's own slices, a quarter of every batch, and keeps its classes)

Starts from --init (default: the bundled default model) with its architecture and preprocessing
plan; trains --steps optimizer steps (seeded, augmentation on) on the given canonical slices (along
the model's slicing direction; 'labelled' = every slice with a non-zero label); saves a checkpoint
that records what it was fine-tuned from and on which slices. Label values beyond the start model's
classes need names (--class-names, background first); a different class list re-initialises only
the class-dependent layers. A scan of another kind than the start model's (an MRI for the bundled
CT model) needs its channels named (--channel-names T1): its intensities are then z-scored per scan
instead of clipped to the CT window. A CT model given a scan with no voxel below 0 (not CT in
Hounsfield units) and no --channel-names is refused rather than silently CT-windowed.
Ctrl-C stops after the current step and still saves.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..errors import ConfigError
from ..finetune_steps import SET_FINETUNE_STEPS, finetune_steps_rule
from .common import SLICES_HELP, add_keep_classes_argument, check_device, labelled_or_named_slices


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", type=Path, help="the scan: NIfTI (4-D or one file per channel: see --channel-file) "
                        "or DICOM (a series folder or a .dcm file); or a training-set folder (nnU-Net v2 with an "
                        "'ignore' label, a dataset.json at its top): every verified voxel of every case is learned")
    parser.add_argument("labels", type=Path, nargs="?", help="its labels (corrected slices): a NIfTI on the scan's "
                        "grid, or for a DICOM scan a DICOM SEG that references it (not with a training-set folder)")
    parser.add_argument("--series", help="the scan is a DICOM folder with several series: which one, by Series "
                        "Number or Series Instance UID")
    parser.add_argument("--channel-file", type=Path, action="append", default=[],
                        help="further channel files of a multi-channel scan, in the model's channel order")
    parser.add_argument("--slices", help="(required with a scan) " f"learn from these {SLICES_HELP}; or 'labelled': "
                        "every slice with a non-zero label")
    parser.add_argument("-o", "--output", type=Path, required=True, help="checkpoint to write (.safetensors)")
    parser.add_argument("--replay", type=float, nargs="?", const=0.25, metavar="FRACTION",
                        help="also train on the slices the (bundled) start model was trained on, this share of "
                        "every batch (default 0.25), and keep its classes, so it forgets less")
    parser.add_argument("--hold-back", action="store_true",
                        help="keep one corrected slice out of training (of the scan, or of the training-set case "
                        "with the most verified slices) and choose the model's consensus on it (default: train "
                        "on every slice; the model then uses its last step, which a fine-tune's rising steps "
                        "make its best)")
    parser.add_argument("--init", default="default", help="start checkpoint: a file or a bundled model "
                        "(default, medconddiff-liver, lsegdiff-liver); default: the bundled default model")
    parser.add_argument("--class-names", nargs="+", help="class names, background first (default: the start "
                        "model's)")
    add_keep_classes_argument(parser)
    parser.add_argument("--channel-names", nargs="+", help="what the scan's channels are when not what the start "
                        "model took, e.g. T1 for an MRI and a CT model: a channel of another kind (CT or not) "
                        "gets its kind's intensity scheme (CT: the HU window; others: per-scan z-scores)")
    parser.add_argument("--steps", type=int, help=f"optimizer steps (default: {finetune_steps_rule()}: a training "
                        f"set of two scans needed {SET_FINETUNE_STEPS})")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights, crops and augmentation (default: 0)")
    parser.add_argument("--batch-size", type=int, help="crops per step (default: 4)")
    parser.add_argument("--lr", type=float, help="learning rate (default: 3e-4)")
    parser.add_argument("--no-augment", action="store_true", help="train without augmentation")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.add_argument("--quiet", action="store_true", help="no per-step progress")


def run(args: argparse.Namespace) -> int:
    from ..atomic import check_target
    from ..checkpoint import load_checkpoint
    from ..finetune import LabelledScan, finetune
    from .labelled_input import kept_labels, labelled_input

    if not args.output.name.endswith(".safetensors"):
        raise ConfigError(f"{args.output}: the checkpoint name must end with .safetensors")
    check_target(args.output, args.overwrite, creates_folders=True)    # before minutes of training, not after
    check_device(args.device)
    start = load_checkpoint(args.init, allow_legacy=True)
    if _is_training_set_folder(args.image):
        if args.series is not None:
            raise ConfigError(f"--series chooses a DICOM series; {args.image} is a training-set folder")
        return _finetune_on_training_set(args, start)
    if args.labels is None or not args.slices:
        raise ConfigError("give the scan's LABELS and --slices (or a training-set folder instead of the scan)")
    given = labelled_input(args.image, args.labels, args.series, label_flag="LABELS", image_flag="the scan")
    channels = len(args.channel_names) if args.channel_names else start.config.plan.num_channels
    image, meta, labels = given.load_on_one_grid(args.labels, args.channel_file, several_channels=channels > 1)
    _refuse_unverified_voxels_of_a_training_set(args.labels, labels)
    if not args.channel_names:
        _refuse_ct_window_on_non_hounsfield(args, start.config.plan, image)
    from ..preprocess import ScanPreprocessor

    name = given.label
    # A SEG's segments or an RT structure set's ROIs name their classes, as add-to-set and napari take them.
    class_names = args.class_names or given.label_class_names(args.labels, labels)
    if class_names or args.keep_classes:
        labels, class_names = kept_labels(args.keep_classes, labels, class_names or start.config.model.class_names,
                                          start.config.model.class_names, name)
    geometry = ScanPreprocessor(start.config.plan).geometry(image.shape[:3], meta)
    slices = labelled_or_named_slices(args.slices, geometry, labels, args.labels, args.image.name, "to learn from")
    run_ = finetune(start, [LabelledScan(name, image, meta, labels, slices)], class_names=class_names,
                    channel_names=args.channel_names, steps=args.steps, seed=args.seed, augment=not args.no_augment,
                    batch_size=args.batch_size,
                    lr=args.lr, device=args.device, replay=_replay(args), hold_back=args.hold_back)
    trained = [i for i in slices if run_.held_back is None or i != run_.held_back.slice]
    print(f"fine-tuning on {len(trained)} slice(s) of {name}: {', '.join(map(str, trained))}")
    if run_.held_back is not None:
        print(f"slice {run_.held_back.slice} is held back: it chooses the consensus and is not trained on")
    return _train_and_save(args, run_)


def _replay(args: argparse.Namespace):
    """--replay's share (False: not given). A share of 0 is refused with the other shares outside (0, 1)
    (medconddiff.finetune.bundled_replay), not taken as 'no replay'."""
    return False if args.replay is None else args.replay


def _is_training_set_folder(path: Path) -> bool:
    """A folder with a dataset.json, or without DICOM below it (the training set's own error then says
    what it lacks); a folder of DICOM files is a scan."""
    from ..dicom_series import is_dicom_path

    return path.is_dir() and ((path / "dataset.json").is_file() or not is_dicom_path(path))


def _finetune_on_training_set(args: argparse.Namespace, start) -> int:
    from ..finetune import finetune
    from ..training_set import TrainingSet

    if args.labels is not None or args.slices or args.channel_file or args.keep_classes:
        raise ConfigError(f"{args.image} is a training-set folder: it holds its labels and verified slices; "
                          "drop LABELS, --slices, --channel-file and --keep-classes")
    training_set = TrainingSet.open(args.image)
    run_ = finetune(start, [], class_names=args.class_names, channel_names=args.channel_names,
                    training_set=training_set, steps=args.steps, seed=args.seed, augment=not args.no_augment,
                    batch_size=args.batch_size, lr=args.lr, device=args.device, replay=_replay(args),
                    hold_back=args.hold_back)
    print(f"fine-tuning on the training set {args.image}: {training_set.summary().text()}")
    if run_.held_back is not None:
        print(f"slice {run_.held_back.slice} of case {run_.held_back.case} is held back: it chooses the consensus "
              "and is not trained on")
    return _train_and_save(args, run_)


def _train_and_save(args: argparse.Namespace, run_) -> int:
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
        if interrupted:
            print("interrupted before the first step: nothing to save", file=sys.stderr)
            return 130
        raise RuntimeError("fine-tuning ended without a single step")   # a bug: steps >= 1 is validated
    if interrupted and args.output.exists():
        # --overwrite asked for the finished model to replace that file, not for a partial one to.
        path = run_.save(_free_name(args.output), overwrite=False)
        print(f"{args.output.name} is left as it is (the fine-tune was interrupted); the model of "
              f"{run_.completed_steps} step(s) is saved as {path.name}", file=sys.stderr)
    else:
        path = _save_or_beside(args, run_)
    print(f"saved {path} ({run_.completed_steps} steps in {time.perf_counter() - started:.1f} s); its "
          f"{run_.consensus_choice.describe()}")
    return 130 if interrupted else 0


def _save_or_beside(args: argparse.Namespace, run_) -> Path:
    try:
        return run_.save(args.output, overwrite=args.overwrite)
    except FileExistsError:
        # Another program wrote the file while this one trained (it was checked at the start): the user's
        # file stays, and the trained weights go beside it rather than nowhere.
        path = run_.save(_free_name(args.output), overwrite=False)
        print(f"{args.output} appeared while training and is left as it is; the model is saved as {path.name}",
              file=sys.stderr)
        return path


def _free_name(path: Path) -> Path:
    """``name_2.safetensors``, ``name_3``… beside ``path``: the first that does not exist."""
    stem, number = path.name.removesuffix(".safetensors"), 2
    while (path.with_name(f"{stem}_{number}.safetensors")).exists():
        number += 1
    return path.with_name(f"{stem}_{number}.safetensors")


def _refuse_unverified_voxels_of_a_training_set(label_path: Path, labels) -> None:
    """A training set's label file marks every voxel nobody checked with its 'ignore' value: given as a scan's
    labels, that value would be learned as a class (or refused as a label without a name, which says nothing
    of why). The set's folder learns only the verified voxels."""
    import numpy as np

    from ..dataset_layout import label_file_classes

    classes = label_file_classes(label_path)
    ignore = classes[1] if classes is not None else None
    if ignore is not None and bool(np.any(np.asarray(labels) == ignore)):
        root = Path(label_path).parent.parent
        raise ConfigError(f"{Path(label_path).name} is a label file of the training set {root.name}, whose value "
                          f"{ignore} is 'ignore' (voxels nobody checked), not a class; give the set's folder "
                          f"({root.name}) instead of its files, to learn only the verified voxels")


def _refuse_ct_window_on_non_hounsfield(args: argparse.Namespace, plan, image) -> None:
    """A CT model would clip a scan that is not in HU (an MRI) to its CT window and learn from a few grey
    levels; the user must say what the scan is instead of getting that silently."""
    from ..finetune import channels_not_in_hounsfield

    unlike = channels_not_in_hounsfield(plan, image)
    if not unlike:
        return
    low, high = (f"{v:g}" for v in plan.window)
    names = ", ".join(plan.channel_names[c] for c in unlike)
    raise ConfigError(f"{args.image} has no voxel below 0, so it is not CT in Hounsfield units, but the start "
                      f"model reads its channel(s) {names} through the CT window [{low}, {high}] HU; say what the "
                      "scan is with --channel-names (e.g. --channel-names MRI, or --channel-names CT to keep the "
                      "CT window)")
