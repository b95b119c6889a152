"""Score a checkpoint on labelled volumes: Dice, IoU, HD95 per class (background excluded).

  medconddiff evaluate --image liver_image.nii.gz --label liver_label.nii.gz --slices 48:72
  medconddiff evaluate --image SERIES_DIR --label labels.nii.gz|seg.dcm [--series N|UID]
  medconddiff evaluate DATASET_DIR --json scores.json

Also reports the Dice of each step's x̂0 (their mean over classes, and per class for a model of several:
a class the reference lacks but a step predicts counts 0 in the mean), of the consensus and of a one-shot
forward, and the AUROC of the uncertainty map for flagging wrong voxels. --slices restricts scoring to a slab of canonical
slices along the model's slicing direction (axial: counted inferior → superior, whatever the file's
voxel order), e.g. the held-out slab of the bundled model's training.

A class in neither the prediction nor the reference is "absent": shown as such and left out of the
means, which say how many classes they averaged. A dataset folder (Decathlon, nnU-Net v2, or
*_image/*_label pairs) prints one row per labelled case and a final row with the mean over cases
(per class: over the cases where it is not absent). --json writes every figure (undefined ones,
such as HD95 with an empty mask, as null) and a "summary" of the means over cases.

--image may be DICOM (a series folder or a .dcm file, told apart from NIfTI as `segment` does; a
folder of several series needs --series). Its reference labels are a NIfTI on the series' voxels or a
DICOM SEG that references the series (read onto its voxels by the images it references) or an RT
structure set drawn on it.

Reference classes are scored as the model's classes of the same name where the reference names them (a
dataset.json's labels, SEG segment labels, RT structure names; case and tumour/tumor spelling aside),
whatever their numbers; --class-map pairs the others (GTV=tumour, or a label value: 5=liver). Once
classes are matched, a reference class the model lacks counts as background (an External contour);
where nothing matches, labels are compared by number with a warning. The JSON records the matching
("reference_classes").
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Optional, Sequence

import numpy as np

from ..config import SamplingConfig, add_dataclass_arguments, override_from_args
from ..errors import ConfigError, UserInputError, user_error_types
from .common import SLICES_HELP, add_class_map_argument, check_device, scan_slices


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", nargs="?", type=Path,
                        help="dataset folder (Decathlon, nnU-Net v2, or *_image/*_label pairs): every labelled case, "
                        "one row each (instead of --image/--label)")
    parser.add_argument("--image", type=Path, help="a scan: NIfTI (4-D for several channels, or one file per "
                        "channel: see --channel-file), or DICOM (a series folder or a .dcm file)")
    parser.add_argument("--channel-file", type=Path, action="append", default=[],
                        help="further channel files of a multi-channel --image, in the model's channel order")
    parser.add_argument("--label", type=Path, help="its reference labels: NIfTI, or a DICOM SEG of a DICOM --image")
    parser.add_argument("--series", help="--image is a DICOM folder with several series: which one, by Series "
                        "Number or Series Instance UID")
    parser.add_argument("--checkpoint", help="checkpoint .safetensors, or a bundled model: medconddiff-liver "
                        "(default), lsegdiff-liver")
    parser.add_argument("--slices", help=f"score only these {SLICES_HELP} (default: all)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    add_class_map_argument(parser)
    parser.add_argument("--json", type=Path, help="write the full report as JSON here (undefined values are null)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    add_dataclass_arguments(parser, SamplingConfig, title="sampling")


def _fmt(value) -> str:
    return "  n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def _dice_cell(metrics: dict) -> str:
    return "absent" if metrics.get("absent") else _fmt(metrics["dice"])


def _mean_note(mean: dict, total: int) -> str:
    note = f"mean over {mean['classes_averaged']} of {total} foreground classes"
    if mean["absent_classes"]:
        note += f"; absent from prediction and reference (not averaged): {', '.join(mean['absent_classes'])}"
    return note


def _choice_note(report: dict) -> str:
    """' (the model's own, chosen on …)' when the consensus used is the checkpoint's recorded choice."""
    from ..consensus_choice import ConsensusChoice

    record = report.get("consensus_choice")
    if not record or record.get("method") != report["sampling"]["consensus"]:
        return ""
    return f" (the model's own, {ConsensusChoice.from_dict(record).origin()})"


def print_report(name: str, report: dict) -> None:
    consensus, one_shot = report["consensus"], report["one_shot"]
    steps = (f"adaptive ≤ {report['sampling']['steps']} steps (mean {report['steps_used_mean']:.1f})"
             if report["sampling"].get("adaptive") else f"{report['sampling']['steps']} steps")
    print(f"\n{name}: {report['n_slices']} {report.get('slicing', '')} slices, {steps}, "
          f"consensus={report['sampling']['consensus']}{_choice_note(report)} "
          "(means over foreground classes; background excluded)")
    print(f"{'class':<14}{'Dice':>8}{'IoU':>8}{'HD95 mm':>9}{'1-shot Dice':>13}")
    for cls, m in consensus["per_class"].items():
        print(f"{cls:<14}{_dice_cell(m):>8}{_fmt(m['iou']):>8}{_fmt(m['hd95_mm']):>9}"
              f"{_dice_cell(one_shot['per_class'][cls]):>13}")
    mean = consensus["mean_foreground"]
    print(f"{'mean (fg)':<14}{_fmt(mean['dice']):>8}{_fmt(mean['iou']):>8}{_fmt(mean['hd95_mm']):>9}"
          f"{_fmt(one_shot['mean_foreground']['dice']):>13}")
    print(f"  ({_mean_note(mean, len(consensus['per_class']))}; HD95 n/a where a mask is empty)")
    steps = ", ".join(_fmt(d).strip() for d in report["step_mean_dice"])
    best = report["best_step"]
    # Steps are counted from 1 here, as in the README; the JSON keeps
    # the list index (``best_step.index``) for code that indexes ``step_mean_dice``.
    best_text = f"step {best['index'] + 1}" if best["index"] is not None else "n/a"
    print(f"per-step x̂0 mean Dice (steps 1 → {len(report['step_mean_dice'])}): [{steps}]; best {best_text} "
          f"({_fmt(best['mean_dice'])}); consensus {_fmt(mean['dice'])}")
    per_class = report["step_dice_per_class"]
    if len(per_class) > 1:
        for cls, dice in per_class.items():
            if not all(math.isnan(d) for d in dice):
                print(f"  {cls:<12}[{', '.join(_fmt(d).strip() for d in dice)}]; consensus "
                      f"{_fmt(consensus['per_class'][cls]['dice']).strip()}")
    check = report["diffusion_check"]
    margin, drift = (check["consensus_minus_best_of_steps_and_one_shot"], check["last_step_minus_first_step"])
    verdict = {True: "the consensus is at least as good", False: "BELOW: fewer steps, the one-shot or "
               "another --consensus may do better here", None: "n/a"}[check["consensus_at_least_best"]]
    print(f"consensus − max(best step, one-shot): {_fmt(margin).strip()} ({verdict}); "
          f"last step − first step: {_fmt(drift).strip()}")
    region = report["foreground_region"]
    print("uncertainty AUROC for flagging wrong voxels:")
    print(f"  whole slab  {_fmt(report['uncertainty_auroc'])}  every scored voxel, error fraction "
          f"{report['error_fraction']:.4f} (easy background can inflate it)")
    print(f"  foreground  {_fmt(report['uncertainty_auroc_foreground'])}  reference ∪ prediction dilated "
          f"{region['margin_voxels']} voxels in-plane: {region['voxels']} voxels, error fraction "
          f"{_fmt(region['error_fraction']).strip()}")


def print_case_table_header(class_names) -> None:
    print(f"\n{'case':<24}" + "".join(f"{c[:12]:>13}" for c in class_names[1:]) + f"{'mean (fg)':>11}")


def print_case_row(name: str, report: dict) -> None:
    consensus = report["consensus"]
    cells = "".join(f"{_dice_cell(m):>13}" for m in consensus["per_class"].values())
    print(f"{name[:23]:<24}{cells}{_fmt(consensus['mean_foreground']['dice']):>11}", flush=True)


def print_summary_row(summary: dict) -> None:
    cells = "".join(f"{_fmt(m['dice']):>13}" for m in summary["per_class"].values())
    print(f"{'mean over cases':<24}{cells}{_fmt(summary['mean_foreground_dice']):>11}")
    counts = ", ".join(f"{name} {m['cases_averaged']}" for name, m in summary["per_class"].items())
    print(f"  (consensus Dice, background excluded. A class's mean skips the cases where it is absent; "
          f"cases averaged: {counts}.\n   'mean (fg)' is the mean of the case means, over "
          f"{summary['cases_averaged']} of {summary['n_cases']} cases.)")


class EvalCase(NamedTuple):
    name: str
    load_image: Callable[[], tuple]     # () -> (array in file order, VolumeMeta)
    label: Path
    image_record: str                   # the report's "image": file names, or the series (never a folder)
    # () -> (labels, VolumeMeta or None); None: read ``label`` as NIfTI.
    load_label: Optional[Callable[[], tuple]] = None
    ignore_value: Optional[int] = None  # a dataset's "ignore" label: those voxels count in no metric
    # (labels) -> the class names the reference gives, index = label value (None: it names none)
    reference_names: Optional[Callable[[np.ndarray], Optional[tuple[str, ...]]]] = None
    # what the image's channels are, in its order (a dataset.json's channel names; None: unnamed)
    channel_names: Optional[tuple[str, ...]] = None


def dataset_cases(root: Path) -> tuple[list[EvalCase], Optional[tuple[str, ...]]]:
    """The labelled (training) cases of a dataset folder, in any layout
    :func:`medconddiff.dataset_layout.describe_dataset` reads (multi-channel cases load channels
    last), and the class names the folder gives (None if it gives none)."""
    from ..dataset_layout import DatasetError, describe_dataset, load_case_image
    from ..outputs import recorded_name

    description = describe_dataset(root)
    channels = len(description.channel_names) if description.channel_names else None
    names = description.class_names
    cases = [EvalCase(case.name, lambda c=case: load_case_image(c, channels), Path(case.label),
                      ", ".join(recorded_name(p) for p in case.images), ignore_value=description.ignore_label,
                      reference_names=lambda labels: names, channel_names=description.channel_names)
             for case in description.training if case.label is not None]
    if not cases:
        raise DatasetError(f"{root}: no labelled cases to evaluate")
    return cases, description.class_names


def _cases(args: argparse.Namespace) -> tuple[list[EvalCase], Optional[tuple[str, ...]]]:
    if args.dataset and (args.image or args.label):
        raise ConfigError("give a dataset folder or --image and --label, not both")
    if args.dataset:
        return dataset_cases(args.dataset)
    if args.image and args.label:
        return [_image_case(args.image, args.label, args.series, args.channel_file)], None
    raise ConfigError("give a dataset folder or --image and --label")


def _image_case(image: Path, label: Path, series: Optional[str], channel_files: Sequence[Path] = ()) -> EvalCase:
    """The case of --image/--label: NIfTI or DICOM scan (a NIfTI's channels: a 4-D file, or ``channel_files``
    after it), NIfTI labels or a DICOM SEG."""
    from ..nifti import load_channels
    from .labelled_input import labelled_input

    given = labelled_input(image, label, series)
    if given.is_dicom and channel_files:
        raise ConfigError("--channel-file adds NIfTI channel files; a DICOM series is one channel")
    # A DICOM series by number and description: its folder may be named after the patient.
    name = given.label if given.is_dicom else given.name
    load_image = given.load_image if given.is_dicom else (lambda: load_channels([image, *channel_files]))
    return EvalCase(name, load_image, label, name, given.load_labels,
                    reference_names=lambda labels: given.label_class_names(label, labels))


def in_model_channel_order(cases: list[EvalCase], model_channels: Sequence[str], data_label: str,
                           model_label: str) -> list[EvalCase]:
    """``cases`` whose images load with their channels in the model's order, where the data names the model's
    channels in another order (a dataset.json's T1, FLAIR for a FLAIR, T1 model); a channel list that names some of
    the model's channels at other places is refused (:func:`medconddiff.experiment.channel_order`)."""
    from ..experiment import channel_order

    ordered = []
    for case in cases:
        order = channel_order(model_channels, case.channel_names, data_label=data_label, model_label=model_label)
        if order is not None:
            case = case._replace(load_image=lambda load=case.load_image, order=list(order): _reordered(load(), order))
        ordered.append(case)
    return ordered


def _reordered(loaded: tuple, order: list[int]) -> tuple:
    image, meta = loaded
    return image[..., order], meta


def _check_json_target(path: Path, overwrite: bool) -> None:
    """Refuse an output that cannot be written before anything is computed."""
    from ..atomic import check_target

    check_target(path, overwrite, "--json")


def _evaluate_cases(cases: list[EvalCase], segmenter, sampling, slices_text, class_map=None
                    ) -> Iterator[tuple[EvalCase, dict]]:
    from ..class_match import match_classes
    from ..evaluation import evaluate_volume
    from ..geometry import labels_on_image_grid
    from ..nifti import load_labels
    from ..outputs import recorded_name

    shown: set[str] = set()    # a dataset's cases share their names: each message said once
    for case in cases:
        try:
            image, meta = case.load_image()
            labels, label_meta = case.load_label() if case.load_label else load_labels(case.label)
            labels, placed = labels_on_image_grid(labels, None if label_meta is None else label_meta.affine,
                                                  meta.affine, image.shape)
            if placed == "reordered":      # the image's grid stored in another voxel order: scored where it lies
                print(f"medconddiff evaluate: note: {case.name}: the label file stores the image's grid in "
                      "another voxel order; read onto the image's voxels", file=sys.stderr)
            elif placed == "affine differs" and labels.shape == tuple(image.shape[:3]):
                print(f"medconddiff evaluate: warning: {case.name}: the label file's affine differs from the "
                      "image's; labels are compared voxel by voxel on the image's grid", file=sys.stderr)
            match = match_classes(case.reference_names(labels) if case.reference_names else None,
                                  segmenter.class_names, class_map, labels, case.ignore_value)
            for kind, text in match.messages():
                if text not in shown:
                    shown.add(text)
                    print(f"medconddiff evaluate: {kind}: {text}", file=sys.stderr)
            # Which voxels nobody checked, read before the classes are renumbered: a class may take the
            # ignore value's number (a set of background, tumour, ignore scored by a liver/tumour model).
            ignored = None if case.ignore_value is None else np.asarray(labels) == case.ignore_value
            labels = match.apply(labels, case.ignore_value)
            n_slices = segmenter.preprocessor.geometry(image.shape[:3], meta).n_slices
            slices = scan_slices(slices_text, n_slices, where=case.name)
            report = evaluate_volume(segmenter, image, labels, meta, sampling, slices, ignored=ignored)
        except user_error_types() as error:
            if len(cases) == 1:
                raise
            # Named for the case; any other exception is a bug and keeps its own type and traceback.
            raise UserInputError(f"{case.name}: {error}") from error
        report["image"], report["label"] = case.image_record, recorded_name(case.label)
        report["slices"] = slices_text or "all"
        report["reference_classes"] = match.record()
        yield case, report


def run(args: argparse.Namespace) -> int:
    from ..class_match import parse_class_map
    from ..evaluation import json_safe, summarize_cases
    from ..nifti import write_json_atomic
    from ..outputs import recorded_name
    from ..segmenter import Segmenter

    check_device(args.device)
    if args.json:
        _check_json_target(args.json, args.overwrite)
    class_map = parse_class_map(args.class_map)
    cases, _ = _cases(args)
    sampling = override_from_args(SamplingConfig(), args)
    segmenter = Segmenter.from_checkpoint(args.checkpoint, device=args.device)
    if args.dataset is not None:
        cases = in_model_channel_order(cases, segmenter.config.plan.channel_names, f"{args.dataset.name}/dataset.json",
                                       f"the model {recorded_name(segmenter.checkpoint_path)}")
    reports = {}
    table = args.dataset is not None
    if table:
        print_case_table_header(segmenter.class_names)
    for case, report in _evaluate_cases(cases, segmenter, sampling, args.slices, class_map):
        reports[case.name] = report
        if table:
            print_case_row(case.name, report)
        else:
            print_report(case.name, report)
    summary = summarize_cases(reports, segmenter.class_names)
    if table:
        print_summary_row(summary)
    output = {"checkpoint": recorded_name(segmenter.checkpoint_path), "checkpoint_sha256": segmenter.checkpoint_sha256,
              "dataset": recorded_name(args.dataset), "volumes": reports, "summary": summary}
    if args.json:
        write_json_atomic(args.json, json_safe(output), overwrite=args.overwrite)
        print(f"wrote {args.json}")
    return 0
