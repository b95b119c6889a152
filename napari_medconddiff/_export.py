"""Export the (possibly hand-edited) consensus as a labels NIfTI plus a JSON sidecar, and where
the plugin proposes to put files.

The files match what ``medconddiff segment`` writes (:mod:`medconddiff.outputs`): ``<name>.nii.gz``
in the scan's original voxel order with its affine, and ``<name>.json``. Both writes are atomic;
whether an existing file may be replaced is decided by the caller (the widget asks the user).
Proposed folders are next to the scan's file, else the user's home: never inside the installed
packages (the bundled sample scan lives there, and a reinstall would delete what was saved).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from medconddiff.nifti import VolumeMeta, save_volume, smallest_label_dtype, write_json_atomic
from medconddiff.outputs import output_paths, segmentation_record, strip_nifti_suffix, with_nifti_suffix

__all__ = ["ExportSummary", "export_targets", "default_export_path", "default_finetune_path", "checkpoint_target",
           "inside_installed_package", "write_export"]

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
    """The scan's folder, unless the scan has none or it is inside the installed packages."""
    if not source:
        return None
    folder = Path(source).expanduser().parent
    return None if inside_installed_package(folder) else folder


def export_targets(path: str | Path) -> tuple[Path, Path]:
    """(labels NIfTI, JSON sidecar) for a chosen file name."""
    nifti = with_nifti_suffix(path)
    return nifti, output_paths(nifti)["sidecar"]


def default_export_path(scan_name: str, source: Optional[str]) -> Path:
    """``<scan>_seg.nii.gz`` next to the scan's file, else in the user's home."""
    stem = strip_nifti_suffix(Path(source)) if source else scan_name
    return (_user_folder(source) or Path.home()) / f"{stem}_seg.nii.gz"


def default_finetune_path(scan_name: str, source: Optional[str]) -> Path:
    """``<scan>_finetuned.safetensors`` next to the scan's file, else in ~/.medconddiff/models/."""
    stem = strip_nifti_suffix(Path(source)) if source else scan_name
    return (_user_folder(source) or MODELS_FOLDER.expanduser()) / f"{stem}_finetuned.safetensors"


def checkpoint_target(path: str | Path) -> Path:
    """A fine-tuned checkpoint's path (``.safetensors`` added), refused inside the installed packages."""
    path = Path(path).expanduser()
    if path.suffix.lower() != ".safetensors":
        path = path.with_name(path.name + ".safetensors")
    if inside_installed_package(path):
        raise ValueError(f"{path} is inside the installed package, which a reinstall replaces; "
                         "save the fine-tuned model next to your scan or in ~/.medconddiff/models/")
    return path


def write_export(path: str | Path, labels: np.ndarray, meta: VolumeMeta, summary: ExportSummary, *, source: str,
                 edited_slices: list[int], overwrite: bool) -> tuple[Path, Path]:
    """Write file-ordered ``labels`` with ``meta`` as NIfTI + sidecar; returns both paths."""
    nifti, sidecar = export_targets(path)
    labels = np.asarray(labels)
    if labels.size and labels.min() < 0:
        raise ValueError("labels must be non-negative to be saved as a label map")
    dtype = smallest_label_dtype(int(labels.max()) if labels.size else 0)
    save_volume(nifti, labels, meta, overwrite=overwrite, dtype=dtype)
    record = segmentation_record(summary, meta, labels, source=source, outputs={"labels": str(nifti.resolve())},
                                 edited=bool(edited_slices))
    record["edited_slices"] = [int(s) for s in edited_slices]
    if len(summary.runs) > 1:
        record["runs"] = summary.runs
    write_json_atomic(sidecar, record, overwrite=overwrite)
    return nifti, sidecar
