"""The one convention that maps NIfTI volumes to napari layers and back.

A volume from :func:`medconddiff.nifti.load_volume` has axes ``(i, j, k)`` (the file's array
axes) and ``meta.spacing`` in mm per axis. napari puts a slider on every leading axis and shows
the last two as rows and columns, so the layer data are ``np.moveaxis(array, -1, 0)``:

* 3-D: layer axes ``(k, i, j)``. The last NIfTI axis (axial for almost every CT and MR) becomes
  napari's slider; each displayed slice has rows = ``i`` and columns = ``j``. This is not the
  radiological view (no flips or transposes are applied), but it is exact and invertible.
* 2-D images (``meta.original_ndim == 2``) become a 2-D layer ``(i, j)`` with no slider.
* ``scale`` is ``meta.spacing`` reordered the same way, so physical distances are right.
* ``metadata["medconddiff"]`` holds ``meta.to_dict()`` and ``metadata["nifti_axis_order"]``
  names the convention, so :func:`layer_to_volume` restores the file's axes and affine exactly.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from medconddiff.nifti import VolumeMeta

METADATA_KEY = "medconddiff"
AXIS_ORDER_KEY = "nifti_axis_order"
AXIS_ORDER = "moved last axis first"

__all__ = ["METADATA_KEY", "AXIS_ORDER_KEY", "AXIS_ORDER", "volume_to_layer", "layer_to_volume", "layer_name"]


def volume_to_layer(array: np.ndarray, meta: VolumeMeta) -> tuple[np.ndarray, dict[str, Any]]:
    """NIfTI-ordered ``(i, j, k)`` volume -> napari layer data ``(k, i, j)`` and layer kwargs.

    The kwargs hold ``scale`` (mm, layer-axis order) and ``metadata``; add name, colormap etc.
    """
    array = np.asarray(array)
    if array.ndim != 3:
        raise ValueError(f"expected a 3-D (i, j, k) volume, got shape {array.shape}")
    names = _axis_names(meta)
    if meta.original_ndim == 2 and array.shape[2] == 1:
        data = array[:, :, 0]
        scale = tuple(meta.spacing[:2])
        labels = names[:2]
    else:
        data = np.moveaxis(array, -1, 0)
        scale = (meta.spacing[2],) + tuple(meta.spacing[:2])
        labels = (names[2],) + names[:2]
    metadata = {METADATA_KEY: meta.to_dict(), AXIS_ORDER_KEY: AXIS_ORDER}
    return data, {"scale": scale, "metadata": metadata, "axis_labels": labels}


def _axis_names(meta: VolumeMeta) -> tuple[str, str, str]:
    """Slider/axis labels a reader of the scan understands: voxel axis and where it points, e.g. 'k → S'."""
    codes = tuple(meta.orientation or ("?", "?", "?"))
    return tuple(f"{axis} → {code}" if code != "?" else axis for axis, code in zip("ijk", codes))  # type: ignore


def layer_to_volume(
    data: Any,
    metadata: dict[str, Any] | None = None,
    *,
    scale: Sequence[float] | None = None,
) -> tuple[np.ndarray, VolumeMeta]:
    """Invert :func:`volume_to_layer`: layer data -> ``(i, j, k)`` array and its VolumeMeta.

    With our metadata the file's affine, spacing and header codes come back. A plain layer
    (no metadata) is read with the same axis convention and gets an axis-aligned affine with
    spacing from the layer ``scale`` (1 mm when no scale is given).
    """
    data = _base_level(data)
    if data.ndim not in (2, 3):
        raise ValueError(f"only 2-D and 3-D layers can be written as NIfTI, got shape {data.shape}")
    array = data[..., np.newaxis] if data.ndim == 2 else np.moveaxis(data, 0, -1)
    stored = (metadata or {}).get(METADATA_KEY)
    if stored is not None:
        return array, VolumeMeta.from_dict(stored)
    return array, VolumeMeta.identity(shape_ndim=data.ndim, spacing=_volume_spacing(data.ndim, scale))


def layer_name(path: str) -> str:
    """File name without folder and .nii/.nii.gz suffix, e.g. ``liver117_image``."""
    name = str(path).replace("\\", "/").rsplit("/", 1)[-1]
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _base_level(data: Any) -> np.ndarray:
    """Full-resolution array of a (possibly multiscale or lazy) layer."""
    if isinstance(data, (list, tuple)):
        data = data[0]
    return np.asarray(data)


def _volume_spacing(ndim: int, scale: Sequence[float] | None) -> tuple[float, ...] | None:
    """Layer scale (layer-axis order) -> spacing in (i, j, k) order."""
    if scale is None:
        return None
    scale = tuple(abs(float(s)) for s in scale)[-ndim:]
    if ndim == 2:
        return scale
    return scale[1:] + scale[:1]
