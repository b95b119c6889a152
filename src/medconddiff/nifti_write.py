"""Writing NIfTI volumes in the geometry of the scan they belong to (conventions: :mod:`medconddiff.nifti`).

A result written with the meta its scan was read with carries the scan's own qform and sform (codes
and matrices), so a viewer that trusts either form puts labels and scan in the same place. Writes are
atomic (:func:`medconddiff.atomic.atomic_write`).
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np

from .atomic import atomic_write
from .errors import UserInputError
from .geometry import affine_is_usable
from .volume_meta import ALIGNED_FORM_CODE, VolumeMeta, set_millimetre_units

__all__ = ["NIFTI_SUFFIXES", "VolumeWriteError", "save_volume"]

NIFTI_SUFFIXES = (".nii.gz", ".nii")


class VolumeWriteError(UserInputError):
    """An array cannot be written as asked (output name, values that do not fit, shape of another scan)."""


def save_volume(
    path: str | os.PathLike,
    array: np.ndarray,
    meta: VolumeMeta,
    *,
    overwrite: bool = False,
    dtype: np.dtype | str | type | None = None,
    intent: str | None = None,
) -> Path:
    """Write ``array`` (axis order ``(i, j, k)`` as load_volume returns) to a .nii or .nii.gz file.

    The file gets the geometry of ``meta``: where ``meta.header`` came with the file the meta was read
    from and ``meta.affine`` is still that file's, its qform and sform are kept as they were (codes
    and matrices: a qform cannot hold a shear, and a file may carry two different forms); otherwise
    ``meta.affine`` is written as sform and qform with the header's codes. Voxel sizes are
    ``meta.spacing``, spatial units mm (the meta's units). A meta whose affine is not known
    (``affine_known`` False) is written with qform and sform codes 0 (NIfTI's "unknown orientation"); a
    singular or non-finite affine is then not written as a form (the header's matrices stay as they are).
    ``dtype`` defaults to the array's own (bool -> uint8; int64 -> int32 when values fit); float arrays
    written as an integer dtype are rounded. The meta of a 2-D file squeezes an ``(X, Y, 1)`` array back to
    2-D (a 3-D file of one slice stays 3-D). ``intent`` sets the header's NIfTI intent (``"label"`` for a
    label map: viewers, and this package's napari reader, then open the file as labels whatever its name).

    Refuses to replace an existing file unless ``overwrite=True`` (``FileExistsError``). The
    write is atomic: a temporary file in the same folder is renamed over ``path`` only once it is
    complete, so a failure never leaves a partial file. Returns the written path.
    """
    path = Path(path)
    _check_nifti_suffix(path)
    out = _array_for_write(array, meta, dtype)
    header = _header_for_write(meta, out)
    if intent is not None:
        header.set_intent(intent)
    # affine=None: the header already holds the affine with the codes chosen above; given an affine,
    # nibabel would mark the sform "aligned" even where the orientation is unknown (codes 0).
    image = nib.Nifti1Image(out, None, header=header)
    suffix = ".nii.gz" if path.name.lower().endswith(".nii.gz") else ".nii"
    atomic_write(path, lambda tmp: nib.save(image, str(tmp)), overwrite=overwrite, suffix=suffix)
    return path


def _check_nifti_suffix(path: Path) -> None:
    if not path.name.lower().endswith(NIFTI_SUFFIXES):
        raise VolumeWriteError(f"{path}: output name must end with .nii or .nii.gz")


def _array_for_write(array: np.ndarray, meta: VolumeMeta, dtype) -> np.ndarray:
    """Check the shape against the meta, squeeze 2-D originals, cast to the output dtype."""
    array = np.asarray(array)
    if array.ndim == 2:
        array = array[..., np.newaxis]
    if array.ndim not in (3, 4):
        raise ValueError(f"expected a 2-D, 3-D or 4-D (volume + trailing axis) array, got shape {array.shape}")
    expected = meta.spatial_shape
    if expected is not None and tuple(array.shape[:3]) != expected:
        raise VolumeWriteError(f"array shape {array.shape} does not match the volume shape {expected} of its "
                               "metadata")
    if _file_ndim(meta) == 2 and array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    out_dtype = _output_dtype(array, dtype)
    if out_dtype.kind in "iu" and array.dtype.kind == "f":
        if not np.isfinite(array).all():
            raise VolumeWriteError(f"cannot write NaN/Inf voxels as {out_dtype}")
        array = np.rint(array)
    if out_dtype.kind in "iu" and array.size:
        info = np.iinfo(out_dtype)
        if array.min() < info.min or array.max() > info.max:
            raise VolumeWriteError(f"values {array.min()}..{array.max()} do not fit in {out_dtype}")
    return np.ascontiguousarray(array, dtype=out_dtype)


def _file_ndim(meta: VolumeMeta) -> int:
    """The number of axes the scan's own file had: a 2-D image stored as a 3-D file of one slice (X, Y, 1)
    is written back as one (keeping its slice thickness and position for other tools), a 2-D file as 2-D."""
    if meta.header is not None:
        return len(meta.header.get_data_shape())
    return meta.original_ndim


def _output_dtype(array: np.ndarray, dtype) -> np.dtype:
    if dtype is not None:
        return np.dtype(dtype)
    if array.dtype == np.bool_:
        return np.dtype(np.uint8)
    if array.dtype in (np.dtype(np.int64), np.dtype(np.uint64)):
        # nibabel refuses 64-bit integers by default because many tools cannot read them.
        fits_int32 = array.size == 0 or (
            array.min() >= np.iinfo(np.int32).min and array.max() <= np.iinfo(np.int32).max
        )
        return np.dtype(np.int32) if fits_int32 else array.dtype
    return array.dtype


def _keeps_source_forms(meta: VolumeMeta) -> bool:
    """Whether the meta still describes its file: a header with a form, whose best affine is the meta's."""
    header = meta.header
    if header is None or not meta.affine_known:
        return False
    if int(header["sform_code"]) == int(header["qform_code"]) == 0:
        return False
    return bool(np.allclose(header.get_best_affine(), meta.affine, rtol=0, atol=1e-6))


def _header_for_write(meta: VolumeMeta, out: np.ndarray) -> nib.Nifti1Header:
    """Header with the meta's geometry (the source's own forms where it has them), spacing and units."""
    keep_forms = _keeps_source_forms(meta)
    if meta.header is not None:
        header = nib.Nifti1Header.from_header(meta.header)
        header.extensions.clear()    # never carried into a file made from the scan: they may hold patient data
        sform_code = int(meta.header["sform_code"])
        qform_code = int(meta.header["qform_code"])
        if sform_code == qform_code == 0:   # a known affine behind a header that did not carry it
            sform_code = ALIGNED_FORM_CODE
    else:
        header = nib.Nifti1Header()
        header.set_xyzt_units("mm")
        sform_code = qform_code = ALIGNED_FORM_CODE
    if not meta.affine_known:
        # Codes 0 are NIfTI's "orientation unknown": never invent an orientation the scan did not have.
        sform_code = qform_code = 0
    header.set_data_shape(out.shape)
    header.set_data_dtype(out.dtype)
    # An inherited display window (cal_min/max) would be wrong for new content such as labels.
    # (Inherited scl_slope/inter need no reset: nibabel recomputes them from the data on save.)
    header["cal_min"] = header["cal_max"] = 0
    if not keep_forms:
        _set_forms(header, meta.affine, sform_code, qform_code)
    # The meta's affine and spacing are in millimetres whatever units its file had (a file in metres or
    # microns is read in mm), so the header must say mm for the result to describe the scan's place.
    set_millimetre_units(header)
    # set_qform derives pixdim from the affine; the meta's spacing is what must be written.
    # A 4th (step/time) axis gets unit spacing. (A kept qform is untouched by this: the meta's spacing
    # is the header's own zooms.)
    header.set_zooms(tuple(meta.spacing[: min(out.ndim, 3)]) + (1.0,) * max(0, out.ndim - 3))
    return header


def _set_forms(header: nib.Nifti1Header, affine: np.ndarray, sform_code: int, qform_code: int) -> None:
    """Write ``affine`` as sform and qform with these codes. A singular or non-finite affine (written with
    codes 0) cannot be stored as a qform (a rotation and voxel sizes) nor sensibly as a sform: the header's
    form matrices are left as they are and only the codes are set, as NIfTI's "orientation unknown"."""
    if not affine_is_usable(affine):
        header["sform_code"] = sform_code
        header["qform_code"] = qform_code
        return
    header.set_sform(affine, code=sform_code)
    header.set_qform(affine, code=qform_code)
