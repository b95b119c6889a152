"""Reading and writing NIfTI volumes; the only module of medconddiff that imports nibabel.

Conventions shared by every function here:

* **Axis order.** Arrays come back in nibabel's voxel-index order ``(i, j, k)``: exactly the
  array axes stored in the file. Nothing is reoriented or transposed, so ``meta.affine`` maps
  ``(i, j, k, 1)`` of the returned array to world (scanner) millimetres unchanged.
* **Spacing.** ``meta.spacing[n]`` is the voxel size along array axis ``n`` in millimetres,
  taken from the header's zooms (pixdim). The header's ``xyzt_units`` is not used to rescale:
  medical NIfTI files are written in millimetres (``unknown`` units are read as mm).
* **2-D images** (``(X, Y)`` or ``(X, Y, 1)``) come back 3-D with a singleton last axis and
  ``meta.original_ndim == 2``; :func:`save_volume` squeezes them back to 2-D.
* Every read failure (missing file, not a NIfTI, truncated or corrupt data, empty image) raises
  :class:`VolumeReadError` with a one-line message naming the file and the problem.
"""

from __future__ import annotations

import gzip
import json
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from .atomic import atomic_write
from .geometry import affine_is_usable

__all__ = [
    "VolumeMeta",
    "VolumeReadError",
    "load_volume",
    "load_labels",
    "load_channels",
    "save_volume",
    "sanitize_nonfinite",
    "write_json_atomic",
    "sample_scan_path",
    "sample_label_path",
    "NIFTI_SUFFIXES",
]

NIFTI_SUFFIXES = (".nii.gz", ".nii")

_DATA_DIR = Path(__file__).resolve().parent / "data"
_SAMPLE_SCAN = "liver117_image.nii.gz"
_SAMPLE_LABEL = "liver117_label.nii.gz"

# Errors nibabel, gzip and numpy raise on unreadable, truncated or corrupt files. They are
# wrapped into VolumeReadError so callers (CLI, napari reader) need to catch only one type.
_READ_ERRORS = (
    ImageFileError,
    HeaderDataError,
    OSError,  # includes gzip.BadGzipFile, PermissionError
    EOFError,  # truncated gzip stream
    zlib.error,
    struct.error,
    ValueError,  # e.g. memmap of a truncated .nii, bad header fields
    TypeError,  # data types that cannot become float (RGB structs)
    MemoryError,  # header claiming an absurd shape
)

# NIfTI form codes (see nibabel.nifti1.xform_codes): 1 = scanner, 2 = aligned.
_ALIGNED_FORM_CODE = 2


class VolumeReadError(ValueError):
    """A file could not be read as a volume; the message names the file and the problem."""


@dataclass
class VolumeMeta:
    """Where a volume's voxels lie in the world, and where the volume came from.

    Attributes
    ----------
    affine
        4x4 float64 voxel-to-world matrix for array indices ``(i, j, k)``, in millimetres.
    spacing
        Voxel size per array axis in millimetres, in array-axis order (3 values for the
        3-D arrays this module returns).
    header
        The NIfTI header read from the file, kept so that writing preserves its form codes and
        units; ``None`` for arrays that did not come from a file.
    source
        Path of the file the volume was read from, or ``None``.
    orientation
        nibabel axis codes of the affine, e.g. ``('R', 'A', 'S')``; ``'?'`` for an axis whose
        direction the affine does not define. Derived from ``affine`` when not given.
    original_ndim
        Number of spatial dimensions in the file: 2 for 2-D images (returned with a singleton
        last axis), 3 otherwise.
    affine_known
        False when the affine says nothing reliable about anatomy: a NIfTI whose qform and sform
        codes are both 0, a singular or non-finite affine, or an array from nowhere. Such scans
        are processed in voxel order (see :mod:`medconddiff.geometry`).
    geometry_note
        Why ``affine_known`` is False (shown to the user), or where an assumed affine came from.
    """

    affine: np.ndarray
    spacing: tuple[float, ...]
    header: nib.Nifti1Header | None = None
    source: str | None = None
    orientation: tuple[str, ...] | None = None
    original_ndim: int = 3
    affine_known: bool = True
    geometry_note: str = ""

    def __post_init__(self) -> None:
        self.affine = np.array(self.affine, dtype=np.float64)
        if self.affine.shape != (4, 4):
            raise ValueError(f"affine must be 4x4, got shape {self.affine.shape}")
        if self.affine_known and not affine_is_usable(self.affine):
            self.affine_known = False
            self.geometry_note = self.geometry_note or "the affine is degenerate (singular or not finite)"
        self.spacing = tuple(float(s) for s in self.spacing)
        if self.orientation is None:
            self.orientation = _axis_codes(self.affine)
        else:
            self.orientation = tuple(str(c) for c in self.orientation)
        self.original_ndim = int(self.original_ndim)
        if self.original_ndim not in (2, 3):
            raise ValueError(f"original_ndim must be 2 or 3, got {self.original_ndim}")

    @property
    def spatial_shape(self) -> tuple[int, ...] | None:
        """3-D shape of the array this meta describes (as returned by load_volume), if known.

        Known only when a header is attached; arrays built from nothing have no fixed shape.
        """
        if self.header is None:
            return None
        return _spatial_shape_3d(self.header.get_data_shape())

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe description (affine as nested lists); :meth:`from_dict` inverts it.

        Of the header, only what a written file needs survives: the spatial shape, the
        qform/sform codes and the units.
        """
        header_dict = None
        if self.header is not None:
            space_unit, time_unit = self.header.get_xyzt_units()
            header_dict = {
                "shape": list(self.spatial_shape),
                "qform_code": int(self.header["qform_code"]),
                "sform_code": int(self.header["sform_code"]),
                "xyzt_units": [space_unit, time_unit],
            }
        return {
            "affine": self.affine.tolist(),
            "spacing": list(self.spacing),
            "orientation": list(self.orientation),
            "source": self.source,
            "original_ndim": self.original_ndim,
            "affine_known": self.affine_known,
            "geometry_note": self.geometry_note,
            "header": header_dict,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VolumeMeta:
        """Rebuild a meta written by :meth:`to_dict` (a minimal header is rebuilt if one was kept)."""
        affine = np.array(d["affine"], dtype=np.float64)
        spacing = tuple(float(s) for s in d["spacing"])
        header_dict = d.get("header")
        header = None
        if header_dict is not None:
            header = _minimal_header(affine, spacing, header_dict)
        return cls(
            affine=affine,
            spacing=spacing,
            header=header,
            source=d.get("source"),
            orientation=tuple(d["orientation"]) if d.get("orientation") else None,
            original_ndim=int(d.get("original_ndim", 3)),
            affine_known=bool(d.get("affine_known", True)),
            geometry_note=str(d.get("geometry_note", "")),
        )

    @classmethod
    def identity(cls, shape_ndim: int = 3, spacing: tuple[float, ...] | None = None, *,
                 known: bool = False, note: str = "") -> VolumeMeta:
        """Meta for an array that came from nowhere: axes aligned with the world, origin at 0.

        ``spacing`` (mm per array axis, ``shape_ndim`` values; default 1 mm) goes on the
        affine's diagonal, so the affine is the identity only for 1 mm voxels. A 2-D meta gets a
        1 mm third axis, matching the singleton last axis load_volume gives 2-D images. Unless
        ``known``, the axes are marked as not anatomically known (``affine_known=False``).
        """
        if shape_ndim not in (2, 3):
            raise ValueError(f"shape_ndim must be 2 or 3, got {shape_ndim}")
        if spacing is None:
            spacing = (1.0,) * shape_ndim
        spacing = tuple(float(s) for s in spacing)
        if len(spacing) != shape_ndim:
            raise ValueError(f"spacing needs {shape_ndim} values, got {len(spacing)}")
        if any(not np.isfinite(s) or s <= 0 for s in spacing):
            raise ValueError(f"spacing must be positive, got {spacing}")
        spacing_3d = spacing + (1.0,) * (3 - shape_ndim)
        affine = np.diag(spacing_3d + (1.0,))
        note = note or ("" if known else "the array came without a NIfTI affine")
        return cls(affine=affine, spacing=spacing_3d, original_ndim=shape_ndim, affine_known=known,
                   geometry_note=note)


# --------------------------------------------------------------------------------------------
# reading


def load_volume(path: str | os.PathLike, *, channel: int | None = None) -> tuple[np.ndarray, VolumeMeta]:
    """Read a NIfTI file as a float32 volume.

    Returns ``(array, meta)``. ``array`` is float32 (scl_slope/inter applied) in nibabel's
    voxel-index order ``(i, j, k)`` = the file's array axes, with no reorientation; ``meta.spacing``
    holds the voxel size per array axis in mm from the header zooms, ``meta.affine`` the file's
    best affine (sform, else qform).

    * 2-D images (``(X, Y)`` or ``(X, Y, 1)``) come back as ``(X, Y, 1)`` with
      ``meta.original_ndim == 2``.
    * 4-D images ``(X, Y, Z, C)`` need ``channel`` to pick one volume along axis 3 unless that
      axis has size 1; otherwise :class:`VolumeReadError` names the axis and its size.
    * NaN/Inf voxels are kept (see :func:`sanitize_nonfinite`), but a volume with no finite voxel
      at all raises :class:`VolumeReadError`.
    """
    path = Path(path)
    data, meta = _read_nifti(path, channel)
    try:
        volume = np.asarray(data, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise VolumeReadError(f"{path}: voxel type {data.dtype} cannot be read as numbers ({exc})") from exc
    if not np.isfinite(volume).any():
        raise VolumeReadError(f"{path}: every voxel is NaN or infinite")
    return volume, meta


def load_labels(path: str | os.PathLike) -> tuple[np.ndarray, VolumeMeta]:
    """Read a NIfTI label map as integers (uint8 if labels fit, else uint16, else int32).

    Axis order, spacing and 2-D handling are those of :func:`load_volume`. Raises
    :class:`VolumeReadError` if a voxel is not finite, not a whole number, or negative.
    """
    path = Path(path)
    data, meta = _read_nifti(path, channel=None)
    if data.dtype.kind not in "biu":
        if data.dtype.kind != "f":
            raise VolumeReadError(f"{path}: voxel type {data.dtype} is not a label type")
        if not np.isfinite(data).all():
            raise VolumeReadError(f"{path}: label map contains NaN or infinite voxels")
        if not np.array_equal(data, np.round(data)):
            raise VolumeReadError(f"{path}: label map contains non-integer values")
    if data.size and data.min() < 0:
        raise VolumeReadError(f"{path}: label map contains negative values (min {data.min()})")
    try:
        label_dtype = smallest_label_dtype(int(data.max()))
    except ValueError as exc:
        raise VolumeReadError(f"{path}: {exc}") from exc
    return data.astype(label_dtype, copy=False), meta


def load_channels(paths: Sequence[str | os.PathLike]) -> tuple[np.ndarray, VolumeMeta]:
    """Read the channels of one scan as a float32 ``(i, j, k, C)`` array, channels last.

    * One path: a 3-D file gives ``C = 1``; a 4-D file ``(X, Y, Z, C)`` gives its ``C`` volumes
      along axis 3 (a Decathlon multi-sequence scan).
    * Several paths (one file per channel, nnU-Net style): each must be 3-D, and all must share
      one shape and one affine (within 1e-3 mm); they are stacked in the order given.

    Axis order, spacing and scaling are those of :func:`load_volume`; ``meta`` is the first file's.
    Raises :class:`VolumeReadError` naming the file(s) and the problem, also when a channel has no
    finite voxel.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("load_channels needs at least one file")
    first, meta = _read_nifti(paths[0], channel=0)
    file_shape = _drop_trailing_singletons(meta.header.get_data_shape())
    if len(paths) == 1:
        sources = [(paths[0], c) for c in range(file_shape[3] if len(file_shape) == 4 else 1)]
    else:
        sources = [(path, 0) for path in paths]
    out = np.empty(first.shape + (len(sources),), dtype=np.float32)
    for index, (path, channel) in enumerate(sources):
        # Every channel goes through _read_nifti so that each read failure is worded the same way;
        # a 4-D .nii.gz is thereby decompressed once per channel, which is cheap next to its use.
        data, channel_meta = (first, meta) if index == 0 else _read_nifti(path, channel)
        where = f"{path}: channel {channel}" if len(paths) == 1 and len(sources) > 1 else str(path)
        if len(paths) > 1:
            shape = _drop_trailing_singletons(channel_meta.header.get_data_shape())
            if len(shape) == 4:
                raise VolumeReadError(f"{path}: 4-D image {shape}; with one file per channel each file "
                                      "must be a 3-D volume")
            if data.shape != first.shape:
                raise VolumeReadError(f"{path} has shape {data.shape} but {paths[0]} has {first.shape}; "
                                      "the channels of a scan must share one grid")
            difference = float(np.abs(channel_meta.affine - meta.affine).max())
            if difference > 1e-3:
                raise VolumeReadError(f"{path} and {paths[0]} have affines that differ by up to "
                                      f"{difference:.4g} mm; the channels of a scan must share one grid")
        try:
            out[..., index] = np.asarray(data, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise VolumeReadError(f"{where}: voxel type {data.dtype} cannot be read as numbers ({exc})") from exc
        if not np.isfinite(out[..., index]).any():
            raise VolumeReadError(f"{where}: every voxel is NaN or infinite")
    return out, meta


def smallest_label_dtype(max_label: int) -> np.dtype:
    """uint8 / uint16 / int32: the smallest type that holds labels 0..max_label."""
    if max_label <= np.iinfo(np.uint8).max:
        return np.dtype(np.uint8)
    if max_label <= np.iinfo(np.uint16).max:
        return np.dtype(np.uint16)
    if max_label <= np.iinfo(np.int32).max:
        return np.dtype(np.int32)
    raise ValueError(f"label {max_label} does not fit in int32")


def sanitize_nonfinite(array: np.ndarray) -> tuple[np.ndarray, int]:
    """Replace NaN and +/-Inf voxels with the smallest finite value (0 if none is finite).

    Returns ``(array, n_bad)``. The input is returned untouched when every voxel is finite (and
    always for integer arrays); otherwise a copy is returned, so the caller can warn about
    ``n_bad`` voxels. The minimum is used because, in CT and MR, it is background (air).
    """
    array = np.asarray(array)
    if array.dtype.kind not in "fc":
        return array, 0
    finite = np.isfinite(array)
    n_bad = int(finite.size - np.count_nonzero(finite))
    if n_bad == 0:
        return array, 0
    fill = array[finite].min() if n_bad < finite.size else 0
    cleaned = array.copy()
    cleaned[~finite] = fill
    return cleaned, n_bad


def _read_nifti(path: Path, channel: int | None) -> tuple[np.ndarray, VolumeMeta]:
    """Read data (as stored, scaling applied) and meta; returns 3-D data (X, Y, Z)."""
    _check_readable_file(path)
    try:
        img = nib.load(str(path))
        if not isinstance(img, (nib.Nifti1Image, nib.Nifti1Pair)):
            raise VolumeReadError(f"{path}: not a NIfTI file (nibabel read it as {type(img).__name__})")
        shape = _drop_trailing_singletons(img.shape)
        _check_shape(path, shape)
        # Reading the data here, inside the try, is what detects truncated or corrupt gzip
        # streams: nibabel reads lazily and would otherwise fail much later.
        data = np.asanyarray(_select_volume(path, img, shape, channel))
    except VolumeReadError:
        raise
    except _READ_ERRORS as exc:
        raise VolumeReadError(f"{path}: {_read_problem(exc)} ({_one_line(exc)})") from exc
    # (X, Y, 1) files and 2-D slices of (X, Y, 1, C) files are 2-D images.
    original_ndim = 2 if len(shape) == 2 or shape[2] == 1 else 3
    data = data.reshape(_spatial_shape_3d(data.shape))
    has_orientation = int(img.header["qform_code"]) > 0 or int(img.header["sform_code"]) > 0
    meta = VolumeMeta(
        affine=img.affine,
        spacing=_spacing_from_header(img.header, img.affine),
        header=img.header,
        source=str(path),
        original_ndim=original_ndim,
        affine_known=has_orientation,
        geometry_note="" if has_orientation else f"{path.name} has no orientation (qform and sform codes are 0)",
    )
    return data, meta


def _check_readable_file(path: Path) -> None:
    if not path.exists():
        raise VolumeReadError(f"{path}: file does not exist")
    if path.is_dir():
        raise VolumeReadError(f"{path}: is a directory, expected a .nii or .nii.gz file")
    if path.stat().st_size == 0:
        raise VolumeReadError(f"{path}: file is empty")


def _check_shape(path: Path, shape: tuple[int, ...]) -> None:
    if 0 in shape or len(shape) == 0:
        raise VolumeReadError(f"{path}: image contains no voxels (shape {shape})")
    if len(shape) == 1:
        raise VolumeReadError(f"{path}: 1-D data of shape {shape}; expected a 2-D or 3-D image")
    if len(shape) > 4:
        raise VolumeReadError(f"{path}: {len(shape)}-D data of shape {shape}; at most 4-D is supported")


def _select_volume(path: Path, img: nib.Nifti1Image, shape: tuple[int, ...], channel: int | None):
    """Pick the requested volume of a 4-D image; slicing the proxy reads only what is needed."""
    if len(shape) < 4:
        if channel not in (None, 0):
            raise VolumeReadError(f"{path}: channel={channel} given, but the image is {len(shape)}-D with one channel")
        return np.asanyarray(img.dataobj).reshape(shape)
    n_channels = shape[3]
    if channel is None:
        raise VolumeReadError(
            f"{path}: 4-D image {shape} has {n_channels} volumes along axis 3 (time/channel); "
            f"choose one with channel=0..{n_channels - 1}"
        )
    if not 0 <= channel < n_channels:
        raise VolumeReadError(f"{path}: channel={channel} is out of range; axis 3 has size {n_channels}")
    index = (slice(None),) * 3 + (channel,) + (0,) * (len(img.shape) - 4)
    return img.dataobj[index]


def _drop_trailing_singletons(shape: tuple[int, ...]) -> tuple[int, ...]:
    """(X, Y, Z, 1, 1) -> (X, Y, Z); spatial axes (first three) are never dropped."""
    shape = tuple(int(s) for s in shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def _spatial_shape_3d(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The 3-D shape load_volume returns for a file of this shape: 2-D gets a last axis of 1."""
    shape = tuple(int(s) for s in shape)
    return (shape + (1, 1, 1))[:3]


def _spacing_from_header(header: nib.Nifti1Header, affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm per array axis; falls back to the affine where pixdim is unusable (0/NaN)."""
    zooms = [abs(float(z)) for z in header.get_zooms()[:3]]
    affine_sizes = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    spacing = []
    for axis in range(3):
        zoom = zooms[axis] if axis < len(zooms) else 0.0
        if not np.isfinite(zoom) or zoom <= 0:
            zoom = float(affine_sizes[axis]) if affine_sizes[axis] > 0 else 1.0
        spacing.append(zoom)
    return tuple(spacing)


def _axis_codes(affine: np.ndarray) -> tuple[str, ...]:
    return tuple(code if code is not None else "?" for code in nib.aff2axcodes(affine))


def _read_problem(exc: BaseException) -> str:
    """Plain words for what a read exception means to the user."""
    text = str(exc).lower()
    # nibabel reports a short uncompressed .nii as "Expected N bytes, got M bytes".
    if isinstance(exc, EOFError) or ("expected" in text and "bytes" in text):
        return "file is truncated"
    if isinstance(exc, (gzip.BadGzipFile, zlib.error)):
        return "compressed data are corrupt"
    if isinstance(exc, ImageFileError):
        return "not a NIfTI file"
    if isinstance(exc, MemoryError):
        return "header describes an image too large to load"
    return "cannot read NIfTI data"


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _minimal_header(affine: np.ndarray, spacing: tuple[float, ...], header_dict: dict[str, Any]) -> nib.Nifti1Header:
    """A header carrying just what VolumeMeta.to_dict kept: shape, zooms, form codes, units."""
    header = nib.Nifti1Header()
    shape = tuple(int(s) for s in header_dict["shape"])
    header.set_data_shape(shape)
    header.set_sform(affine, code=int(header_dict.get("sform_code", _ALIGNED_FORM_CODE)))
    header.set_qform(affine, code=int(header_dict.get("qform_code", 0)))
    header.set_zooms(tuple(spacing[: len(shape)]))
    units = header_dict.get("xyzt_units")
    if units:
        header.set_xyzt_units(*units)
    return header


# --------------------------------------------------------------------------------------------
# writing


def save_volume(
    path: str | os.PathLike,
    array: np.ndarray,
    meta: VolumeMeta,
    *,
    overwrite: bool = False,
    dtype: np.dtype | str | type | None = None,
) -> Path:
    """Write ``array`` (axis order ``(i, j, k)`` as load_volume returns) to a .nii or .nii.gz file.

    The file gets ``meta.affine`` as sform (and qform), voxel sizes ``meta.spacing`` and, when
    ``meta.header`` is set, that header's form codes and units. A meta whose affine is not known
    (``affine_known`` False) is written with qform and sform codes 0 (NIfTI's "unknown orientation"). ``dtype`` defaults to the array's
    own (bool -> uint8; int64 -> int32 when values fit); float arrays written as an integer dtype
    are rounded. A meta with ``original_ndim == 2`` squeezes an ``(X, Y, 1)`` array back to 2-D.

    Refuses to replace an existing file unless ``overwrite=True`` (``FileExistsError``). The
    write is atomic: a temporary file in the same folder is renamed over ``path`` only once it is
    complete, so a failure never leaves a partial file. Returns the written path.
    """
    path = Path(path)
    _check_nifti_suffix(path)
    out = _array_for_write(array, meta, dtype)
    header = _header_for_write(meta, out)
    # affine=None: the header already holds the affine with the codes chosen above; given an affine,
    # nibabel would mark the sform "aligned" even where the orientation is unknown (codes 0).
    image = nib.Nifti1Image(out, None, header=header)
    suffix = ".nii.gz" if path.name.lower().endswith(".nii.gz") else ".nii"
    atomic_write(path, lambda tmp: nib.save(image, str(tmp)), overwrite=overwrite, suffix=suffix)
    return path


def write_json_atomic(path: str | os.PathLike, obj: Any, *, overwrite: bool = False) -> Path:
    """Write ``obj`` as indented JSON (numpy scalars/arrays and Paths converted), atomically.

    Same rules as :func:`save_volume`: ``FileExistsError`` unless ``overwrite``; no partial file
    on failure. Returns the written path.
    """
    path = Path(path)
    # Serialise first so an unserialisable object fails before anything touches the disk.
    text = json.dumps(obj, indent=2, default=_json_default, allow_nan=False) + "\n"

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())

    atomic_write(path, write, overwrite=overwrite, suffix=".json")
    return path


def _check_nifti_suffix(path: Path) -> None:
    if not path.name.lower().endswith(NIFTI_SUFFIXES):
        raise ValueError(f"{path}: output name must end with .nii or .nii.gz")


def _array_for_write(array: np.ndarray, meta: VolumeMeta, dtype) -> np.ndarray:
    """Check the shape against the meta, squeeze 2-D originals, cast to the output dtype."""
    array = np.asarray(array)
    if array.ndim == 2:
        array = array[..., np.newaxis]
    if array.ndim not in (3, 4):
        raise ValueError(f"expected a 2-D, 3-D or 4-D (volume + trailing axis) array, got shape {array.shape}")
    expected = meta.spatial_shape
    if expected is not None and tuple(array.shape[:3]) != expected:
        raise ValueError(f"array shape {array.shape} does not match the volume shape {expected} of its metadata")
    if meta.original_ndim == 2 and array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    out_dtype = _output_dtype(array, dtype)
    if out_dtype.kind in "iu" and array.dtype.kind == "f":
        if not np.isfinite(array).all():
            raise ValueError(f"cannot write NaN/Inf voxels as {out_dtype}")
        array = np.rint(array)
    if out_dtype.kind in "iu" and array.size:
        info = np.iinfo(out_dtype)
        if array.min() < info.min or array.max() > info.max:
            raise ValueError(f"values {array.min()}..{array.max()} do not fit in {out_dtype}")
    return np.ascontiguousarray(array, dtype=out_dtype)


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


def _header_for_write(meta: VolumeMeta, out: np.ndarray) -> nib.Nifti1Header:
    """Header with the meta's affine, spacing and (if any) original form codes and units."""
    if meta.header is not None:
        header = nib.Nifti1Header.from_header(meta.header)
        sform_code = int(meta.header["sform_code"])
        qform_code = int(meta.header["qform_code"])
        if sform_code == qform_code == 0:   # a known affine behind a header that did not carry it
            sform_code = _ALIGNED_FORM_CODE
    else:
        header = nib.Nifti1Header()
        header.set_xyzt_units("mm")
        sform_code = qform_code = _ALIGNED_FORM_CODE
    if not meta.affine_known:
        # Codes 0 are NIfTI's "orientation unknown": never invent an orientation the scan did not have.
        sform_code = qform_code = 0
    header.set_data_shape(out.shape)
    header.set_data_dtype(out.dtype)
    # An inherited display window (cal_min/max) would be wrong for new content such as labels.
    # (Inherited scl_slope/inter need no reset: nibabel recomputes them from the data on save.)
    header["cal_min"] = header["cal_max"] = 0
    header.set_sform(meta.affine, code=sform_code)
    header.set_qform(meta.affine, code=qform_code)
    # set_qform derives pixdim from the affine; the meta's spacing is what must be written.
    # A 4th (step/time) axis gets unit spacing.
    header.set_zooms(tuple(meta.spacing[: min(out.ndim, 3)]) + (1.0,) * max(0, out.ndim - 3))
    return header




def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


# --------------------------------------------------------------------------------------------
# bundled sample data


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
