"""Reading DICOM series (a folder from a scanner or a PACS export, or one file) as volumes.

What comes back is what :func:`medconddiff.nifti.load_volume` gives for the same scan stored as
NIfTI: a float32 array in voxel order ``(i, j, k)`` = (column, row, slice) and a
:class:`~medconddiff.nifti.VolumeMeta` whose affine maps ``(i, j, k)`` to RAS+ millimetres (DICOM's
LPS patient coordinates with the first two axes negated). Voxels are in the modality's units: the
Modality LUT (Rescale Slope and Intercept, so Hounsfield units for CT) is applied. Where slices
lie and how they are sorted is decided in :mod:`medconddiff.dicom_geometry` (read its docstring
for scouts, gaps, gantry tilt and mixed orientations).

Decisions made here:

* **Several series in a folder**: :func:`read_dicom_series` refuses to guess and lists them, one
  line each, unless ``series`` (Series Number, or Series Instance UID) picks one.
* **One file** is read alone, even if the rest of its series lies beside it: an enhanced
  multi-frame file is a whole volume; a single-frame file is a 2-D image.
* **Enhanced multi-frame** files (one file, many frames with per-frame functional groups) are read
  like a series of their frames, through highdicom, which applies per-frame rescales.
* Slices whose Image Type says ``LOCALIZER`` are left out with a note.
* **Refused**, with one line naming the file or series (:class:`DicomError`): a path with no DICOM
  images, a truncated or corrupt file in the chosen series, colour images (RGB secondary captures,
  screenshots), pixel data in a compressed transfer syntax no installed decoder reads (the message
  names the package that would), images of different sizes in one series.
* Files that are not DICOM, or cannot be parsed, are skipped while listing, with a note;
  non-image objects (SEG, structured reports, RT structures) are skipped with a note. A DICOM file
  cut short (pydicom returns what it parsed: no pixel data) refuses the series it belongs to, or,
  when it was cut before its series UID, every series stored in its folder: a slice missing at the
  end of a stack would leave no gap to detect.
* **Privacy**: nothing returned here (notes, errors, :class:`SeriesInfo`, :class:`DicomSource`,
  the meta) holds a patient attribute; series are named by number and description, files by their
  path relative to the folder given.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from .dicom_geometry import StackError, arrange_stack, plane_from_header
from .errors import UserInputError
from .nifti import VolumeMeta

__all__ = ["DicomError", "SeriesInfo", "SeriesList", "DicomSource", "DicomScan", "list_series",
           "read_dicom_series", "load_dicom_series", "dicom_source", "is_dicom_path", "source_datasets"]

# Objects with Rows and Columns that are not images of the patient: listing them as series would only
# make users choose between their scan and a segmentation written beside it.
_NON_VOLUME_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.66.4": "Segmentation Storage",
    "1.2.840.10008.5.1.4.1.1.66.7": "Label Map Segmentation Storage",
    "1.2.840.10008.5.1.4.1.1.481.3": "RT Structure Set Storage",
}
# What pydicom raises on files it cannot parse or decode; anything else is a bug and keeps its traceback.
_READ_ERRORS = (InvalidDicomError, EOFError, OSError, ValueError, KeyError, AttributeError, TypeError,
                IndexError, NotImplementedError, RuntimeError, OverflowError)
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_DEFER_BYTES = 4096


class DicomError(UserInputError):
    """A DICOM path, file or series that cannot be read as a volume; the message names which."""


@dataclass(frozen=True)
class SeriesInfo:
    """One image series found under a path: what a user needs to choose it, and no patient data."""

    number: int | None
    description: str
    modality: str
    uid: str
    instances: int
    frames: int
    size: tuple[int, int] | None  # (rows, columns) of most of its images
    notes: tuple[str, ...] = ()
    localizers: int = 0  # images whose Image Type says LOCALIZER (all of them: a scout series)

    @property
    def name(self) -> str:
        """``series 3 'CT abdomen'``: how messages and layer names refer to the series."""
        number = "?" if self.number is None else str(self.number)
        return f"series {number} '{self.description}'" if self.description else f"series {number}"

    def line(self) -> str:
        """One line for a listing: name, modality, images and size, UID."""
        size = f" {self.size[0]}x{self.size[1]}" if self.size else ""
        frames = f", {self.frames} frames" if self.frames != self.instances else ""
        return f"{self.name}: {self.modality or '?'}, {self.instances} image(s){frames}{size}, uid {self.uid}"


class SeriesList(list):
    """``list[SeriesInfo]`` plus ``notes``: files skipped while looking (not DICOM, unreadable).

    It keeps the headers read while looking, so :func:`read_dicom_series` given it (``listed=``) reads
    each series without reading every header of the folder again.
    """

    def __init__(self, items: Sequence[SeriesInfo] = (), notes: Sequence[str] = (), scanned: _Folder | None = None):
        super().__init__(items)
        self.notes = list(notes)
        self.scanned = scanned      # the headers read while looking (None: read them again)


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

    @property
    def name(self) -> str:
        number = "?" if self.series_number is None else str(self.series_number)
        return (f"series {number} '{self.series_description}'" if self.series_description
                else f"series {number}")

    def to_dict(self) -> dict[str, Any]:
        """What a sidecar records: the series, its slices' instance UIDs in order, the notes."""
        return {"series_instance_uid": self.series_uid, "series_number": self.series_number,
                "series_description": self.series_description, "modality": self.modality,
                "frame_of_reference_uid": self.frame_of_reference_uid,
                "sop_instance_uids": list(self.sop_instance_uids),
                "frame_numbers": list(self.frame_numbers), "notes": list(self.notes)}


class DicomScan(NamedTuple):
    volume: np.ndarray
    meta: VolumeMeta
    source: DicomSource


@dataclass
class _Instance:
    path: Path
    label: str
    header: pydicom.Dataset
    frames: int = 1


@dataclass
class _Folder:
    series: dict[str, list[_Instance]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    broken: dict[str, list[str]] = field(default_factory=dict)   # series UID (or folder) -> unreadable files


# --------------------------------------------------------------------------------------------
# finding series


def is_dicom_path(path: str | os.PathLike) -> bool:
    """A ``.dcm`` file, a file with DICOM's ``DICM`` marker, or a folder holding one: what the CLI and
    the napari reader send here rather than to the NIfTI reader."""
    path = Path(path)
    if path.is_file():
        return path.suffix.lower() in (".dcm", ".dicom") or _has_dicom_marker(path)
    if path.is_dir():
        return any(_has_dicom_marker(file) or file.suffix.lower() == ".dcm" for file in _files_under(path))
    return False


def list_series(path: str | os.PathLike) -> SeriesList:
    """The image series in a folder (searched recursively) or a single file, sorted by number.

    Raises :class:`DicomError` when there is no DICOM image under ``path``.
    """
    folder = _scan(Path(path))
    return SeriesList([_series_info(instances) for instances in _sorted_series(folder)], folder.notes, folder)


def _scan(path: Path) -> _Folder:
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    files = [path] if path.is_file() else list(_files_under(path))
    root = path.parent if path.is_file() else path
    found = _Folder()
    not_dicom, unreadable, non_image = [], [], Counter()
    for file in files:
        label = str(file.relative_to(root))
        try:
            # Deferred values: every element is parsed (so a file cut short shows as missing pixel
            # data) without loading pixel data into memory.
            header = pydicom.dcmread(file, defer_size=_DEFER_BYTES)
        except InvalidDicomError:
            not_dicom.append(label)
            continue
        except _READ_ERRORS as exc:
            unreadable.append(f"{label} ({_one_line(exc)})")
            continue
        sop_class = str(header.get("SOPClassUID", "") or header.file_meta.get("MediaStorageSOPClassUID", ""))
        uid = str(header.get("SeriesInstanceUID", "") or "")
        has_pixels = any(keyword in header for keyword in _PIXEL_KEYWORDS)
        if sop_class in _NON_VOLUME_SOP_CLASSES or not (has_pixels or _is_image_class(header, sop_class)):
            non_image[_NON_VOLUME_SOP_CLASSES.get(sop_class) or _sop_class_name(sop_class)] += 1
            continue
        problem = ("truncated or incomplete: no pixel data" if not has_pixels
                   else "no Rows/Columns" if "Rows" not in header or "Columns" not in header
                   else "no Series Instance UID" if not uid else "")
        if problem:
            unreadable.append(f"{label} ({problem})")
            # A file cut short before its series UID is filed under its folder: it may be a slice of
            # any series stored there.
            found.broken.setdefault(uid or str(file.parent), []).append(f"{label} ({problem})")
            continue
        frames = int(header.get("NumberOfFrames", 1) or 1)
        found.series.setdefault(uid, []).append(_Instance(file, label, header, frames))
    if not_dicom:
        found.notes.append(f"skipped {len(not_dicom)} file(s) that are not DICOM: {_some(not_dicom)}")
    if unreadable:
        found.notes.append(f"skipped {len(unreadable)} unreadable DICOM file(s): {_some(unreadable)}")
    if non_image:
        kinds = ", ".join(f"{count} {kind}" for kind, count in non_image.items())
        found.notes.append(f"skipped DICOM objects that are not images: {kinds}")
    if not found.series:
        what = "file" if path.is_file() else "folder"
        detail = f" ({'; '.join(found.notes)})" if found.notes else ""
        raise DicomError(f"{path}: no DICOM image in this {what}{detail}")
    return found


def _files_under(folder: Path):
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if not name.startswith("."):
                yield Path(root) / name


def _is_image_class(header: pydicom.Dataset, sop_class: str) -> bool:
    return "Rows" in header or (bool(sop_class) and "Image Storage" in UID(sop_class).name)


def _has_dicom_marker(file: Path) -> bool:
    try:
        with open(file, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def _sorted_series(folder: _Folder) -> list[list[_Instance]]:
    def key(instances: list[_Instance]):
        number = _series_number(instances[0].header)
        return (number is None, number or 0, str(instances[0].header.SeriesInstanceUID))
    return sorted(folder.series.values(), key=key)


def _series_info(instances: list[_Instance]) -> SeriesInfo:
    header = instances[0].header
    sizes = Counter((int(i.header.Rows), int(i.header.Columns)) for i in instances)
    notes = []
    if len(sizes) > 1:
        notes.append("images of " + ", ".join(f"{r}x{c}" for r, c in sizes) + " in one series")
    localizers = sum(_is_localizer(i.header) for i in instances)
    if localizers:
        notes.append(f"{localizers} localizer image(s)")
    return SeriesInfo(number=_series_number(header), description=_text(header, "SeriesDescription"),
                      modality=_text(header, "Modality"), uid=str(header.SeriesInstanceUID),
                      instances=len(instances), frames=sum(i.frames for i in instances),
                      size=sizes.most_common(1)[0][0], notes=tuple(notes), localizers=localizers)


def _choose_series(path: Path, folder: _Folder, series: int | str | None) -> list[_Instance]:
    ordered = _sorted_series(folder)
    listing = "\n".join("  " + _series_info(instances).line() for instances in ordered)
    if series is None:
        if len(ordered) == 1:
            return ordered[0]
        raise DicomError(f"{path} holds {len(ordered)} DICOM series; choose one by number or UID "
                         f"(--series N|UID):\n{listing}")
    text = str(series).strip()
    if text in folder.series:
        return folder.series[text]
    matches = []
    if text.lstrip("-").isdigit():
        matches = [instances for instances in ordered if _series_number(instances[0].header) == int(text)]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise DicomError(f"{path}: {len(matches)} series have number {text}; choose one by UID:\n{listing}")
    raise DicomError(f"{path}: no series with number or UID {text}; found:\n{listing}")


# --------------------------------------------------------------------------------------------
# reading a series


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


def _locate(path: Path, series: int | str | None, scanned: _Folder | None = None):
    """Choose the series and sort its images: (instances, layout or None, [(instance, frame)] by k, notes)."""
    folder = scanned if scanned is not None else _scan(path)
    instances = _choose_series(path, folder, series)
    where = _series_info(instances).name
    broken = list(folder.broken.get(str(instances[0].header.SeriesInstanceUID), []))
    for parent in sorted({str(instance.path.parent) for instance in instances}):
        broken += folder.broken.get(parent, [])
    if broken:
        raise DicomError(f"{where}: cannot read {len(broken)} DICOM file(s) stored with this series: {_some(broken)}")
    notes = list(folder.notes)
    for instance in instances:
        _check_pixels_readable(instance, where)
    kept = [i for i in instances if not _is_localizer(i.header)]
    if kept and len(kept) < len(instances):
        notes.append(f"{where}: left out {len(instances) - len(kept)} localizer image(s): "
                     f"{_some([i.label for i in instances if _is_localizer(i.header)])}")
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
    for file in source.files:
        if file in seen:
            continue
        seen.add(file)
        try:
            datasets.append(pydicom.dcmread(file, stop_before_pixels=True))
        except _READ_ERRORS as exc:
            raise DicomError(f"{file}: cannot read the source DICOM again ({_one_line(exc)})") from exc
    return datasets


def _check_pixels_readable(instance: _Instance, where: str) -> None:
    header = instance.header
    samples = int(header.get("SamplesPerPixel", 1) or 1)
    photometric = str(header.get("PhotometricInterpretation", "MONOCHROME2"))
    if samples != 1 or photometric not in _MONOCHROME:
        raise DicomError(f"{where}: {instance.label} is a colour image ({photometric}, {samples} samples per "
                         "pixel), e.g. a secondary capture or screenshot, not a scan in intensity units")
    syntax = UID(str(header.file_meta.get("TransferSyntaxUID", pydicom.uid.ExplicitVRLittleEndian)))
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


def _planes(instances: list[_Instance], where: str):
    """One SlicePlane per image (frames of multi-frame files included), and (instance, frame) for each;
    ``(None, frames)`` when the series has no patient geometry at all."""
    planes, frames = [], []
    missing = []
    for instance in instances:
        header = instance.header
        for frame in range(1, instance.frames + 1) if instance.frames > 1 or "PerFrameFunctionalGroupsSequence" in header else [None]:
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
        except _READ_ERRORS as exc:
            raise DicomError(f"{instance.label}: cannot read its pixel data, the file may be truncated or "
                             f"corrupt ({_one_line(exc)})") from exc
        image = np.asarray(image)
        if image.shape != (rows, columns):
            raise DicomError(f"{instance.label}: pixel data of shape {image.shape}, expected rows x columns "
                             f"{rows}x{columns}")
        stack[k] = image
    return stack.transpose(2, 1, 0)


def _highdicom_image(dataset: pydicom.Dataset):
    import highdicom

    return highdicom.Image.from_dataset(dataset, copy=False)


def _read_without_geometry(instances: list[_Instance], frames: list, notes: list[str]) -> DicomScan:
    """A lone image without patient geometry (a radiograph, a secondary capture): a 2-D image in pixel
    order, its axes marked as not anatomically known."""
    header = instances[0].header
    spacing = header.get("PixelSpacing") or header.get("ImagerPixelSpacing") or (1.0, 1.0)
    volume = _read_pixels(frames, int(header.Rows), int(header.Columns))
    meta = VolumeMeta.identity(2, (float(spacing[1]), float(spacing[0])), note=notes[-1])
    meta.source = str(instances[0].path)
    return DicomScan(volume, meta, _source(header, frames, notes))


def _source(header: pydicom.Dataset, frames: list, notes: list[str]) -> DicomSource:
    return DicomSource(series_uid=str(header.SeriesInstanceUID), series_number=_series_number(header),
                       series_description=_text(header, "SeriesDescription"), modality=_text(header, "Modality"),
                       frame_of_reference_uid=_text(header, "FrameOfReferenceUID"),
                       sop_instance_uids=tuple(str(i.header.SOPInstanceUID) for i, _ in frames),
                       files=tuple(os.path.abspath(i.path) for i, _ in frames),
                       frame_numbers=tuple(frame for _, frame in frames), notes=tuple(notes))


def _is_localizer(header: pydicom.Dataset) -> bool:
    image_type = header.get("ImageType") or []
    if isinstance(image_type, str):
        image_type = [image_type]
    return any(str(value).upper() == "LOCALIZER" for value in image_type)


def _series_number(header: pydicom.Dataset) -> int | None:
    value = header.get("SeriesNumber")
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _text(header: pydicom.Dataset, keyword: str) -> str:
    return " ".join(str(header.get(keyword, "") or "").split())


def _sop_class_name(uid: str) -> str:
    return UID(uid).name if uid else "objects without SOP class"


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _some(labels: list[str], limit: int = 3) -> str:
    shown = ", ".join(labels[:limit])
    return shown + (f" and {len(labels) - limit} more" if len(labels) > limit else "")
