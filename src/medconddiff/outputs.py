"""What a segmentation writes: file names, class volumes, the JSON sidecar, the per-step volume.

Shared by the ``segment`` command and the napari plugin's Export, so both write the same files.
Arrays are in the scan's file voxel order; volumes in millilitres from ``meta.spacing`` (mm).
The labels file may be NIfTI or, for a scan read from DICOM, a DICOM SEG (``seg.dcm``): its
uncertainty and trajectory volumes are NIfTI either way, and its sidecar is ``seg.json``. A
sidecar records the DICOM series a scan came from by its UIDs, number and description, never by a
patient attribute.

**Records name files, never folders** (:func:`recorded_name`): exported DICOM is usually filed in
folders named after the patient (``DOE_JOHN_12345/CT_ABDOMEN/``), and converters carry those names
into their paths. So a sidecar names its inputs by file name, or a DICOM series by number and
description, and its outputs by file name (they lie next to it); a fine-tuned checkpoint and an
``evaluate`` report name their scans the same way.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from .consensus import skip_first_note
from .nifti import NIFTI_SUFFIXES, VolumeMeta


def strip_nifti_suffix(path: Path | str) -> str:
    """File name without .nii/.nii.gz (``scan.nii.gz`` → ``scan``)."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


def with_nifti_suffix(path: str | Path) -> Path:
    path = Path(path)
    return path if path.name.lower().endswith(NIFTI_SUFFIXES) else path.with_name(path.name + ".nii.gz")


def recorded_name(path: Optional[str | Path]) -> Optional[str]:
    """How a record names a file: its name, without the folders above it (see the module doc)."""
    return None if path is None else Path(path).name


def output_paths(output: Path) -> dict[str, Path]:
    """The files of one segmentation: labels (``output``), uncertainty, trajectory and the sidecar."""
    output = Path(output)
    stem = strip_nifti_suffix(output)
    return {
        "labels": output,
        "uncertainty": output.with_name(f"{stem}_uncertainty.nii.gz"),
        "trajectory": output.with_name(f"{stem}_trajectory.nii.gz"),
        "sidecar": output.with_name(f"{stem}.json"),
    }


#: Ends the name of the hidden marker beside a labels file whose outputs are being written (see pending_marker).
PENDING_SUFFIX = ".medconddiff-pending"


def pending_marker(labels: Path) -> Path:
    """The hidden file beside ``labels`` while its outputs are written: ``.seg.nii.gz.medconddiff-pending``.

    It is written before the first output and removed after the sidecar, so it is this program's own record
    of a run that stopped half-way: ``--skip-existing`` redoes such a scan, and takes a labels file without a
    sidecar and without this marker for someone else's file, which it never replaces. It holds no patient data.
    """
    labels = Path(labels)
    return labels.with_name(f".{labels.name}{PENDING_SUFFIX}")


def default_output(scan: Path, folder: Optional[Path] = None) -> Path:
    """``<scan>_seg.nii.gz`` in ``folder`` (default: next to the scan)."""
    return (folder or scan.parent) / f"{strip_nifti_suffix(scan)}_seg.nii.gz"


def folder_holding(path: Path) -> Path:
    """The folder that holds ``path`` (a file, or a series folder: ``.`` gives the folder above), written as
    the path was: a relative path gives a relative folder, so the console does not spell out the folders
    above it (often named after the patient), and links are not followed (outputs go where the user looked)."""
    holder = Path(os.path.abspath(path)).parent
    return holder if Path(path).is_absolute() else Path(os.path.relpath(holder))


def class_volumes_ml(labels: np.ndarray, spacing: tuple[float, ...], class_names: tuple[str, ...]) -> dict:
    """Voxels and millilitres per class (labels beyond the class list are counted under their value)."""
    voxel_ml = float(np.prod(spacing[:3])) / 1000.0
    labels = np.asarray(labels)
    top = int(labels.max()) if labels.size else 0
    if top < 16:
        # One comparison per class is 4× faster than bincount's histogram at 512² × 300 (napari
        # recounts the consensus as the user paints); background is what the classes leave.
        counts = np.zeros(max(top + 1, len(class_names)), np.int64)
        counts[1:top + 1] = [np.count_nonzero(labels == k) for k in range(1, top + 1)]
        counts[0] = labels.size - counts[1:].sum()
    else:
        counts = np.bincount(labels.ravel(), minlength=len(class_names))
    names = list(class_names) + [f"label_{k}" for k in range(len(class_names), len(counts))]
    return {name: {"voxels": int(counts[i]), "ml": round(counts[i] * voxel_ml, 3)}
            for i, name in enumerate(names) if i < len(class_names) or counts[i]}


def trajectory_volume(result: Any) -> np.ndarray:
    """Every step's x̂0 labels on the scan's grid, in file order with the step axis last: (i, j, k, S)."""
    steps = result.trajectory.shape[0]
    out = np.zeros(result.labels.shape + (steps,), np.uint8)
    view = result.geometry.slice_view(out)   # (n, H, W, S)
    for step in range(steps):
        view[result.slice_indices, ..., step] = result.step_labels_on_scan(step)
    return out


def segmentation_record(result: Any, meta: VolumeMeta, labels: np.ndarray, *, inputs: Sequence[str | Path],
                        outputs: dict[str, str | Path], scan_name: str = "", seconds: Optional[float] = None,
                        edited: Optional[bool] = None, dicom_source: Any = None) -> dict:
    """The JSON sidecar of a segmentation: inputs, outputs, provenance, geometry, class volumes.

    ``inputs`` are the scan's files (one per channel); a scan with none (an array in napari) is
    recorded by ``scan_name``. ``dicom_source`` is the :class:`medconddiff.dicom_series.DicomSource`
    of a scan read from DICOM, recorded as ``"dicom_source"`` (series and instance UIDs, no patient
    attribute), and the input is then the series by number and description. Inputs, outputs and the
    checkpoint are named by file name only.
    """
    done = result.slice_indices[result.completed]
    record: dict[str, Any] = {
        "input": (dicom_source.name if dicom_source is not None
                  else ", ".join(map(recorded_name, inputs)) if inputs else scan_name),
        "outputs": {kind: recorded_name(path) for kind, path in outputs.items()},
        "input_shape": list(labels.shape),
        "slices": [int(i) for i in done],
        # Steps each of those slices took (fewer than sampling.steps where adaptive sampling stopped it).
        "steps_used": [int(n) for n in result.steps_used[result.completed]],
        "complete": bool(result.is_complete),
        "class_names": list(result.class_names),
        "class_volumes": class_volumes_ml(labels, meta.spacing, result.class_names),
        "affine": np.asarray(meta.affine).tolist(),
        "affine_known": bool(meta.affine_known),
    }
    if dicom_source is not None:
        record["dicom_source"] = dicom_source.to_dict()
    if not meta.affine_known:
        record["affine_note"] = meta.geometry_note or "the scan's affine is unknown"
    if seconds is not None:
        record["seconds"] = round(float(seconds), 3)
    if edited is not None:
        record["edited_in_napari"] = bool(edited)
    record.update(result.provenance)
    sampling = record.get("sampling")
    if isinstance(sampling, dict):      # the skip recorded may ask for more than some slices could leave out
        note = skip_first_note(int(sampling.get("skip_first", 0)), str(sampling.get("consensus")),
                               np.asarray(record["steps_used"]))
        if note:
            record["skip_first_note"] = note
    # The model by file name and SHA-256: a fine-tuned model is saved next to the scan by default.
    if "checkpoint" in record:
        record["checkpoint"] = recorded_name(record["checkpoint"])
    return record


def outputs_recorded_in(folder: Path) -> set[str]:
    """Names of the files this package's sidecars in ``folder`` list as their outputs (labels, uncertainty,
    trajectory): results of an earlier run written beside the scans, not scans to segment."""
    import json

    names: set[str] = set()
    for sidecar in sorted(folder.glob("*.json")):
        try:
            record = json.loads(sidecar.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and "medconddiff_version" in record and isinstance(record.get("outputs"), dict):
            names.update(str(name) for name in record["outputs"].values())
    return names

