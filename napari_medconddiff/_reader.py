"""npe2 reader for NIfTI volumes (.nii, .nii.gz).

Layers follow :mod:`napari_medconddiff._layers`: the last NIfTI axis becomes napari's slider,
``scale`` is the voxel spacing in mm, and ``metadata`` lets the writer restore the file's axes
and affine. A file whose name mentions label/seg/mask and whose voxels are small non-negative
integers opens as a Labels layer; everything else opens as a grey-scale Image.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Callable

import numpy as np

from medconddiff.nifti import NIFTI_SUFFIXES, load_volume, sanitize_nonfinite, smallest_label_dtype

from ._layers import layer_name, volume_to_layer

LayerData = tuple[np.ndarray, dict[str, Any], str]
PathOrPaths = str | os.PathLike | list[str | os.PathLike]

LABEL_NAME_HINTS = ("label", "seg", "mask")
# A label map has few distinct values; an integer-valued CT named "*_seg*" has thousands.
MAX_LABEL_VALUE = 65535
MAX_DISTINCT_LABELS = 1024
# Percentiles of the display window: robust against a few extreme (metal, air) voxels.
CONTRAST_PERCENTILES = (1.0, 99.0)
# Percentiles are estimated on at most this many voxels to keep opening big scans fast.
CONTRAST_SAMPLE_SIZE = 1_000_000


def get_reader(path: PathOrPaths) -> Callable[[PathOrPaths], list[LayerData]] | None:
    """Return :func:`read_nifti` if every path is an existing .nii/.nii.gz file, else None.

    Whether a file is really readable is only known once it is read; read_nifti then raises a
    VolumeReadError whose message names the file and the problem, which napari shows.
    """
    paths = path if isinstance(path, (list, tuple)) else [path]
    if not paths or not all(_is_nifti_file(p) for p in paths):
        return None
    return read_nifti


def read_nifti(path: PathOrPaths) -> list[LayerData]:
    """Read one or several NIfTI files into napari layer data tuples (one layer per file)."""
    paths = path if isinstance(path, (list, tuple)) else [path]
    return [read_layer(p) for p in paths]


def read_layer(path: str | os.PathLike) -> LayerData:
    """One NIfTI file -> ``(data, kwargs, "image" | "labels")``."""
    path = os.fspath(path)
    array, meta = load_volume(path)
    name = layer_name(path)
    if _looks_like_labels(name, array):
        labels = array.astype(smallest_label_dtype(int(array.max())))
        data, kwargs = volume_to_layer(labels, meta)
        return data, {**kwargs, "name": name}, "labels"
    array, n_bad = sanitize_nonfinite(array)
    if n_bad:
        # napari's contrast and rendering break on NaN; say what was changed instead of failing.
        warnings.warn(f"{path}: {n_bad} NaN/Inf voxels replaced by the smallest finite value", stacklevel=2)
    data, kwargs = volume_to_layer(array, meta)
    kwargs["metadata"]["nonfinite_voxels_replaced"] = n_bad
    kwargs.update(name=name, colormap="gray", contrast_limits=contrast_limits(array))
    return data, kwargs, "image"


def contrast_limits(array: np.ndarray) -> tuple[float, float]:
    """Display window from the 1st..99th percentile: shows soft tissue in CT and MR alike."""
    values = np.asarray(array).ravel()
    step = max(1, values.size // CONTRAST_SAMPLE_SIZE)
    low, high = np.percentile(values[::step], CONTRAST_PERCENTILES)
    if not high > low:
        # Nearly constant images: fall back to the full range, or any non-empty window.
        low, high = float(values.min()), float(values.max())
        if not high > low:
            high = low + 1.0
    return float(low), float(high)


def _is_nifti_file(path: Any) -> bool:
    if not isinstance(path, (str, os.PathLike)):
        return False
    path = os.fspath(path)
    return str(path).lower().endswith(NIFTI_SUFFIXES) and os.path.isfile(path)


def _looks_like_labels(name: str, array: np.ndarray) -> bool:
    """Name hints at a segmentation and the voxels are few small non-negative integers."""
    if not any(hint in name.lower() for hint in LABEL_NAME_HINTS):
        return False
    if not np.isfinite(array).all() or array.min() < 0 or array.max() > MAX_LABEL_VALUE:
        return False
    if not np.array_equal(array, np.round(array)):
        return False
    counts = np.bincount(array.astype(np.int64).ravel(), minlength=1)
    return np.count_nonzero(counts) <= MAX_DISTINCT_LABELS
