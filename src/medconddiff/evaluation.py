"""Segmentation metrics and the evaluation of a checkpoint on labelled volumes.

Per class: Dice (= F1), IoU and HD95 (mm, from the voxel spacing). Means are over FOREGROUND classes
only: background is excluded (the reference code includes it, which inflates its numbers).

A class that is in neither the prediction nor the reference of what is scored is **absent**: there is
nothing to find and nothing was found, so it says nothing about the model. It is reported as
``{"absent": True, "dice": None, ...}`` and left out of every mean (of classes, of a step's x̂_0, of
cases); means say how many classes they averaged and which were absent. (:func:`dice_score` on two
empty masks still returns 1.0, the usual convention, for callers scoring one mask pair; nothing here
averages such a value.)

Also the Dice of every single step's x̂_0, of the consensus, and of a one-shot forward, and the AUROC
of the uncertainty map for flagging wrong voxels, both over the whole scored slab and over the
foreground region (reference ∪ prediction, dilated in-plane), where easy background cannot inflate it.

Everything is compared on canonical slices (``geometry.slice_view``: slice axis first, then the two
in-plane axes), so HD95 uses the canonical spacing in that order: (slice spacing, row, column).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
from scipy import ndimage
from scipy.stats import rankdata

from .defined_values import defined, max_defined
from .errors import UserInputError

#: In-plane dilation (voxels, per slice) of reference ∪ prediction foreground for the foreground AUROC.
FOREGROUND_MARGIN = 3


def dice_score(predicted: np.ndarray, reference: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty (nothing to find, nothing found).

    That 1.0 is a convention, not evidence: means must skip classes absent from both masks
    (:func:`class_metrics`, :func:`foreground_dice` do) instead of averaging it.
    """
    total = predicted.sum() + reference.sum()
    return 1.0 if total == 0 else float(2 * np.logical_and(predicted, reference).sum() / total)


def iou_score(predicted: np.ndarray, reference: np.ndarray) -> float:
    """IoU of two boolean masks; 1.0 when both are empty (same convention as :func:`dice_score`)."""
    union = np.logical_or(predicted, reference).sum()
    return 1.0 if union == 0 else float(np.logical_and(predicted, reference).sum() / union)


def dice_per_class(predicted: np.ndarray, reference: np.ndarray, num_classes: int) -> list[float]:
    """Dice of each foreground class 1..K-1 (1.0 for a class absent from both; see :func:`dice_score`)."""
    return [dice_score(predicted == k, reference == k) for k in range(1, num_classes)]


def absent_classes(predicted: np.ndarray, reference: np.ndarray, num_classes: int) -> list[int]:
    """Foreground classes (1..K-1) in neither ``predicted`` nor ``reference``."""
    counts = np.zeros(num_classes, np.int64)
    for labels in (predicted, reference):   # bincount: linear time, unlike np.unique's sort
        counts += np.bincount(np.asarray(labels).ravel(), minlength=num_classes)[:num_classes]
    return [k for k in range(1, num_classes) if counts[k] == 0]


def foreground_dice(predicted: np.ndarray, reference: np.ndarray, num_classes: int) -> list[float]:
    """Dice of each foreground class 1..K-1; NaN for a class absent from both (not a free 1.0)."""
    absent = set(absent_classes(predicted, reference, num_classes))
    return [float("nan") if k in absent else dice_score(predicted == k, reference == k)
            for k in range(1, num_classes)]


def mean_foreground_dice(predicted: np.ndarray, reference: np.ndarray, num_classes: int) -> tuple[float, list[int]]:
    """(mean Dice over the foreground classes that are not absent, the absent ones).

    NaN when every foreground class is absent (nothing to score).
    """
    scores = foreground_dice(predicted, reference, num_classes)
    return _nanmean(scores), [k for k, d in enumerate(scores, start=1) if math.isnan(d)]


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def hd95(predicted: np.ndarray, reference: np.ndarray, spacing: Sequence[float],
         positions: Optional[Sequence[int]] = None) -> float:
    """95th percentile of the symmetric surface distances, in the units of ``spacing`` (mm).

    ``spacing`` is per axis of the arrays given (for canonical slices: slice spacing first). ``positions``
    (optional) are the slice indices along axis 0 at which the masks' slices lie (scored slices with gaps:
    the slices between are empty, not adjacent). NaN when either mask is empty (undefined), so means can
    skip it explicitly.
    """
    if not predicted.any() or not reference.any():
        return float("nan")
    if positions is not None:
        predicted, reference = (_at_positions(mask, positions) for mask in (predicted, reference))
    spacing = tuple(spacing)
    if len(spacing) < predicted.ndim:
        raise ValueError(f"hd95 needs a spacing per axis: {len(spacing)} values for {predicted.ndim}-D masks")
    spacing = spacing[: predicted.ndim]
    pred_surface, ref_surface = _surface(predicted), _surface(reference)
    to_ref = ndimage.distance_transform_edt(~ref_surface, sampling=spacing)[pred_surface]
    to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=spacing)[ref_surface]
    return float(np.percentile(np.concatenate([to_ref, to_pred]), 95))


def _at_positions(mask: np.ndarray, positions: Sequence[int]) -> np.ndarray:
    """``mask``'s slices (axis 0) placed at ``positions`` in a stack from the first to the last of them."""
    positions = np.asarray(positions, dtype=np.int64)
    if len(positions) != mask.shape[0]:
        raise ValueError(f"{len(positions)} slice positions for {mask.shape[0]} slices")
    if len(positions) == 0 or (np.diff(positions) == 1).all():
        return mask
    first = int(positions.min())
    placed = np.zeros((int(positions.max()) - first + 1,) + mask.shape[1:], dtype=bool)
    placed[positions - first] = mask
    return placed


def auroc(scores: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` ranking ``positives`` first (Mann–Whitney U, ties averaged)."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    positives = np.asarray(positives, dtype=bool).ravel()
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def foreground_region(predicted: np.ndarray, reference: np.ndarray, margin: int = FOREGROUND_MARGIN) -> np.ndarray:
    """(reference ∪ prediction foreground) of canonical slices (n, H, W), dilated ``margin`` voxels
    in-plane, slice by slice (never across slices)."""
    foreground = (np.asarray(predicted) > 0) | (np.asarray(reference) > 0)
    if margin <= 0 or not foreground.any():
        return foreground
    structure = np.zeros((3, 3, 3), bool)
    structure[1] = ndimage.generate_binary_structure(2, 1)     # in-plane 4-neighbourhood only
    return ndimage.binary_dilation(foreground, structure=structure, iterations=margin)


def _nanmean(values: Iterable[Optional[float]]) -> float:
    """Mean of the defined values; NaN when none is (e.g. HD95 with every class empty)."""
    kept = defined(values)
    return float(np.mean(kept)) if kept else float("nan")


def class_metrics(predicted: np.ndarray, reference: np.ndarray, class_names: Sequence[str],
                  spacing: Sequence[float], positions: Optional[Sequence[int]] = None) -> dict:
    """{'per_class': {name: {absent, dice, iou, hd95_mm, ...}}, 'mean_foreground': {...}}.

    ``positions``: the canonical slice index of each slice along axis 0, for HD95 (see :func:`hd95`).

    Background is excluded. A class absent from both masks gets ``absent: True`` and None metrics,
    and is left out of the means; ``mean_foreground`` says how many classes it averaged
    (``classes_averaged``; ``hd95_classes_averaged`` for HD95, which is undefined when one mask is
    empty) and which were absent (``absent_classes``). Means are NaN when nothing was averaged.
    """
    per_class = {}
    for k, name in enumerate(class_names):
        if k == 0:
            continue
        p, r = predicted == k, reference == k
        counts = {"reference_voxels": int(r.sum()), "predicted_voxels": int(p.sum())}
        if not counts["reference_voxels"] and not counts["predicted_voxels"]:
            per_class[name] = {"absent": True, "dice": None, "iou": None, "hd95_mm": None, **counts}
        else:
            per_class[name] = {"absent": False, "dice": dice_score(p, r), "iou": iou_score(p, r),
                               "hd95_mm": hd95(p, r, spacing, positions), **counts}
    present = [m for m in per_class.values() if not m["absent"]]
    mean = {key: _nanmean(m[key] for m in present) for key in ("dice", "iou", "hd95_mm")}
    mean["classes_averaged"] = len(present)
    mean["hd95_classes_averaged"] = sum(1 for m in present if not math.isnan(m["hd95_mm"]))
    mean["absent_classes"] = [name for name, m in per_class.items() if m["absent"]]
    return {"per_class": per_class, "mean_foreground": mean, "background_excluded": True}


def diffusion_check(consensus_dice: float, one_shot_dice: float, step_dice: Sequence[float]) -> dict:
    """Whether the diffusion earned its cost on this slab: the consensus against the best single step
    and the one-shot forward (``margin`` < 0 means it did not), and the drift from the first step to
    the last (< 0: later steps got worse). NaN where a figure is undefined (an empty class set)."""
    steps = defined(step_dice)
    margin = consensus_dice - max_defined((*steps, one_shot_dice))   # NaN when either side is undefined
    drift = steps[-1] - steps[0] if len(steps) >= 2 else float("nan")
    return {"consensus_minus_best_of_steps_and_one_shot": margin, "last_step_minus_first_step": drift,
            "consensus_at_least_best": bool(margin >= 0) if not math.isnan(margin) else None}


def evaluate_volume(segmenter, image: np.ndarray, reference: np.ndarray, meta, sampling,
                    slices: Optional[Iterable[int]] = None, ignore_value: Optional[int] = None,
                    ignored: Optional[np.ndarray] = None) -> dict:
    """Every figure of the evaluation for one labelled volume.

    ``image`` ((i, j, k) or (i, j, k, C)) and ``reference`` ((i, j, k)) are in the file's voxel order
    with the image's ``meta`` (:class:`~medconddiff.nifti.VolumeMeta`); ``slices`` are canonical slice
    indices along the checkpoint plan's slicing direction (all when None). Everything is scored on
    those canonical slices only, with HD95 in mm from the canonical spacing
    (``spacing_mm`` = slice spacing, then the in-plane row and column spacing).

    Reference voxels holding ``ignore_value`` (a sparse label's unverified voxels) count in no
    figure: they are background in both masks for Dice, IoU and HD95 (so they add nothing to any
    foreground class) and are left out of the AUROCs and error fractions. ``ignored`` (a boolean mask of
    ``reference``'s shape) says which they are instead, for labels whose classes were renumbered after
    reading (a class may then take the ignore value's number).
    """
    image_shape = tuple(np.shape(image))[:3]
    if image_shape != tuple(reference.shape):
        raise UserInputError(f"label shape {tuple(reference.shape)} differs from image shape {image_shape}")
    ignored_file = None
    if ignored is None and ignore_value is not None:
        ignored = np.asarray(reference) == ignore_value
    if ignored is not None:
        ignored_file = np.asarray(ignored, dtype=bool)
        reference = np.where(ignored_file, 0, reference)
    if reference.size and int(reference.max()) >= segmenter.num_classes:
        raise UserInputError(f"label value {int(reference.max())} is outside the model's "
                             f"{segmenter.num_classes} classes")
    result = segmenter.segment(image, sampling, slices=slices, meta=meta)
    geometry = result.geometry
    indices = np.asarray(result.slice_indices)
    names = tuple(segmenter.class_names)
    spacing = (geometry.slice_spacing, *geometry.plane_spacing)     # the axes of a slice_view

    def scored(file_ordered: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(geometry.slice_view(file_ordered)[indices])

    ref = scored(reference)
    known = np.ones(ref.shape, bool) if ignored_file is None else ~scored(ignored_file)

    def counted(labels: np.ndarray) -> np.ndarray:
        return labels if ignored_file is None else np.where(known, labels, 0)

    consensus = counted(scored(result.labels))
    # Scored slices with gaps lie apart: HD95 measures at their positions, not as if stacked.
    report = {"consensus": class_metrics(consensus, ref, names, spacing, indices)}
    precision = sampling.precision if sampling is not None else "auto"     # the diffusion's, for a like comparison
    one_shot = counted(scored(segmenter.one_shot(image, slices=indices, meta=meta, precision=precision)))
    report["one_shot"] = class_metrics(one_shot, ref, names, spacing, indices)
    # Each step's x̂_0 alone, on the scan's grid like the consensus; absent classes skipped per step.
    # Per class too: a class the reference does not hold but a step predicts counts 0 in the mean, which
    # can hide how the reference's own classes fared over the steps.
    per_step = [foreground_dice(counted(result.step_labels_on_scan(step, clean=True)), ref, len(names))
                for step in range(result.trajectory.shape[0])]
    step_dice = [_nanmean(scores) for scores in per_step]
    report["step_mean_dice"] = step_dice
    report["step_dice_per_class"] = {name: [scores[k] for scores in per_step] for k, name in enumerate(names[1:])}
    defined = [i for i, d in enumerate(step_dice) if not math.isnan(d)]
    best = max(defined, key=lambda i: step_dice[i]) if defined else None
    report["best_step"] = {"index": best, "mean_dice": step_dice[best] if best is not None else float("nan")}
    report["diffusion_check"] = diffusion_check(report["consensus"]["mean_foreground"]["dice"],
                                                report["one_shot"]["mean_foreground"]["dice"], step_dice)
    wrong = consensus != ref
    unc = scored(result.uncertainty)
    report["uncertainty_auroc"] = auroc(unc[known], wrong[known])
    region = foreground_region(consensus, ref) & known
    report["uncertainty_auroc_foreground"] = auroc(unc[region], wrong[region])
    report["foreground_region"] = {"margin_voxels": FOREGROUND_MARGIN, "voxels": int(region.sum()),
                                   "error_fraction": float(wrong[region].mean()) if region.any() else float("nan")}
    report["error_fraction"] = float(wrong[known].mean()) if known.any() else float("nan")
    report["ignored_voxels"] = int((~known).sum())
    report["n_slices"] = int(len(indices))
    report["steps_used_mean"] = float(result.steps_used[result.completed].mean())
    report["slicing"] = geometry.slicing
    report["spacing_mm"] = [float(s) for s in spacing]
    report["sampling"] = dataclasses.asdict(result.sampling)
    report["consensus_choice"] = result.provenance.get("consensus_choice")
    return report


def summarize_cases(reports: Mapping[str, dict], class_names: Sequence[str]) -> dict:
    """Mean over cases of the consensus scores: per class, skipping the cases where it is absent;
    ``mean_foreground_dice`` is the mean over cases of each case's foreground mean (cases where
    every class is absent skipped)."""
    per_class = {}
    for name in class_names[1:]:
        entries = {case: r["consensus"]["per_class"][name] for case, r in reports.items()}
        scored = [m for m in entries.values() if not m["absent"]]
        per_class[name] = {"dice": _nanmean(m["dice"] for m in scored),
                           "iou": _nanmean(m["iou"] for m in scored),
                           "hd95_mm": _nanmean(m["hd95_mm"] for m in scored),
                           "cases_averaged": len(scored),
                           "absent_in_cases": [case for case, m in entries.items() if m["absent"]]}
    case_means = [r["consensus"]["mean_foreground"]["dice"] for r in reports.values()]
    one_shot_means = [r["one_shot"]["mean_foreground"]["dice"] for r in reports.values()]
    return {"n_cases": len(reports), "per_class": per_class,
            "mean_foreground_dice": _nanmean(case_means),
            "cases_averaged": sum(1 for v in case_means if not math.isnan(v)),
            "one_shot_mean_foreground_dice": _nanmean(one_shot_means),
            "uncertainty_auroc": _nanmean(r["uncertainty_auroc"] for r in reports.values()),
            "uncertainty_auroc_foreground": _nanmean(r["uncertainty_auroc_foreground"] for r in reports.values()),
            "background_excluded": True}


def json_safe(value: Any) -> Any:
    """``value`` with every NaN/±Inf float (Python or numpy) replaced by None, recursively, and numpy
    scalars/arrays, tuples and paths made plain JSON types: ``json.dumps(..., allow_nan=False)``
    accepts the result."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, (list, tuple, set, frozenset)):
        return [json_safe(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value
