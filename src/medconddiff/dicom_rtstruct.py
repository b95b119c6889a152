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
* **Filling.** A contour fills the voxels whose centres lie inside it (a crossing-number scan-line fill
  over the contour's bounding box: a planning structure set of thousands of contours on a 512² series
  fills in seconds, where a point-in-polygon test per voxel took minutes); the contours of one ROI on
  one slice combine by the even-odd rule, so a contour inside another is a hole (how RTSTRUCT stores a
  ring).
* **Overlaps.** ROIs overlap as a rule (the body outline holds every organ). A label map holds one class
  per voxel, so where they overlap the ROI covering fewer voxels wins — the organ inside the body, the
  tumour inside the organ — as for an overlapping DICOM SEG, and a note says how many voxels.
* **Patient data.** Nothing of the patient or structure set is returned but ROI names and counts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pydicom
from pydicom.multival import MultiValue

from .dicom_folder import READ_ERRORS, RT_STRUCTURE_SET, DicomError, error_text, file_sop_class, one_line
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
        raise DicomError(f"{path.name}: cannot read the RT structure set ({error_text(exc, path)})") from exc
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
    # Slice-first while filling, so that each slice's region is contiguous in memory.
    by_slice = np.zeros((shape[2], shape[0], shape[1]), dtype=smallest_label_dtype(len(drawn)))
    overlapping = np.zeros(by_slice.shape, dtype=bool)
    sizes = [sum(int(piece.mask.sum()) for piece in pieces.values()) for pieces in masks]
    for index in np.argsort(-np.asarray(sizes), kind="stable"):    # largest first: smaller ROIs on top
        for k, piece in masks[index].items():
            rows, columns = slice(piece.row, piece.row + piece.mask.shape[0]), \
                slice(piece.column, piece.column + piece.mask.shape[1])
            region = by_slice[k, rows, columns]
            overlapping[k, rows, columns] |= piece.mask & (region != 0)
            region[piece.mask] = index + 1
    labels = np.ascontiguousarray(by_slice.transpose(1, 2, 0))
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
        raise DicomError(f"{Path(path).name}: cannot read the RT structure set "
                         f"({error_text(exc, Path(path))})") from exc
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
            points = _contour_points(contour)
            if points.size >= 9 and points.size % 3 == 0:
                contours.setdefault(number, []).append(points.reshape(-1, 3))
    return [(names.get(number, f"ROI {number}"), found) for number, found in contours.items()]


#: The Contour Data attribute (3006,0050): a contour's points, x, y, z, x, y, z, …
CONTOUR_DATA = pydicom.tag.Tag(0x3006, 0x0050)


def _contour_points(contour: pydicom.Dataset) -> np.ndarray:
    """A contour's Contour Data as floats (x, y, z, x, y, z, …). Read from the file's own text where
    pydicom has not converted it yet: its value-by-value conversion took 8 s of a 3,200-contour structure set."""
    element = contour.get_item(CONTOUR_DATA)
    if element is None:
        return np.zeros(0)
    value = element.value
    try:
        if isinstance(value, (bytes, bytearray)):
            text = bytes(value).strip(b" \x00")
            return np.array(text.split(b"\\"), dtype="S").astype(np.float64) if text else np.zeros(0)
        return np.asarray([float(v) for v in (value if isinstance(value, (list, tuple, MultiValue)) else [value])
                           if v is not None and str(v).strip()], dtype=np.float64)
    except ValueError as exc:
        raise DicomError(f"a contour's Contour Data is not a list of numbers ({one_line(exc)})") from exc


class _Piece(NamedTuple):
    """One ROI filled on one slice: ``mask`` (rows, columns of the bounding box) placed at (row, column)."""

    row: int
    column: int
    mask: np.ndarray


def _fill(file: str, roi: str, contours: list[np.ndarray], to_voxels: np.ndarray,
          shape: tuple[int, ...]) -> dict[int, _Piece]:
    """Slice index -> one ROI filled on that slice (even-odd over its contours there)."""
    on_slice: dict[int, list[np.ndarray]] = {}
    for points in contours:
        ras = np.column_stack([-points[:, 0], -points[:, 1], points[:, 2], np.ones(len(points))])
        voxels = (to_voxels @ ras.T).T[:, :3]
        k = float(np.median(voxels[:, 2]))
        nearest = int(round(k))
        if abs(k - nearest) > SLICE_TOLERANCE or np.ptp(voxels[:, 2]) > 2 * SLICE_TOLERANCE \
                or not 0 <= nearest < shape[2]:
            raise DicomError(f"{file}: a contour of ROI {roi!r} does not lie on a slice of this series "
                             f"(at slice {k:.2f} of 0..{shape[2] - 1}): it was drawn on other images")
        on_slice.setdefault(nearest, []).append(voxels[:, :2])
    filled = {k: fill_polygons(polygons, shape[:2]) for k, polygons in on_slice.items()}
    return {k: piece for k, piece in filled.items() if piece is not None}


def fill_polygons(polygons: list[np.ndarray], shape: tuple[int, int]) -> "_Piece | None":
    """The pixels of a ``shape`` grid whose centres lie inside ``polygons`` ((n, 2) vertices in (row, column)
    pixel coordinates, closed implicitly; a centre on the outline is inside, as in scikit-image's
    ``polygon2mask``), the polygons combined by the even-odd rule (each one's pixels flip); None when no
    centre is inside."""
    pieces = [piece for piece in (_fill_polygon(polygon, shape) for polygon in polygons) if piece is not None]
    if not pieces:
        return None
    if len(pieces) == 1:
        return pieces[0]
    row0, col0 = min(p.row for p in pieces), min(p.column for p in pieces)
    row1 = max(p.row + p.mask.shape[0] for p in pieces)
    col1 = max(p.column + p.mask.shape[1] for p in pieces)
    mask = np.zeros((row1 - row0, col1 - col0), dtype=bool)
    for p in pieces:
        mask[p.row - row0:p.row - row0 + p.mask.shape[0], p.column - col0:p.column - col0 + p.mask.shape[1]] ^= p.mask
    return _Piece(row0, col0, mask) if mask.any() else None


def _fill_polygon(polygon: np.ndarray, shape: tuple[int, int]) -> "_Piece | None":
    """One polygon filled over its bounding box: a crossing-number scan line per pixel row (an edge crosses
    the row at height y when y lies in [min, max) of its ends' rows; a pixel is inside when an odd number
    of crossings lie left of its centre), then the centres on the outline."""
    row0, row1 = max(int(np.ceil(polygon[:, 0].min())), 0), min(int(np.floor(polygon[:, 0].max())), shape[0] - 1)
    col0, col1 = max(int(np.ceil(polygon[:, 1].min())), 0), min(int(np.floor(polygon[:, 1].max())), shape[1] - 1)
    if row1 < row0 or col1 < col0:
        return None
    height, width = row1 - row0 + 1, col1 - col0 + 1
    crossings = np.zeros((height, width + 1), dtype=np.int32)
    start_r, start_c = polygon[:, 0], polygon[:, 1]
    end_r, end_c = np.roll(start_r, -1), np.roll(start_c, -1)
    first = np.clip(np.ceil(np.minimum(start_r, end_r)).astype(np.int64), row0, row1 + 1)
    stop = np.clip(np.ceil(np.maximum(start_r, end_r)).astype(np.int64), row0, row1 + 1)
    count = np.maximum(stop - first, 0)
    edge = np.repeat(np.arange(len(polygon)), count)
    row = np.repeat(first, count) + np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
    along = (row - start_r[edge]) / (end_r[edge] - start_r[edge])
    x = start_c[edge] + along * (end_c[edge] - start_c[edge])
    column = np.clip(np.floor(x).astype(np.int64) + 1 - col0, 0, width)
    np.add.at(crossings, (row - row0, column), 1)
    mask = (np.cumsum(crossings, axis=1)[:, :width] & 1).astype(bool)
    _mark_outline_centres(mask, polygon, row0, col0)
    return _Piece(row0, col0, mask) if mask.any() else None


def _mark_outline_centres(mask: np.ndarray, polygon: np.ndarray, row0: int, col0: int) -> None:
    """Set the pixels of ``mask`` (placed at ``row0``, ``col0``) whose centres lie on the polygon's edges."""
    start_r, start_c = polygon[:, 0], polygon[:, 1]
    end_r, end_c = np.roll(start_r, -1), np.roll(start_c, -1)
    level = start_r == end_r
    for r_a, c_a, c_b in zip(start_r[level], start_c[level], end_c[level]):   # along a pixel row: a run
        if float(r_a).is_integer() and 0 <= int(r_a) - row0 < mask.shape[0]:
            c_lo, c_hi = int(np.ceil(min(c_a, c_b))) - col0, int(np.floor(max(c_a, c_b))) - col0
            mask[int(r_a) - row0, max(c_lo, 0):max(c_hi + 1, 0)] = True
    slanted = ~level
    start_r, start_c, end_r, end_c = start_r[slanted], start_c[slanted], end_r[slanted], end_c[slanted]
    first = np.ceil(np.minimum(start_r, end_r)).astype(np.int64)
    count = np.maximum(np.floor(np.maximum(start_r, end_r)).astype(np.int64) - first + 1, 0)
    edge = np.repeat(np.arange(len(start_r)), count)
    row = np.repeat(first, count) + np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
    x = start_c[edge] + (row - start_r[edge]) / (end_r[edge] - start_r[edge]) * (end_c[edge] - start_c[edge])
    column = np.round(x)
    on = np.abs(x - column) <= 1e-9
    r, c = row[on] - row0, column[on].astype(np.int64) - col0
    keep = (r >= 0) & (r < mask.shape[0]) & (c >= 0) & (c < mask.shape[1])
    mask[r[keep], c[keep]] = True


def describe(header: Any) -> str:
    """The structure set's label for a layer name: its Structure Set Label, else its series description."""
    for keyword in ("StructureSetLabel", "SeriesDescription"):
        text = str(header.get(keyword, "") or "").strip()
        if text:
            return text
    return ""
