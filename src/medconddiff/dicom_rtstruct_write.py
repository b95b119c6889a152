"""Writing a label map as a DICOM RT Structure Set (RTSTRUCT), for planning systems that import contours
but not DICOM SEG.

* **Contours.** Each class is one ROI (named by its class name, numbered as its label value). On every
  slice where a class has voxels, its outline is traced between voxel centres (scikit-image's
  ``find_contours`` at the 0.5 level of the class's mask) and stored as closed planar contours in patient
  coordinates (LPS mm, through the scan's affine); collinear points are dropped. A hole is a contour of
  its own inside the outer one, as planning systems store rings and as
  :func:`medconddiff.dicom_rtstruct.read_rtstruct` reads them (even-odd), so the file reads back onto
  the series voxel for voxel. Every contour references the image of its slice.
* **References.** The structure set references the series (its study, its frame of reference and
  every image), copies the patient and study attributes of the series — as any DICOM object of a patient
  must, into the file only — and gets a new series and instance UID. Nothing is logged of the patient.
* **Limits.** A series read from an enhanced multi-frame file is refused: its contours would have to
  reference frames, which planning systems do not take.
"""

from __future__ import annotations

import copy
import datetime
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from .atomic import atomic_write, check_target
from .dicom_folder import READ_ERRORS, RT_STRUCTURE_SET, DicomError, error_text
from .dicom_rtstruct import CONTOUR_DATA
from .dicom_series import DicomSource
from .nifti import VolumeMeta

#: Attributes copied from the series into the structure set: it belongs to the same patient and study.
_PATIENT_AND_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
                      "StudyDate", "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName")
#: Copied where the series has them (a SEG keeps them too): whose ID it is, and that an anonymiser has been at
#: work and how; dropping them would make a de-identified series' structure set look identified.
_PATIENT_IDENTITY = ("IssuerOfPatientID", "PatientIdentityRemoved", "DeidentificationMethod",
                     "DeidentificationMethodCodeSequence")
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def outline_contours(mask: np.ndarray) -> list[np.ndarray]:
    """The closed outlines of a 2-D boolean ``mask`` as (n, 2) vertices in its (row, column) voxel
    coordinates, between voxel centres, holes included as contours of their own; collinear points
    dropped."""
    from skimage.measure import approximate_polygon, find_contours

    rows, columns = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not rows.size:
        return []
    # Traced in the mask's bounding box, padded by one voxel so that outlines close at its edges.
    box = mask[rows[0]:rows[-1] + 1, columns[0]:columns[-1] + 1]
    padded = np.pad(box.astype(np.float32), 1)
    offset = np.array([rows[0] - 1.0, columns[0] - 1.0])
    contours = []
    for contour in find_contours(padded, 0.5):
        points = approximate_polygon(contour + offset, tolerance=0)
        if len(points) > 1 and np.array_equal(points[0], points[-1]):
            points = points[:-1]
        if len(points) >= 3:
            contours.append(points)
    return contours


def write_rtstruct(path: str | os.PathLike, labels: np.ndarray, meta: VolumeMeta, source: DicomSource,
                   class_names: Sequence[str], *, overwrite: bool = False, series_number: int = 9902,
                   label: str = "MEDCONDDIFF") -> Path:
    """Write ``labels`` (integers ``0..len(class_names)-1`` on the series' voxels, shaped and ordered like
    the volume :func:`~medconddiff.dicom_series.read_dicom_series` gave, with its ``meta``) as an RT
    structure set of ``source``. Classes without a voxel are left out. Raises FileExistsError for an
    existing ``path`` unless ``overwrite``; returns the written path."""
    path = Path(path)
    check_target(path, overwrite, "RT structure set")
    labels = np.asarray(labels)
    names = [str(name) for name in class_names]
    if labels.ndim != 3 or labels.shape[2] != len(source.sop_instance_uids):
        raise DicomError(f"{path.name}: labels of shape {labels.shape} do not lie on the "
                         f"{len(source.sop_instance_uids)} slices of {source.name}")
    if any(frame is not None for frame in source.frame_numbers):
        raise DicomError(f"{path.name}: {source.name} comes from an enhanced multi-frame file; an RT structure set "
                         "of it cannot be written here (write a DICOM SEG or NIfTI instead)")
    if labels.size and int(labels.max()) >= len(names):
        raise DicomError(f"{path.name}: label {int(labels.max())} has no class name (classes: {', '.join(names)})")
    try:
        first = pydicom.dcmread(source.files[0], stop_before_pixels=True)
    except READ_ERRORS as exc:
        raise DicomError(f"{path.name}: cannot read the series' first image again "
                         f"({error_text(exc, Path(source.files[0]))})") from exc
    image_class = str(first.get("SOPClassUID", ""))
    to_patient = _voxel_to_lps(meta.affine)
    rois = []
    for value in range(1, len(names)):
        contours = []
        for k in np.flatnonzero((labels == value).any(axis=(0, 1))):
            for points in outline_contours(labels[:, :, k] == value):
                voxels = np.column_stack([points, np.full(len(points), float(k))])
                contours.append((int(k), to_patient(voxels)))
        if contours:
            rois.append((value, names[value], contours))
    if not rois:
        raise DicomError(f"{path.name}: no class has a voxel: there is nothing to contour")
    dataset = _structure_set(first, source, image_class, rois, series_number, label)
    atomic_write(path, lambda tmp: dataset.save_as(tmp, enforce_file_format=True), overwrite=overwrite,
                 suffix=".dcm")
    return path


def _voxel_to_lps(affine: np.ndarray):
    affine = np.asarray(affine, dtype=np.float64)

    def convert(voxels: np.ndarray) -> np.ndarray:
        ras = voxels @ affine[:3, :3].T + affine[:3, 3]
        return ras @ _RAS_TO_LPS.T
    return convert


def _structure_set(first: pydicom.Dataset, source: DicomSource, image_class: str,
                   rois: list[tuple[int, str, list[tuple[int, np.ndarray]]]], series_number: int,
                   label: str) -> Dataset:
    from .dicom_seg import SEG_MANUFACTURER, UNICODE_CHARACTER_SET, software_version

    now = datetime.datetime.now()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = RT_STRUCTURE_SET
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = RT_STRUCTURE_SET, ds.file_meta.MediaStorageSOPInstanceUID
    ds.SpecificCharacterSet = UNICODE_CHARACTER_SET
    for keyword in _PATIENT_AND_STUDY:
        setattr(ds, keyword, first.get(keyword, ""))
    for keyword in _PATIENT_IDENTITY:
        if keyword in first:
            setattr(ds, keyword, copy.deepcopy(first[keyword].value))
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = "RTSTRUCT", generate_uid(), int(series_number)
    ds.SeriesDescription = "medconddiff contours"
    ds.Manufacturer, ds.ManufacturerModelName = SEG_MANUFACTURER, SEG_MANUFACTURER
    ds.SoftwareVersions = software_version()
    ds.OperatorsName, ds.InstanceNumber = "", 1
    ds.StructureSetLabel, ds.StructureSetName = label[:16], label[:64]
    ds.StructureSetDate, ds.StructureSetTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.ContentDate, ds.ContentTime = ds.StructureSetDate, ds.StructureSetTime

    def image(k: int) -> Dataset:
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = image_class, source.sop_instance_uids[k]
        return item

    series = Dataset()
    series.SeriesInstanceUID = source.series_uid
    series.ContourImageSequence = DicomSequence([image(k) for k in range(len(source.sop_instance_uids))])
    study = Dataset()
    study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"       # Detached Study Management (retired, as used)
    study.ReferencedSOPInstanceUID = str(first.get("StudyInstanceUID", ""))
    study.RTReferencedSeriesSequence = DicomSequence([series])
    frame = Dataset()
    frame.FrameOfReferenceUID = source.frame_of_reference_uid
    frame.RTReferencedStudySequence = DicomSequence([study])
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([frame])

    structure_rois, contour_rois, observations = [], [], []
    for number, name, contours in rois:
        roi = Dataset()
        roi.ROINumber, roi.ReferencedFrameOfReferenceUID = number, source.frame_of_reference_uid
        roi.ROIName, roi.ROIGenerationAlgorithm = name[:64], "AUTOMATIC"
        structure_rois.append(roi)
        contour_roi = Dataset()
        contour_roi.ReferencedROINumber = number
        contour_roi.ROIDisplayColor = list(_colour(number))
        items = []
        for k, points in contours:
            item = Dataset()
            item.ContourImageSequence = DicomSequence([image(k)])
            item.ContourGeometricType = "CLOSED_PLANAR"
            item.NumberOfContourPoints = len(points)
            item[CONTOUR_DATA] = _decimal_strings(points.ravel())
            items.append(item)
        contour_roi.ContourSequence = DicomSequence(items)
        contour_rois.append(contour_roi)
        observation = Dataset()
        observation.ObservationNumber, observation.ReferencedROINumber = number, number
        observation.RTROIInterpretedType, observation.ROIInterpreter = "", ""
        observations.append(observation)
    ds.StructureSetROISequence = DicomSequence(structure_rois)
    ds.ROIContourSequence = DicomSequence(contour_rois)
    ds.RTROIObservationsSequence = DicomSequence(observations)
    return ds


def _decimal_strings(values: np.ndarray) -> RawDataElement:
    """Contour Data as the file stores it (backslash-separated decimal strings, even length), built in one
    pass: pydicom's value-by-value DS validation took 35 s of a 3,200-contour structure set."""
    text = "\\".join(np.char.mod("%.4f", values).tolist()).encode("ascii")
    if len(text) % 2:
        text += b" "
    return RawDataElement(CONTOUR_DATA, "DS", len(text), text, 0, False, True)


def _colour(number: int) -> tuple[int, int, int]:
    """A distinct display colour per ROI number (the golden-angle hue walk)."""
    import colorsys

    red, green, blue = colorsys.hsv_to_rgb((number * 0.618033988749895) % 1.0, 0.75, 1.0)
    return int(red * 255), int(green * 255), int(blue * 255)
