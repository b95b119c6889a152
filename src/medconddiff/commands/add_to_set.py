"""Add a scan's checked slices to a training set (the napari "Add to training set" button's path).

  medconddiff add-to-set my_set/ scan.nii.gz corrected.nii.gz --slices 31,33,40-42
  medconddiff add-to-set my_set/ SERIES_DIR corrections.dcm --slices labelled
      (a DICOM series and a DICOM SEG of it, e.g. the plugin's export, or an RT structure set drawn on it;
      or NIfTI labels on its voxels)
  medconddiff add-to-set my_set/ brain_t1.nii.gz labels.nii.gz --slices 60,90 --channel-names T1 \\
      --class-names background "grey matter" "white matter"
  medconddiff finetune my_set/ -o model.safetensors          (then learn from every case in the set)

The set is an nnU-Net v2 dataset folder (created by the first add): the scan's image, and its labels
on the slices you name; every other voxel is the set's 'ignore' label, so nothing you did not check
is learned as truth. Slices are canonical slices along the slicing of --checkpoint's plan (the
indices the napari widget shows and `finetune --slices` takes); 'labelled' = every slice holding a
non-zero label (a slice checked and found empty must be named). Adding the same scan again merges:
newly named slices take the new labels, the others keep theirs. Label values are named by
--class-names, else by a DICOM SEG's segment labels (an RT structure set's ROI names), else by
--checkpoint's classes; classes merge into the set's by name (case and tumour/tumor spelling aside).
--keep-classes GTV=lesion takes only the classes named (renamed after '='), the others as background:
for a planning system's structure set, whose External covers every slice. The case is named after
the scan's file, or for DICOM after the series and a hash of its UID (two patients' "series 2 'CT'"
are two cases), never after a folder or a patient attribute; --case names it yourself. Everything is checked before anything is written: a failed
add leaves the set as it was.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import ConfigError
from .common import SLICES_HELP, add_keep_classes_argument, labelled_or_named_slices


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("set", type=Path, help="the training-set folder (created if it does not exist)")
    parser.add_argument("image", type=Path, help="the scan: NIfTI (4-D or one file per channel: see "
                        "--channel-file) or DICOM (a series folder or a .dcm file)")
    parser.add_argument("labels", type=Path, help="its labels: a NIfTI on the scan's grid, or for a DICOM scan a "
                        "DICOM SEG that references it")
    parser.add_argument("--slices", required=True, help=f"the checked {SLICES_HELP}; or 'labelled': every slice "
                        "with a non-zero label")
    parser.add_argument("--series", help="the scan is a DICOM folder with several series: which one, by Series "
                        "Number or Series Instance UID")
    parser.add_argument("--channel-file", type=Path, action="append", default=[],
                        help="further channel files of a multi-channel scan, in the set's channel order")
    parser.add_argument("--checkpoint", default="default", help="the model whose slicing counts the slices and "
                        "whose classes and channels are the defaults (default: the bundled default model)")
    parser.add_argument("--class-names", nargs="+", help="what the label values are, background first (default: "
                        "a DICOM SEG's segment labels, else the checkpoint's classes)")
    add_keep_classes_argument(parser)
    parser.add_argument("--channel-names", nargs="+", help="what the scan's channels are (default: the set's, or "
                        "for a new set the checkpoint's), e.g. T1 for an MRI")
    parser.add_argument("--case", help="the case's name in the set (default: the scan's file name, or the DICOM "
                        "series and a hash of its UID)")


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from ..checkpoint import load_checkpoint
    from ..dicom_inputs import series_case_name
    from ..preprocess import ScanPreprocessor
    from ..slice_lists import slice_list_text
    from ..training_set import TrainingSet, case_id_from_name
    from .labelled_input import kept_labels, labelled_input

    start = load_checkpoint(args.checkpoint, allow_legacy=True)
    plan = start.config.plan
    existing = TrainingSet.open(args.set) if (args.set / "dataset.json").is_file() else None
    channel_names = tuple(args.channel_names or (existing.channel_names if existing else plan.channel_names))
    given = labelled_input(args.image, args.labels, args.series, label_flag="LABELS", image_flag="the scan")
    # Every volume of a 4-D file is read, so that a channel count that does not match is told as such.
    image, meta, labels = given.load_on_one_grid(args.labels, args.channel_file, several_channels=True)
    channels = image.shape[3] if image.ndim == 4 else 1
    if channels == 1 and image.ndim == 4:
        image = image[..., 0]
    if channels != len(channel_names):
        if args.channel_names or not existing:
            fix = "name the scan's channels with --channel-names"
        elif channels < len(channel_names):
            fix = "give its further channel files with --channel-file, in the set's order"
        else:
            fix = f"add it to a set of {channels}-channel scans"
        raise ConfigError(f"the scan has {channels} channel(s), the set {'holds' if existing else 'would hold'} "
                          f"{len(channel_names)} ({', '.join(channel_names)}): {fix}")
    _refuse_ct_name_for_non_hounsfield(args, start, channel_names, image)
    # An existing set's own classes by default: the model's would add 'liver, tumour' beside the set's 'lesion'
    # and call the lesion voxels liver.
    known_classes = existing.class_names if existing else start.config.model.class_names
    class_names = _class_names(args, given, labels, known_classes)
    labels, class_names = kept_labels(args.keep_classes, labels, class_names, known_classes, given.label)
    top = int(labels.max()) if labels.size else 0
    if top >= len(class_names):
        raise ConfigError(f"{args.labels} holds label {top} but {len(class_names)} class names are known "
                          f"({', '.join(class_names)}); name every value with --class-names, background first")

    geometry = ScanPreprocessor(plan).geometry(image.shape[:3], meta)
    slices = labelled_or_named_slices(args.slices, geometry, labels, args.labels, args.image.name, "you checked")

    case = args.case or (series_case_name(given.dicom_source()) if given.is_dicom else given.name)
    training_set = existing or _created_or_opened(args.set, class_names, channel_names)
    result = training_set.add_scan(case_id_from_name(case), image, meta, np.asarray(labels), class_names,
                                   verified_slices=slices, slicing=geometry.slicing, channel_names=channel_names)
    grown = f"; new class(es): {', '.join(result.added_classes)}" if result.added_classes else ""
    print(f"{given.label}: slice(s) {slice_list_text(slices)} ({geometry.slicing}) {result.description()} "
          f"({result.verified_slices} verified slice(s)){grown}")
    print(f"training set {args.set}: {training_set.summary().text()}")
    return 0


def _created_or_opened(folder: Path, class_names, channel_names):
    """A new set in ``folder``; the set another program created there meanwhile (two adds to a new set take
    turns, as two adds to one set do), which then takes this scan as its next case."""
    from ..training_set import TrainingSet, TrainingSetError

    try:
        return TrainingSet.create(folder, class_names, channel_names)
    except TrainingSetError:
        if not (folder / "dataset.json").is_file():
            raise
        return TrainingSet.open(folder)


def _refuse_ct_name_for_non_hounsfield(args: argparse.Namespace, start, channel_names, image) -> None:
    """A scan with no voxel below 0 (an MRI) stored under a channel that fine-tuning reads through the CT window
    would be clipped to a few grey levels there; the scan given alone to ``finetune`` is refused the same way.
    Channel names the user gave are theirs (``--channel-names CT`` keeps a CT stored without its rescale)."""
    from ..finetune import channels_not_in_hounsfield, finetune_config

    if args.channel_names:
        return
    plan = finetune_config(start, channel_names=channel_names, log=lambda _: None).plan
    unlike = channels_not_in_hounsfield(plan, image)
    if unlike:
        names = ", ".join(plan.channel_names[c] for c in unlike)
        raise ConfigError(f"{args.image.name} has no voxel below 0, so it is not CT in Hounsfield units, but the set "
                          f"would store it as {names} and fine-tuning would read it through the CT window; say what "
                          "the scan is with --channel-names (e.g. --channel-names MRI, in a set of MRI scans)")


def _class_names(args: argparse.Namespace, given, labels, model_classes) -> tuple[str, ...]:
    if args.class_names:
        from ..class_match import checked_class_names

        return checked_class_names(args.class_names)
    return given.label_class_names(args.labels, labels) or tuple(model_classes)
