"""Export the (possibly hand-edited) consensus as a labels NIfTI or, for a scan read from DICOM, a
DICOM SEG, plus a JSON sidecar; and where the plugin proposes to put files.

The files match what ``medconddiff segment`` writes (:mod:`medconddiff.outputs`): ``<name>.nii.gz``
in the scan's original voxel order with its affine, and ``<name>.json``. Both writes are atomic;
whether an existing file may be replaced is decided by the caller (the widget asks the user).
A DICOM SEG (``<name>.dcm``, chosen by its suffix) references the series the scan was read from
(recorded in the layer metadata, :func:`napari_medconddiff._layers.dicom_source_of`), has one segment
per class named as the model names it, and is proposed beside the series folder, named by the
series; its sidecar records the series (``dicom_source``) as the CLI's does.
Proposed folders are next to the scan's file, else the user's home: never inside the installed
packages (the bundled sample scan lives there, and a reinstall would delete what was saved), nor a
folder that cannot be written (a CD, a read-only share), where saving would only fail.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np

from medconddiff.atomic import check_target
from medconddiff.dicom_inputs import series_file_name
from medconddiff.errors import UserInputError
from medconddiff.nifti import VolumeMeta, save_volume, smallest_label_dtype, write_json_atomic
from medconddiff.outputs import output_paths, segmentation_record, strip_nifti_suffix, with_nifti_suffix

if TYPE_CHECKING:
    from medconddiff.dicom_series import DicomSource

__all__ = ["ExportSummary", "export_targets", "padded_class_names", "is_dicom_seg_path", "DICOM_SEG_SUFFIX", "NIFTI_FILTER",
           "DICOM_SEG_FILTER", "DICOM_RTSTRUCT_FILTER", "default_export_path", "default_finetune_path", "checkpoint_target",
           "inside_installed_package", "write_export"]

DICOM_SEG_SUFFIX = ".dcm"
#: The Export dialog's file types; DICOM SEG is offered only for a scan read from DICOM.
NIFTI_FILTER = "NIfTI (*.nii.gz *.nii)"
DICOM_SEG_FILTER = "DICOM SEG (*.dcm)"
#: Contours for a planning system that imports RT structure sets but not SEG (a .dcm file as well).
DICOM_RTSTRUCT_FILTER = "DICOM RT Structure Set (*.dcm)"
#: Where fine-tuned models go when the scan has no folder of its own (a plain layer, the sample).
MODELS_FOLDER = Path("~/.medconddiff/models")


@dataclass
class ExportSummary:
    """What the sidecar says about the runs behind the exported labels (duck-types a SegmentationResult)."""

    slice_indices: np.ndarray       # canonical slices the consensus shows results for
    completed: np.ndarray
    steps_used: np.ndarray          # denoising steps each of those slices took
    class_names: tuple[str, ...]
    provenance: dict
    runs: list                      # per run still shown: slices, checkpoint, sampling
    complete: bool                  # every run finished all the slices it was asked for

    @property
    def is_complete(self) -> bool:
        return self.complete


def _package_folders() -> list[Path]:
    import medconddiff

    import napari_medconddiff

    return [Path(medconddiff.__file__).resolve().parent, Path(napari_medconddiff.__file__).resolve().parent]


def inside_installed_package(path: str | Path) -> bool:
    """Whether ``path`` lies in medconddiff's or this plugin's package folder."""
    path = Path(path).expanduser().resolve()
    return any(path == folder or folder in path.parents for folder in _package_folders())


def _user_folder(source: Optional[str]) -> Optional[Path]:
    """The scan's folder, unless the scan has none, it is inside the installed packages or it cannot be
    written (a series on a CD): the caller then proposes the user's own folder."""
    if not source:
        return None
    folder = Path(source).expanduser().parent
    return None if inside_installed_package(folder) or not _writable(folder) else folder


def _writable(folder: Path) -> bool:
    """Whether a file can be made in ``folder``: it, or the nearest folder above it that exists (a
    folder not made yet), is a folder this user may write in."""
    there = next((parent for parent in (folder, *folder.parents) if parent.exists()), None)
    return there is not None and there.is_dir() and os.access(there, os.W_OK)


def is_dicom_seg_path(path: str | Path) -> bool:
    return str(path).lower().endswith(DICOM_SEG_SUFFIX)


def export_targets(path: str | Path, *, dicom_seg: bool = False) -> tuple[Path, Path]:
    """(labels file, JSON sidecar) for a chosen file name: a ``.dcm`` name, or a name without suffix
    when ``dicom_seg`` (the DICOM SEG filter was chosen), is a DICOM SEG; anything else NIfTI."""
    path = Path(path)
    if is_dicom_seg_path(path):
        labels = path
    elif dicom_seg and not path.name.lower().endswith((".nii", ".nii.gz")):
        labels = path.with_name(path.name + DICOM_SEG_SUFFIX)
    else:
        labels = with_nifti_suffix(path)
    return labels, output_paths(labels)["sidecar"]


def default_export_path(scan_name: str, source: Optional[str], dicom: Optional[DicomSource] = None) -> Path:
    """``<scan>_seg.nii.gz`` next to the scan's file, else (none, or not writable) in the user's home; for
    a scan read from DICOM, ``series<N>_<description>_seg.dcm`` beside the series folder (also when one of
    its files or a CD's DICOMDIR was opened: never inside the folder, which may be a read-only disc), or
    in the home where that cannot be written. The folder does not name it: DICOM exports are filed in
    folders named after the patient."""
    if dicom is not None:
        return (_user_folder(_series_folder(source)) or Path.home()) / f"{_series_stem(dicom)}_seg{DICOM_SEG_SUFFIX}"
    stem = strip_nifti_suffix(Path(source)) if source else scan_name
    return (_user_folder(source) or Path.home()) / f"{stem}_seg.nii.gz"


def default_finetune_path(scan_name: str, source: Optional[str], dicom: Optional[DicomSource] = None) -> Path:
    """``<scan>_finetuned.safetensors`` next to the scan's file, else (none, or not writable) in
    ~/.medconddiff/models/; for a scan read from DICOM, ``series<N>_<description>_finetuned.safetensors``
    beside the series folder, or there where that cannot be written."""
    if dicom is not None:
        folder = _user_folder(_series_folder(source)) or MODELS_FOLDER.expanduser()
        return folder / f"{_series_stem(dicom)}_finetuned.safetensors"
    stem = strip_nifti_suffix(Path(source)) if source else scan_name
    return (_user_folder(source) or MODELS_FOLDER.expanduser()) / f"{stem}_finetuned.safetensors"


def _series_stem(dicom: DicomSource) -> str:
    # With its echo or phase: two parts of one file do not propose the same name.
    return series_file_name(dicom.series_number, dicom.series_description, dicom.part)


def _series_folder(source: Optional[str]) -> Optional[str]:
    """The folder a DICOM scan was opened from (its files' folder when a file or a DICOMDIR was opened)."""
    if not source:
        return None
    folder = Path(source).expanduser()
    return str(folder if folder.is_dir() else folder.parent)


def checkpoint_target(path: str | Path) -> Path:
    """A fine-tuned checkpoint's path (``.safetensors`` added), refused inside the installed packages."""
    path = Path(path).expanduser()
    if path.suffix.lower() != ".safetensors":
        path = path.with_name(path.name + ".safetensors")
    if inside_installed_package(path):
        raise UserInputError(f"{path} is inside the installed package, which a reinstall replaces; "
                         "save the fine-tuned model next to your scan or in ~/.medconddiff/models/")
    return path


def padded_class_names(names: list[str], top_label: int) -> list[str]:
    """``names`` and ``class N`` for every label value up to ``top_label`` beyond them: a DICOM SEG needs a
    segment for each label painted (napari's File > Save and Export name them alike)."""
    return names + [f"class {value}" for value in range(len(names), top_label + 1)]


def write_export(path: str | Path, labels: np.ndarray, meta: VolumeMeta, summary: ExportSummary, *,
                 source: Optional[str], scan_name: str, edited_slices: list[int], overwrite: bool,
                 dicom: Optional[DicomSource] = None, rtstruct: bool = False) -> tuple[Path, Path]:
    """Write file-ordered ``labels`` as NIfTI with ``meta``, or as a DICOM SEG on ``dicom`` for a
    ``.dcm`` path (an RT structure set of contours where ``rtstruct``), plus the sidecar; returns both
    paths. Neither file is replaced unless ``overwrite``.
    ``source`` is the scan's file (None for a layer from no file, recorded as ``scan_name``)."""
    target, sidecar = export_targets(path)
    labels = np.asarray(labels)
    if labels.size and labels.min() < 0:
        raise UserInputError("labels must be non-negative to be saved as a label map")
    if is_dicom_seg_path(target) and dicom is None:
        raise UserInputError(f"{target.name}: a DICOM SEG references the DICOM series it segments, and this "
                             "scan was not read from DICOM; export it as NIfTI (.nii.gz)")
    # Both targets are checked before either is written: a refused sidecar must not leave new labels.
    check_target(sidecar, overwrite, "sidecar")
    if is_dicom_seg_path(target) and rtstruct:
        from medconddiff.dicom_rtstruct_write import write_rtstruct

        write_rtstruct(target, labels, meta, dicom, summary.class_names, overwrite=overwrite)
    elif is_dicom_seg_path(target):
        from medconddiff.dicom_seg import write_dicom_seg

        # Slices the user painted make it the model's output edited by hand, as DICOM's SEMIAUTOMATIC says.
        write_dicom_seg(target, labels, dicom, summary.class_names, overwrite=overwrite,
                        algorithm_type="SEMIAUTOMATIC" if edited_slices else "AUTOMATIC")
    else:
        dtype = smallest_label_dtype(int(labels.max()) if labels.size else 0)
        save_volume(target, labels, meta.without_header_text(), overwrite=overwrite, dtype=dtype, intent="label")
    record = segmentation_record(summary, meta, labels, inputs=[source] if source else [], scan_name=scan_name,
                                 outputs={"labels": target}, edited=bool(edited_slices), dicom_source=dicom)
    record["edited_slices"] = [int(s) for s in edited_slices]
    if len(summary.runs) > 1:
        record["runs"] = summary.runs
    write_json_atomic(sidecar, record, overwrite=overwrite)
    return target, sidecar
