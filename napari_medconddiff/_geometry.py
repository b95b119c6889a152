"""Where a layer's voxels are for the engine, and where the engine's results go in a layer.

Three voxel orders meet here (see :mod:`medconddiff.geometry`): the scan layer's own axes, the
file order ``(i, j, k)`` the engine takes, and the engine's canonical slices along the model's
slicing direction. :class:`LayerSpace` links a scan layer to the file order (a reorientation,
so every link is a numpy view), :class:`ScanSpace` adds the engine's
:class:`~medconddiff.preprocess.ScanGeometry`, so results are written into layer data through
views (``space.slices(layer.data)[indices] = labels``), an edit's layer position names its
canonical slice, and the model-resolution x̂0 stack is overlaid exactly on the scan.

Nothing here imports torch: the ScanGeometry is made by the engine in a worker thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from medconddiff.geometry import Reorientation, affine_from_codes, display_codes
from medconddiff.nifti import VolumeMeta

from ._layers import file_view, layer_view, plain_meta, stored_geometry

PLAIN_LAYER_STATUS = "plain layer: slicing along the slider axis, voxel size from the layer scale"


@dataclass(frozen=True)
class LayerSpace:
    """A scan layer seen by the engine: the meta of its file-ordered array and the file → layer
    reorientation (3-D; a 2-D layer is that orientation's view without its singleton first axis)."""

    meta: VolumeMeta
    to_layer: Reorientation
    layer_ndim: int
    plain: bool = False

    @classmethod
    def of_layer(cls, data_ndim: int, metadata: Optional[dict], scale: Sequence[float],
                 view_axes: Sequence[int], slicing: str) -> "LayerSpace":
        """From a layer's metadata (a file we read), else as a plain layer.

        A plain layer is taken to show the radiological view of the model's ``slicing`` plane:
        ``view_axes`` = (slider, rows, columns) layer axes of a 3-D layer (napari's dims order),
        the layer ``scale`` is the voxel size, and layer order is file order.
        """
        stored = stored_geometry(metadata)
        if stored is not None:
            meta, to_layer = stored
            return cls(meta, to_layer, data_ndim)
        normal, rows, columns = display_codes(slicing)
        scale = tuple(abs(float(s)) for s in scale)[-data_ndim:]
        if data_ndim == 2:
            # One image: file (rows, columns, 1) with the singleton along the plane's normal.
            codes, spacing, to_layer = (rows, columns, normal), scale + (1.0,), Reorientation((2, 0, 1), (False,) * 3)
        else:
            slider, row_axis, column_axis = view_axes
            codes = [""] * 3
            codes[slider], codes[row_axis], codes[column_axis] = normal, rows, columns
            spacing, to_layer = scale, Reorientation.identity()
        meta = VolumeMeta(affine=affine_from_codes(codes, spacing), spacing=spacing, original_ndim=data_ndim,
                          geometry_note=PLAIN_LAYER_STATUS)
        return cls(meta, to_layer, data_ndim, plain=True)

    def file_view(self, data: np.ndarray) -> np.ndarray:
        """The layer's data as a file-ordered (i, j, k) view (writable when the data are)."""
        return file_view(data, self.to_layer)

    def layer_view(self, array: np.ndarray) -> np.ndarray:
        """A file-ordered array as layer data (a view)."""
        return layer_view(array, self.to_layer, self.layer_ndim)

    def export_meta(self, layer_shape: Sequence[int]) -> VolumeMeta:
        """What a file written from this layer (of ``layer_shape``) says about its geometry.

        A plain layer's orientation was only assumed for the model: its file gets the layer's axis
        order with codes 0 (unknown), never the invented orientation.
        """
        if not self.plain:
            return self.meta
        return plain_meta(layer_shape, tuple(self.meta.spacing[a] for a in self.to_layer.axes)[3 - self.layer_ndim:])


@dataclass(frozen=True)
class ScanSpace:
    """A :class:`LayerSpace` plus the engine's geometry: canonical slices ↔ layer voxels."""

    layer: LayerSpace
    geometry: Any                  # medconddiff.preprocess.ScanGeometry

    @property
    def n_slices(self) -> int:
        return int(self.geometry.n_slices)

    @property
    def layer_shape(self) -> tuple[int, ...]:
        shape = self.layer.to_layer.shape(self.geometry.file_shape)
        return shape[-self.layer.layer_ndim:]

    def export_meta(self) -> VolumeMeta:
        return self.layer.export_meta(self.layer_shape)

    @property
    def canonical_to_layer(self) -> Reorientation:
        return self.geometry.orientation.to_canonical.inverse().then(self.layer.to_layer)

    def slices(self, data: np.ndarray) -> np.ndarray:
        """Layer data as canonical slices (n, H, W): a writable view."""
        return self.geometry.slice_view(self.layer.file_view(data))

    @property
    def slice_layer_axis(self) -> Optional[int]:
        """The layer axis along which canonical slices follow each other (None: a 2-D layer's one slice)."""
        axis = self.canonical_to_layer.axes.index(self.geometry.slice_axis)
        return axis - (3 - self.layer.layer_ndim) if axis >= 3 - self.layer.layer_ndim else None

    def slice_of_layer_index(self, index: np.ndarray | int) -> np.ndarray | int:
        """Canonical slice of a layer index along :attr:`slice_layer_axis`."""
        c2l = self.canonical_to_layer
        axis = c2l.axes.index(self.geometry.slice_axis)
        return self.n_slices - 1 - index if c2l.flips[axis] else index

    def slice_at(self, layer_point: Sequence[float]) -> int:
        """The canonical slice through a point given in layer data coordinates."""
        axis = self.slice_layer_axis
        if axis is None:
            return 0
        index = int(np.clip(np.round(layer_point[axis]), 0, self.layer_shape[axis] - 1))
        return int(self.slice_of_layer_index(index))

    def layer_position(self, slice_index: int) -> tuple[Optional[int], int]:
        """(layer axis, layer index) where canonical slice ``slice_index`` lies."""
        axis = self.slice_layer_axis
        return axis, (int(self.slice_of_layer_index(slice_index)) if axis is not None else 0)

    def layer_indices(self, slices: np.ndarray, rows: np.ndarray, columns: np.ndarray) -> tuple[np.ndarray, ...]:
        """Layer index arrays of canonical voxels (slice, row, column): for ``Labels.data_setitem``."""
        geometry = self.geometry
        canonical: list[Any] = [None] * 3
        canonical[geometry.slice_axis] = slices
        canonical[geometry.plane_axes[0]], canonical[geometry.plane_axes[1]] = rows, columns
        layer = self.canonical_to_layer.index(canonical, geometry.canonical_shape)
        return tuple(np.asarray(a, dtype=np.intp) for a in layer[3 - self.layer.layer_ndim:])

    # ---------------------------------------------------------------- the model-grid x̂0 stack
    def stack_view(self, stack: np.ndarray) -> np.ndarray:
        """(S, n, h, w) stack of canonical model-grid slices → (S, *layer axes) view in layer order."""
        view = self._stack_to_layer.apply(stack, first_axis=1)
        return view[:, 0] if self.layer.layer_ndim == 2 else view

    @property
    def _stack_to_layer(self) -> Reorientation:
        geometry = self.geometry
        order = (geometry.slice_axis, *geometry.plane_axes)   # canonical axis of each stack axis
        stack_to_canonical = Reorientation(tuple(order.index(c) for c in range(3)), (False,) * 3)
        return stack_to_canonical.then(self.canonical_to_layer)

    def stack_placement(self, stack_shape: Sequence[int], first_slice: int) -> tuple[np.ndarray, np.ndarray]:
        """Per layer axis, (scale, offset) taking a stack view's index to scan layer coordinates.

        Stack indices go stack → canonical scan coordinates → file → layer. In-plane, model pixel
        ``p`` was resized from the scan's ``H`` pixels to ``h`` with ``align_corners=False``, so it
        is centred on scan coordinate ``(p + 0.5) * H / h - 0.5``; along the slice axis the stack
        starts at canonical slice ``first_slice``.
        """
        geometry = self.geometry
        spatial = tuple(int(n) for n in stack_shape[1:4])     # (n, h, w) of the canonical stack
        view_shape = self._stack_to_layer.shape(spatial)
        ratios = [g / m for g, m in zip(geometry.plane_shape, geometry.model_shape)]

        def to_layer(view_index: Sequence[float]) -> np.ndarray:
            s = self._stack_to_layer.inverse().index(view_index, view_shape)   # (slice, row, column)
            canonical = [0.0] * 3
            canonical[geometry.slice_axis] = first_slice + s[0]
            for k, axis in enumerate(geometry.plane_axes):
                canonical[axis] = (s[1 + k] + 0.5) * ratios[k] - 0.5
            file_index = geometry.orientation.to_canonical.inverse().index(canonical, geometry.canonical_shape)
            return np.asarray(self.layer.to_layer.index(file_index, geometry.file_shape), dtype=float)

        # Every layer axis depends on one stack axis only (a permutation), so two points give all slopes.
        origin, ones = to_layer((0.0, 0.0, 0.0)), to_layer((1.0, 1.0, 1.0))
        keep = slice(3 - self.layer.layer_ndim, 3)
        return (ones - origin)[keep], origin[keep]


def _upper_triangular(shear: np.ndarray, ndim: int) -> np.ndarray:
    shear = np.asarray(shear, dtype=float)
    if shear.ndim == 2:
        return shear
    matrix = np.eye(ndim)
    matrix[np.triu_indices(ndim, 1)] = shear
    return matrix


def _embed(matrix: np.ndarray, size: int) -> np.ndarray:
    """Put ``matrix`` in the lower-right block of a ``size`` identity (a new leading axis)."""
    out = np.eye(size)
    n = matrix.shape[0]
    out[size - n:, size - n:] = matrix
    return out


def same_place_kwargs(layer: Any) -> dict:
    """Layer kwargs that put a layer of the same shape exactly over ``layer``."""
    return dict(scale=tuple(layer.scale), translate=tuple(layer.translate), rotate=np.asarray(layer.rotate),
                shear=np.asarray(layer.shear), affine=layer.affine.affine_matrix, units=tuple(layer.units),
                axis_labels=tuple(layer.axis_labels))


def stack_overlay_kwargs(layer: Any, scale: Sequence[float], offset: Sequence[float], step_axis_label: str) -> dict:
    """Transforms for a (S, *spatial) stack drawn over ``layer``: stack voxel ``q`` lies on scan voxel
    ``scale * q + offset`` (per axis), composed with the scan layer's own scale, translate, rotate,
    shear and affine. The leading (diffusion step) axis is a slider of its own."""
    from napari.utils.transforms import Affine

    ndim = layer.ndim
    scale, offset = np.asarray(scale, dtype=float), np.asarray(offset, dtype=float)
    if scale.shape != (ndim,) or offset.shape != (ndim,):
        raise ValueError(f"a {ndim}-D layer needs {ndim} scales and offsets, got {scale.shape} and {offset.shape}")
    data_to_physical = Affine(scale=layer.scale, translate=layer.translate, rotate=layer.rotate,
                              shear=layer.shear, ndim=ndim)
    size = ndim + 1
    return dict(
        scale=(1.0,) + tuple(np.asarray(layer.scale) * scale),
        translate=(0.0,) + tuple(np.asarray(data_to_physical(offset), dtype=float)),
        rotate=_embed(np.asarray(layer.rotate, dtype=float), size),
        shear=_embed(_upper_triangular(layer.shear, ndim), size),
        affine=_embed(layer.affine.affine_matrix, size + 1),
        units=("pixel",) + tuple(layer.units),
        axis_labels=(step_axis_label,) + tuple(layer.axis_labels),
    )
