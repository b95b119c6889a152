"""Merge two cases of a training set that hold the same scan (a set an earlier release built).

  medconddiff merge-cases my_set/ lung1_image series2_CT_chest_3ab8c05f
  medconddiff merge-cases my_set/ lung1_image series2_CT_chest_3ab8c05f --prefer series2_CT_chest_3ab8c05f

A set written before it kept each case's image digest could hold one patient's scan under two names
(its NIfTI and its DICOM series; a renamed layer), so that patient's slices weighed double in training.
The set's summary names such cases. This command copies the second case's verified voxels into the first
(in the first's voxel order) and removes the second. Where both verified a voxel and disagree, it changes
nothing unless --prefer says whose labels win. Two cases holding different scans are refused.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("set", type=Path, help="the training-set folder")
    parser.add_argument("case", help="the case to keep")
    parser.add_argument("other", help="the case merged into it and then removed")
    parser.add_argument("--prefer", help="whose labels win on voxels both verified differently (one of the two "
                        "case names); without it such voxels stop the merge")


def run(args: argparse.Namespace) -> int:
    from ..training_set import TrainingSet

    training_set = TrainingSet.open(args.set)
    result = training_set.merge_cases(args.case, args.other, prefer=args.prefer)
    print(f"training set {args.set}: {result.description()}")
    print(f"training set {args.set}: {training_set.summary().text()}")
    return 0
