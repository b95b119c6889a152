"""npe2 writers: save an Image or Labels layer as .nii / .nii.gz.

The layer is turned back into the voxel order, affine and header codes of the file it was read
from (see :mod:`napari_medconddiff._layers`); a layer that did not come from a NIfTI file is
written in its own axis order with its napari ``scale`` as voxel spacing and NIfTI codes 0
(orientation unknown: no orientation is invented).

Overwriting: napari's save dialog already asks the user before replacing an existing file, so
these writers, which napari calls only after that, pass ``overwrite=True`` to
:func:`medconddiff.nifti.save_volume`. The write itself is still atomic (no half-written file).
Code that saves outside napari's dialog should call ``save_volume`` directly, which refuses to
overwrite by default.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from medconddiff.nifti import NIFTI_SUFFIXES, save_volume, smallest_label_dtype

from ._layers import layer_to_volume

__all__ = ["write_labels", "write_image"]


def write_labels(path: str, data: Any, attributes: dict[str, Any]) -> list[str]:
    """Write a Labels layer as an integer NIfTI (uint8 if labels fit, else uint16/int32)."""
    array, meta = layer_to_volume(data, attributes.get("metadata"), scale=attributes.get("scale"))
    return [str(save_volume(_with_nifti_suffix(path), array, meta, overwrite=True, dtype=_labels_dtype(array)))]


def write_image(path: str, data: Any, attributes: dict[str, Any]) -> list[str]:
    """Write an Image layer as NIfTI, keeping the layer's dtype (float32 for scans we read)."""
    if attributes.get("rgb"):
        raise ValueError("RGB image layers cannot be written as NIfTI volumes")
    array, meta = layer_to_volume(data, attributes.get("metadata"), scale=attributes.get("scale"))
    return [str(save_volume(_with_nifti_suffix(path), array, meta, overwrite=True))]


def _labels_dtype(array: np.ndarray) -> np.dtype:
    """Smallest unsigned type for non-negative labels; int32 if a label is negative."""
    if array.size == 0:
        return np.dtype(np.uint8)
    if array.min() < 0:
        return np.dtype(np.int32)
    return smallest_label_dtype(int(array.max()))


def _with_nifti_suffix(path: str) -> str:
    """napari normally adds the extension; this covers direct calls with a bare name."""
    return path if str(path).lower().endswith(NIFTI_SUFFIXES) else f"{path}.nii.gz"
