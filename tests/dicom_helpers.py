"""Writing synthetic DICOM series with pydicom, from a volume and a NIfTI-style (RAS+) affine.

A slice ``k`` of ``volume[:, :, k]`` becomes one CT image: its columns run along the affine's first
axis, its rows along the second, its position is ``affine @ (0, 0, k)`` (or ``positions[k]``), all
converted to DICOM's LPS. Stored values are ``(HU - intercept) / slope`` as int16, so a reader that
applies the rescale gets the volume back exactly.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import format_number_as_ds

from medconddiff import dicom_folder, dicom_series

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
#: Patient attributes distinctive enough that a test can search every output for them.
PATIENT = {"PatientName": "Zyxwvut^Qqpatientname", "PatientID": "PID-98765-XQ", "PatientBirthDate": "19230417"}
#: Exported DICOM is usually filed in a folder named after the patient: tests put series in one, so that a
#: path that reached a record or a name would be found by the same search.
PATIENT_FOLDER = "Zyxwvut_Qqpatientname_PID-98765-XQ"


def ds_values(values) -> list[str]:
    return [format_number_as_ds(float(v)) for v in values]


def slice_dataset(image_hu: np.ndarray, *, position_lps, row_dir, col_dir, pixel_spacing, series_uid: str,
                  study_uid: str, frame_uid: str, series_number: int = 1, description: str = "synthetic CT",
                  instance_number: int = 1, slope: float = 1.0, intercept: float = -1024.0,
                  image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"), thickness: float = 1.0,
                  patient: dict | None = None) -> Dataset:
    """One CT image of ``image_hu`` (rows, columns) at ``position_lps``."""
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    for keyword, value in (patient or PATIENT).items():
        setattr(ds, keyword, value)
    ds.PatientSex = "O"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study_uid, series_uid, sop_uid
    ds.SOPClassUID = CTImageStorage
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "1", "A1"
    ds.ReferringPhysicianName = ""
    ds.Manufacturer = "synthetic"
    ds.Modality = "CT"
    ds.SeriesNumber = series_number
    ds.SeriesDescription = description
    ds.InstanceNumber = instance_number
    ds.ImageType = list(image_type)
    ds.ImagePositionPatient = ds_values(position_lps)
    ds.ImageOrientationPatient = ds_values(list(row_dir) + list(col_dir))
    ds.PixelSpacing = ds_values(pixel_spacing)
    ds.SliceThickness = format_number_as_ds(float(thickness))
    ds.RescaleSlope = format_number_as_ds(float(slope))
    ds.RescaleIntercept = format_number_as_ds(float(intercept))
    ds.RescaleType = "HU"
    stored = np.rint((np.asarray(image_hu, dtype=np.float64) - intercept) / slope).astype(np.int16)
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.PixelData = np.ascontiguousarray(stored).tobytes()
    return ds


def write_series(folder: Path, volume: np.ndarray, affine_ras: np.ndarray, *, positions_lps=None,
                 series_uid: str | None = None, study_uid: str | None = None, frame_uid: str | None = None,
                 series_number: int = 1, description: str = "synthetic CT", prefix: str = "img",
                 skip: Sequence[int] = (), patient: dict | None = None, **slice_kwargs) -> list[Path]:
    """Write ``volume`` (i, j, k) with ``affine_ras`` as one file per slice; returns the paths in k order.

    File names are shuffled against k (``prefix`` + a scrambled number) so a reader cannot rely on them.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lps = LPS_TO_RAS @ np.asarray(affine_ras, dtype=np.float64)
    column_step, row_step = lps[:3, 0], lps[:3, 1]
    row_dir, col_dir = column_step / np.linalg.norm(column_step), row_step / np.linalg.norm(row_step)
    pixel_spacing = (np.linalg.norm(row_step), np.linalg.norm(column_step))
    series_uid, study_uid, frame_uid = series_uid or generate_uid(), study_uid or generate_uid(), frame_uid or generate_uid()
    n_slices = volume.shape[2]
    paths = []
    for k in range(n_slices):
        if k in skip:
            continue
        position = positions_lps[k] if positions_lps is not None else (lps @ np.array([0, 0, k, 1.0]))[:3]
        ds = slice_dataset(volume[:, :, k].T, position_lps=position, row_dir=row_dir, col_dir=col_dir,
                           pixel_spacing=pixel_spacing, series_uid=series_uid, study_uid=study_uid,
                           frame_uid=frame_uid, series_number=series_number, description=description,
                           instance_number=k + 1, patient=patient, **slice_kwargs)
        path = folder / f"{prefix}{(k * 7919) % 10007:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def transcode(paths: Sequence[Path], folder: Path, syntax: str) -> list[Path]:
    """Copies of ``paths`` in ``folder`` with their pixel data re-encoded by GDCM as ``syntax`` (a name of
    ``gdcm.TransferSyntax``, e.g. ``"JPEGLosslessProcess14_1"``): the compressed files a PACS sends."""
    import gdcm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    copies = []
    for path in paths:
        reader = gdcm.ImageReader()
        reader.SetFileName(str(path))
        assert reader.Read(), path
        change = gdcm.ImageChangeTransferSyntax()
        change.SetTransferSyntax(gdcm.TransferSyntax(getattr(gdcm.TransferSyntax, syntax)))
        change.SetInput(reader.GetImage())
        assert change.Change(), f"GDCM could not encode {path.name} as {syntax}"
        writer = gdcm.ImageWriter()
        writer.SetFile(reader.GetFile())
        writer.SetImage(change.GetOutput())
        writer.SetFileName(str(folder / path.name))
        assert writer.Write(), path
        copies.append(folder / path.name)
    return copies


def write_echoes(folder: Path, echoes: Sequence[np.ndarray], affine_ras: np.ndarray, *, tag: str = "EchoNumbers",
                 **series_kwargs) -> str:
    """One series holding ``echoes`` (volumes of one shape) at the same positions, told apart by ``tag``
    (1, 2, … per volume), as a multi-echo MRI or a multi-phase series is stored; returns its UID."""
    import pydicom

    uid = generate_uid()
    for number, volume in enumerate(echoes, start=1):
        for path in write_series(folder, volume, affine_ras, series_uid=uid, prefix=f"e{number}_", **series_kwargs):
            dataset = pydicom.dcmread(path)
            if tag:
                setattr(dataset, tag, number)
            dataset.save_as(path, enforce_file_format=True)
    return uid


def oblique_affine(spacing=(0.8, 0.9, 1.5), origin=(-20.0, 35.0, 12.0)) -> np.ndarray:
    """A right-handed RAS affine rotated about two axes (no voxel axis along a world axis)."""
    a, b = np.radians(20.0), np.radians(-12.0)
    rot_z = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rot_x = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    affine = np.eye(4)
    affine[:3, :3] = rot_z @ rot_x @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


@contextlib.contextmanager
def counted_folder_scans() -> Iterator[list]:
    """Within the block, every scan of a folder's DICOM headers (``dicom_folder.scan_folder``, whether
    listing or reading calls it) is appended to the list yielded: reading several series of one folder
    should scan it once."""
    scans: list = []
    original = dicom_folder.scan_folder
    with pytest.MonkeyPatch.context() as patch:
        for module in (dicom_folder, dicom_series):
            patch.setattr(module, "scan_folder", lambda path: scans.append(path) or original(path))
        yield scans


def write_media(folder: Path, paths: Sequence[Path]) -> Path:
    """The files at ``paths`` as a CD or USB export stores them: a DICOMDIR indexing files without extension
    in PTxxxxxx/STxxxxxx/SExxxxxx folders under ``folder``; returns the DICOMDIR's path."""
    import pydicom
    from pydicom.fileset import FileSet

    media = FileSet()
    for path in paths:
        media.add(pydicom.dcmread(path))
    media.write(folder)
    return folder / "DICOMDIR"


def write_rtstruct(path: Path, series_paths: Sequence[Path], affine_ras: np.ndarray,
                   rois: Sequence[tuple[str, Sequence[tuple[int, np.ndarray]]]], *, geometric_type: str = "CLOSED_PLANAR"
                   ) -> Path:
    """An RT Structure Set over the series at ``series_paths`` (written with ``affine_ras``), as a planning
    system stores one: each ROI (name, [(slice k, polygon (n, 2) in voxel (i, j))]) as closed planar
    contours in patient LPS mm."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence as DicomSequence
    from pydicom.uid import ExplicitVRLittleEndian

    first = pydicom.dcmread(series_paths[0], stop_before_pixels=True)
    lps = LPS_TO_RAS @ np.asarray(affine_ras, dtype=np.float64)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.481.3"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.StructureSetLabel = "RTSTRUCT", "planning"
    ds.PatientName, ds.PatientID = first.PatientName, first.PatientID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = first.StudyInstanceUID, generate_uid()
    series = Dataset()
    series.SeriesInstanceUID = first.SeriesInstanceUID
    series.ContourImageSequence = DicomSequence([])
    study = Dataset()
    study.ReferencedSOPClassUID, study.ReferencedSOPInstanceUID = "1.2.840.10008.3.1.2.3.1", first.StudyInstanceUID
    study.RTReferencedSeriesSequence = DicomSequence([series])
    frame = Dataset()
    frame.FrameOfReferenceUID = first.FrameOfReferenceUID
    frame.RTReferencedStudySequence = DicomSequence([study])
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([frame])
    ds.StructureSetROISequence, ds.ROIContourSequence = DicomSequence([]), DicomSequence([])
    for number, (name, contours) in enumerate(rois, start=1):
        roi = Dataset()
        roi.ROINumber, roi.ROIName, roi.ReferencedFrameOfReferenceUID = number, name, first.FrameOfReferenceUID
        ds.StructureSetROISequence.append(roi)
        item = Dataset()
        item.ReferencedROINumber = number
        item.ContourSequence = DicomSequence([])
        for k, polygon in contours:
            voxels = np.column_stack([np.asarray(polygon, dtype=np.float64), np.full(len(polygon), float(k)),
                                      np.ones(len(polygon))])
            points = (lps @ voxels.T).T[:, :3]
            contour = Dataset()
            contour.ContourGeometricType, contour.NumberOfContourPoints = geometric_type, len(points)
            contour.ContourData = [f"{value:.4f}" for value in points.ravel()]
            item.ContourSequence.append(contour)
        ds.ROIContourSequence.append(item)
    ds.save_as(path, enforce_file_format=True)
    return Path(path)
