"""Scan → network input, identical in training and inference (the checkpoint records the config).

Volumes are numpy arrays in NIfTI voxel order; ``slice_axis`` says which axis is sliced. Intensities
are mapped to [-1, 1]; slices are resized to the model's square input and predictions resized back.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F

from .config import PreprocessConfig
from .nifti import sanitize_nonfinite


class ScanError(ValueError):
    """A scan the model cannot be run on (wrong dimensionality, no finite voxels, ...)."""


def intensity_range(volume: np.ndarray, config: PreprocessConfig) -> tuple[float, float]:
    """The (low, high) intensities mapped to -1 and 1, computed once per volume."""
    if config.intensity == "ct_window":
        return float(config.window[0]), float(config.window[1])
    sample = volume[:: max(1, volume.shape[0] // 64)]  # percentiles on a subsample: same result, less memory
    low, high = np.percentile(sample, config.percentiles)
    return float(low), float(high)


def normalise_intensity(slices: np.ndarray, low: float, high: float) -> np.ndarray:
    if high <= low:  # a constant scan: nothing to see, feed mid-grey rather than dividing by zero
        return np.zeros_like(slices, dtype=np.float32)
    scaled = (np.clip(slices, low, high) - low) / (high - low)
    return (scaled * 2 - 1).astype(np.float32)


def check_volume(volume: np.ndarray) -> np.ndarray:
    """A 3-D float array, or a clear ScanError. 2-D images become one slice along axis 2."""
    volume = np.asarray(volume)
    if volume.ndim == 2:
        volume = volume[..., None]
    if volume.ndim != 3:
        raise ScanError(f"expected a 2-D or 3-D scan, got {volume.ndim}-D data of shape {volume.shape}; "
                        "pick one channel/time point of a 4-D scan first")
    if volume.dtype.kind not in "fiub":
        raise ScanError(f"scan data must be numeric, got dtype {volume.dtype}")
    if min(volume.shape) == 0:
        raise ScanError(f"the scan is empty (shape {volume.shape})")
    cleaned, bad = sanitize_nonfinite(volume.astype(np.float32, copy=False))
    if bad == volume.size:
        raise ScanError("the scan has no finite voxel (all NaN or Inf)")
    if bad:
        warnings.warn(f"{bad} NaN/Inf voxels were replaced by the lowest finite intensity", stacklevel=2)
    return cleaned


def to_model_input(slices: np.ndarray, size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(B, H, W) normalised slices → (B, 1, size, size) tensor (antialiased when shrinking)."""
    tensor = torch.from_numpy(np.ascontiguousarray(slices, dtype=np.float32))[:, None].to(device)
    if tensor.shape[-2:] == (size, size):
        return tensor
    return F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def resize_probabilities(probabilities: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """(B, K, h, w) probabilities → (B, K, H, W), bilinear (smooth boundaries, sums stay 1)."""
    if tuple(probabilities.shape[-2:]) == tuple(shape):
        return probabilities
    return F.interpolate(probabilities, size=shape, mode="bilinear", align_corners=False)


def resize_labels(labels: torch.Tensor, size: int) -> torch.Tensor:
    """(B, H, W) integer labels → (B, size, size), nearest neighbour (for training targets)."""
    if labels.shape[-2:] == (size, size):
        return labels
    return F.interpolate(labels[:, None].float(), size=(size, size), mode="nearest-exact")[:, 0].long()
