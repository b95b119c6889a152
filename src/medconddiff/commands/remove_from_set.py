"""Take a case, or some of its verified slices, out of a training set (what was added by mistake).

  medconddiff remove-from-set my_set/                             (lists the cases: nothing is removed)
  medconddiff remove-from-set my_set/ lung1_image                 (the whole case: its image and labels)
  medconddiff remove-from-set my_set/ lung1_image --slices 31,33   (those slices become unverified again)

Only this command and `merge-cases` take anything out of a set; `add-to-set` never does. Slices are the
canonical slices the case was added with (the indices the napari widget and `add-to-set --slices` use);
their voxels take the set's 'ignore' label, so fine-tuning no longer learns them, and the case keeps its
other verified slices (a case left with none is refused: remove the case). The set is rewritten as an
add rewrites it: everything checked first, all or nothing, dataset.json last.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("set", type=Path, help="the training-set folder")
    parser.add_argument("case", nargs="?", help="the case's name in the set (without it, the set's cases are "
                        "listed and nothing is removed)")
    parser.add_argument("--slices", help="remove only these verified slices (e.g. 31,33,40-42) instead of the case")


def run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..slice_lists import parse_slices, slice_list_text
    from ..training_set import TrainingSet

    training_set = TrainingSet.open(args.set)
    if args.case is None:
        if args.slices is not None:
            raise ConfigError("--slices needs the case they belong to: remove-from-set SET CASE --slices …")
        summary = training_set.summary()
        print(f"training set {args.set}: {summary.text()}")
        for line in summary.case_lines():
            print(f"  {line}")
        return 0
    if args.slices is None:
        training_set.remove_case(args.case)
        print(f"training set {args.set}: case '{args.case}' removed (its image and labels)")
    else:
        slices = parse_slices(args.slices, what="--slices", where=f"case {args.case}") or []
        left = training_set.unverify_slices(args.case, slices)
        print(f"training set {args.set}: slice(s) {slice_list_text(slices)} of case '{args.case}' are unverified "
              f"again ({left} verified slice(s) left)")
    print(f"training set {args.set}: {training_set.summary().text()}")
    return 0
