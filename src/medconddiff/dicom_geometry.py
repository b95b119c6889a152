"""Where the slices of a DICOM series lie, and the one affine that places them all.

A DICOM series has no affine: every slice (or frame) carries its own Image Position (Patient),
Image Orientation (Patient) and Pixel Spacing, in the patient's LPS millimetres. This module turns
such planes into the project's geometry (see :mod:`medconddiff.nifti`): an array in voxel order
``(i, j, k)`` = (column, row, slice) and a 4x4 affine from ``(i, j, k)`` to RAS+ world millimetres,
like a NIfTI written by dcm2niix (without its row flip). The decisions it makes, each raising
:class:`StackError` (one line, naming the images) or leaving a note:

* **Slice order**: ascending along the slice normal (row direction x column direction), as ITK and
  dcm2niix sort; Instance Number is not trusted. The affine is therefore right-handed in LPS.
* **Mixed orientations** in one series: the largest group of parallel slices is the stack; slices
  in other orientations (scouts, localizers) are left out with a note. Groups of equal size are
  refused: nothing says which one is the scan.
* **Off-stack slices** (same orientation, but lying beside the stack, like a localizer that shares
  the series): left out with a note when they are fewer than a third of the slices.
* **Missing slices or uneven spacing**: refused, naming the gap (both positions, the step found and
  the step expected). Resampling would invent anatomy in a gap and make the segmentation reference
  voxels no file holds; the user re-exports the series or picks another.
* **Gantry tilt** (slice positions marching along a direction that is not the slice normal): kept
  as acquired, with a note giving the angle. The affine's third column is the real step from slice
  to slice, a sheared affine, which NIfTI's sform stores exactly. No voxel is interpolated, so each
  slice of the array is one acquired image, and a DICOM SEG references it one to one.
* **Different image sizes or pixel spacings** within the stack: refused, naming one file of each.
* **Two slices at one position**: refused. (A series of several echoes or phases reaches this module
  split into one stack each by :func:`medconddiff.dicom_folder.split_by_part`; what is left has nothing
  that tells the two images apart.)
* **One slice**: a 2-D image, returned with a last axis of 1 whose step is the slice thickness.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .errors import UserInputError

__all__ = ["SlicePlane", "StackLayout", "StackError", "arrange_stack", "plane_from_header", "LPS_TO_RAS"]

#: LPS (DICOM patient coordinates) to RAS+ (NIfTI world): the first two world axes change sign.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

# Direction cosines of parallel slices agree to about 1e-4 after DS rounding; scouts differ by far more.
_ORIENTATION_TOLERANCE = 1e-3
# Positions are compared in millimetres; scanners write them rounded to a few micrometres.
_POSITION_TOLERANCE_MM = 1e-3
# Slice steps may differ by 1 % (or the position tolerance) before a series counts as uneven.
_SPACING_RELATIVE_TOLERANCE = 0.01
# A shear below a twentieth of a pixel over the whole stack is rounding, not gantry tilt.
_TILT_PIXEL_FRACTION = 0.05


class StackError(UserInputError):
    """The slices of a series do not form one regular stack (the message says where and why)."""


@dataclass(frozen=True)
class SlicePlane:
    """One image plane of a series: a single-frame file or one frame of a multi-frame file.

    ``row_direction`` is the first triple of Image Orientation (Patient) (the direction in which the
    column index grows), ``column_direction`` the second; ``pixel_spacing`` is DICOM's
    (between rows, between columns). ``label`` names the plane in messages (``series 2 image 14``,
    never a file name: exports name files after the patient).
    """

    position: tuple[float, float, float]
    row_direction: tuple[float, float, float]
    column_direction: tuple[float, float, float]
    pixel_spacing: tuple[float, float]
    rows: int
    columns: int
    label: str
    thickness: float | None = None


@dataclass
class StackLayout:
    """How planes form a volume: ``order`` lists plane indices by slice (k); ``affine`` is RAS+."""

    order: list[int]
    affine: np.ndarray
    spacing: tuple[float, float, float]
    rows: int
    columns: int
    tilt_degrees: float = 0.0
    dropped: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def arrange_stack(planes: Sequence[SlicePlane], where: str) -> StackLayout:
    """Sort ``planes`` into one stack and compute its affine; ``where`` names the series in messages."""
    if not planes:
        raise StackError(f"{where}: no image slices")
    notes: list[str] = []
    members = _majority_orientation(planes, where, notes)
    _check_same_grid(planes, members, where)
    first = planes[members[0]]
    row_dir, col_dir = _unit(first.row_direction), _unit(first.column_direction)
    normal = _unit(np.cross(row_dir, col_dir))
    positions = np.array([planes[m].position for m in members], dtype=np.float64)
    along = positions @ normal
    sort = np.argsort(along, kind="stable")
    members = [members[s] for s in sort]
    positions, along = positions[sort], along[sort]
    members, positions, along = _drop_off_stack(planes, members, positions, along, row_dir, col_dir,
                                                where, notes)
    dropped = [index for index in range(len(planes)) if index not in set(members)]
    row_spacing, column_spacing = first.pixel_spacing
    if len(members) == 1:
        step_vector = normal * _single_slice_step(first)
        tilt = 0.0
        notes.append(f"{where} has one slice: read as a 2-D image")
    else:
        _check_even_steps(planes, members, along, where)
        step_vector, tilt = _slice_step(positions, normal, row_dir, col_dir, min(row_spacing, column_spacing))
        if tilt:
            notes.append(f"{where}: gantry tilt of {tilt:.2f} degrees; the slices are kept as acquired "
                         "(a sheared affine), not resampled")
    lps = np.eye(4)
    lps[:3, 0] = row_dir * column_spacing
    lps[:3, 1] = col_dir * row_spacing
    lps[:3, 2] = step_vector
    lps[:3, 3] = positions[0]
    spacing = (float(column_spacing), float(row_spacing), float(np.linalg.norm(step_vector)))
    return StackLayout(order=members, affine=LPS_TO_RAS @ lps, spacing=spacing, rows=first.rows,
                       columns=first.columns, tilt_degrees=tilt, dropped=dropped, notes=notes)


def functional_group_items(header, frame: int) -> list:
    """Where the attributes of frame ``frame`` (1-based) of an enhanced multi-frame dataset live, in the
    order they apply: its item of the per-frame functional groups, then the shared one (each holds one
    sequence per functional group)."""
    items = []
    per_frame = header.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and len(per_frame) >= frame:
        items.append(per_frame[frame - 1])
    shared = header.get("SharedFunctionalGroupsSequence")
    if shared:
        items.append(shared[0])
    return items


def plane_from_header(header, frame: int | None, label: str) -> SlicePlane | None:
    """The plane of a single-frame dataset (``frame`` None) or of one frame (1-based) of an enhanced
    multi-frame one, whose per-frame functional groups override the shared ones; None when its
    position, orientation or pixel spacing is missing or unusable."""
    sources = [header] if frame is None else functional_group_items(header, frame)

    def find(sequence: str | None, keyword: str):
        for source in sources:
            item = source
            if sequence is not None:
                if not source.get(sequence):
                    continue
                item = source.get(sequence)[0]
            value = item.get(keyword)
            if value not in (None, ""):
                return value
        return None

    nested = frame is not None
    position = find("PlanePositionSequence" if nested else None, "ImagePositionPatient")
    orientation = find("PlaneOrientationSequence" if nested else None, "ImageOrientationPatient")
    spacing = find("PixelMeasuresSequence" if nested else None, "PixelSpacing")
    thickness = (find("PixelMeasuresSequence" if nested else None, "SpacingBetweenSlices")
                 or find("PixelMeasuresSequence" if nested else None, "SliceThickness"))
    try:
        position = tuple(float(v) for v in position)
        orientation = tuple(float(v) for v in orientation)
        spacing = tuple(float(v) for v in spacing)
        thickness = float(thickness) if thickness is not None else None
    except (TypeError, ValueError):
        return None
    if len(position) != 3 or len(orientation) != 6 or len(spacing) != 2 or min(spacing) <= 0:
        return None
    if (not np.isfinite(position + orientation + spacing).all()
            or np.linalg.norm(np.cross(orientation[:3], orientation[3:])) < 0.5):   # not two directions
        return None
    return SlicePlane(position=position, row_direction=orientation[:3], column_direction=orientation[3:],
                      pixel_spacing=spacing, rows=int(header.Rows), columns=int(header.Columns), label=label,
                      thickness=thickness)


def _majority_orientation(planes: Sequence[SlicePlane], where: str, notes: list[str]) -> list[int]:
    groups: list[list[int]] = []
    for index, plane in enumerate(planes):
        for group in groups:
            if _same_orientation(planes[group[0]], plane):
                group.append(index)
                break
        else:
            groups.append([index])
    if len(groups) == 1:
        return groups[0]
    groups.sort(key=len, reverse=True)
    if len(groups[0]) == len(groups[1]):
        sizes = ", ".join(f"{len(g)} like {planes[g[0]].label}" for g in groups)
        raise StackError(f"{where}: slices in {len(groups)} orientations of equal weight ({sizes}); "
                         "cannot tell the scan from a localizer")
    others = [planes[i].label for group in groups[1:] for i in group]
    notes.append(f"{where}: left out {len(others)} slice(s) in another orientation (scout/localizer): "
                 f"{_some(others)}")
    return groups[0]


def _same_orientation(a: SlicePlane, b: SlicePlane) -> bool:
    return (np.allclose(_unit(a.row_direction), _unit(b.row_direction), atol=_ORIENTATION_TOLERANCE)
            and np.allclose(_unit(a.column_direction), _unit(b.column_direction), atol=_ORIENTATION_TOLERANCE))


def _check_same_grid(planes: Sequence[SlicePlane], members: list[int], where: str) -> None:
    first = planes[members[0]]
    for index in members[1:]:
        plane = planes[index]
        if (plane.rows, plane.columns) != (first.rows, first.columns):
            raise StackError(f"{where}: images of different sizes in one series: {first.label} is "
                             f"{first.rows}x{first.columns}, {plane.label} is {plane.rows}x{plane.columns} "
                             "(rows x columns)")
        if not np.allclose(plane.pixel_spacing, first.pixel_spacing, rtol=1e-4, atol=1e-6):
            raise StackError(f"{where}: pixel spacing differs within the series: {first.label} has "
                             f"{_mm(first.pixel_spacing)}, {plane.label} has {_mm(plane.pixel_spacing)}")


def _drop_off_stack(planes, members, positions, along, row_dir, col_dir, where, notes):
    """Leave out the few slices lying beside the line the others follow (same orientation scouts)."""
    count = len(members)
    if count < 3:
        return members, positions, along
    in_plane = np.stack([positions @ row_dir, positions @ col_dir], axis=1)
    slope, intercept = _robust_line(along, in_plane)
    residual = np.linalg.norm(in_plane - (intercept + along[:, None] * slope), axis=1)
    tolerance = _TILT_PIXEL_FRACTION * min(planes[members[0]].pixel_spacing) + _POSITION_TOLERANCE_MM
    off = residual > tolerance
    if not off.any():
        return members, positions, along
    if off.sum() * 3 > count:
        raise StackError(f"{where}: the slices do not lie in one stack ({int(off.sum())} of {count} are "
                         f"displaced in-plane, e.g. {planes[members[int(np.argmax(off))]].label})")
    labels = [planes[m].label for m, is_off in zip(members, off) if is_off]
    notes.append(f"{where}: left out {len(labels)} slice(s) lying beside the stack (scout/localizer): "
                 f"{_some(labels)}")
    keep = ~off
    return [m for m, k in zip(members, keep) if k], positions[keep], along[keep]


def _robust_line(along: np.ndarray, in_plane: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Median of the slopes between neighbouring slices, then the median intercept: a few outliers
    (scouts) cannot bend the line the stack follows, as a least-squares fit would."""
    steps = np.diff(along)
    usable = steps > _POSITION_TOLERANCE_MM
    if not usable.any():
        return np.zeros(2), np.median(in_plane, axis=0)
    slopes = np.diff(in_plane, axis=0)[usable] / steps[usable, None]
    slope = np.median(slopes, axis=0)
    intercept = np.median(in_plane - along[:, None] * slope, axis=0)
    return slope, intercept


def _check_even_steps(planes, members, along, where) -> None:
    steps = np.diff(along)
    duplicate = int(np.argmin(steps))
    if steps[duplicate] <= _POSITION_TOLERANCE_MM:
        raise StackError(f"{where}: two slices at one position ({along[duplicate]:.3f} mm along the normal): "
                         f"{planes[members[duplicate]].label} and {planes[members[duplicate + 1]].label} "
                         "(several echoes, phases or acquisitions in one series?)")
    expected = float(np.median(steps))
    tolerance = max(_POSITION_TOLERANCE_MM, _SPACING_RELATIVE_TOLERANCE * expected)
    uneven = np.flatnonzero(np.abs(steps - expected) > tolerance)
    if not uneven.size:
        return
    worst = int(uneven[np.argmax(np.abs(steps[uneven] - expected))])
    gap = float(steps[worst])
    missing = round(gap / expected) - 1
    hint = f"; about {missing} slice(s) missing" if missing >= 1 and abs(gap - (missing + 1) * expected) <= tolerance else ""
    raise StackError(f"{where}: slices are not evenly spaced: {gap:.3f} mm between {planes[members[worst]].label} "
                     f"({along[worst]:.3f} mm along the normal) and {planes[members[worst + 1]].label} "
                     f"({along[worst + 1]:.3f} mm), expected {expected:.3f} mm{hint} "
                     f"({uneven.size} uneven step(s)); not resampled: export the complete series")


def _slice_step(positions: np.ndarray, normal, row_dir, col_dir, pixel_size: float) -> tuple[np.ndarray, float]:
    """The step from slice to slice, and the gantry tilt in degrees (0 for an orthogonal stack)."""
    count = len(positions)
    step = (positions[-1] - positions[0]) / (count - 1)
    along_normal = float(step @ normal)
    shear = step - along_normal * normal
    if np.linalg.norm(shear) * (count - 1) <= _TILT_PIXEL_FRACTION * pixel_size:
        return normal * along_normal, 0.0
    return step, float(np.degrees(np.arctan2(np.linalg.norm(shear), along_normal)))


def _single_slice_step(plane: SlicePlane) -> float:
    thickness = plane.thickness
    return float(thickness) if thickness and np.isfinite(thickness) and thickness > 0 else 1.0


def _unit(vector) -> np.ndarray:
    vector = np.asarray(vector, dtype=np.float64)
    return vector / np.linalg.norm(vector)


def _mm(values) -> str:
    return "x".join(f"{float(v):g}" for v in values) + " mm"


def _some(labels: list[str], limit: int = 3) -> str:
    shown = ", ".join(labels[:limit])
    return shown + (f" and {len(labels) - limit} more" if len(labels) > limit else "")
