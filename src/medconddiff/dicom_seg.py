"""Writing a label map as a DICOM Segmentation (SEG) that references its source series, and reading
one back onto the source's voxels.

* **Layout.** Labels are in the voxel order :func:`medconddiff.dicom_series.read_dicom_series`
  returns, ``(columns, rows, slices)`` with slices sorted along the normal. Each slice is written as
  the frame of the source image it came from, so the SEG lies exactly on the source (gantry-tilted
  stacks included) and a clinical viewer shows it over the series it references. One part (echo,
  phase, …) of an enhanced multi-frame file that holds several at each position is placed by its own
  frames' positions, each SEG frame naming only the part's frame as its source.
* **Segments.** One per foreground class (``class_names[1:]``; class 0 is background and is not a
  segment); segment number ``c`` is class ``c``, labelled with its class name. A class named after a
  common structure or finding (:data:`KNOWN_CLASSES`: liver, tumour, lesion, kidney, grey matter, …)
  is coded as what it is — SNOMED CT codes from pydicom's code dictionary, category "Anatomical
  Structure" or, for a finding, "Morphologically Abnormal Structure" — so that a PACS or viewer knows
  what the segment is, not only its label; any other class is category SCT 91723000 "Anatomical
  Structure", type SCT 85756007 "Tissue". ``codes`` overrides both: a (category, type) pair for all
  classes, or per class name. The algorithm is recorded as "medconddiff", family DCM "Artificial
  Intelligence", and as automatic unless ``algorithm_type`` says the model's output was edited by hand
  (``SEMIAUTOMATIC``: what Export writes when slices were edited) or made by hand (``MANUAL``).
* **Refused before any work** (:func:`check_seg_writable`): a series without a Frame of Reference UID, and
  one stored as several enhanced multi-frame files; anything else highdicom refuses is a one-line
  :class:`DicomError` too (export NIfTI instead).
* **Reading** another tool's SEG: a FRACTIONAL one (probabilities) is read at 0.5; overlapping segments
  give the voxel to the smaller segment, with a warning.
* **Type.** ``BINARY`` by default (read by every SEG-aware viewer); ``LABELMAP`` (the 2024 Label Map
  Segmentation class: smaller, fewer readers) on request.
* **Patient data.** Unlike everything else this project writes, a SEG copies the patient and study
  modules (name, ID, birth date, sex, study UID) from its source: DICOM requires it, so that PACS
  files the SEG under the same patient and study. It is a clinical object for a PACS, not a log;
  nothing of it is printed.
* **Writing** is atomic (temporary file renamed into place) and never replaces a file unless
  ``overwrite=True``.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import pydicom
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes as dicom_codes
from pydicom.sr.coding import Code

from .atomic import atomic_write, check_target
from .class_match import class_key
from .dicom_folder import error_text
from .dicom_geometry import plane_from_header
from .dicom_series import DicomError, DicomScan, DicomSource, dicom_source, source_datasets
from .nifti import smallest_label_dtype

__all__ = ["write_dicom_seg", "check_seg_writable", "read_dicom_seg", "dicom_seg_segments", "dicom_seg_codes",
           "DEFAULT_SEGMENT_CODES",
           "KNOWN_CLASSES", "segment_codes", "SEG_MANUFACTURER", "software_version"]

CodeLike = Union[Code, tuple]
#: (category, type) given to a segment whose class name is not in :data:`KNOWN_CLASSES`, unless ``codes``
#: says otherwise.
DEFAULT_SEGMENT_CODES = (dicom_codes.SCT.AnatomicalStructure, dicom_codes.SCT.Tissue)
#: Class names (in :func:`~medconddiff.class_match.class_key` form: lower case, single spaces, British
#: spelling, so ``Tumor`` and ``left_kidney`` find theirs) → pydicom's SNOMED CT keyword of the type, and
#: whether it is a finding (category "Morphologically Abnormal Structure") rather than a structure.
KNOWN_CLASSES = {
    "liver": ("Liver", False), "kidney": ("Kidney", False), "spleen": ("Spleen", False), "lung": ("Lung", False),
    "pancreas": ("Pancreas", False), "prostate": ("Prostate", False), "heart": ("Heart", False),
    "aorta": ("Aorta", False), "bladder": ("Bladder", False), "bone": ("Bone", False), "brain": ("Brain", False),
    "grey matter": ("GrayMatter", False), "gray matter": ("GrayMatter", False),
    "white matter": ("WhiteMatter", False), "csf": ("CerebrospinalFluid", False),
    "cerebrospinal fluid": ("CerebrospinalFluid", False),
    "tumour": ("Tumor", True), "neoplasm": ("Neoplasm", True), "lesion": ("Lesion", True),
    "mass": ("Mass", True), "nodule": ("Nodule", True), "oedema": ("Edema", True),
    "necrosis": ("Necrosis", True),
}
SEG_MANUFACTURER = "medconddiff"
#: The character set of every DICOM object written here (UTF-8): names typed by users are any script.
UNICODE_CHARACTER_SET = "ISO_IR 192"
_ARTIFICIAL_INTELLIGENCE = Code("123110", "DCM", "Artificial Intelligence")

Reference = Union[DicomSource, DicomScan, str, os.PathLike]


def write_dicom_seg(
    path: str | os.PathLike,
    labels: np.ndarray,
    source: Reference,
    class_names: Sequence[str],
    *,
    codes: tuple[CodeLike, CodeLike] | Mapping[str, tuple[CodeLike, CodeLike]] | None = None,
    series: int | str | None = None,
    overwrite: bool = False,
    segmentation_type: str = "BINARY",
    series_number: int = 9901,
    series_description: str = "medconddiff segmentation",
    algorithm_type: str = "AUTOMATIC",
) -> Path:
    """Write ``labels`` (integers ``0..len(class_names)-1``, shaped like the source volume) as a SEG.

    ``source`` is the series the labels were computed on: a :class:`DicomSource` (or the
    :class:`DicomScan` that holds it), or the path read (with ``series`` as for
    :func:`read_dicom_series`). ``codes`` is a (category, type) pair for every segment, or a mapping
    from class name to such a pair; a code is a ``pydicom.sr.coding.Code`` or a
    ``(value, scheme, meaning)`` tuple. ``algorithm_type`` is what the segments say made them:
    ``AUTOMATIC`` (the model's output as it is), ``SEMIAUTOMATIC`` (the model's output that someone
    edited) or ``MANUAL``. Raises FileExistsError for an existing ``path`` unless ``overwrite``, and
    :class:`DicomError` before any work for a series no SEG can be written of
    (:func:`check_seg_writable`). Returns the written path.
    """
    import highdicom as hd

    path = Path(path)
    check_target(path, overwrite, "DICOM SEG")
    reference = _source_of(source, series)
    check_seg_writable(path, reference)
    algorithm = _algorithm_type(path, algorithm_type)
    names = [str(name) for name in class_names]
    if len(names) < 2:
        raise DicomError(f"{path.name}: need a background and at least one class name, got {names}")
    frames = _frames_for_source(np.asarray(labels), reference, len(names), path)
    datasets = _with_type2_attributes(source_datasets(reference))
    shared_file = _shares_its_file(reference)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number, segment_label=names[number][:64],
            segmented_property_category=_coded(category), segmented_property_type=_coded(kind),
            algorithm_type=algorithm,
            algorithm_identification=None if algorithm == hd.seg.SegmentAlgorithmTypeValues.MANUAL else
            hd.AlgorithmIdentificationSequence(name=SEG_MANUFACTURER, family=_ARTIFICIAL_INTELLIGENCE,
                                               version=software_version()))
        for number in range(1, len(names))
        for category, kind in [_codes_for(names[number], codes)]
    ]
    try:
        segmentation = hd.seg.Segmentation(
            source_images=datasets, pixel_array=frames, segmentation_type=segmentation_type.upper(),
            segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=int(series_number),
            sop_instance_uid=hd.UID(), instance_number=1, manufacturer=SEG_MANUFACTURER,
            manufacturer_model_name=SEG_MANUFACTURER, software_versions=software_version(), device_serial_number="0",
            series_description=series_description[:64], content_label="MEDCONDDIFF",
            content_description=_CONTENT_DESCRIPTIONS[algorithm.value], omit_empty_frames=True,
            plane_positions=_plane_positions(datasets[0], reference.frame_numbers) if shared_file else None,
            # Class names and the copied patient/study texts are str here; under the source's repertoire (or
            # none: ASCII) a "Läsion" or "肝臓" would reach other readers as "?".
            specific_character_set=UNICODE_CHARACTER_SET)
    except (ValueError, AttributeError) as exc:
        # What highdicom refuses in a source that check_seg_writable does not foresee (an attribute the SEG must
        # copy that the images lack: a 2-D image without Pixel Spacing): the user's input, not a bug.
        raise DicomError(f"{path.name}: a DICOM SEG of {reference.name} cannot be written "
                         f"({' '.join(str(exc).split())}); export NIfTI instead: it carries the scan's affine") from exc
    if shared_file:
        _derive_from_own_frames(segmentation, reference)
    atomic_write(path, lambda tmp: segmentation.save_as(tmp), overwrite=overwrite, suffix=".dcm")
    return path


#: The patient and study attributes a SEG copies from its images. They are type 2 (present, may be empty) in
#: the image's IOD, but anonymisers drop them, and highdicom then fails on the missing attribute.
_COPIED_TYPE2_ATTRIBUTES = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber",
                            "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName")


def _with_type2_attributes(datasets: list) -> list:
    """``datasets`` (headers read for this SEG alone) with each missing copied attribute present and empty."""
    for dataset in datasets:
        for keyword in _COPIED_TYPE2_ATTRIBUTES:
            if keyword not in dataset:
                setattr(dataset, keyword, "")
    return datasets


def check_seg_writable(path: str | os.PathLike, source: DicomSource) -> None:
    """Refuse, in one line, a series no DICOM SEG can be written of here, from its :class:`DicomSource` alone
    (nothing is read): one without a Frame of Reference UID (a 2-D image without patient geometry: a SEG
    is placed by it), and one whose frames come from several enhanced multi-frame files (a SEG's frames
    are placed on one multi-frame source). Callers may call it before segmenting, so that a run does not
    fail at its last step."""
    name = Path(path).name
    if not source.frame_of_reference_uid:
        raise DicomError(f"{name}: {source.name} has no Frame of Reference UID, which a DICOM SEG needs to lie "
                         "on its images; export NIfTI instead")
    multi_frame_files = {file for file, frame in zip(source.files, source.frame_numbers) if frame is not None}
    if multi_frame_files and len(set(source.files)) > 1:
        raise DicomError(f"{name}: {source.name} takes its frames from {len(set(source.files))} files, of which "
                         f"{len(multi_frame_files)} multi-frame; a DICOM SEG of it cannot be written here (export "
                         "NIfTI instead: it carries the scan's affine)")


#: What the SEG's Content Description says, by the segments' algorithm type.
_CONTENT_DESCRIPTIONS = {"AUTOMATIC": "Automatic segmentation",
                         "SEMIAUTOMATIC": "Automatic segmentation, edited by hand",
                         "MANUAL": "Manual segmentation"}


def _algorithm_type(path: Path, value: str):
    import highdicom as hd

    try:
        return hd.seg.SegmentAlgorithmTypeValues(str(value).upper())
    except ValueError:
        raise DicomError(f"{path.name}: algorithm type {value!r} is none of "
                         f"{', '.join(_CONTENT_DESCRIPTIONS)}") from None


def read_dicom_seg(path: str | os.PathLike, reference: Reference, *, series: int | str | None = None) -> np.ndarray:
    """Read a SEG as a label map on the voxels of ``reference`` (the series it segments).

    Returns integers shaped ``(columns, rows, slices)`` like the reference volume: 0 where no segment
    is, else the segment number (for a SEG written by :func:`write_dicom_seg`, the class index).
    Where segments overlap (SEGs from other tools may store a finding inside its organ that way), the
    smaller segment wins, with a warning. Raises :class:`DicomError`
    if the SEG does not reference the series.
    """
    path = Path(path)
    source = _source_of(reference, series)
    segmentation = _read_seg(path)
    referenced = {str(uid) for _, _, uid in segmentation.get_source_image_uids()}
    if not referenced & set(source.sop_instance_uids):
        raise DicomError(f"{path.name}: this segmentation references none of the images of {source.name}")
    numbers = list(segmentation.segment_numbers)
    if any(frame is not None for frame in source.frame_numbers):
        # One enhanced multi-frame file can hold several echoes or phases, each read as its own series with
        # the file's one instance UID: only the frames a SEG references tell which one it segments.
        frames = _referenced_frames(segmentation, source.sop_instance_uids[0])
        if frames and not frames & {int(f) for f in source.frame_numbers}:
            raise DicomError(f"{path.name}: this segmentation references none of the frames of {source.name}")
    try:
        stack = _source_pixels(segmentation, source, combine=True)
    except _HIGHDICOM_ERRORS as exc:
        # Read again: highdicom's frame index stays locked after a failed query on the same object.
        stack = _flattened(path, _read_seg(path), source, numbers)
        if stack is None:
            raise DicomError(f"{path.name}: cannot map the segmentation onto {source.name} "
                             f"({' '.join(str(exc).split())})") from exc
    labels = np.ascontiguousarray(stack.transpose(2, 1, 0))
    return labels.astype(smallest_label_dtype(max(numbers, default=0)), copy=False)


_HIGHDICOM_ERRORS = (ValueError, RuntimeError, KeyError)


def _source_pixels(segmentation, source: DicomSource, *, combine: bool) -> np.ndarray:
    """The SEG's frames in the source's slice order, (slices, rows, columns): segment numbers where
    ``combine``, else one mask per segment on a last axis (in ``segment_numbers`` order)."""
    if all(frame is None for frame in source.frame_numbers):
        stack = segmentation.get_pixels_by_source_instance(
            source_sop_instance_uids=list(source.sop_instance_uids), combine_segments=combine,
            assert_missing_frames_are_empty=True)
    else:
        stack = segmentation.get_pixels_by_source_frame(
            source_sop_instance_uid=source.sop_instance_uids[0],
            source_frame_numbers=[int(f) for f in source.frame_numbers], combine_segments=combine,
            assert_missing_frames_are_empty=True)
    return np.asarray(stack)


def _flattened(path: Path, segmentation, source: DicomSource, numbers: list[int]) -> np.ndarray | None:
    """The label map of a SEG that highdicom cannot combine into one, from its masks one by one; None where
    those cannot be read either (the failure was another).

    Two kinds of SEG reach here. A FRACTIONAL SEG (probabilities, as other AI tools write them): a voxel
    belongs to a segment where its value is at least 0.5. And segments that overlap: other tools store a
    finding inside its organ as two segments (a tumour inside the liver); a label map holds one class per
    voxel, so where segments overlap the one covering fewer voxels in all wins (the finding, whichever
    number it has), and a warning says how many voxels."""
    try:
        masks = _source_pixels(segmentation, source, combine=False)
    except _HIGHDICOM_ERRORS:
        return None
    present = masks >= 0.5 if np.issubdtype(masks.dtype, np.floating) else masks > 0
    shared = int(np.count_nonzero(present.sum(axis=-1) > 1))
    labels = np.zeros(present.shape[:-1], dtype=smallest_label_dtype(max(numbers)))
    sizes = present.reshape(-1, present.shape[-1]).sum(axis=0)
    for index in np.argsort(-sizes, kind="stable"):     # largest first: smaller segments are written over it
        labels[present[..., index]] = numbers[index]
    if shared:
        warnings.warn(f"{path.name}: {shared:,} voxel(s) lie in more than one segment (the SEG's segments overlap): "
                      "each took the smallest of its segments, as a finding inside its organ", stacklevel=3)
    return labels


def _referenced_frames(segmentation, sop_instance_uid: str) -> set[int]:
    """The frames of source instance ``sop_instance_uid`` that a SEG's frames say they were derived from
    (empty when it names none)."""
    frames: set[int] = set()
    for item in segmentation.get("PerFrameFunctionalGroupsSequence", []):
        for derivation in item.get("DerivationImageSequence", []):
            for source in derivation.get("SourceImageSequence", []):
                if str(source.get("ReferencedSOPInstanceUID", "")) == sop_instance_uid:
                    numbers = source.get("ReferencedFrameNumber")
                    if numbers is not None:
                        frames.update(int(n) for n in (numbers if isinstance(numbers, MultiValue) else [numbers]))
    return frames


def dicom_seg_segments(path: str | os.PathLike) -> dict[int, str]:
    """Segment number -> segment label of a SEG file (for naming the classes of a SEG read back); the
    background segment 0 that a label-map SEG carries is left out. Only the header is read (its
    Segment Sequence): the frames were read already, by :func:`read_dicom_seg`."""
    path = Path(path)
    _check_exists(path)
    try:
        segments = pydicom.dcmread(path, stop_before_pixels=True).SegmentSequence
        return {int(item.SegmentNumber): str(item.SegmentLabel) for item in segments if int(item.SegmentNumber) > 0}
    except _READ_ERRORS as exc:
        raise _unreadable(path, exc) from exc


def dicom_seg_codes(path: str | os.PathLike) -> dict[str, list[list[str]]]:
    """Segment label -> its ``[[category value, scheme, meaning], [type value, scheme, meaning]]`` as a SEG
    file codes them (JSON-safe; the ``codes`` a re-saved SEG of these segments passes to
    :func:`write_dicom_seg`, so that the anatomy another tool coded is not re-coded from the name alone).
    Segments without both codes are left out; only the header is read."""
    path = Path(path)
    _check_exists(path)
    try:
        segments = pydicom.dcmread(path, stop_before_pixels=True).SegmentSequence
    except _READ_ERRORS as exc:
        raise _unreadable(path, exc) from exc
    codes = {}
    for item in segments:
        pair = [_code_triple(item.get(keyword)) for keyword in ("SegmentedPropertyCategoryCodeSequence",
                                                                "SegmentedPropertyTypeCodeSequence")]
        if int(item.get("SegmentNumber", 0) or 0) > 0 and all(pair):
            codes[str(item.get("SegmentLabel", ""))] = pair
    return codes


def _code_triple(sequence) -> Optional[list[str]]:
    if not sequence:
        return None
    value = sequence[0].get("CodeValue") or sequence[0].get("LongCodeValue") or sequence[0].get("URNCodeValue")
    scheme, meaning = sequence[0].get("CodingSchemeDesignator"), sequence[0].get("CodeMeaning")
    return [str(value), str(scheme), str(meaning)] if value and scheme and meaning else None


def segment_class_names(path: str | os.PathLike, labels: np.ndarray) -> tuple[str, ...]:
    """The class names of a SEG read back as ``labels`` (:func:`read_dicom_seg`): background, then each
    segment's label by number (``segment N`` for a number the SEG does not describe)."""
    segments = dicom_seg_segments(path)
    top = max([int(labels.max()) if labels.size else 0, *segments])
    return ("background", *(segments.get(k, f"segment {k}") for k in range(1, top + 1)))


_READ_ERRORS = (pydicom.errors.InvalidDicomError, ValueError, AttributeError, KeyError, EOFError, OSError)


def _check_exists(path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{path.name}: DICOM SEG file does not exist")


def _unreadable(path: Path, exc: BaseException) -> DicomError:
    return DicomError(f"{path.name}: not a readable DICOM Segmentation ({error_text(exc, path)})")


def _read_seg(path: Path):
    import highdicom as hd

    _check_exists(path)
    try:
        return hd.seg.segread(path)
    except _READ_ERRORS as exc:
        raise _unreadable(path, exc) from exc


def _source_of(reference: Reference, series: int | str | None) -> DicomSource:
    if isinstance(reference, DicomScan):
        return reference.source
    if isinstance(reference, DicomSource):
        return reference
    return dicom_source(reference, series)


def _frames_for_source(labels: np.ndarray, source: DicomSource, n_classes: int, path: Path) -> np.ndarray:
    """``(columns, rows, slices)`` labels -> the SEG pixel array, one frame per source frame."""
    if labels.ndim == 2:
        labels = labels[:, :, np.newaxis]
    n_slices = len(source.sop_instance_uids)
    if labels.ndim != 3 or labels.shape[2] != n_slices:
        raise DicomError(f"{path.name}: labels of shape {labels.shape} do not fit {source.name}, which has "
                         f"{n_slices} slice(s)")
    if labels.dtype.kind not in "biu":
        if not np.array_equal(labels, np.round(labels)):
            raise DicomError(f"{path.name}: labels must be whole numbers")
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise DicomError(f"{path.name}: labels run {int(labels.min())}..{int(labels.max())}, but there are only "
                         f"{n_classes} class names (0..{n_classes - 1})")
    frames = np.ascontiguousarray(labels.transpose(2, 1, 0)).astype(smallest_label_dtype(n_classes - 1))
    if all(frame is None for frame in source.frame_numbers) or _shares_its_file(source):
        return frames      # in slice order: each frame placed on its source frame's plane position
    # A multi-frame source: the SEG's frames follow the source file's frame order, not slice order.
    n_frames = max(int(frame) for frame in source.frame_numbers)
    by_frame = np.zeros((n_frames,) + frames.shape[1:], dtype=frames.dtype)
    for k, frame in enumerate(source.frame_numbers):
        by_frame[int(frame) - 1] = frames[k]
    return by_frame


def _shares_its_file(source: DicomSource) -> bool:
    """``source`` is one part (echo, phase, …) of an enhanced multi-frame file whose other frames lie at
    the same positions: highdicom would place the SEG's frames on all of them, so they are placed by
    hand on the part's own frames."""
    return bool(source.part) and any(frame is not None for frame in source.frame_numbers)


def _plane_positions(header: pydicom.Dataset, frame_numbers: Sequence[int]) -> list:
    """The Plane Position of each of ``frame_numbers`` (1-based) of a multi-frame ``header``, in that order
    (read as the series was: :func:`~medconddiff.dicom_geometry.plane_from_header`)."""
    import highdicom as hd

    positions = []
    for frame in frame_numbers:
        plane = plane_from_header(header, int(frame), f"frame {frame}")
        if plane is None:
            raise DicomError(f"frame {frame} of {header.get('SOPInstanceUID', 'the source')} has no usable plane")
        positions.append(hd.PlanePositionSequence(hd.CoordinateSystemNames.PATIENT, list(plane.position)))
    return positions


def _derive_from_own_frames(segmentation, source: DicomSource) -> None:
    """Each SEG frame names as its source only the frame of ``source``'s part at its position, where
    highdicom names every frame of the file at that position (the other echoes' too): a reader then
    knows which part the SEG segments (:func:`read_dicom_seg` refuses it for the others)."""
    own = {int(frame) for frame in source.frame_numbers}
    for item in segmentation.PerFrameFunctionalGroupsSequence:
        for derivation in item.get("DerivationImageSequence", []):
            derivation.SourceImageSequence = [
                reference for reference in derivation.SourceImageSequence
                if int(reference.get("ReferencedFrameNumber", 0)) in own]


def segment_codes(name: str) -> tuple[Code, Code]:
    """(category, type) of a class named ``name`` when nothing else is given (see the module docstring)."""
    known = KNOWN_CLASSES.get(class_key(name))
    if known is None:
        return DEFAULT_SEGMENT_CODES
    keyword, finding = known
    category = dicom_codes.SCT.MorphologicallyAbnormalStructure if finding else dicom_codes.SCT.AnatomicalStructure
    return category, getattr(dicom_codes.SCT, keyword)


def _codes_for(name: str, given) -> tuple[CodeLike, CodeLike]:
    if given is None:
        return segment_codes(name)
    if isinstance(given, Mapping):
        return given.get(name) or segment_codes(name)
    return given


def _coded(code: CodeLike):
    import highdicom as hd

    if isinstance(code, (Code, hd.sr.CodedConcept)):
        return code
    try:
        value, scheme, meaning = code
    except (TypeError, ValueError):
        raise DicomError(f"segment code {code!r} is not a Code or a (value, scheme, meaning) tuple") from None
    return Code(str(value), str(scheme), str(meaning))


def software_version() -> str:
    """This package's version, as DICOM objects it writes record it ("unknown" when not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("napari-medconddiff")
    except PackageNotFoundError:
        return "unknown"
