"""Print a dataset's fingerprint and the preprocessing plan it implies.

  medconddiff plan DATASET_DIR
  medconddiff plan DATASET_DIR --json plan.json [--overwrite]

DATASET_DIR is a Medical Segmentation Decathlon or nnU-Net v2 folder (with dataset.json), or a
plain folder (imagesTr/ + labelsTr/, or *_image.nii.gz with *_label.nii.gz). Every training case is
read once: spacings and shapes (in R, A, S order), foreground intensities per channel, voxels and
axial slices per class; the plan follows nnU-Net-like rules (see medconddiff.fingerprint).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from ..config import PreprocessPlan
    from ..dataset_layout import DatasetDescription
    from ..fingerprint import DatasetFingerprint


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", type=Path, help="dataset folder")
    parser.add_argument("--json", type=Path, help="also write dataset, fingerprint and plan as JSON here")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json file")


def run(args: argparse.Namespace) -> int:
    from ..atomic import check_target
    from ..dataset_layout import describe_dataset
    from ..fingerprint import compute_fingerprint, plan_from_fingerprint
    from ..nifti import write_json_atomic

    # Refuse before the (long) pass over the data, not after it.
    if args.json is not None:
        check_target(args.json, args.overwrite, "--json")
    description = describe_dataset(args.dataset)
    class_names, channel_names = _names(description)
    fingerprint = compute_fingerprint(description, class_names, channel_names)
    plan = plan_from_fingerprint(fingerprint, channel_names)
    _print_summary(description, class_names, channel_names, fingerprint, plan)
    if args.json is not None:
        dataset = {
            "root": str(description.root), "layout": description.layout, "name": description.name,
            "file_ending": description.file_ending, "class_names": list(class_names),
            "channel_names": list(channel_names),
            "names_from_folder": description.class_names is not None and description.channel_names is not None,
            "training_cases": [case.name for case in description.training],
            "test_cases": [case.name for case in description.test],
        }
        output = {"dataset": dataset, "fingerprint": fingerprint.to_dict(), "plan": dataclasses.asdict(plan)}
        write_json_atomic(args.json, output, overwrite=args.overwrite)
        print(f"\nwrote {args.json}")
    return 0


def _names(description: DatasetDescription) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Class and channel names: the folder's, else made up from what the files hold.

    Classes: "background", "class_1", ... up to the largest label value of any case. Channels:
    "channel_0", ... as many as the first case has (files, or volumes of a 4-D file).
    """
    from ..dataset_layout import load_case_image
    from ..nifti import load_labels

    class_names, channel_names = description.class_names, description.channel_names
    if class_names is None:
        largest = max(int(load_labels(case.label)[0].max()) for case in description.training)
        class_names = ("background",) + tuple(f"class_{k}" for k in range(1, max(largest, 1) + 1))
    if channel_names is None:
        image, _ = load_case_image(description.training[0])
        channel_names = tuple(f"channel_{c}" for c in range(image.shape[3]))
    return class_names, channel_names


def _print_summary(description: DatasetDescription, class_names: Sequence[str], channel_names: Sequence[str],
                   fingerprint: DatasetFingerprint, plan: PreprocessPlan) -> None:
    print(f"dataset   {description.name} ({description.layout} layout, {description.file_ending}) "
          f"at {description.root}")
    print(f"cases     {fingerprint.cases} training, {len(description.test)} test")
    print(f"classes   {', '.join(f'{k} {name}' for k, name in enumerate(class_names))}")
    print(f"channels  {', '.join(f'{c} {name}' for c, name in enumerate(channel_names))}")
    unnamed = [what for what, given in (("classes", description.class_names), ("channels", description.channel_names))
               if given is None]
    if unnamed:
        print(f"note: the folder does not name its {' or '.join(unnamed)}; the names above were made up "
              "from the files")
    spacing = fingerprint.median_spacing
    print(f"\nmedian spacing (R, A, S): {' x '.join(f'{s:.3f}' for s in spacing)} mm")
    low = [min(s[a] for s in fingerprint.spacings) for a in range(3)]
    high = [max(s[a] for s in fingerprint.spacings) for a in range(3)]
    print(f"spacing range  (R, A, S): {' x '.join(f'{lo:.3f}-{hi:.3f}' for lo, hi in zip(low, high))} mm")
    print("\nforeground intensities (voxels with label > 0): 0.5 / 50 / 99.5 percentiles, mean, std")
    for channel in fingerprint.channels:
        percentiles = " / ".join(f"{p:.6g}" for p in channel.foreground_percentiles)
        print(f"  {channel.name:<16}{percentiles}   mean {channel.mean:.6g}, std {channel.std:.6g}")
    print("\nclasses: voxels, fraction of axial slices showing it")
    for name in class_names:
        print(f"  {name:<16}{fingerprint.class_voxels[name]:>14,}   {fingerprint.class_slice_fraction[name]:.3f}")
    print("\nplan")
    schemes = {plan.scheme_of(c) for c in range(plan.num_channels)}
    unused = set()   # settings no channel's scheme reads: printing them would only confuse
    if "ct_window" not in schemes:
        unused.add("window")
    if not schemes & {"percentile", "zscore"}:
        unused.add("percentiles")
    if plan.context_slices == 0:
        unused.add("context_mm")
    for field in dataclasses.fields(plan):
        if field.name in unused:
            continue
        value = getattr(plan, field.name)
        values = value if isinstance(value, tuple) else (value,)
        print(f"  {field.name:<16}{' '.join(f'{v:.6g}' if isinstance(v, float) else str(v) for v in values)}")
