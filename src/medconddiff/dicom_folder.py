"""Finding the DICOM image series in a folder (a scanner's or a PACS export, searched recursively) or
in one file: what :func:`medconddiff.dicom_series.read_dicom_series` then reads.

Every header is read once, without pixel data (values over a few KB are deferred), and kept
(:class:`ScannedFolder`), so listing a folder and then reading each of its series costs one pass.

* Files that are not DICOM, or cannot be parsed, are skipped with a note; non-image objects (SEG,
  structured reports, RT structures) are skipped with a note, so that a segmentation written beside a
  scan is not offered as a series of its own. DICOM SEG and RT Structure Set files are kept aside
  (:attr:`ScannedFolder.segmentations`, with their own note) for the napari reader, which opens each as
  labels over the series it references.
* **Several images at each position** (multi-echo MRI, cardiac or DCE phases, Dixon images):
  :func:`split_by_part` splits the series into one part per echo / phase / trigger time / acquisition /
  image type, the first of :data:`PART_TAGS` that leaves one image per position in every part, else
  the first pair of them that does (``echo 2, phase 3``); each part is listed as its own series
  (``series 5 'T2' (echo 2)``) under the key ``UID#echo_2``, which ``--series`` and the readers take
  like a UID. The frames of an enhanced multi-frame file split the same way, each frame's values read
  from its functional groups (:func:`_value`); each part holds the file with its own frames
  (:attr:`Instance.frame_numbers`).
* A DICOM file cut short (pydicom returns what it parsed: no pixel data) is recorded as broken under
  its series, or, when it was cut before its series UID, under its folder: reading refuses that series
  (or every series stored in that folder), since a slice missing at the end of a stack would leave no gap
  to detect.
* **Several series**: :func:`choose_series` refuses to guess and lists them, one line each, unless
  a Series Number or Series Instance UID picks one.
* **Privacy**: no patient attribute goes into a note, an error or a :class:`SeriesInfo`; series are
  named by number and description, images by series and instance number (:func:`image_label`), never by
  file name or folder (exports name both after the patient); files with no readable header are counted.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from .dicom_geometry import functional_group_items
from .errors import UserInputError

__all__ = ["DicomError", "SeriesInfo", "SeriesList", "ScannedFolder", "is_dicom_path", "list_series",
           "scan_folder", "choose_series", "chosen_series_index", "series_listing", "is_media_directory",
           "file_sop_class"]

# Objects with Rows and Columns that are not images of the patient: listing them as series would only
# make users choose between their scan and a segmentation written beside it.
_NON_VOLUME_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.66.4": "Segmentation Storage",
    "1.2.840.10008.5.1.4.1.1.66.7": "Label Map Segmentation Storage",
    "1.2.840.10008.5.1.4.1.1.481.3": "RT Structure Set Storage",
}
#: DICOM SEG classes: skipped as images, kept in :attr:`ScannedFolder.segmentations` (napari opens them as
#: labels over the series they reference).
SEGMENTATION_SOP_CLASSES = ("1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7")
#: An RT Structure Set (radiotherapy contours): kept with the segmentations, which napari opens as labels.
RT_STRUCTURE_SET = "1.2.840.10008.5.1.4.1.1.481.3"
#: A DICOMDIR (the index of a CD or USB export).
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
# What pydicom raises on files it cannot parse or decode; anything else is a bug and keeps its traceback.
READ_ERRORS = (InvalidDicomError, EOFError, OSError, ValueError, KeyError, AttributeError, TypeError,
                IndexError, NotImplementedError, RuntimeError, OverflowError)
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
    part: str = ""       # one echo/phase/... of a series split by it ("echo 2"); ``uid`` is then its key

    @property
    def name(self) -> str:
        """``series 3 'CT abdomen'`` (``series 5 'Dixon' (echo 2)`` for one part of a split series): how
        messages and layer names refer to the series."""
        number = "?" if self.number is None else str(self.number)
        name = f"series {number} '{self.description}'" if self.description else f"series {number}"
        return f"{name} ({self.part})" if self.part else name

    def line(self) -> str:
        """One line for a listing: name, modality, images and size, UID."""
        size = f" {self.size[0]}x{self.size[1]}" if self.size else ""
        frames = f", {self.frames} frames" if self.frames != self.instances else ""
        return f"{self.name}: {self.modality or '?'}, {self.instances} image(s){frames}{size}, uid {self.uid}"


class SeriesList(list):
    """``list[SeriesInfo]`` plus ``notes``: files skipped while looking (not DICOM, unreadable).

    It keeps the headers read while looking, so :func:`~medconddiff.dicom_series.read_dicom_series` given it (``listed=``) reads
    each series without reading every header of the folder again.
    """

    def __init__(self, items: Sequence[SeriesInfo] = (), notes: Sequence[str] = (), scanned: ScannedFolder | None = None):
        super().__init__(items)
        self.notes = list(notes)
        self.scanned = scanned      # the headers read while looking (None: read them again)


@dataclass
class Instance:
    path: Path
    label: str
    header: pydicom.Dataset
    frames: int = 1
    part: str = ""      # which echo/phase/... of a series that holds several at each position ("echo 2")
    #: the 1-based frames of a multi-frame file that belong to ``part`` (None: all its frames)
    frame_numbers: tuple[int, ...] | None = None

    def frame_list(self) -> list[int | None]:
        """The image planes this instance contributes: its frames (1-based; those of its part), or
        ``[None]`` for a single-frame image."""
        if self.frame_numbers is not None:
            return list(self.frame_numbers)
        if self.frames > 1 or "PerFrameFunctionalGroupsSequence" in self.header:
            return list(range(1, self.frames + 1))
        return [None]


@dataclass
class ScannedFolder:
    series: dict[str, list[Instance]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    broken: dict[str, list[str]] = field(default_factory=dict)   # series UID (or folder) -> unreadable files
    segmentations: list[Instance] = field(default_factory=list)  # SEG and RTSTRUCT files (headers only), file order
    segmentation_note: str = ""                                  # the note that says they were skipped as images
    #: A single file given and read with the other files of its series: the scan of that file alone, read
    #: instead where those files do not make one volume (so a file never reads worse than it did alone).
    file_alone: ScannedFolder | None = None

    def series_files(self) -> set[Path]:
        return {instance.path for instances in self.series.values() for instance in instances}


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
    folder = scan_folder(Path(path))
    return SeriesList([series_info(instances) for instances in sorted_series(folder)], folder.notes, folder)


def scan_folder(path: Path) -> ScannedFolder:
    """The DICOM files under a folder (recursively), or a single file, sorted into series.

    A single file of a series whose other files lie beside it (one slice of a CT or MR series, as a
    user drags it from a folder) is read with them: the series it belongs to, not one slice of it."""
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_file() and is_media_directory(path):
        # A CD or USB export's DICOMDIR indexes the files below its folder: opening it means that folder.
        return scan_folder(path.parent)
    if path.is_dir():
        return _scan_files(list(_files_under(path)), path, path)
    alone = _scan_files([path], path.parent, path)
    siblings = _series_siblings(path, alone)
    if not siblings:
        return alone
    (instances,) = alone.series.values()
    headers = {path: instances[0].header, **siblings}     # every file of the series, read once
    found = _scan_files(sorted(headers), path.parent, path, headers=headers)
    # Only the series (or the echo, phase, ... of a split one) the given file is part of.
    found.series = {key: instances for key, instances in found.series.items()
                    if any(instance.path == path for instance in instances)}
    if not found.series:
        return alone
    # Neither the folder nor the file is named: exports name both after the patient.
    found.notes.append(f"the file given is one of {len(found.series_files())} files of its series in its folder: read "
                       "them all as one volume (a copy of the file alone in a folder reads as one slice)")
    found.file_alone = alone
    return found


def is_media_directory(file: Path) -> bool:
    """Whether ``file`` is a DICOMDIR (the Media Storage Directory that indexes a CD or USB export)."""
    return file_sop_class(file) == MEDIA_STORAGE_DIRECTORY


def file_sop_class(file: str | os.PathLike) -> str:
    """The SOP Class UID of a DICOM file, from its header alone ("" for a file pydicom cannot read)."""
    try:
        return sop_class_of(pydicom.dcmread(file, stop_before_pixels=True, specific_tags=["SOPClassUID"]))
    except READ_ERRORS:
        return ""


def _series_siblings(file: Path, found: ScannedFolder) -> dict[Path, pydicom.Dataset]:
    """The other files in ``file``'s folder (not below it) holding single-frame images of the one series
    ``file`` holds a single-frame image of, with their headers; {} for anything else (a multi-frame file
    holds its series)."""
    if len(found.series) != 1:
        return {}
    (instances,) = found.series.values()
    if len(instances) != 1 or instances[0].frames != 1:
        return {}
    uid = str(instances[0].header.SeriesInstanceUID)
    instance_uid = str(instances[0].header.get("SOPInstanceUID", "") or "")
    siblings = {}
    for other in sorted(file.parent.iterdir()):
        if other == file or other.name.startswith(".") or not other.is_file():
            continue
        try:
            # The whole header (as _scan_files reads it), kept so that each sibling is read once.
            header = pydicom.dcmread(other, defer_size=_DEFER_BYTES)
        except READ_ERRORS:
            continue
        same_image = instance_uid and str(header.get("SOPInstanceUID", "") or "") == instance_uid
        if (str(header.get("SeriesInstanceUID", "") or "") == uid and not same_image
                and int(header.get("NumberOfFrames", 1) or 1) == 1):
            siblings[other] = header
    return siblings


def _scan_files(files: list[Path], root: Path, path: Path,
                headers: dict[Path, pydicom.Dataset] | None = None) -> ScannedFolder:
    """Headers of ``files`` sorted into series (``root``: what labels are relative to; ``path``: what
    the user gave, for the error when nothing is an image; ``headers``: those already read)."""
    headers = headers or {}
    found = ScannedFolder()
    not_dicom, unreadable, non_image, segmentation_kinds = 0, [], Counter(), Counter()
    first_copy: dict[tuple[str, ...], str] = {}
    duplicates: list[str] = []
    for place, file in enumerate(files, start=1):
        try:
            # Deferred values: every element is parsed (so a file cut short shows as missing pixel
            # data) without loading pixel data into memory.
            header = headers[file] if file in headers else pydicom.dcmread(file, defer_size=_DEFER_BYTES)
        except InvalidDicomError:
            not_dicom += 1      # counted, not named: its name may be the patient's, and no header says more
            continue
        except READ_ERRORS as exc:
            unreadable.append(f"header unreadable: {error_text(exc, file)}")
            continue
        label = image_label(header, place)
        sop_class = sop_class_of(header)
        if sop_class == MEDIA_STORAGE_DIRECTORY:
            continue            # a CD's index: expected beside its images, never one of them
        uid = str(header.get("SeriesInstanceUID", "") or "")
        has_pixels = any(keyword in header for keyword in _PIXEL_KEYWORDS)
        if sop_class in SEGMENTATION_SOP_CLASSES or sop_class == RT_STRUCTURE_SET:
            # Named by file (its name alone), as the SEG and RTSTRUCT readers name it: a user opens it by that
            # name, and our Export names it after the series, never the patient.
            found.segmentations.append(Instance(file, file.name, header))
            segmentation_kinds[_NON_VOLUME_SOP_CLASSES[sop_class]] += 1
            continue
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
        identity = _instance_identity(header, uid)
        if identity is not None:
            if identity in first_copy:
                first = first_copy[identity]
                duplicates.append(label if label == first else f"{label} (= {first})")
                continue
            first_copy[identity] = label
        frames = int(header.get("NumberOfFrames", 1) or 1)
        found.series.setdefault(uid, []).append(Instance(file, label, header, frames))
    for uid in list(found.series):
        parts = split_by_part(found.series[uid])
        if parts:
            del found.series[uid]
            for part, instances in parts:
                found.series[part_key(uid, part)] = instances
    if duplicates:
        found.notes.append(f"skipped {len(duplicates)} duplicate file(s), copies of an image already read (same SOP "
                           f"Instance UID and position): {some_of(duplicates)}")
    if not_dicom:
        found.notes.append(f"skipped {not_dicom} file(s) that are not DICOM")
    if unreadable:
        found.notes.append(f"skipped {len(unreadable)} unreadable DICOM file(s): {some_of(unreadable)}")
    if non_image:
        kinds = ", ".join(f"{count} {kind}" for kind, count in non_image.items())
        found.notes.append(f"skipped DICOM objects that are not images: {kinds}")
    if found.segmentations:
        found.segmentation_note = ("skipped DICOM segmentations, which are not images: "
                                   + ", ".join(f"{count} {kind}" for kind, count in segmentation_kinds.items()))
        found.notes.append(found.segmentation_note)
    if not found.series:
        what = "file" if path.is_file() else "folder"
        detail = f" ({'; '.join(found.notes)})" if found.notes else ""
        raise DicomError(f"{path}: no DICOM image in this {what}{detail}")
    return found


def image_label(header: pydicom.Dataset, place: int) -> str:
    """How notes and errors name an image: by its Series and Instance Number (``series 2 image 14``), never by
    its file name or folders, which exports make of the patient's name (Siemens:
    ``DOE_JOHN.CT.ABDOMEN.0002.0014….IMA``; ``EXPORT/DOE_JOHN_12345/CT/``); ``image #7``, its place among the
    files looked at (sorted by name), when it has no Instance Number."""
    instance = header_text(header, "InstanceNumber")
    if not instance:
        return f"image #{place}"
    number = series_number(header)
    return f"image {instance}" if number is None else f"series {number} image {instance}"


def error_text(exc: BaseException, file: Path) -> str:
    """:func:`one_line` of an error about ``file``, without the file's path or name (an OSError carries them)."""
    text = one_line(exc)
    for name in sorted({str(file), str(file.resolve()), file.name}, key=len, reverse=True):
        text = text.replace(name, "the file")
    return text


def _instance_identity(header: pydicom.Dataset, series_uid: str) -> tuple[str, ...] | None:
    """What makes two files one image: the same SOP Instance UID (unique per image by the standard) at
    the same position. A folder exported twice, or copied into itself, holds such copies; two images
    that share a UID but not a position (a broken anonymiser) are not copies: reading their series refuses
    it (:mod:`medconddiff.dicom_series`)."""
    instance_uid = str(header.get("SOPInstanceUID", "") or "")
    if not instance_uid:
        return None
    return series_uid, instance_uid, str(header.get("ImagePositionPatient", "")), str(header.get("NumberOfFrames", 1))


def sop_class_of(header: pydicom.Dataset) -> str:
    """The SOP Class UID of a file: its own, else its file meta's."""
    return str(header.get("SOPClassUID", "") or header.file_meta.get("MediaStorageSOPClassUID", ""))


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


def sorted_series(folder: ScannedFolder) -> list[list[Instance]]:
    order = {id(instances): i for i, instances in enumerate(folder.series.values())}   # parts in split order

    def key(instances: list[Instance]):
        number = series_number(instances[0].header)
        return (number is None, number or 0, str(instances[0].header.SeriesInstanceUID), order[id(instances)])
    return sorted(folder.series.values(), key=key)


#: Tags that tell apart the images a series holds at each position (multi-echo MRI, cardiac or DCE
#: phases, repeated acquisitions, Dixon's in/opposed/water/fat images), tried in this order, and
#: how a part is called.
PART_TAGS = (("EchoNumbers", "echo"), ("EchoTime", "echo time"), ("EffectiveEchoTime", "echo time"),
             ("TemporalPositionIdentifier", "phase"), ("TemporalPositionIndex", "phase"),
             ("TriggerTime", "trigger time"), ("NominalCardiacTriggerDelayTime", "trigger time"),
             ("DiffusionBValue", "b-value"), ("AcquisitionNumber", "acquisition"),
             ("FrameAcquisitionNumber", "acquisition"), ("ImageType", "image type"), ("FrameType", "image type"))
# (EchoTime alone tells apart the echoes of a converter that drops Echo Numbers. EffectiveEchoTime,
# TemporalPositionIndex, NominalCardiacTriggerDelayTime, FrameAcquisitionNumber and FrameType are where
# enhanced multi-frame files keep them, per frame, in their functional groups.)
_POSITION_DECIMALS = 2     # positions equal to 0.01 mm are the same position


def part_key(uid: str, part: str) -> str:
    """How ``--series`` and the readers name one part of a split series: ``UID#echo_2``."""
    return f"{uid}#{re.sub(r'[^A-Za-z0-9.-]+', '_', part)}"


def series_uid_of(key: str) -> str:
    """The Series Instance UID behind a series key (a UID, or ``UID#echo_2`` for one part of a split series)."""
    return key.split("#", 1)[0]


def split_by_part(instances: list[Instance]) -> list[tuple[str, list[Instance]]]:
    """A series that holds several images at one position (single-frame files, or the frames of
    enhanced multi-frame files), split by the first of :data:`PART_TAGS` that gives two or more parts,
    each with one image per position and at least two images, else by the first pair of them that does
    (a multi-echo series of several phases: ``echo 2, phase 3``); ``[]`` when the series needs no split
    or nothing splits it (the reader then refuses it, naming two such images). A multi-frame file split this way comes
    back once per part, holding that part's frames (:attr:`Instance.frame_numbers`)."""
    planes = [(instance, frame) for instance in instances for frame in instance.frame_list()]
    if len(planes) < 2:
        return []
    # Scouts inside a series are the reader's to leave out: they neither need a split nor make one.
    images, scouts = [], []
    for instance, frame in planes:
        (scouts if frame is None and is_localizer(instance.header) else images).append((instance, frame))
    positions = [_position(_value(instance.header, frame, "ImagePositionPatient")) for instance, frame in images]
    if None in positions or len(set(positions)) == len(positions):
        return []
    values = {keyword: [_tag_text(_value(instance.header, frame, keyword), keyword) for instance, frame in images]
              for keyword, _ in PART_TAGS}
    usable = [(keyword, word) for keyword, word in PART_TAGS
              if None not in values[keyword] and len(set(values[keyword])) > 1]
    for tags in [*([tag] for tag in usable), *itertools.combinations(usable, 2)]:
        keys = list(zip(*(values[keyword] for keyword, _ in tags)))
        groups: dict[tuple[str, ...], list[int]] = {}
        for index, key in enumerate(keys):
            groups.setdefault(key, []).append(index)
        # A part of one image is no split: a tag that differs on every image (a trigger time written per
        # image) would make one "series" of each.
        if all(len(members) >= 2 and len({positions[i] for i in members}) == len(members)
               for members in groups.values()):
            ordered = sorted(groups.items(), key=lambda item: [_natural(value) for value in item[0]])
            parts = []
            for n, (key, members) in enumerate(ordered):
                part = ", ".join(f"{word} {value}" for (_, word), value in zip(tags, key))
                kept = _part_instances([images[i] for i in members] + (scouts if n == 0 else []), part)
                parts.append((part, kept))
            return parts
    return []


def _part_instances(planes: list[tuple[Instance, int | None]], part: str) -> list[Instance]:
    """The instances of one part: each single-frame image, and each multi-frame file once with its
    frames of this part."""
    frames_of: dict[int, list[int]] = {}
    order: list[Instance] = []
    for instance, frame in planes:
        if id(instance) not in frames_of:
            frames_of[id(instance)] = []
            order.append(instance)
        if frame is not None:
            frames_of[id(instance)].append(frame)
    return [dataclasses.replace(instance, part=part, frame_numbers=tuple(frames_of[id(instance)]) or None)
            for instance in order]


def _value(header: pydicom.Dataset, frame: int | None, keyword: str):
    """An attribute of one image plane: for frame ``frame`` (1-based) of a multi-frame file, from its
    per-frame functional groups, then the shared ones, then the file's own; else the header's."""
    if frame is not None:
        for item in functional_group_items(header, frame):
            for element in item:
                if element.VR == "SQ" and len(element.value) and keyword in element.value[0]:
                    return element.value[0].get(keyword)
    return header.get(keyword)


def _position(value) -> tuple[float, ...] | None:
    try:
        return tuple(round(float(v), _POSITION_DECIMALS) for v in value)
    except (TypeError, ValueError):
        return None


def _tag_text(value, keyword: str) -> str | None:
    if value is None or value == "":
        return None
    if keyword in ("ImageType", "FrameType"):
        return "/".join(str(v) for v in (value if not isinstance(value, str) else [value]))
    if isinstance(value, float):        # binary floats (b-values, echo times): 1000, 4.6, not 1000.0
        return f"{value:g}"
    return str(value).strip()


def _natural(text: str):
    try:
        return (0, float(text), text)
    except ValueError:
        return (1, 0.0, text)


def series_info(instances: list[Instance]) -> SeriesInfo:
    header = instances[0].header
    sizes = Counter((int(i.header.Rows), int(i.header.Columns)) for i in instances)
    notes = []
    if len(sizes) > 1:
        notes.append("images of " + ", ".join(f"{r}x{c}" for r, c in sizes) + " in one series")
    localizers = sum(is_localizer(i.header) for i in instances)
    if localizers:
        notes.append(f"{localizers} localizer image(s)")
    part = instances[0].part
    uid = str(header.SeriesInstanceUID)
    return SeriesInfo(number=series_number(header), description=header_text(header, "SeriesDescription"),
                      modality=header_text(header, "Modality"), uid=part_key(uid, part) if part else uid,
                      instances=len(instances), frames=sum(len(i.frame_list()) for i in instances),
                      size=sizes.most_common(1)[0][0], notes=tuple(notes), localizers=localizers, part=part)


def choose_series(path: Path, folder: ScannedFolder, series: int | str | None) -> list[Instance]:
    ordered = sorted_series(folder)
    infos = [series_info(instances) for instances in ordered]
    if series is None:
        if len(ordered) == 1:
            return ordered[0]
        raise DicomError(f"{path} holds {len(ordered)} DICOM series; choose one by number or UID "
                         f"(--series N|UID):\n{series_listing(infos)}")
    return ordered[chosen_series_index(path, infos, series)]


def series_listing(infos: Sequence[SeriesInfo]) -> str:
    """The lines of a listing of series, each with its notes, for a message that asks to choose."""
    return "\n".join(f"  {info.line()}" + (f" ({'; '.join(info.notes)})" if info.notes else "") for info in infos)


def chosen_series_index(path: Path, infos: Sequence[SeriesInfo], series: int | str) -> int:
    """The index of the one listed series that ``series`` names: its listed UID (a part's ``UID#echo_2``, or
    an unsplit series' UID), else its Series Instance UID (which names all parts of a split series), else its
    number. DicomError with the listing when none or several match."""
    text = str(series).strip()
    numbered = text.lstrip("-").isdigit()
    matches = ([i for i, info in enumerate(infos) if info.uid == text]
               or [i for i, info in enumerate(infos) if series_uid_of(info.uid) == text]
               or [i for i, info in enumerate(infos) if numbered and info.number == int(text)])
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise DicomError(f"{path}: {len(matches)} series have number or UID {text}; choose one by the UID "
                         f"shown (a part of a split series: UID#part):\n{series_listing(infos)}")
    raise DicomError(f"{path}: no series with number or UID {text}; found:\n{series_listing(infos)}")


def is_localizer(header: pydicom.Dataset) -> bool:
    image_type = header.get("ImageType") or []
    if isinstance(image_type, str):
        image_type = [image_type]
    return any(str(value).upper() == "LOCALIZER" for value in image_type)


def series_number(header: pydicom.Dataset) -> int | None:
    value = header.get("SeriesNumber")
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def header_text(header: pydicom.Dataset, keyword: str) -> str:
    return " ".join(str(header.get(keyword, "") or "").split())


def _sop_class_name(uid: str) -> str:
    return UID(uid).name if uid else "objects without SOP class"


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def some_of(labels: list[str], limit: int = 3) -> str:
    shown = ", ".join(labels[:limit])
    return shown + (f" and {len(labels) - limit} more" if len(labels) > limit else "")
