"""Reading and writing NIfTI volumes: the public face of :mod:`medconddiff.volume_meta` (where voxels lie),
:mod:`medconddiff.nifti_read` and :mod:`medconddiff.nifti_write`, plus the bundled sample scan.

Conventions shared by every function here:

* **Axis order.** Arrays come back in nibabel's voxel-index order ``(i, j, k)``: exactly the
  array axes stored in the file. Nothing is reoriented or transposed, so ``meta.affine`` maps
  ``(i, j, k, 1)`` of the returned array to world (scanner) millimetres unchanged.
* **Spacing.** ``meta.spacing[n]`` is the voxel size along array axis ``n`` in millimetres,
  taken from the header's zooms (pixdim). A header whose spatial unit (``xyzt_units``) is metres or
  microns is converted to mm when read (zooms, qform and sform; ``meta.header`` is that converted
  copy), and :func:`save_volume` always writes mm, so a result lies where its scan lies.
  ``unknown`` units are read as mm, as medical NIfTI files mean them.
* **Unusable affines.** A singular affine, or one with NaN/Inf (then replaced by the voxel sizes on
  its diagonal), gives ``meta.affine_known == False``: processed in voxel order, written with codes 0.
* **2-D images** (``(X, Y)`` or ``(X, Y, 1)``) come back 3-D with a singleton last axis and
  ``meta.original_ndim == 2``; :func:`save_volume` squeezes them back to 2-D.
* Every read failure that lies in the file (missing file, not a NIfTI, truncated or corrupt data,
  a .nii.gz whose gzip CRC or length is wrong, empty image, a header describing more data than the
  file holds or a negative size) raises :class:`VolumeReadError`
  with a one-line message naming the file and the problem; running out of memory raises MemoryError.
* Writing keeps the scan's qform and sform and is atomic; the JSON sidecar writer,
  :func:`write_json_atomic`, lives with the other atomic writes in :mod:`medconddiff.atomic`.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib  # noqa: F401  (tests replace nib.save through this module)

from .atomic import write_json_atomic
from .nifti_read import (VolumeReadError, load_channels, load_labels, load_volume, read_meta, sanitize_nonfinite,
                         smallest_label_dtype)
from .nifti_write import NIFTI_SUFFIXES, VolumeWriteError, save_volume
from .volume_meta import VolumeMeta

__all__ = [
    "VolumeMeta",
    "VolumeReadError",
    "VolumeWriteError",
    "load_volume",
    "load_labels",
    "load_channels",
    "read_meta",
    "save_volume",
    "sanitize_nonfinite",
    "smallest_label_dtype",
    "write_json_atomic",
    "sample_scan_path",
    "sample_label_path",
    "NIFTI_SUFFIXES",
]

_DATA_DIR = Path(__file__).resolve().parent / "data"
_SAMPLE_SCAN = "liver117_image.nii.gz"
_SAMPLE_LABEL = "liver117_label.nii.gz"


def sample_scan_path() -> Path:
    """The bundled sample CT: liver117_image.nii.gz (LiTS case 117 crop, int16 HU, 128^3, 1 mm)."""
    return _bundled(_SAMPLE_SCAN)


def sample_label_path() -> Path:
    """Reference labels of the sample scan: 0 background, 1 liver, 2 tumour (uint8)."""
    return _bundled(_SAMPLE_LABEL)


def _bundled(name: str) -> Path:
    path = _DATA_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"bundled sample {name} is missing from {_DATA_DIR}; reinstall medconddiff")
    return path
