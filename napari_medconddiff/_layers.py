"""The one convention that maps NIfTI volumes to napari layers and back.

A volume from :func:`medconddiff.nifti.load_volume` has the file's voxel axes ``(i, j, k)``;
napari puts a slider on the first layer axis and shows the last two as rows (downwards) and
columns (rightwards). Layers are shown in the **radiological convention**
(:func:`medconddiff.geometry.display_codes`): a 3-D scan's layer axes point to ``("S", "P", "L")``,
so the slider runs inferior → superior, anterior is at the top and the patient's right is on the
screen's left, however the file stores its voxels (RAS, LPS, a sagittal stack, ...).

* The layer data are a **view** of the file-ordered array (a permutation plus flips,
  :class:`medconddiff.geometry.Reorientation`): nothing is copied or resampled.
* A file whose affine says nothing about anatomy (NIfTI codes 0, singular affine) is shown as if
  its voxel axes were R, A, S, as the engine processes it; its axis labels name the voxel axes
  instead of directions.
* A 2-D image is reoriented in-plane to the radiological view of its own plane: a 2-D layer.
* ``scale`` is the voxel size in mm in layer-axis order; ``axis_labels`` say where each axis
  points (``"I→S"``).
* ``metadata[METADATA_KEY]`` holds ``meta.to_dict()`` and ``metadata[TO_LAYER_KEY]`` the
  file → layer reorientation, so :func:`layer_to_volume` restores the file's voxel order, affine
  and header codes exactly.
* A scan read from **DICOM** also carries ``metadata[METADATA_KEY][DICOM_SOURCE_KEY]``: the series
  and the SOP instances of its slices in file order (:func:`dicom_record`; UIDs, series number and
  description, file paths, no patient attribute). It sits inside the meta's dict, so every layer that
  copies the scan's geometry (the consensus, the uncertainty) also knows which series to reference
  in a DICOM SEG; it is plain JSON, so napari's copies of metadata keep it intact.

A **plain layer** (an array added without this metadata) has no known anatomy: it is written in
its own axis order with NIfTI codes 0 ("orientation unknown"), spacing from its ``scale``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from medconddiff.geometry import SLICE_AXIS, Orientation, Reorientation, display_codes
from medconddiff.nifti import VolumeMeta

METADATA_KEY = "medconddiff"
TO_LAYER_KEY = "medconddiff_file_to_layer"
PLAIN_LAYER_NOTE = ("a napari layer without NIfTI metadata: voxel axes in the layer's order, "
                    "orientation unknown, voxel size from the layer scale")

__all__ = ["METADATA_KEY", "TO_LAYER_KEY", "DICOM_SOURCE_KEY", "LABELS_FROM_KEY", "SEGMENT_CODES_KEY", "dicom_record", "dicom_source_of", "volume_to_layer", "layer_to_volume", "layer_name",
           "display_reorientation", "stored_geometry", "file_view", "layer_view", "plain_meta", "full_resolution"]

#: Key, inside ``metadata[METADATA_KEY]``, of the DICOM series a scan was read from.
DICOM_SOURCE_KEY = "dicom_source"
#: Key, inside ``metadata[METADATA_KEY]``, of the kind of DICOM file a Labels layer was read from: "SEG" or
#: "RTSTRUCT" (a planning structure set: contours of a plan, not anyone's corrections of this model).
LABELS_FROM_KEY = "labels_from"
#: Key, inside ``metadata[METADATA_KEY]``, of a SEG's segment codes by segment label (``dicom_seg_codes``): saved
#: again as a SEG, the segments keep the anatomy the other tool coded.
SEGMENT_CODES_KEY = "segment_codes"

_OPPOSITE = {"R": "L", "L": "R", "A": "P", "P": "A", "S": "I", "I": "S"}
_PLANE_OF_AXIS = {axis: name for name, axis in SLICE_AXIS.items()}


def display_reorientation(meta: VolumeMeta) -> tuple[Reorientation, Orientation]:
    """File → layer reorientation of the radiological view, and the orientation it assumed.

    3-D scans are shown axially; a 2-D image (``original_ndim == 2``, a singleton third file axis)
    in its own plane, with that singleton axis first so that the 2-D layer is ``view[0]``.
    """
    orientation = Orientation.of(meta.affine, known=meta.affine_known, note=meta.geometry_note)
    if meta.original_ndim == 2:
        plane = _PLANE_OF_AXIS[orientation.to_canonical.axes.index(2)]
        target = display_codes(plane)
    else:
        target = display_codes("axial")
    return Reorientation.between(orientation.file_codes, target), orientation


def layer_view(array: np.ndarray, to_layer: Reorientation, layer_ndim: int) -> np.ndarray:
    """File-ordered ``(i, j, k)`` array → layer data (a view); 2-D layers drop the singleton axis."""
    view = to_layer.apply(array)
    return view[0] if layer_ndim == 2 else view


def file_view(data: np.ndarray, to_layer: Reorientation) -> np.ndarray:
    """Layer data → the file-ordered ``(i, j, k)`` view of the same memory (writable if ``data`` is)."""
    return to_layer.inverse().apply(data[np.newaxis] if data.ndim == 2 else data)


def volume_to_layer(array: np.ndarray, meta: VolumeMeta) -> tuple[np.ndarray, dict[str, Any]]:
    """File-ordered ``(i, j, k)`` volume → radiological layer data (a view) and layer kwargs.

    The kwargs hold ``scale`` (mm, layer-axis order), ``axis_labels`` and ``metadata``; add
    name, colormap etc.
    """
    array = np.asarray(array)
    if array.ndim != 3:
        raise ValueError(f"expected a 3-D (i, j, k) volume, got shape {array.shape}")
    to_layer, orientation = display_reorientation(meta)
    layer_ndim = 2 if meta.original_ndim == 2 and array.shape[2] == 1 else 3
    data = layer_view(array, to_layer, layer_ndim)
    scale = tuple(float(meta.spacing[a]) for a in to_layer.axes)
    labels = _axis_labels(to_layer, orientation)
    metadata = {METADATA_KEY: meta.to_dict(), TO_LAYER_KEY: to_layer.to_dict()}
    return data, {"scale": scale[-layer_ndim:], "axis_labels": labels[-layer_ndim:], "metadata": metadata}


def _axis_labels(to_layer: Reorientation, orientation: Orientation) -> tuple[str, ...]:
    """Where each layer axis points, e.g. ``"I→S"``; voxel axis names when the anatomy is unknown."""
    codes = to_layer.codes(orientation.file_codes)
    if orientation.known:
        return tuple(f"{_OPPOSITE[code]}→{code}" for code in codes)
    return tuple("ijk"[axis] + (" reversed" if flip else "") for axis, flip in zip(to_layer.axes, to_layer.flips))


def stored_geometry(metadata: dict[str, Any] | None) -> tuple[VolumeMeta, Reorientation] | None:
    """The meta and file → layer reorientation a layer carries, or None for a plain layer."""
    stored = (metadata or {}).get(METADATA_KEY)
    if stored is None:
        return None
    meta = VolumeMeta.from_dict(stored)
    to_layer = (metadata or {}).get(TO_LAYER_KEY)
    # Metadata written by hand with a meta but no reorientation: the layer is in file order.
    return meta, Reorientation.from_dict(to_layer) if to_layer else Reorientation.identity()


def layer_to_volume(
    data: Any,
    metadata: dict[str, Any] | None = None,
    *,
    scale: Sequence[float] | None = None,
) -> tuple[np.ndarray, VolumeMeta]:
    """Invert :func:`volume_to_layer`: layer data → file-ordered ``(i, j, k)`` view and its meta.

    With our metadata the file's voxel order, affine and header codes come back. A plain layer
    keeps its own axis order (a 2-D layer gets a singleton third axis) with the layer ``scale``
    as spacing (1 mm when none is given) and an unknown orientation (written with codes 0).
    """
    data = np.asarray(full_resolution(data))
    if data.ndim not in (2, 3):
        raise ValueError(f"only 2-D and 3-D layers can be written as NIfTI, got shape {data.shape}")
    stored = stored_geometry(metadata)
    if stored is not None:
        meta, to_layer = stored
        return file_view(data, to_layer), meta
    array = data[..., np.newaxis] if data.ndim == 2 else data
    spacing = (1.0,) * data.ndim if scale is None else tuple(abs(float(s)) for s in scale)[-data.ndim:]
    return array, plain_meta(data.shape, spacing)


def plain_meta(shape: Sequence[int], spacing: Sequence[float]) -> VolumeMeta:
    """Meta of an array written in its own axis order with no known orientation (NIfTI codes 0).

    Its affine is the one nibabel derives from the voxel size for codes 0: with any other affine,
    nibabel would store it as an "aligned" sform (code 2) and so invent an orientation.
    """
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_shape(tuple(int(n) for n in shape))
    header.set_zooms(tuple(float(s) for s in spacing[:len(shape)]))
    spacing_3d = tuple(float(s) for s in spacing[:len(shape)]) + (1.0,) * (3 - len(shape))
    return VolumeMeta(affine=header.get_base_affine(), spacing=spacing_3d, original_ndim=len(shape),
                      affine_known=False, geometry_note=PLAIN_LAYER_NOTE)


def dicom_record(source: Any) -> dict[str, Any]:
    """A :class:`~medconddiff.dicom_series.DicomSource` as layer metadata: its sidecar record plus the
    files of its slices, which a DICOM SEG needs to copy the study's references from."""
    return {**source.to_dict(), "files": [str(file) for file in source.files]}


def dicom_source_of(metadata: dict[str, Any] | None) -> Any:
    """The :class:`~medconddiff.dicom_series.DicomSource` a layer's metadata records, or None when the
    layer was not read from DICOM."""
    record = ((metadata or {}).get(METADATA_KEY) or {}).get(DICOM_SOURCE_KEY)
    if not record:
        return None
    from medconddiff.dicom_series import DicomSource

    return DicomSource(
        series_uid=str(record["series_instance_uid"]), series_number=record.get("series_number"),
        series_description=str(record.get("series_description", "")), modality=str(record.get("modality", "")),
        frame_of_reference_uid=str(record.get("frame_of_reference_uid", "")),
        sop_instance_uids=tuple(str(uid) for uid in record["sop_instance_uids"]),
        files=tuple(str(file) for file in record["files"]),
        frame_numbers=tuple(None if frame is None else int(frame) for frame in record["frame_numbers"]),
        notes=tuple(str(note) for note in record.get("notes", ())), part=str(record.get("part", "")))


def layer_name(path: str) -> str:
    """File name without folder and .nii/.nii.gz suffix, e.g. ``liver117_image``."""
    name = str(path).replace("\\", "/").rsplit("/", 1)[-1]
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def full_resolution(layer_or_data: Any) -> Any:
    """The full-resolution array of a layer, or of a layer's data, possibly multiscale: the one helper for it.

    napari keeps a multiscale layer's levels in a ``MultiScaleData`` (a Sequence, not a list), level 0
    the full resolution; a layer data tuple or a plugin may hand over a plain list or tuple of levels.
    The array is returned as it is (numpy, dask, zarr): no copy, nothing computed.
    """
    if hasattr(layer_or_data, "multiscale") and hasattr(layer_or_data, "data"):     # a layer
        return layer_or_data.data[0] if layer_or_data.multiscale else layer_or_data.data
    if isinstance(layer_or_data, (list, tuple)) or _is_multiscale_data(layer_or_data):
        return layer_or_data[0]
    return layer_or_data


def _is_multiscale_data(data: Any) -> bool:
    try:
        from napari.layers._multiscale_data import MultiScaleData
    except ImportError:      # another napari layout: a Sequence of levels that is no array
        return isinstance(data, Sequence) and not hasattr(data, "__array__")
    return isinstance(data, MultiScaleData)
