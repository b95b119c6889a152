"""Reading a DICOM RT Structure Set (RTSTRUCT: the contours of radiotherapy planning) as a label map on
the voxels of the series it outlines.

* **Classes.** One per ROI that has closed planar contours, numbered in the order of the Structure Set
  ROI Sequence (1, 2, …; 0 is background), named by its ROI Name. ROIs without such contours (points,
  open lines, empty ROIs) are left out, with a note.
* **Geometry.** A contour's points are patient coordinates (LPS mm); they are taken to the series'
  voxels through the scan's affine (:func:`medconddiff.dicom_series.read_dicom_series`), so oblique and
  gantry-tilted series are filled where their voxels are. Each contour lies on one slice; a contour
  more than a tenth of a slice away from every slice, or outside the slice range, is refused: the
  structure set was not drawn on this series.
* **Filling.** A contour fills the voxels whose centres lie inside it (scikit-image's ``polygon2mask``);
  the contours of one ROI on one slice combine by the even-odd rule, so a contour inside another is a
  hole (how RTSTRUCT stores a ring).
* **Overlaps.** ROIs overlap as a rule (the body outline holds every organ). A label map holds one class
  per voxel, so where they overlap the ROI covering fewer voxels wins — the organ inside the body, the
  tumour inside the organ — as for an overlapping DICOM SEG, and a note says how many voxels.
* **Patient data.** Nothing of the patient or structure set is returned but ROI names and counts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from .dicom_folder import READ_ERRORS, RT_STRUCTURE_SET, DicomError, file_sop_class, one_line
from .dicom_series import DicomScan
from .nifti import smallest_label_dtype

__all__ = ["RT_STRUCTURE_SET", "StructureSet", "read_rtstruct", "rtstruct_referenced_series",
           "rtstruct_frames_of_reference", "drawn_on", "rtstruct_class_names", "is_rtstruct", "describe"]
#: How far (in slices) a contour may lie from the nearest slice: rounding in the points' decimal strings.
SLICE_TOLERANCE = 0.1


@dataclass(frozen=True)
class StructureSet:
    """An RTSTRUCT read onto a series: labels ``(columns, rows, slices)`` like the series' volume, the
    class names (background first), and notes (ROIs left out, overlapping voxels)."""

    labels: np.ndarray
    class_names: tuple[str, ...]
    notes: tuple[str, ...]


def rtstruct_referenced_series(header: pydicom.Dataset) -> set[str]:
    """The Series Instance UIDs an RTSTRUCT's contours were drawn on (its Referenced Frame of Reference
    Sequence names them, study by study; empty where it leaves them out, which the standard allows)."""
    return {str(series.get("SeriesInstanceUID", ""))
            for frame in header.get("ReferencedFrameOfReferenceSequence", [])
            for study in frame.get("RTReferencedStudySequence", [])
            for series in study.get("RTReferencedSeriesSequence", [])}


def rtstruct_frames_of_reference(header: pydicom.Dataset) -> set[str]:
    """The Frame of Reference UIDs an RTSTRUCT's contours are in: what ties it to its series where it
    names no series."""
    frames = {str(frame.get("FrameOfReferenceUID", ""))
              for frame in header.get("ReferencedFrameOfReferenceSequence", [])}
    frames |= {str(roi.get("ReferencedFrameOfReferenceUID", "")) for roi in header.get("StructureSetROISequence", [])}
    return frames - {""}


def drawn_on(header: pydicom.Dataset, series_uid: str, frame_of_reference_uid: str) -> bool:
    """Whether an RTSTRUCT was drawn on a series: the series it names, else (it names none) the frame of
    reference it shares with the series."""
    series = rtstruct_referenced_series(header)
    if series:
        return series_uid in series
    return bool(frame_of_reference_uid) and frame_of_reference_uid in rtstruct_frames_of_reference(header)


def read_rtstruct(path: str | os.PathLike, scan: DicomScan) -> StructureSet:
    """Fill the closed contours of an RTSTRUCT on the voxels of ``scan`` (the series it outlines).

    Raises :class:`DicomError` for a file that is not an RTSTRUCT, one drawn on another series or frame
    of reference, contours off the series' slices, or no closed contour at all."""
    path = Path(path)
    try:
        header = pydicom.dcmread(path)
    except READ_ERRORS as exc:
        raise DicomError(f"{path.name}: cannot read the RT structure set ({one_line(exc)})") from exc
    if str(header.get("SOPClassUID", "")) != RT_STRUCTURE_SET:
        raise DicomError(f"{path.name} is not an RT structure set")
    if not drawn_on(header, scan.source.series_uid, scan.source.frame_of_reference_uid):
        raise DicomError(f"{path.name}: this structure set was drawn on another series, not {scan.source.name}")
    rois = _closed_contours_by_roi(header)
    notes = [f"{path.name}: left out ROI {name!r}: no closed planar contour" for name, contours in rois if not contours]
    drawn = [(name, contours) for name, contours in rois if contours]
    if not drawn:
        raise DicomError(f"{path.name}: no ROI with closed contours to fill")
    to_voxels = np.linalg.inv(scan.meta.affine)
    shape = scan.volume.shape[:3]
    masks = [_fill(path.name, name, contours, to_voxels, shape) for name, contours in drawn]
    labels = np.zeros(shape, dtype=smallest_label_dtype(len(drawn)))
    covered = np.zeros(shape, dtype=bool)
    overlapping = np.zeros(shape, dtype=bool)
    sizes = [sum(int(mask.sum()) for mask in slices.values()) for slices in masks]
    for index in np.argsort(-np.asarray(sizes), kind="stable"):    # largest first: smaller ROIs on top
        for k, mask in masks[index].items():
            overlapping[:, :, k] |= mask & covered[:, :, k]
            covered[:, :, k] |= mask
            labels[:, :, k][mask] = index + 1
    shared = int(overlapping.sum())
    if shared:
        notes.append(f"{path.name}: {shared:,} voxel(s) lie in more than one ROI: each took the smallest of its "
                     "ROIs (an organ inside the body outline, a tumour inside its organ)")
    return StructureSet(labels, ("background", *(name for name, _ in drawn)), tuple(notes))


def is_rtstruct(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an RT Structure Set file (header only)."""
    return file_sop_class(path) == RT_STRUCTURE_SET


def rtstruct_class_names(path: str | os.PathLike) -> tuple[str, ...]:
    """The class names :func:`read_rtstruct` gives the file's labels: background, then each ROI with closed
    contours, in order."""
    try:
        header = pydicom.dcmread(path)
    except READ_ERRORS as exc:
        raise DicomError(f"{Path(path).name}: cannot read the RT structure set ({one_line(exc)})") from exc
    return ("background", *(name for name, contours in _closed_contours_by_roi(header) if contours))


def _closed_contours_by_roi(header: pydicom.Dataset) -> list[tuple[str, list[np.ndarray]]]:
    """(ROI name, [points (n, 3) in LPS mm of each closed planar contour]) in Structure Set ROI order."""
    names = {int(roi.ROINumber): str(roi.get("ROIName", "") or f"ROI {roi.ROINumber}").strip()
             for roi in header.get("StructureSetROISequence", [])}
    contours: dict[int, list[np.ndarray]] = {number: [] for number in names}
    for roi in header.get("ROIContourSequence", []):
        number = int(roi.get("ReferencedROINumber", -1))
        for contour in roi.get("ContourSequence", []):
            if str(contour.get("ContourGeometricType", "")).upper() != "CLOSED_PLANAR":
                continue
            points = np.asarray([float(value) for value in contour.get("ContourData", [])], dtype=np.float64)
            if points.size >= 9 and points.size % 3 == 0:
                contours.setdefault(number, []).append(points.reshape(-1, 3))
    return [(names.get(number, f"ROI {number}"), found) for number, found in contours.items()]


def _fill(file: str, roi: str, contours: list[np.ndarray], to_voxels: np.ndarray,
          shape: tuple[int, ...]) -> dict[int, np.ndarray]:
    """Slice index -> filled (columns, rows) mask of one ROI (even-odd over its contours on that slice)."""
    from skimage.draw import polygon2mask

    filled: dict[int, np.ndarray] = {}
    for points in contours:
        ras = np.column_stack([-points[:, 0], -points[:, 1], points[:, 2], np.ones(len(points))])
        voxels = (to_voxels @ ras.T).T[:, :3]
        k = float(np.median(voxels[:, 2]))
        nearest = int(round(k))
        if abs(k - nearest) > SLICE_TOLERANCE or np.ptp(voxels[:, 2]) > 2 * SLICE_TOLERANCE \
                or not 0 <= nearest < shape[2]:
            raise DicomError(f"{file}: a contour of ROI {roi!r} does not lie on a slice of this series "
                             f"(at slice {k:.2f} of 0..{shape[2] - 1}): it was drawn on other images")
        mask = polygon2mask(shape[:2], voxels[:, :2])
        filled[nearest] = filled[nearest] ^ mask if nearest in filled else mask
    return filled


def describe(header: Any) -> str:
    """The structure set's label for a layer name: its Structure Set Label, else its series description."""
    for keyword in ("StructureSetLabel", "SeriesDescription"):
        text = str(header.get(keyword, "") or "").strip()
        if text:
            return text
    return ""
