"""Measure the README's "Corrections that add up" table: fine-tunes that grow a training set scan by scan.

    python docs/measure_corrections.py ../shared/data [--json corrections.json]

Needs the real scans of ``../shared/data`` (liver117, lung1, lung2). Every fine-tune starts from the
bundled default model with this release's fine-tune defaults (200 steps for one scan, 600 for a set of two or more;
training seed 0); every score is per-class Dice of the model's own consensus under default sampling
(adaptive, sampling seed 0), from
:func:`medconddiff.evaluation.evaluate_volume`. Three patients: liver117 (the bundled sample), lung2
(scan A: lesion slices 15-17 corrected, 19-60 scored) and lung1 (scan B: slice 33 corrected, its other
47 slices scored). Takes about 9 minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from medconddiff.config import SamplingConfig
from medconddiff.evaluation import evaluate_volume
from medconddiff.finetune import LabelledScan, finetune
from medconddiff.nifti import load_labels, load_volume
from medconddiff.training_set import TrainingSet

LESION = ("background", "lesion")
SCAN_A_CORRECTED, SCAN_A_SCORED = [15, 16, 17], list(range(19, 61))
SCAN_B_CORRECTED = [33]


def read(data: Path, name: str):
    image, meta = load_volume(data / f"{name}_image.nii.gz")
    labels, _ = load_labels(data / f"{name}_label.nii.gz")
    return image, meta, labels.astype(np.uint8)


def lesion_dice(segmenter, scan, slices) -> dict:
    """Lesion Dice (and its one-shot) on ``slices``, the scan's label 1 mapped to the model's lesion class."""
    image, meta, labels = scan
    reference = np.where(labels > 0, segmenter.class_names.index("lesion"), 0).astype(np.uint8)
    report = evaluate_volume(segmenter, image, reference, meta, SamplingConfig(), slices=slices)
    return {"lesion": report["consensus"]["per_class"]["lesion"]["dice"],
            "one_shot": report["one_shot"]["per_class"]["lesion"]["dice"],
            "voxels_predicted": report["consensus"]["per_class"]["lesion"].get("predicted_voxels")}


def liver_dice(segmenter, scan) -> dict:
    image, meta, labels = scan
    report = evaluate_volume(segmenter, image, labels, meta, SamplingConfig(), slices=range(48, 72))
    return {name: report["consensus"]["per_class"][name]["dice"] for name in ("liver", "tumour")}


def trained(run):
    for _ in run:
        pass
    print(f"  ({run.total_steps} steps)", flush=True)
    return run.segmenter("cpu")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, help="folder with liver117, lung1 and lung2 image/label pairs")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    liver, scan_a, scan_b = (read(args.data, n) for n in ("liver117", "lung2", "lung1"))
    b_scored = [k for k in range(scan_b[0].shape[2]) if k not in SCAN_B_CORRECTED]
    quiet = dict(seed=0, device="cpu", log=lambda message: None)     # the default steps: 200 for one scan, 600 for more
    rows = {}

    def score(name, segmenter, with_liver):
        rows[name] = {"lung2 19-60": lesion_dice(segmenter, scan_a, SCAN_A_SCORED),
                      "lung1 other 47": lesion_dice(segmenter, scan_b, b_scored)}
        if with_liver:
            rows[name]["liver117 48-71"] = liver_dice(segmenter, liver)
        print(name, json.dumps(rows[name]), flush=True)

    a = LabelledScan("A", scan_a[0], scan_a[1], scan_a[2], SCAN_A_CORRECTED)
    b = LabelledScan("B", scan_b[0], scan_b[1], scan_b[2], SCAN_B_CORRECTED)
    score("A, no replay", trained(finetune("default", [a], class_names=LESION, **quiet)), False)
    with tempfile.TemporaryDirectory() as folder:
        training_set = TrainingSet.create(Path(folder) / "set", LESION, ("CT",))
        training_set.add_scan("A", scan_a[0], scan_a[1], scan_a[2], LESION, verified_slices=SCAN_A_CORRECTED)
        score("A: set, replay", trained(finetune("default", training_set=training_set, replay=True, **quiet)), True)
        training_set.add_scan("B", scan_b[0], scan_b[1], scan_b[2], LESION, verified_slices=SCAN_B_CORRECTED)
        score("A + B: set, replay", trained(finetune("default", training_set=training_set, replay=True, **quiet)),
              True)
    score("B alone", trained(finetune("default", [b], class_names=LESION, **quiet)), False)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
