"""Segmentation metrics and the evaluation of a checkpoint on labelled volumes.

Per class: Dice (= F1), IoU and HD95 (mm, from the voxel spacing). Means are over FOREGROUND classes
only: background is excluded (the reference code includes it, which inflates its numbers). Also the
Dice of every single step's x̂_0, of the consensus, and of a one-shot forward, and the AUROC of the
uncertainty map for flagging wrong voxels.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np
from scipy import ndimage
from scipy.stats import rankdata


def dice_score(predicted: np.ndarray, reference: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty (nothing to find, nothing found)."""
    total = predicted.sum() + reference.sum()
    return 1.0 if total == 0 else float(2 * np.logical_and(predicted, reference).sum() / total)


def iou_score(predicted: np.ndarray, reference: np.ndarray) -> float:
    union = np.logical_or(predicted, reference).sum()
    return 1.0 if union == 0 else float(np.logical_and(predicted, reference).sum() / union)


def dice_per_class(predicted: np.ndarray, reference: np.ndarray, num_classes: int) -> list[float]:
    """Dice of each foreground class 1..K-1."""
    return [dice_score(predicted == k, reference == k) for k in range(1, num_classes)]


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def hd95(predicted: np.ndarray, reference: np.ndarray, spacing: Sequence[float]) -> float:
    """95th percentile of the symmetric surface distances, in the units of ``spacing`` (mm).

    NaN when either mask is empty (undefined), so means can skip it explicitly.
    """
    if not predicted.any() or not reference.any():
        return float("nan")
    spacing = tuple(spacing)[: predicted.ndim]
    pred_surface, ref_surface = _surface(predicted), _surface(reference)
    to_ref = ndimage.distance_transform_edt(~ref_surface, sampling=spacing)[pred_surface]
    to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=spacing)[ref_surface]
    return float(np.percentile(np.concatenate([to_ref, to_pred]), 95))


def auroc(scores: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` ranking ``positives`` first (Mann–Whitney U, ties averaged)."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    positives = np.asarray(positives, dtype=bool).ravel()
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _nanmean(values: Sequence[float]) -> float:
    """Mean of the defined values; NaN when none is (e.g. HD95 with every class empty)."""
    defined = [v for v in values if not np.isnan(v)]
    return float(np.mean(defined)) if defined else float("nan")


def class_metrics(predicted: np.ndarray, reference: np.ndarray, class_names: Sequence[str],
                  spacing: Sequence[float]) -> dict:
    """{'per_class': {name: {dice, iou, hd95_mm}}, 'mean_foreground': {...}} (background excluded)."""
    per_class = {}
    for k, name in enumerate(class_names):
        if k == 0:
            continue
        p, r = predicted == k, reference == k
        per_class[name] = {"dice": dice_score(p, r), "iou": iou_score(p, r), "hd95_mm": hd95(p, r, spacing),
                           "reference_voxels": int(r.sum()), "predicted_voxels": int(p.sum())}
    mean = {key: _nanmean([m[key] for m in per_class.values()]) for key in ("dice", "iou", "hd95_mm")}
    return {"per_class": per_class, "mean_foreground": mean, "background_excluded": True}


def _slab(array: np.ndarray, axis: int, rng: Optional[range]) -> np.ndarray:
    if rng is None:
        return array
    return np.take(array, np.arange(rng.start, rng.stop), axis=axis)


def evaluate_volume(segmenter, image: np.ndarray, reference: np.ndarray, spacing: Sequence[float],
                    sampling, slices: Optional[range] = None) -> dict:
    """Every figure of the evaluation for one labelled volume (scored on ``slices`` only, if given)."""
    from .segmenter import labels_at

    axis = segmenter.config.preprocess.slice_axis
    if image.shape != reference.shape:
        raise ValueError(f"label shape {reference.shape} differs from image shape {image.shape}")
    if reference.max() >= segmenter.num_classes:
        raise ValueError(f"label value {int(reference.max())} is outside the model's {segmenter.num_classes} classes")
    result = segmenter.segment(image, sampling, slices=slices)
    names = segmenter.class_names
    ref = _slab(reference, axis, slices)
    consensus = _slab(result.labels, axis, slices)
    report = {"consensus": class_metrics(consensus, ref, names, spacing)}
    one_shot = _slab(segmenter.one_shot(image, slices=slices), axis, slices)
    report["one_shot"] = class_metrics(one_shot, ref, names, spacing)
    # Each step's x̂_0 alone, resized to the scan like the consensus is.
    ref_sf = np.moveaxis(ref, axis, 0)
    step_dice = []
    for step in range(result.trajectory.shape[0]):
        step_labels = labels_at(result.trajectory[step].transpose(1, 0, 2, 3), ref_sf.shape[1:])
        step_dice.append(float(np.mean(dice_per_class(step_labels, ref_sf, len(names)))))
    report["step_mean_dice"] = step_dice
    report["best_step"] = {"index": int(np.argmax(step_dice)), "mean_dice": float(np.max(step_dice))}
    wrong = consensus != ref
    report["uncertainty_auroc"] = auroc(_slab(result.uncertainty, axis, slices), wrong)
    report["error_fraction"] = float(wrong.mean())
    report["n_slices"] = int(ref.shape[axis])
    report["sampling"] = dataclasses.asdict(result.sampling)
    return report
