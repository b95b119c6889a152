"""Export the (possibly hand-edited) consensus layer as a labels NIfTI plus a JSON sidecar.

The files match what ``medconddiff segment`` writes: ``<name>.nii.gz`` with the scan's affine and
``<name>.json`` with the provenance needed to reproduce the segmentation. Both writes are atomic;
whether an existing file may be replaced is decided by the caller (the widget asks the user).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

import numpy as np

from medconddiff.commands.segment import class_volumes_ml, output_paths, strip_nifti_suffix
from medconddiff.nifti import NIFTI_SUFFIXES, save_volume, smallest_label_dtype, write_json_atomic

from ._layers import layer_to_volume

__all__ = ["export_targets", "default_export_path", "write_export"]


def with_nifti_suffix(path: str | Path) -> Path:
    path = Path(path)
    return path if path.name.lower().endswith(NIFTI_SUFFIXES) else path.with_name(path.name + ".nii.gz")


def export_targets(path: str | Path) -> tuple[Path, Path]:
    """(labels NIfTI, JSON sidecar) for a chosen file name."""
    nifti = with_nifti_suffix(path)
    return nifti, output_paths(nifti)["sidecar"]


def default_export_path(scan_name: str, source: Optional[str]) -> Path:
    """``<scan>_seg.nii.gz`` next to the scan's file (or in the working folder)."""
    folder = Path(source).parent if source else Path.cwd()
    stem = strip_nifti_suffix(Path(source)) if source else scan_name
    return folder / f"{stem}_seg.nii.gz"


def write_export(path: str | Path, labels_layer: Any, result: Any, scan_name: str, *, overwrite: bool
                 ) -> tuple[Path, Path]:
    """Write ``labels_layer`` (layer data, metadata, scale) as NIfTI + sidecar; returns both paths."""
    nifti, sidecar = export_targets(path)
    labels, meta = layer_to_volume(labels_layer.data, labels_layer.metadata, scale=labels_layer.scale)
    labels = np.asarray(labels)
    if labels.size and labels.min() < 0:
        raise ValueError("labels must be non-negative to be saved as a label map")
    dtype = smallest_label_dtype(int(labels.max()) if labels.size else 0)
    save_volume(nifti, labels, meta, overwrite=overwrite, dtype=dtype)
    done = np.flatnonzero(result.completed)
    provenance = {**result.provenance, "sampling": dataclasses.asdict(result.sampling)}
    record = {
        "input": meta.source or scan_name,
        "outputs": {"labels": str(nifti.resolve())},
        "input_shape": list(labels.shape),
        "slices": [int(i) for i in result.slice_indices[done]],
        "complete": bool(result.is_complete),
        "edited_in_napari": not np.array_equal(labels, result.labels),
        "class_names": list(result.class_names),
        "class_volumes": class_volumes_ml(labels, meta.spacing, result.class_names),
        "affine": meta.affine.tolist(),
        **provenance,
    }
    write_json_atomic(sidecar, record, overwrite=overwrite)
    return nifti, sidecar
