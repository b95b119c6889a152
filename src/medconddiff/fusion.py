"""From a kept trajectory (or one prediction) to labels and uncertainty on the scan's grid.

The one way a prediction becomes labels: model-grid probabilities are resampled to the scan's grid
(bilinear), then arg-maxed. Used by a running segmentation, by re-fusion of a finished one and by
the napari plugin's re-fuse.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import numpy as np
import torch

from .config import ONE_SHOT, SamplingConfig
from .consensus import as_probabilities, first_argmax, fuse, labels_from_probabilities, select_steps, uncertainty
from .errors import UserInputError
from .preprocess import ScanGeometry
from .profiling import FUSE, engine_part

#: ``postprocess(labels (B, H, W), model_pixel_area) -> labels``: a family's clean-up of consensus labels.
Postprocess = Callable[[np.ndarray, float], np.ndarray]


def argmax_labels(probabilities: torch.Tensor) -> np.ndarray:
    """(B, K, H, W) probabilities → (B, H, W) uint8 labels on the host; equal to ``argmax(dim=1)``.

    torch's CPU arg-max over the class dimension is ~10× slower than comparing class planes, and at
    scan resolution (512²) it cost more than the whole fusion.
    """
    if probabilities.device.type == "cpu":
        return first_argmax(probabilities.numpy(), axis=1)
    return probabilities.argmax(dim=1).to(torch.uint8).cpu().numpy()


def scan_labels(probabilities: np.ndarray | torch.Tensor, geometry: ScanGeometry) -> np.ndarray:
    """(B, K, h, w) model-grid probabilities (float, or uint8-quantised) → (B, H, W) uint8 labels
    on the scan's grid: the one way a prediction becomes labels (bilinear, then arg-max)."""
    if isinstance(probabilities, np.ndarray):
        probabilities = torch.from_numpy(np.ascontiguousarray(probabilities, dtype=np.float32))
    return argmax_labels(geometry.to_scan_grid(probabilities.float()))


def model_pixel_area(geometry: ScanGeometry) -> float:
    """How many scan-grid pixels one model-grid pixel covers."""
    (H, W), (h, w) = geometry.plane_shape, geometry.model_shape
    return (H / h) * (W / w)


def fuse_slices(stack_uint8: np.ndarray, sampling: SamplingConfig, geometry: ScanGeometry,
                postprocess: Optional[Postprocess] = None, steps_used: Optional[np.ndarray] = None,
                one_shot: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    """(S, K, B, h, w) quantised trajectory → labels (B, H, W) uint8 and uncertainty (B, H, W) float32
    on the scan's grid. ``postprocess`` cleans the labels (not the uncertainty, which describes the
    raw trajectory). ``steps_used`` (B,): slices that stopped early fuse only the steps they took
    (skip-first then leaves at least their last step). ``one_shot`` (K, B, h, w), quantised like a
    step: the one-shot forward's probabilities, which the ``one_shot`` consensus takes as its own."""
    if sampling.consensus == ONE_SHOT and one_shot is None:
        raise UserInputError("the one-shot consensus needs the one-shot forward, which only a run with that "
                             "consensus keeps: segment again with it")
    with engine_part(FUSE):
        return _fuse_slices(stack_uint8, sampling, geometry, postprocess, steps_used, one_shot)


def _fuse_slices(stack_uint8: np.ndarray, sampling: SamplingConfig, geometry: ScanGeometry,
                 postprocess: Optional[Postprocess], steps_used: Optional[np.ndarray],
                 one_shot: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    if steps_used is not None and (np.asarray(steps_used) < sampling.steps).any():
        return _fuse_ragged(stack_uint8, sampling, geometry, postprocess, np.asarray(steps_used), one_shot)
    if sampling.consensus == ONE_SHOT:
        fused = as_probabilities(one_shot)                                                  # (K, B, h, w)
    else:
        fused = fuse(stack_uint8, sampling.consensus, sampling.skip_first, sampling.num_seeds)   # (K, B, h, w)
    labels_small = labels_from_probabilities(fused)
    # The mean fusion is the steps' pooled prediction: not computed twice.
    pooled = fused if sampling.consensus == "mean" and one_shot is None else None
    unc_small = uncertainty(select_steps(stack_uint8, sampling.skip_first, sampling.num_seeds), labels_small,
                            one_shot=one_shot, pooled=pooled)
    labels = scan_labels(fused.transpose(1, 0, 2, 3), geometry)
    if postprocess is not None:
        labels = postprocess(labels, model_pixel_area(geometry))
    unc = geometry.to_scan_grid(torch.from_numpy(unc_small)[:, None])[:, 0].clamp_(0, 1).numpy()
    return labels, unc.astype(np.float32)


def _fuse_ragged(stack_uint8: np.ndarray, sampling: SamplingConfig, geometry: ScanGeometry,
                 postprocess: Optional[Postprocess], steps_used: np.ndarray,
                 one_shot: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    """fuse_slices for slices that took different numbers of steps: one fusion per step count."""
    H, W = geometry.plane_shape
    labels = np.zeros((len(steps_used), H, W), np.uint8)
    unc = np.zeros((len(steps_used), H, W), np.float32)
    for used in np.unique(steps_used):
        used = int(used)
        positions = np.flatnonzero(steps_used == used)
        entries = [seed * sampling.steps + i for seed in range(sampling.num_seeds) for i in range(used)]
        taken = dataclasses.replace(sampling, steps=used, skip_first=min(sampling.skip_first, used - 1))
        labels[positions], unc[positions] = _fuse_slices(
            stack_uint8[entries][:, :, positions], taken, geometry, postprocess, None,
            None if one_shot is None else one_shot[:, positions])
    return labels, unc
