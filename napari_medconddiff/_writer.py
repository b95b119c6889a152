"""npe2 writers: save an Image or Labels layer as .nii / .nii.gz, and a Labels layer on a scan read
from DICOM as a DICOM SEG (.dcm).

The layer is turned back into the voxel order, affine and header codes of the file it was read
from (see :mod:`napari_medconddiff._layers`); a layer that did not come from a NIfTI file is
written in its own axis order with its napari ``scale`` as voxel spacing and NIfTI codes 0
(orientation unknown: no orientation is invented). Layer metadata keeps a file's geometry, never
its header text (``descrip``, ``aux_file``, where converters put acquisition times and at times a
name), so neither writer writes any.

Overwriting: napari's save dialog already asks the user before replacing an existing file, so
these writers, which napari calls only after that, pass ``overwrite=True`` to
:func:`medconddiff.nifti.save_volume` for the very name the dialog returned. A name typed without the
extension is another file than the one the writer adds the extension to, which nobody was asked about:
if that one exists, it is refused. The write itself is still atomic (no half-written file).
Code that saves outside napari's dialog should call ``save_volume`` directly, which refuses to
overwrite by default.

DICOM SEG: a SEG references the images it segments, so only a labels layer whose metadata records the
DICOM series of its scan (the consensus of a scan the reader opened from DICOM, see
:mod:`napari_medconddiff._layers`) can be saved as one; any other layer is refused with a message
that says to save it as NIfTI. Segment names come from the layer's ``class`` feature (the model's
class names, which the plugin sets on its result layers), else ``class 1``, ``class 2``, … The
segments are AUTOMATIC for the plugin's result layer, SEMIAUTOMATIC for any other (:func:`algorithm_type`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medconddiff.errors import UserInputError
from medconddiff.nifti import save_volume, smallest_label_dtype
from medconddiff.outputs import with_nifti_suffix

from ._export import padded_class_names
from ._layers import METADATA_KEY, SEGMENT_CODES_KEY, dicom_source_of, layer_to_volume

__all__ = ["write_labels", "write_image", "write_dicom_seg_labels"]

DICOM_SEG_SUFFIX = ".dcm"


def write_labels(path: str, data: Any, attributes: dict[str, Any]) -> list[str]:
    """Write a Labels layer as an integer NIfTI (uint8 if labels fit, else uint16/int32), its header's intent
    NIFTI_INTENT_LABEL: the reader opens it as labels whatever the file is named (napari proposes the layer's
    name, '<scan> consensus', which says nothing of labels)."""
    array, meta = layer_to_volume(data, attributes.get("metadata"), scale=attributes.get("scale"))
    target = _unasked_target(path, str(with_nifti_suffix(path)))
    return [str(save_volume(target, array, meta, overwrite=True, dtype=_labels_dtype(array), intent="label"))]


def write_image(path: str, data: Any, attributes: dict[str, Any]) -> list[str]:
    """Write an Image layer as NIfTI, keeping the layer's dtype (float32 for scans we read)."""
    if attributes.get("rgb"):
        raise ValueError("RGB image layers cannot be written as NIfTI volumes")
    array, meta = layer_to_volume(data, attributes.get("metadata"), scale=attributes.get("scale"))
    return [str(save_volume(_unasked_target(path, str(with_nifti_suffix(path))), array, meta, overwrite=True))]


def write_dicom_seg_labels(path: str, data: Any, attributes: dict[str, Any]) -> list[str]:
    """Write a Labels layer on a scan read from DICOM as a DICOM SEG referencing that series."""
    from medconddiff.dicom_seg import write_dicom_seg

    metadata = attributes.get("metadata")
    source = dicom_source_of(metadata)
    if source is None:
        raise UserInputError(f"{attributes.get('name', 'this layer')}: a DICOM SEG references the DICOM series it "
                             "segments, and this layer was not made on a scan read from DICOM; save it as NIfTI "
                             "(.nii.gz) instead")
    labels, _ = layer_to_volume(data, metadata)
    named = path if str(path).lower().endswith(DICOM_SEG_SUFFIX) else f"{path}{DICOM_SEG_SUFFIX}"
    target = _unasked_target(path, named)
    names = segment_names(attributes.get("features"), int(labels.max()) if labels.size else 0)
    codes = ((metadata or {}).get(METADATA_KEY) or {}).get(SEGMENT_CODES_KEY) or None
    return [str(write_dicom_seg(target, labels, source, names, overwrite=True, codes=codes,
                                algorithm_type=algorithm_type(metadata)))]


def algorithm_type(metadata: Any) -> str:
    """What a SEG saved from a layer says made it: AUTOMATIC for this plugin's own result layer (its marker
    in the metadata), SEMIAUTOMATIC for any other: the user's layer (a SEG or structure set opened, a
    layer painted) is someone's work, if perhaps from a model's start; this writer cannot tell whether
    any of it was drawn by hand, so it does not claim MANUAL either. The plugin's consensus with edits
    (its result set flags them in the metadata) is SEMIAUTOMATIC too, as Export writes it."""
    from ._result_layers import EDITED_KEY, MARKER_KEY

    metadata = metadata or {}
    own = isinstance(metadata.get(MARKER_KEY), dict)
    return "AUTOMATIC" if own and not metadata.get(EDITED_KEY) else "SEMIAUTOMATIC"


def segment_names(features: Any, max_label: int) -> list[str]:
    """Class names for labels ``0..max_label``: the layer's ``class`` feature where it names them all."""
    names = ["background"]
    if features is not None and "class" in features and len(features["class"]):
        names = [str(name) for name in list(features["class"])]
    # Labels painted beyond the named classes and, for a layer with no foreground at all, one class so that
    # the SEG has a segment.
    return padded_class_names(names, max(max_label, 1))


def _labels_dtype(array: np.ndarray) -> np.dtype:
    """Smallest unsigned type for non-negative labels; int32 if a label is negative."""
    if array.size == 0:
        return np.dtype(np.uint8)
    if array.min() < 0:
        return np.dtype(np.int32)
    return smallest_label_dtype(int(array.max()))


def _unasked_target(path: str, target: str) -> str:
    """``target``, the file written for the name ``path`` napari's dialog returned; refused when it is
    another, existing file (the extension added here), which the dialog did not ask about replacing."""
    if Path(target) != Path(path) and Path(target).exists():
        raise UserInputError(f"{target} exists, and the save dialog asked only about '{Path(path).name}': type the "
                             f"full name ({Path(target).name}) to be asked before it is replaced, or another name")
    return target
