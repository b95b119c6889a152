"""Reading NIfTI volumes, label maps and multi-channel scans (conventions: :mod:`medconddiff.nifti`).

Every failure that lies in the file (missing, not a NIfTI, truncated or corrupt data, a header that
describes more data than the file can hold or a negative size) raises :class:`VolumeReadError`, one
line naming the file and the problem. A .nii.gz is read to the end of its gzip stream, so gzip's CRC
and length check every byte: a damaged stream is refused, never read as a volume with wrong voxels.
Running out of memory while reading a valid file is no fault of the file: it raises ``MemoryError``
saying which file and how much it needed, so a cohort stops instead of skipping the scan as broken.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
from nibabel.affines import voxel_sizes
from nibabel.filebasedimages import ImageFileError
from nibabel.fileholders import FileHolder
from nibabel.spatialimages import HeaderDataError

from .errors import UserInputError
from .geometry import affine_is_usable, onto_grid
from .volume_meta import VolumeMeta, set_millimetre_units, spatial_shape_3d

__all__ = ["VolumeReadError", "load_volume", "load_labels", "load_channels", "read_meta", "smallest_label_dtype",
           "sanitize_nonfinite"]

# Errors nibabel, gzip and numpy raise on unreadable, truncated or corrupt files. They are
# wrapped into VolumeReadError so callers (CLI, napari reader) need to catch only one type.
# MemoryError is not among them: a valid scan too big for this machine is not a broken file.
_READ_ERRORS = (
    ImageFileError,
    HeaderDataError,
    OSError,  # includes gzip.BadGzipFile, PermissionError
    EOFError,  # truncated gzip stream
    OverflowError,  # header sizes numpy cannot allocate or index with
    zlib.error,
    struct.error,
    ValueError,  # e.g. memmap of a truncated .nii, bad header fields, numpy's "array is too big"
    TypeError,  # data types that cannot become float (RGB structs)
)

#: deflate (gzip) cannot compress better than about 1032:1; a .gz file whose header describes more
#: data than that has a damaged header, whatever the machine's memory.
_MAX_DEFLATE_RATIO = 1032


class VolumeReadError(UserInputError):
    """A file could not be read as a volume; the message names the file and the problem."""


def load_volume(path: str | os.PathLike, *, channel: int | None = None) -> tuple[np.ndarray, VolumeMeta]:
    """Read a NIfTI file as a float32 volume.

    Returns ``(array, meta)``. ``array`` is float32 (scl_slope/inter applied) in nibabel's
    voxel-index order ``(i, j, k)`` = the file's array axes, with no reorientation; ``meta.spacing``
    holds the voxel size per array axis in mm from the header zooms, ``meta.affine`` the file's
    best affine (sform, else qform), also in mm: a header in metres or microns is converted, and a
    non-finite affine is replaced by the voxel sizes on its diagonal with ``meta.affine_known`` False.

    * 2-D images (``(X, Y)`` or ``(X, Y, 1)``) come back as ``(X, Y, 1)`` with
      ``meta.original_ndim == 2``.
    * 4-D images ``(X, Y, Z, C)`` need ``channel`` to pick one volume along axis 3 unless that
      axis has size 1; otherwise :class:`VolumeReadError` names the axis and its size.
    * NaN/Inf voxels are kept (see :func:`sanitize_nonfinite`), but a volume with no finite voxel
      at all raises :class:`VolumeReadError`, as does a complex-valued one.
    """
    path = Path(path)
    data, meta = _read_nifti(path, channel)
    _refuse_complex(data, path)
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
    _refuse_several_volumes(path)
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


def _refuse_several_volumes(path: Path) -> None:
    """A label map holds one label per voxel: a 4-D file (one mask per class, a time series) is refused as
    such, not with the scan reader's advice to pick one of its volumes."""
    try:
        shape = nib.load(str(path)).shape
    except Exception:      # noqa: BLE001 - the reader below reports what is wrong with the file
        return
    if len(shape) > 3 and int(np.prod(shape[3:])) > 1:
        raise VolumeReadError(f"{path}: a label map holds one label per voxel (3-D), but this file holds "
                              f"{int(np.prod(shape[3:]))} volumes {tuple(shape)}; give one label file with "
                              "values 0..N (background, then one value per class)")


def load_channels(paths: Sequence[str | os.PathLike]) -> tuple[np.ndarray, VolumeMeta]:
    """Read the channels of one scan as a float32 ``(i, j, k, C)`` array, channels last.

    * One path: a 3-D file gives ``C = 1``; a 4-D file ``(X, Y, Z, C)`` gives its ``C`` volumes
      along axis 3 (a Decathlon multi-sequence scan).
    * Several paths (one file per channel, nnU-Net style): each must be 3-D, and all must lie on one
      grid (one affine within 1e-3 mm, or the first file's grid stored in another voxel order, which is
      moved onto the first file's voxels); they are stacked in the order given.

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
            difference = float(np.abs(channel_meta.affine - meta.affine).max())
            if difference > 1e-3:
                # One grid stored in another voxel order (a channel converted by another tool) is moved onto
                # the first file's voxels; only another grid is refused.
                moved = onto_grid(np.asarray(data), channel_meta.affine, meta.affine, first.shape)
                if moved is None:
                    raise VolumeReadError(f"{path} and {paths[0]} have affines that differ by up to "
                                          f"{difference:.4g} mm; the channels of a scan must share one grid")
                data = moved
            if data.shape != first.shape:
                raise VolumeReadError(f"{path} has shape {data.shape} but {paths[0]} has {first.shape}; "
                                      "the channels of a scan must share one grid")
        _refuse_complex(data, where)
        try:
            out[..., index] = np.asarray(data, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise VolumeReadError(f"{where}: voxel type {data.dtype} cannot be read as numbers ({exc})") from exc
        if not np.isfinite(out[..., index]).any():
            raise VolumeReadError(f"{where}: every voxel is NaN or infinite")
    return out, meta


def _refuse_complex(data: np.ndarray, where: object) -> None:
    # Casting would silently keep the real part, which is not the image a viewer shows.
    if np.iscomplexobj(data):
        raise VolumeReadError(f"{where}: voxels are complex numbers (MR real/imaginary or phase data); "
                              "save the magnitude image and open that")


def smallest_label_dtype(max_label: int) -> np.dtype:
    """uint8 / uint16 / int32: the smallest type that holds labels 0..max_label."""
    if max_label <= np.iinfo(np.uint8).max:
        return np.dtype(np.uint8)
    if max_label <= np.iinfo(np.uint16).max:
        return np.dtype(np.uint16)
    if max_label <= np.iinfo(np.int32).max:
        return np.dtype(np.int32)
    raise UserInputError(f"label {max_label} does not fit in int32")


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
    return np.nan_to_num(array, copy=True, nan=fill, posinf=fill, neginf=fill), n_bad


def _read_nifti(path: Path, channel: int | None) -> tuple[np.ndarray, VolumeMeta]:
    """Read data (as stored, scaling applied) and meta; returns 3-D data (X, Y, Z)."""
    _check_readable_file(path)
    img = None
    try:
        img = nib.load(str(path))
        if not isinstance(img, (nib.Nifti1Image, nib.Nifti1Pair)):
            raise VolumeReadError(f"{path}: not a NIfTI file (nibabel read it as {type(img).__name__})")
        shape = _drop_trailing_singletons(img.shape)
        _check_shape(path, shape)
        _check_size_fits_file(path, img)
        # Reading the data here, inside the try, is what detects truncated or corrupt gzip
        # streams: nibabel reads lazily and would otherwise fail much later.
        data = _read_checked_data(path, img, shape, channel)
    except VolumeReadError:
        raise
    except MemoryError as exc:
        described = "" if img is None else f" its {tuple(img.shape)} voxels of {img.get_data_dtype()} " \
                                              f"({_size(_data_bytes(img))} as stored)"
        raise MemoryError(f"{path}: not enough memory to read{described}; free memory or use a machine "
                          "with more") from exc
    except _READ_ERRORS as exc:
        raise VolumeReadError(f"{path}: {_read_problem(exc)} ({_one_line(exc)})") from exc
    return data.reshape(spatial_shape_3d(data.shape)), _meta_of(path, img, shape)


def _read_checked_data(path: Path, img: nib.Nifti1Image, shape: tuple[int, ...], channel: int | None) -> np.ndarray:
    """The requested volume's voxels; a gzip data file is read to the end of its stream.

    nibabel reads exactly the bytes of the data, and Python's gzip checks its CRC32 and length only
    when a read reaches the end of the stream: a flipped byte in the deflate stream would otherwise
    give wrong voxels without an error. So the data are read through a stream opened here, which is
    then drained to its end (nothing is left for a 3-D file; the later volumes for one channel of a
    4-D file): the check costs no second decompression and no extra memory."""
    image_file = _image_file_name(img)
    if image_file is None or not image_file.lower().endswith(".gz"):
        return np.asanyarray(_select_volume(path, img, shape, channel))
    with gzip.open(image_file, "rb") as stream:
        data = np.asanyarray(_select_volume(path, _image_over_stream(img, stream), shape, channel))
        _read_to_end(stream)
    return data


def _image_file_name(img: nib.Nifti1Image) -> str | None:
    """The file that holds the voxels (the .nii itself, or the .img of a .hdr/.img pair)."""
    return img.file_map["image"].filename


def _image_over_stream(img: nib.Nifti1Image, stream) -> nib.Nifti1Image:
    """``img`` again, its voxels read from ``stream`` (an open gzip stream of its image file)."""
    # A single-file .nii.gz has the one entry 'image' (its header is read from the same stream); a pair
    # also has 'header', read again from its own file.
    file_map = {name: FileHolder(filename=holder.filename) for name, holder in img.file_map.items()}
    file_map["image"] = FileHolder(filename=img.file_map["image"].filename, fileobj=stream)
    return type(img).from_file_map(file_map)


def _read_to_end(stream) -> None:
    """Read ``stream`` to its end in 1 MB blocks: gzip then checks the CRC32 and length of every member."""
    while stream.read(1 << 20):
        pass


def read_meta(path: str | os.PathLike) -> VolumeMeta:
    """The meta :func:`load_volume` would return for ``path``, from its header alone (no voxel is read,
    so a damaged data stream goes unnoticed here); its spatial shape is ``meta.spatial_shape``."""
    path = Path(path)
    _check_readable_file(path)
    try:
        img = nib.load(str(path))
    except _READ_ERRORS as exc:
        raise VolumeReadError(f"{path}: {_read_problem(exc)} ({_one_line(exc)})") from exc
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti1Pair)):
        raise VolumeReadError(f"{path}: not a NIfTI file (nibabel read it as {type(img).__name__})")
    return _meta_of(path, img, _drop_trailing_singletons(img.shape))


def _meta_of(path: Path, img: nib.Nifti1Image, shape: tuple[int, ...]) -> VolumeMeta:
    # (X, Y, 1) files and 2-D slices of (X, Y, 1, C) files are 2-D images.
    original_ndim = 2 if len(shape) == 2 or shape[2] == 1 else 3
    header = _header_in_millimetres(img.header)
    affine = _placing_affine(header)
    spacing = _spacing_from_header(header, affine)
    has_orientation = int(header["qform_code"]) > 0 or int(header["sform_code"]) > 0
    note = "" if has_orientation else f"{path.name} has no orientation (qform and sform codes are 0)"
    if not np.isfinite(affine).all():
        # Processed in voxel order like any unusable affine; the meta keeps a finite one (the voxel sizes on
        # its diagonal) and a header without the broken form, so that results and their sidecar (JSON) can be
        # written, with codes 0.
        affine = np.diag(spacing + (1.0,))
        header = _without_nonfinite_forms(header, affine)
        has_orientation = False
        note = f"{path.name}'s affine holds NaN or infinite values"
    return VolumeMeta(
        affine=affine,
        spacing=spacing,
        header=header,
        source=str(path),
        original_ndim=original_ndim,
        affine_known=has_orientation,
        geometry_note=note,
    )


def _placing_affine(header: nib.Nifti1Header) -> np.ndarray:
    """nibabel's best affine (the coded sform, else the coded qform), except that a coded sform that places
    nothing (singular or not finite) gives way to a coded qform that does: NIfTI's second method still
    places the voxels, and the scan is not reduced to voxel order for one broken form."""
    best = header.get_best_affine()
    if int(header["sform_code"]) > 0 and int(header["qform_code"]) > 0 and not affine_is_usable(best):
        qform = header.get_qform()
        if affine_is_usable(qform):
            return qform
    return best


def _without_nonfinite_forms(header: nib.Nifti1Header, voxel_affine: np.ndarray) -> nib.Nifti1Header:
    """A copy of ``header`` whose non-finite qform or sform is replaced by ``voxel_affine`` with code 0."""
    header = header.copy()
    if not np.isfinite(header.get_sform()).all():
        header.set_sform(voxel_affine, code=0)
    if not np.isfinite(header.get_qform()).all():
        header.set_qform(voxel_affine, code=0)
    return header


#: Millimetres per NIfTI spatial unit (xyzt_units); 'unknown' is read as mm, as medical files mean it.
_MM_PER_SPACE_UNIT = {"meter": 1000.0, "mm": 1.0, "micron": 0.001, "unknown": 1.0}


def _header_in_millimetres(header: nib.Nifti1Header) -> nib.Nifti1Header:
    """``header`` with its voxel sizes, qform and sform in millimetres (a copy where its units are metres or
    microns): the meta's affine and spacing are in mm, and a result written with this header describes the
    same place as the file it was read from."""
    scale = _mm_per_space_unit(header)
    if scale == 1.0:
        return header
    header = header.copy()
    # Scaling pixdim and the offsets scales the qform (rotation × pixdim + offset); srow rows are the sform.
    pixdim = np.array(header["pixdim"], dtype=np.float64)
    pixdim[1:4] *= scale
    header["pixdim"] = pixdim
    for name in ("qoffset_x", "qoffset_y", "qoffset_z"):
        header[name] = float(header[name]) * scale
    for name in ("srow_x", "srow_y", "srow_z"):
        header[name] = np.array(header[name], dtype=np.float64) * scale
    set_millimetre_units(header)
    return header


def _mm_per_space_unit(header: nib.Nifti1Header) -> float:
    try:
        space_unit, _ = header.get_xyzt_units()
    except KeyError:     # a units code NIfTI does not define: read as unknown, i.e. mm
        return 1.0
    return _MM_PER_SPACE_UNIT.get(space_unit, 1.0)


def _check_readable_file(path: Path) -> None:
    if not path.exists():
        raise VolumeReadError(f"{path}: file does not exist")
    if path.is_dir():
        raise VolumeReadError(f"{path}: is a directory, expected a .nii or .nii.gz file")
    if path.stat().st_size == 0:
        raise VolumeReadError(f"{path}: file is empty")


def _check_shape(path: Path, shape: tuple[int, ...]) -> None:
    if any(n < 0 for n in shape):
        raise VolumeReadError(f"{path}: header gives a negative image size {shape}; the header is damaged, "
                              "export the file again")
    if 0 in shape or len(shape) == 0:
        raise VolumeReadError(f"{path}: image contains no voxels (shape {shape})")
    if len(shape) == 1:
        raise VolumeReadError(f"{path}: 1-D data of shape {shape}; expected a 2-D or 3-D image")
    if len(shape) > 4:
        raise VolumeReadError(f"{path}: {len(shape)}-D data of shape {shape}; at most 4-D is supported")


def _data_bytes(img: nib.Nifti1Image) -> int:
    return math.prod(int(n) for n in img.shape) * img.get_data_dtype().itemsize


def _check_size_fits_file(path: Path, img: nib.Nifti1Image) -> None:
    """Refuse a header that describes more data than its file can hold: an impossible size, which
    says the header is damaged or the file truncated (a size this machine cannot hold is a MemoryError
    while reading). Only the file size is looked at, so this costs nothing before a read."""
    image_file = Path(_image_file_name(img) or path)
    described, stored = _data_bytes(img), image_file.stat().st_size
    if image_file.name.lower().endswith(".gz"):
        if described > _MAX_DEFLATE_RATIO * stored:
            raise VolumeReadError(f"{path}: header describes {tuple(img.shape)} voxels of {img.get_data_dtype()} "
                                  f"({_size(described)}), more than a {_size(stored)} gzip file can hold; the "
                                  "header is damaged")
        return
    offset = int(img.dataobj.offset)    # where nibabel reads the voxels from (the header copy says 0)
    available = max(0, stored - offset)
    if described > available:
        raise VolumeReadError(f"{path}: file is truncated or its header is damaged: the header describes "
                              f"{tuple(img.shape)} voxels of {img.get_data_dtype()} ({_size(described)}), but "
                              f"{image_file.name} holds {_size(available)} after byte {offset}; copy or export "
                              "the file again")


def _size(n_bytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.3g} {unit}"
    return f"{n_bytes} bytes"


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
            f"choose one with channel=0..{n_channels - 1} (`--channel N` on the command line)"
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


def _spacing_from_header(header: nib.Nifti1Header, affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm per array axis; falls back to the affine where pixdim is unusable (0/NaN)."""
    zooms = [abs(float(z)) for z in header.get_zooms()[:3]]
    affine_sizes = voxel_sizes(np.asarray(affine))
    spacing = []
    for axis in range(3):
        zoom = zooms[axis] if axis < len(zooms) else 0.0
        if not np.isfinite(zoom) or zoom <= 0:
            zoom = float(affine_sizes[axis]) if affine_sizes[axis] > 0 else 1.0
        spacing.append(zoom)
    return tuple(spacing)


def _read_problem(exc: BaseException) -> str:
    """Plain words for what a read exception means to the user."""
    text = str(exc).lower()
    # nibabel reports a short uncompressed .nii as "Expected N bytes, got M bytes".
    if isinstance(exc, EOFError) or ("expected" in text and "bytes" in text):
        return "file is truncated"
    if isinstance(exc, (gzip.BadGzipFile, zlib.error)):
        return "compressed data are corrupt, copy or export the file again"
    if isinstance(exc, ImageFileError):
        return "not a NIfTI file"
    return "cannot read NIfTI data"


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
