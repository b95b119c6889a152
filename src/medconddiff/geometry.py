"""Scan geometry: lossless reorientations between voxel orders, and anatomical directions.

Three voxel orders meet in this project:

* the **file order** ``(i, j, k)`` a NIfTI stores (what :func:`medconddiff.nifti.load_volume`
  returns; its affine maps these indices to world millimetres);
* the **canonical order** ``(R, A, S)`` the model works in: axis 0 runs towards the patient's
  right, axis 1 towards anterior, axis 2 towards superior (nibabel's RAS+, the closest one to the
  scan's axes, so no voxel is interpolated);
* the **display order** of napari layers (radiological convention, see :func:`display_codes`).

Every change between them is a permutation of axes plus flips, held by :class:`Reorientation`
and applied as a numpy *view* (nothing is copied, and writing through the view writes the original
array). Axis codes are nibabel's: the letter an axis points *towards* as its index grows.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from nibabel import orientations

CANONICAL_CODES = ("R", "A", "S")
#: The canonical (RAS) axis each slicing direction cuts across.
SLICE_AXIS = {"sagittal": 0, "coronal": 1, "axial": 2}
_OPPOSITE = {"R": "L", "L": "R", "A": "P", "P": "A", "S": "I", "I": "S"}
#: Unit world (RAS mm) direction of each axis code.
_DIRECTION = {"R": (1, 0, 0), "L": (-1, 0, 0), "A": (0, 1, 0), "P": (0, -1, 0), "S": (0, 0, 1), "I": (0, 0, -1)}


class GeometryWarning(UserWarning):
    """A scan's orientation had to be assumed (missing or degenerate affine, plain array)."""


@dataclass(frozen=True)
class Reorientation:
    """A permutation of the first ``n`` array axes plus flips: ``out`` axis d is ``in`` axis
    ``axes[d]``, reversed where ``flips[d]``. Further (trailing) axes, such as channels, ride along.
    """

    axes: tuple[int, ...]
    flips: tuple[bool, ...]

    def __post_init__(self) -> None:
        if sorted(self.axes) != list(range(len(self.axes))) or len(self.flips) != len(self.axes):
            raise ValueError(f"not a permutation with flips: axes {self.axes}, flips {self.flips}")

    @classmethod
    def identity(cls, ndim: int = 3) -> "Reorientation":
        return cls(tuple(range(ndim)), (False,) * ndim)

    @classmethod
    def between(cls, source_codes: Sequence[str], target_codes: Sequence[str]) -> "Reorientation":
        """The reorientation taking an array whose axes point to ``source_codes`` to ``target_codes``."""
        source = tuple(str(c).upper() for c in source_codes)
        target = tuple(str(c).upper() for c in target_codes)
        try:
            ornt = orientations.ornt_transform(orientations.axcodes2ornt(source), orientations.axcodes2ornt(target))
        except ValueError:
            ornt = None
        # nibabel matches each source axis to some target axis even where the codes name no one
        # orientation (a repeated code): only a permutation that yields the target codes is one.
        if ornt is None or len(source) != len(target) or np.isnan(ornt).any() \
                or sorted(ornt[:, 0].astype(int)) != list(range(len(source))) \
                or cls._from_ornt(ornt).codes(source) != target:
            raise ValueError(f"axis codes {tuple(source_codes)} and {tuple(target_codes)} are not one "
                             "orientation seen two ways")
        return cls._from_ornt(ornt)

    @classmethod
    def _from_ornt(cls, ornt: np.ndarray) -> "Reorientation":
        """From nibabel's orientation: row ``i`` = (the output axis input axis ``i`` goes to, ±1 = flip)."""
        axes, flips = [0] * len(ornt), [False] * len(ornt)
        for source_axis, (target_axis, direction) in enumerate(ornt):
            axes[int(target_axis)] = source_axis
            flips[int(target_axis)] = bool(direction < 0)
        return cls(tuple(axes), tuple(flips))

    def _ornt(self) -> np.ndarray:
        """This reorientation as nibabel's orientation array (see :meth:`_from_ornt`)."""
        ornt = np.zeros((len(self.axes), 2))
        for target_axis, (source_axis, flip) in enumerate(zip(self.axes, self.flips)):
            ornt[source_axis] = (target_axis, -1 if flip else 1)
        return ornt

    @property
    def is_identity(self) -> bool:
        return self.axes == tuple(range(len(self.axes))) and not any(self.flips)

    def apply(self, array: np.ndarray, first_axis: int = 0) -> np.ndarray:
        """View of ``array`` reoriented; the moved axes start at ``first_axis`` (leading axes stay)."""
        array = np.asarray(array) if not isinstance(array, np.ndarray) else array
        # nibabel reorients the leading axes: bring ours to the front and the leading ones back after.
        moved = np.moveaxis(array, range(first_axis), range(array.ndim - first_axis, array.ndim))
        out = orientations.apply_orientation(moved, self._ornt())
        return np.moveaxis(out, range(out.ndim - first_axis, out.ndim), range(first_axis))

    def inverse(self) -> "Reorientation":
        axes = [0] * len(self.axes)
        flips = [False] * len(self.axes)
        for d, (a, f) in enumerate(zip(self.axes, self.flips)):
            axes[a] = d
            flips[a] = f
        return Reorientation(tuple(axes), tuple(flips))

    def then(self, other: "Reorientation") -> "Reorientation":
        """This reorientation followed by ``other``."""
        axes = tuple(self.axes[b] for b in other.axes)
        flips = tuple(other.flips[d] != self.flips[other.axes[d]] for d in range(len(other.axes)))
        return Reorientation(axes, flips)

    def shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """Shape of the reoriented array (first ``n`` axes)."""
        return tuple(int(shape[a]) for a in self.axes) + tuple(int(s) for s in shape[len(self.axes):])

    def index(self, index: Sequence[float], shape: Sequence[int]) -> tuple[float, ...]:
        """Where voxel ``index`` of an input of ``shape`` lands in the output (works for fractions)."""
        n = len(self.axes)
        # inv_ornt_aff maps indices of a reoriented array back to those of its source: for the
        # inverse reorientation, that is from this one's input to its output.
        to_output = orientations.inv_ornt_aff(self.inverse()._ornt(), self.shape(shape)[:n])
        # Each coordinate may be an array of voxels (the plugin maps whole slices at once): element-wise.
        coords = np.broadcast_arrays(*(np.asarray(c, float) for c in index[:n]))
        out = np.tensordot(to_output, np.stack([*coords, np.ones_like(coords[0])]), axes=1)[:n]
        return tuple(float(v) if v.ndim == 0 else v for v in out)

    def codes(self, source_codes: Sequence[str]) -> tuple[str, ...]:
        """Axis codes of the output for an input with ``source_codes``."""
        return tuple(_OPPOSITE[source_codes[a]] if f else source_codes[a] for a, f in zip(self.axes, self.flips))

    def to_dict(self) -> dict:
        return {"axes": list(self.axes), "flips": list(self.flips)}

    @classmethod
    def from_dict(cls, data: dict) -> "Reorientation":
        return cls(tuple(int(a) for a in data["axes"]), tuple(bool(f) for f in data["flips"]))


def onto_grid(array: np.ndarray, affine: np.ndarray, target_affine: np.ndarray,
              target_shape: Sequence[int]) -> Optional[np.ndarray]:
    """``array`` (voxels placed by ``affine``) on the grid of ``target_affine`` and ``target_shape`` when it
    is that grid stored in another voxel order (axes swapped or reversed, same voxels); None otherwise."""
    mapping = np.linalg.solve(np.asarray(target_affine, float), np.asarray(affine, float))   # its voxel → target's
    rotation, offset = mapping[:3, :3], mapping[:3, 3]
    rounded = np.round(rotation)
    magnitude = np.abs(rounded)        # a permutation: one 1 in every row and every column
    if not np.allclose(rotation, rounded, atol=1e-3) or not (magnitude.sum(axis=0) == 1).all() \
            or not (magnitude.sum(axis=1) == 1).all():
        return None
    axes = tuple(int(np.argmax(np.abs(rounded[d]))) for d in range(3))
    flips = tuple(bool(rounded[d, axes[d]] < 0) for d in range(3))
    if tuple(array.shape[a] for a in axes) != tuple(int(n) for n in target_shape):
        return None
    expected = [target_shape[d] - 1 if flips[d] else 0 for d in range(3)]
    if not np.allclose(offset, expected, atol=1e-2):
        return None
    return np.ascontiguousarray(Reorientation(axes, flips).apply(array))


def labels_on_image_grid(labels: np.ndarray, label_affine: Optional[np.ndarray], image_affine: np.ndarray,
                         image_shape: Sequence[int]) -> tuple[np.ndarray, str]:
    """Reference ``labels`` on the image's voxels, and how they got there: ``"same"`` (one affine),
    ``"reordered"`` (the image's grid stored in another voxel order, moved by :func:`onto_grid`) or
    ``"affine differs"`` (same shape, another place: left voxel by voxel, the caller warns). Labels of
    another shape on another grid come back unchanged, for the caller's shape check to refuse."""
    if label_affine is None or np.allclose(label_affine, image_affine, atol=1e-3):
        return labels, "same"
    moved = onto_grid(labels, label_affine, image_affine, tuple(image_shape)[:3])
    if moved is not None:
        return moved, "reordered"
    return labels, "affine differs"


def affine_is_usable(affine: np.ndarray) -> bool:
    """A finite affine whose 3×3 part is not singular (so it names a direction for every axis)."""
    affine = np.asarray(affine, dtype=float)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        return False
    linear = affine[:3, :3]
    sizes = np.sqrt((linear ** 2).sum(axis=0))
    if (sizes <= 0).any():
        return False
    return abs(np.linalg.det(linear / sizes)) > 1e-3


def axis_codes(affine: np.ndarray) -> tuple[str, str, str]:
    """The closest anatomical direction of each voxel axis, e.g. ``('L', 'P', 'S')``."""
    import nibabel as nib

    return tuple(nib.aff2axcodes(np.asarray(affine, dtype=float)))  # type: ignore[return-value]


def display_codes(slicing: str = "axial") -> tuple[str, str, str]:
    """Layer axis codes of the radiological convention for viewing ``slicing`` slices.

    The first axis is napari's slider; the other two are the screen's rows (downwards) and columns
    (rightwards). Axial: slider inferior → superior, anterior at the top, the patient's right on the
    screen's left. Coronal: slider posterior → anterior, head at the top, right on the left.
    Sagittal: slider right → left, head at the top, anterior on the left.
    """
    return {"axial": ("S", "P", "L"), "coronal": ("A", "I", "L"), "sagittal": ("L", "I", "P")}[slicing]


def affine_from_codes(codes: Sequence[str], spacing: Sequence[float]) -> np.ndarray:
    """An axis-aligned affine whose voxel axes point to ``codes`` with ``spacing`` mm, origin 0."""
    affine = np.eye(4)
    for axis, (code, size) in enumerate(zip(codes, spacing)):
        affine[:3, axis] = np.asarray(_DIRECTION[str(code).upper()], dtype=float) * float(size)
    return affine


@dataclass(frozen=True)
class Orientation:
    """How a scan's file axes relate to the canonical RAS axes, and whether that is known."""

    to_canonical: Reorientation
    file_codes: tuple[str, str, str]
    known: bool
    note: str = ""

    @classmethod
    def of(cls, affine: np.ndarray, known: bool = True, note: str = "") -> "Orientation":
        """From a voxel-to-world affine; an unusable one means voxel order, with a warning."""
        if not known or not affine_is_usable(affine):
            why = note or "the scan has no usable affine (missing or degenerate)"
            warnings.warn(f"{why}: its voxel axes are taken as R, A, S (voxel order, no reorientation)",
                          GeometryWarning, stacklevel=3)
            return cls(Reorientation.identity(), CANONICAL_CODES, False, why)
        codes = axis_codes(affine)
        return cls(Reorientation.between(codes, CANONICAL_CODES), codes, True, note)
