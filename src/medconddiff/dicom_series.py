"""Reading DICOM series (a folder from a scanner or a PACS export, or one file) as volumes.

What comes back is what :func:`medconddiff.nifti.load_volume` gives for the same scan stored as
NIfTI: a float32 array in voxel order ``(i, j, k)`` = (column, row, slice) and a
:class:`~medconddiff.nifti.VolumeMeta` whose affine maps ``(i, j, k)`` to RAS+ millimetres (DICOM's
LPS patient coordinates with the first two axes negated). Voxels are in the modality's units: the
Modality LUT (Rescale Slope and Intercept, so Hounsfield units for CT) is applied. Where slices
lie and how they are sorted is decided in :mod:`medconddiff.dicom_geometry` (read its docstring
for scouts, gaps, gantry tilt and mixed orientations); which files make up which series, in
:mod:`medconddiff.dicom_folder`.

Decisions made here:

* **Several series in a folder**: :func:`read_dicom_series` refuses to guess and lists them, one
  line each, unless ``series`` (Series Number, or Series Instance UID) picks one.
* **One file** of a single-frame series is read with the other files of its series in its folder
  (:func:`medconddiff.dicom_folder.scan_folder`), and alone, as a 2-D image, where it has none or
  they do not make one volume (the note says why); an enhanced multi-frame file is a whole volume; a
  CD's DICOMDIR stands for its folder.
* **Enhanced multi-frame** files (one file, many frames with per-frame functional groups) are read
  like a series of their frames, through highdicom, which applies per-frame rescales; one holding
  several echoes or phases at each position is split into one volume each, as a series of single
  frames is (:mod:`medconddiff.dicom_folder`).
* Slices whose Image Type says ``LOCALIZER`` are left out with a note.
* **Refused**, with one line naming the file or series (:class:`DicomError`): a path with no DICOM
  images, a truncated or corrupt file in the chosen series, colour images (RGB secondary captures,
  screenshots), pixel data in a compressed transfer syntax no installed decoder reads (the message
  names the package that would; GDCM, a dependency, reads JPEG Lossless, JPEG-LS, JPEG 2000 and RLE) or
  in one pydicom does not know (JPEG XL, a private syntax), images of different sizes in one series, two
  images sharing one SOP Instance UID at different positions.
* Files that are not DICOM, or cannot be parsed, are skipped while listing, with a note;
  non-image objects (SEG, structured reports, RT structures) are skipped with a note. A DICOM file
  cut short (pydicom returns what it parsed: no pixel data) refuses the series it belongs to, or,
  when it was cut before its series UID, every series stored in its folder: a slice missing at the
  end of a stack would leave no gap to detect.
* **Privacy**: nothing returned here (notes, errors, :class:`SeriesInfo`, :class:`DicomSource`,
  the meta) holds a patient attribute; series are named by number and description, images by series and
  instance number (:func:`medconddiff.dicom_folder.image_label`), never by file name or folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pydicom
from pydicom.uid import UID

from .dicom_folder import (READ_ERRORS, DicomError, Instance, ScannedFolder, SeriesInfo, SeriesList, choose_series,
                           error_text, header_text, is_dicom_path, is_localizer, list_series, scan_folder, series_info,
                           series_number, some_of)
from .dicom_geometry import StackError, arrange_stack, plane_from_header
from .nifti import VolumeMeta

__all__ = ["DicomError", "SeriesInfo", "SeriesList", "DicomSource", "DicomScan", "list_series",
           "read_dicom_series", "load_dicom_series", "dicom_source", "is_dicom_path", "source_datasets"]

_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")


@dataclass(frozen=True)
class DicomSource:
    """The DICOM a volume came from, as a DICOM SEG must reference it (no patient attributes).

    ``sop_instance_uids``, ``files`` and ``frame_numbers`` have one entry per slice, in array order
    (k); ``frame_numbers`` are 1-based frames of multi-frame files (``None`` for single-frame ones).
    """

    series_uid: str
    series_number: int | None
    series_description: str
    modality: str
    frame_of_reference_uid: str
    sop_instance_uids: tuple[str, ...]
    files: tuple[str, ...]
    frame_numbers: tuple[int | None, ...]
    notes: tuple[str, ...] = ()
    part: str = ""      # the echo/phase/... of a series split into several ("echo 2"); "" for a whole series

    @property
    def name(self) -> str:
        number = "?" if self.series_number is None else str(self.series_number)
        name = f"series {number} '{self.series_description}'" if self.series_description else f"series {number}"
        return f"{name} ({self.part})" if self.part else name

    def to_dict(self) -> dict[str, Any]:
        """What a sidecar records: the series, its slices' instance UIDs in order, the notes."""
        return {"series_instance_uid": self.series_uid, "series_number": self.series_number,
                "series_description": self.series_description, "modality": self.modality,
                "frame_of_reference_uid": self.frame_of_reference_uid,
                "sop_instance_uids": list(self.sop_instance_uids),
                "frame_numbers": list(self.frame_numbers), "notes": list(self.notes),
                **({"part": self.part} if self.part else {})}


class DicomScan(NamedTuple):
    volume: np.ndarray
    meta: VolumeMeta
    source: DicomSource


def read_dicom_series(path: str | os.PathLike, series: int | str | None = None, *,
                      listed: SeriesList | None = None) -> DicomScan:
    """Read one series under ``path`` as ``(volume, meta, source)``; see the module docstring.

    ``listed``: what :func:`list_series` returned for the same ``path`` a moment ago; its headers are
    used instead of reading the folder's again (opening every series of a folder reads it once).

    ``volume`` is float32 ``(columns, rows, slices)`` in modality units (HU for CT); ``meta.affine``
    maps it to RAS+ mm; ``source`` names the series and the SOP instances of its slices in order.
    A single slice comes back as ``(columns, rows, 1)`` with ``meta.original_ndim == 2``.
    """
    path = Path(path)
    instances, layout, ordered, notes = _locate(path, series, listed.scanned if listed is not None else None)
    if layout is None:
        return _read_without_geometry(instances, ordered, notes)
    volume = _read_pixels(ordered, layout.rows, layout.columns)
    meta = VolumeMeta(affine=layout.affine, spacing=layout.spacing, source=str(path),
                      original_ndim=2 if len(ordered) == 1 else 3)
    return DicomScan(volume, meta, _source(instances[0].header, ordered, notes))


def dicom_source(path: str | os.PathLike, series: int | str | None = None) -> DicomSource:
    """The :class:`DicomSource` :func:`read_dicom_series` would return, from the headers alone
    (no pixel data is decoded): what a DICOM SEG needs to reference the series."""
    instances, _, ordered, notes = _locate(Path(path), series)
    return _source(instances[0].header, ordered, notes)


def _locate(path: Path, series: int | str | None, scanned: ScannedFolder | None = None):
    """Choose the series and sort its images: (instances, layout or None, [(instance, frame)] by k, notes)."""
    folder = scanned if scanned is not None else scan_folder(path)
    try:
        return _locate_in(path, series, folder)
    except DicomError as exc:
        if folder.file_alone is None:
            raise
        # The file's series in its folder is not one volume (a slice missing, a duplicate, ...): the file
        # alone, as it read before its neighbours were looked at, and why.
        alone = folder.file_alone
        why = (f"the file given: the other files of its series in its folder do not make one volume ({exc}): "
               "read this file alone")
        return _locate_in(path, series, replace(alone, notes=[*alone.notes, why]))


def _locate_in(path: Path, series: int | str | None, folder: ScannedFolder):
    instances = choose_series(path, folder, series)
    where = series_info(instances).name
    broken = list(folder.broken.get(str(instances[0].header.SeriesInstanceUID), []))
    for parent in sorted({str(instance.path.parent) for instance in instances}):
        broken += folder.broken.get(parent, [])
    if broken:
        raise DicomError(f"{where}: cannot read {len(broken)} DICOM file(s) stored with this series: {some_of(broken)}")
    _check_unique_instances(instances, where)
    notes = list(folder.notes)
    for instance in instances:
        _check_pixels_readable(instance, where)
    kept = [i for i in instances if not is_localizer(i.header)]
    if kept and len(kept) < len(instances):
        notes.append(f"{where}: left out {len(instances) - len(kept)} localizer image(s): "
                     f"{some_of([i.label for i in instances if is_localizer(i.header)])}")
        instances = kept
    planes, frames = _planes(instances, where)
    if planes is None:
        notes.append(f"{where} has no position in the patient: read as a 2-D image in pixel order")
        return instances, None, frames, notes
    try:
        layout = arrange_stack(planes, where)
    except StackError as exc:
        raise DicomError(str(exc)) from exc
    notes.extend(layout.notes)
    return instances, layout, [frames[index] for index in layout.order], notes


def load_dicom_series(path: str | os.PathLike, series: int | str | None = None) -> tuple[np.ndarray, VolumeMeta]:
    """:func:`read_dicom_series` without the source: the ``(volume, meta)`` of ``load_volume``."""
    scan = read_dicom_series(path, series)
    return scan.volume, scan.meta


def source_datasets(source: DicomSource) -> list[pydicom.Dataset]:
    """The header of every file of ``source`` (without pixel data), each file once, in slice order."""
    datasets, seen = [], set()
    for k, file in enumerate(source.files):
        if file in seen:
            continue
        seen.add(file)
        try:
            datasets.append(pydicom.dcmread(file, stop_before_pixels=True))
        except READ_ERRORS as exc:
            # The slice, not the file: its path is the patient's folders and its name may be the patient's.
            raise DicomError(f"{source.name}: cannot read the file of slice {k} again, moved or changed since the "
                             f"series was read? ({error_text(exc, Path(file))}); open the series again") from exc
    return datasets


def _check_unique_instances(instances: list[Instance], where: str) -> None:
    """Refuse two files of one series that share a SOP Instance UID (copies at one position were skipped
    while scanning, so these lie at different positions): a faulty anonymiser or converter. A SEG or RT
    structure set names its images by that UID, so one written on such a series could not be read back."""
    first_with: dict[str, Instance] = {}
    for instance in instances:
        uid = str(instance.header.get("SOPInstanceUID", "") or "")
        other = first_with.setdefault(uid, instance) if uid else instance
        if other.path != instance.path:
            raise DicomError(f"{where}: {other.label} and {instance.label} share one SOP Instance UID at different "
                             "positions (a faulty anonymiser?), so a segmentation could not tell them apart; "
                             "export the series again with a UID per image")


def _check_pixels_readable(instance: Instance, where: str) -> None:
    header = instance.header
    samples = int(header.get("SamplesPerPixel", 1) or 1)
    photometric = str(header.get("PhotometricInterpretation", "MONOCHROME2"))
    if samples != 1 or photometric not in _MONOCHROME:
        raise DicomError(f"{where}: {instance.label} is a colour image ({photometric}, {samples} samples per "
                         "pixel), e.g. a secondary capture or screenshot, not a scan in intensity units")
    syntax = UID(str(header.file_meta.get("TransferSyntaxUID", pydicom.uid.ExplicitVRLittleEndian)))
    if not syntax.is_transfer_syntax:
        # A syntax newer than the installed pydicom (JPEG XL) or a private one: pydicom cannot even say
        # whether it is compressed, so nothing here can decode it.
        known = f" ({syntax.name})" if syntax.name != str(syntax) else ""
        raise DicomError(f"{where}: {instance.label} uses transfer syntax {syntax}{known}, which the installed "
                         "pydicom does not know, so no installed decoder reads it; export the series uncompressed "
                         "or as JPEG Lossless")
    if not syntax.is_compressed:
        return
    from pydicom.pixels import get_decoder
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise DicomError(f"{where}: {instance.label} uses transfer syntax {syntax} ({syntax.name}), "
                         "which no DICOM decoder supports") from None
    if not decoder.is_available:
        needs = "; ".join(decoder.missing_dependencies) or "a decoder plugin"
        raise DicomError(f"{where}: {instance.label} is compressed as {syntax.name}, which no installed decoder "
                         f"reads (install one of: {needs})")


def _planes(instances: list[Instance], where: str):
    """One SlicePlane per image (frames of multi-frame files included), and (instance, frame) for each;
    ``(None, frames)`` when the series has no patient geometry at all."""
    planes, frames = [], []
    missing = []
    for instance in instances:
        header = instance.header
        for frame in instance.frame_list():
            label = instance.label if frame is None else f"{instance.label} frame {frame}"
            plane = plane_from_header(header, frame, label)
            frames.append((instance, frame))
            if plane is None:
                missing.append(label)
            else:
                planes.append(plane)
    if missing and len(frames) == 1:
        return None, frames
    if missing:
        raise DicomError(f"{where}: {len(missing)} image(s) without a position or orientation in the patient "
                         f"(Image Position/Orientation (Patient)), e.g. {missing[0]}; cannot place the slices")
    return planes, frames


def _read_pixels(frames: list, rows: int, columns: int) -> np.ndarray:
    """Decode each slice once per file, apply its Modality LUT, lay it out as (column, row, slice)."""
    from pydicom.pixels import apply_modality_lut

    # Filled slice by slice in (slice, row, column) order and returned transposed: a Fortran-ordered
    # (column, row, slice) array, as nibabel returns NIfTI data, at no copy and with contiguous writes.
    stack = np.empty((len(frames), rows, columns), dtype=np.float32)
    decoded: dict[Path, Any] = {}
    for k, (instance, frame) in enumerate(frames):
        try:
            if instance.path not in decoded:
                dataset = pydicom.dcmread(instance.path)
                decoded.clear()   # a multi-frame file stays cached while its frames are read
                decoded[instance.path] = _highdicom_image(dataset) if frame is not None else dataset
            source = decoded[instance.path]
            if frame is None:
                image = apply_modality_lut(source.pixel_array, source)
            else:
                image = source.get_frame(frame, dtype=np.float32, apply_modality_transform=True)
        except READ_ERRORS as exc:
            raise DicomError(f"{instance.label}: cannot read its pixel data, the file may be truncated or "
                             f"corrupt ({error_text(exc, instance.path)})") from exc
        image = np.asarray(image)
        if image.shape != (rows, columns):
            raise DicomError(f"{instance.label}: pixel data of shape {image.shape}, expected rows x columns "
                             f"{rows}x{columns}")
        stack[k] = image
    return stack.transpose(2, 1, 0)


def _highdicom_image(dataset: pydicom.Dataset):
    import highdicom

    return highdicom.Image.from_dataset(dataset, copy=False)


def _read_without_geometry(instances: list[Instance], frames: list, notes: list[str]) -> DicomScan:
    """A lone image without patient geometry (a radiograph, a secondary capture): a 2-D image in pixel
    order, its axes marked as not anatomically known."""
    header = instances[0].header
    spacing = header.get("PixelSpacing") or header.get("ImagerPixelSpacing") or (1.0, 1.0)
    volume = _read_pixels(frames, int(header.Rows), int(header.Columns))
    meta = VolumeMeta.identity(2, (float(spacing[1]), float(spacing[0])), note=notes[-1])
    meta.source = str(instances[0].path)
    return DicomScan(volume, meta, _source(header, frames, notes))


def _source(header: pydicom.Dataset, frames: list, notes: list[str]) -> DicomSource:
    return DicomSource(series_uid=str(header.SeriesInstanceUID), series_number=series_number(header),
                       series_description=header_text(header, "SeriesDescription"), modality=header_text(header, "Modality"),
                       frame_of_reference_uid=header_text(header, "FrameOfReferenceUID"),
                       sop_instance_uids=tuple(str(i.header.SOPInstanceUID) for i, _ in frames),
                       files=tuple(os.path.abspath(i.path) for i, _ in frames),
                       frame_numbers=tuple(frame for _, frame in frames), notes=tuple(notes),
                       part=frames[0][0].part if frames else "")
