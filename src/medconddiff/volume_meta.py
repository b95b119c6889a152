"""Where a volume's voxels lie in the world and where the volume came from: :class:`VolumeMeta`.

``meta.affine`` maps array indices ``(i, j, k, 1)`` to world (scanner) millimetres, ``meta.spacing``
holds the voxel size per array axis in mm, and ``meta.header`` (for volumes read from a file) keeps
what writing needs to give a result the scan's own geometry: its form codes, its qform and sform
matrices and its units.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import nibabel as nib
import numpy as np

from .geometry import affine_is_usable

__all__ = ["VolumeMeta", "ALIGNED_FORM_CODE", "HEADER_TEXT_FIELDS", "spatial_shape_3d", "set_millimetre_units"]

#: NIfTI header fields of free text. Converters fill them with what they like (series descriptions,
#: acquisition times, at times a name): files derived from a scan are written without them.
HEADER_TEXT_FIELDS = ("descrip", "aux_file", "db_name", "intent_name")

# NIfTI form codes (see nibabel.nifti1.xform_codes): 1 = scanner, 2 = aligned.
ALIGNED_FORM_CODE = 2


@dataclass
class VolumeMeta:
    """Where a volume's voxels lie in the world, and where the volume came from.

    Attributes
    ----------
    affine
        4x4 float64 voxel-to-world matrix for array indices ``(i, j, k)``, in millimetres.
    spacing
        Voxel size per array axis in millimetres, in array-axis order (3 values for the
        3-D arrays :func:`medconddiff.nifti.load_volume` returns).
    header
        The NIfTI header read from the file, kept so that writing preserves its form codes, its
        qform and sform and its units; ``None`` for arrays that did not come from a file.
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
        return spatial_shape_3d(self.header.get_data_shape())

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe description (affine as nested lists); :meth:`from_dict` inverts it.

        Of the header, only what a written file needs survives: the spatial shape (as the file stored it:
        a 2-D file's two axes, a one-slice 3-D file's three), the qform and sform (codes and matrices) and
        the units.
        """
        header_dict = None
        if self.header is not None:
            space_unit, time_unit = self.header.get_xyzt_units()
            header_dict = {
                "shape": [int(n) for n in self.header.get_data_shape()[:3]],
                "qform_code": int(self.header["qform_code"]),
                "sform_code": int(self.header["sform_code"]),
                "qform": self.header.get_qform().tolist(),
                "sform": self.header.get_sform().tolist(),
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

    def without_header_text(self) -> VolumeMeta:
        """This meta with its header's free-text fields (:data:`HEADER_TEXT_FIELDS`) empty and no header
        extensions: what a file made from the scan (labels, maps, a training set's copy) is written with,
        geometry unchanged."""
        if self.header is None:
            return self
        header = self.header.copy()
        for key in HEADER_TEXT_FIELDS:
            header[key] = b""
        # Extensions are free content too: converters keep the DICOM header (patient data) or comments there.
        if hasattr(header, "extensions"):
            header.extensions.clear()
        return dataclasses.replace(self, header=header)


def set_millimetre_units(header: nib.Nifti1Header) -> None:
    """Say in ``header`` that its spatial unit is mm, keeping its time unit (one NIfTI does not define is
    kept as 'unknown'): the geometry a meta holds is in mm whatever unit its file counted in."""
    try:
        time_unit = header.get_xyzt_units()[1]
    except KeyError:     # a units code NIfTI does not define
        time_unit = "unknown"
    header.set_xyzt_units("mm", time_unit)


def spatial_shape_3d(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The 3-D shape load_volume returns for a file of this shape: 2-D gets a last axis of 1."""
    shape = tuple(int(s) for s in shape)
    return (shape + (1, 1, 1))[:3]


def _axis_codes(affine: np.ndarray) -> tuple[str, ...]:
    # A non-finite affine names no direction (and nibabel's SVD of it fails): every axis is unknown.
    if not np.isfinite(affine).all():
        return ("?", "?", "?")
    return tuple(code if code is not None else "?" for code in nib.aff2axcodes(affine))


def _minimal_header(affine: np.ndarray, spacing: tuple[float, ...], header_dict: dict[str, Any]) -> nib.Nifti1Header:
    """A header carrying just what VolumeMeta.to_dict kept: shape, zooms, qform and sform, units.

    Dicts written before the form matrices were kept rebuild both forms from the affine."""
    header = nib.Nifti1Header()
    shape = tuple(int(s) for s in header_dict["shape"])
    header.set_data_shape(shape)
    header.set_sform(np.array(header_dict.get("sform", affine), dtype=np.float64),
                     code=int(header_dict.get("sform_code", ALIGNED_FORM_CODE)))
    qform = np.array(header_dict.get("qform", affine), dtype=np.float64)
    qform_code = int(header_dict.get("qform_code", 0))
    # A degenerate qform (zero pixdim in the source) cannot be set as a matrix; codes 0 ignore it anyway.
    usable = next((m for m in (qform, affine) if affine_is_usable(m)), None)
    if usable is None:       # nothing to decompose into a qform (a singular or NaN affine): the code alone
        header["qform_code"] = qform_code
    else:
        header.set_qform(usable, code=qform_code)
    header.set_zooms(tuple(spacing[: len(shape)]))
    units = header_dict.get("xyzt_units")
    if units:
        header.set_xyzt_units(*units)
    return header
