"""Choose a model's consensus and step cap on labelled slices it was not trained on, and record them.

  medconddiff choose-consensus scan.nii.gz labels.nii.gz --slices 40:48,72:80 --checkpoint model.safetensors \\
      -o model_chosen.safetensors
  medconddiff choose-consensus SERIES_DIR reference.dcm --slices 40:48 --checkpoint model.safetensors -o ...
      (a DICOM series and a DICOM SEG of it; --series N|UID for a folder of several series)

One sampling run (default settings: adaptive steps, seed 0) over the slices keeps every step's x̂0;
the per-step Dice sets the step cap (the first step that no later one beats by more than 0.001), and
every candidate fusion is scored on the trajectories cut there, beside each step and the one-shot
forward (itself a candidate, ``one_shot``). ``mean`` stays unless another candidate beats it by more than
0.005, or the steps a capped run takes rise (then ``last``). The output is the same
checkpoint (weights and config unchanged) with the choice in its record: ``--consensus auto``, the
default of `segment`, `evaluate` and the napari widget, then uses it, and every sidecar says so.
Use slices the model was not trained on (the scores are meant to predict other scans).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import ConfigError
from .common import SLICES_HELP, add_class_map_argument, check_device, scan_slices


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", type=Path, help="a labelled scan the model was not trained on: NIfTI, or DICOM "
                        "(a series folder or a .dcm file)")
    parser.add_argument("labels", type=Path, help="its labels: a NIfTI on the scan's grid, or for a DICOM scan a "
                        "DICOM SEG or RT structure set of it (its classes matched to the model's by name)")
    parser.add_argument("--series", help="the scan is a DICOM folder with several series: which one, by Series "
                        "Number or Series Instance UID")
    parser.add_argument("--channel-file", type=Path, action="append", default=[],
                        help="further channel files of a multi-channel scan, in the model's channel order")
    parser.add_argument("--slices", required=True, help=f"the labelled slices to choose on: {SLICES_HELP}")
    add_class_map_argument(parser)
    parser.add_argument("--checkpoint", default="default", help="the model: a file or a bundled model's name")
    parser.add_argument("-o", "--output", type=Path, required=True,
                        help="checkpoint to write: the model with its choice recorded (.safetensors)")
    parser.add_argument("--basis", help="what the slices are, in words recorded with the choice (default: "
                        "'N labelled slice(s) of a scan'); no patient identifiers: sidecars repeat it")
    parser.add_argument("--no-step-cap", action="store_true", help="record no step cap, only the consensus")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.add_argument("--json", type=Path, help="also write the choice and its scores as JSON")


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import with_extra
    from ..class_match import match_classes, parse_class_map
    from ..consensus_choice import EXTRA_KEY, ChoosingSlices, choose_consensus
    from ..atomic import check_target, write_json_atomic
    from ..evaluation import json_safe
    from ..segmenter import Segmenter
    from .labelled_input import labelled_input

    if not args.output.name.endswith(".safetensors"):
        raise ConfigError(f"{args.output}: the checkpoint name must end with .safetensors")
    check_target(args.output, args.overwrite, creates_folders=True)    # before the sampling runs, not after
    if args.json:
        check_target(args.json, args.overwrite, "--json")
    check_device(args.device)
    segmenter = Segmenter.from_checkpoint(args.checkpoint, device=args.device)
    given = labelled_input(args.image, args.labels, args.series, label_flag="LABELS", image_flag="the scan")
    image, meta, labels = given.load_on_one_grid(args.labels, args.channel_file)
    # As evaluate scores: a SEG's or structure set's classes by name, whatever their numbers.
    match = match_classes(given.label_class_names(args.labels, labels), segmenter.class_names,
                          parse_class_map(args.class_map), labels)
    for kind, text in match.messages():
        print(f"medconddiff choose-consensus: {kind}: {text}", file=sys.stderr)
    labels = match.apply(labels)
    geometry = segmenter.preprocessor.geometry(image.shape[:3], meta)
    slices = scan_slices(args.slices, geometry.n_slices, where=args.image.name)
    if not slices:
        raise ConfigError("--slices is empty: name the labelled slices to choose on")
    basis = args.basis or f"{len(slices)} labelled slice(s) of a scan"
    overlap, set_case = _trained_among(segmenter.checkpoint_extra, given.label, slices, geometry.n_slices)
    if overlap or set_case:
        # The warning names the file; the recorded basis does not (sidecars repeat it, and a file may be named
        # after the patient).
        what = (f"{len(overlap)} of these {len(slices)} slices are ones the model was trained on" if overlap else
                "the scan is a case of the training set the model was fine-tuned on: its verified slices may be "
                "among these")
        shown = f" ({', '.join(map(str, overlap[:8]))}{' …' if len(overlap) > 8 else ''})" if overlap else ""
        print(f"medconddiff choose-consensus: warning: {given.label}: {what}{shown}, as its record says; scores on "
              "slices it learned flatter it: choose on slices it was not trained on", file=sys.stderr)
        basis += f" (warning: {what})"
    choice = choose_consensus(segmenter, [ChoosingSlices(image, labels, meta, slices)], basis,
                              cap_steps=not args.no_step_cap)
    print(choice.describe())
    dice = ", ".join(f"{method} {value:.4f}" for method, value in choice.candidate_dice.items())
    steps = ", ".join(f"{value:.4f}" for value in choice.step_dice)
    print(f"candidates: {dice}\nper-step x̂0 Dice: [{steps}]; one-shot {choice.one_shot_dice:.4f}")
    print(f"consensus − max(best step, one-shot) on these slices: {choice.margin:+.4f}")
    path = with_extra(args.checkpoint, args.output, {EXTRA_KEY: choice.to_dict()}, overwrite=args.overwrite)
    steps = f" with at most {choice.step_cap} adaptive step{'' if choice.step_cap == 1 else 's'}"
    print(f"saved {path}: `--consensus auto` (the default) now uses '{choice.method}'"
          + (steps if choice.step_cap else ""))
    if args.json:
        write_json_atomic(args.json, json_safe(choice.to_dict()), overwrite=args.overwrite)
    return 0


def _trained_among(extra: dict, scan: str, slices, n_slices: int) -> tuple[list[int], bool]:
    """``(the slices of slices the model was trained on, whether scan is a training-set case it learned)``,
    ``scan`` by the name a checkpoint records (the file's stem, the series), as the model's record (``extra``)
    says: a run of ``train`` records its cases (``trained_on``) and one slice list for all of them
    (``train_slices``; none: every slice), a fine-tune its scans' slices (``finetuned_on``) and, for a
    training set, only its cases (their verified slices were learned)."""
    from ..errors import UserInputError
    from ..slice_lists import parse_slice_spec

    names = {scan, scan.removesuffix("_0000")}      # an nnU-Net image file (CASE_0000) is the case CASE
    finetuned = [entry for entry in extra.get("finetuned_on") or []
                 if isinstance(entry, dict) and entry.get("scan") in names]
    if finetuned:
        learned = {int(i) for entry in finetuned for i in entry.get("slices") or []}
    elif not names & set(extra.get("trained_on") or []):
        return [], False
    elif "finetuned_on" in extra:
        return [], True
    elif not extra.get("train_slices"):
        learned = set(range(n_slices))
    else:
        try:
            learned = set(parse_slice_spec(str(extra["train_slices"]), "train_slices").indices(n_slices))
        except UserInputError:                # slices this scan does not have: another scan of that name
            return [], False
    return sorted({int(i) for i in slices} & learned), False
