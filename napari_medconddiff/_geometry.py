"""Axis bookkeeping between the engine (NIfTI-ordered volumes, one axis sliced) and napari layers.

The engine works on volumes in NIfTI order ``(i, j, k)`` and slices ``slice_axis`` of them; layers
follow :mod:`napari_medconddiff._layers` (last NIfTI axis first; 2-D images are a single slice
along axis 2). Results are written into layer data through the views these helpers return, so a
finished slice appears in the layer without copying the volume.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from ._layers import layer_to_volume


def layer_axis_of(volume_axis: int, layer_ndim: int) -> Optional[int]:
    """Layer axis that shows NIfTI axis ``volume_axis`` (None: a 2-D layer has no third axis)."""
    if layer_ndim == 3:
        return (volume_axis + 1) % 3
    if layer_ndim == 2:
        return volume_axis if volume_axis < 2 else None
    raise ValueError(f"only 2-D and 3-D layers map to volumes, got {layer_ndim}-D")


def volume_view(layer_data: np.ndarray) -> np.ndarray:
    """Writable NIfTI-ordered view of a 2-D/3-D layer's numpy data (no copy)."""
    if not isinstance(layer_data, np.ndarray):
        raise TypeError("result layers hold numpy arrays")
    return layer_to_volume(layer_data)[0]


def slice_first_view(layer_data: np.ndarray, slice_axis: int) -> np.ndarray:
    """View of a layer's data with the engine's slice axis first: ``view[indices] = slices``."""
    return np.moveaxis(volume_view(layer_data), slice_axis, 0)


def stack_to_layer_order(stack: np.ndarray, slice_axis: int, layer_ndim: int) -> np.ndarray:
    """(S, n_slices, h, w) engine-order stack -> (S, *layer axes) view, the same axis convention as
    :func:`napari_medconddiff._layers.volume_to_layer` applied to every entry of the leading axis."""
    volume_order = np.moveaxis(stack, 1, slice_axis + 1)  # (S, i, j, k), mixed resolutions
    if layer_ndim == 3:
        return np.moveaxis(volume_order, -1, 1)
    if slice_axis != 2 or volume_order.shape[-1] != 1:
        raise ValueError("a 2-D image is a single slice along axis 2")
    return volume_order[..., 0]


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


def stack_overlay_kwargs(layer: Any, stack_shape: Sequence[int], slice_layer_axis: Optional[int],
                         first_slice: int, step_axis_label: str) -> dict:
    """Transforms for a (S, *spatial) stack at model resolution drawn over ``layer`` (scan resolution).

    In-plane axes were resized from the scan's size to the model's with ``align_corners=False``, so
    model pixel ``p`` covers scan coordinates centred on ``(p + 0.5) * ratio - 0.5``; along the slice
    axis the stack starts at ``first_slice`` with the scan's spacing. The stack keeps a leading
    axis (diffusion step) that napari shows as a slider of its own.
    """
    from napari.utils.transforms import Affine

    spatial = tuple(int(n) for n in stack_shape[1:])
    base = layer.data[0] if layer.multiscale else layer.data
    scan_shape = tuple(int(n) for n in np.shape(base)[:layer.ndim])
    if len(spatial) != len(scan_shape):
        raise ValueError(f"stack {stack_shape} does not match a {len(scan_shape)}-D layer")
    ratio = np.array([1.0 if axis == slice_layer_axis else scan_shape[axis] / spatial[axis]
                      for axis in range(len(spatial))])
    offset = np.array([float(first_slice) if axis == slice_layer_axis else 0.5 * ratio[axis] - 0.5
                       for axis in range(len(spatial))])
    ndim = len(spatial)
    data_to_physical = Affine(scale=layer.scale, translate=layer.translate, rotate=layer.rotate,
                              shear=layer.shear, ndim=ndim)
    size = ndim + 1
    return dict(
        scale=(1.0,) + tuple(np.asarray(layer.scale) * ratio),
        translate=(0.0,) + tuple(np.asarray(data_to_physical(offset), dtype=float)),
        rotate=_embed(np.asarray(layer.rotate, dtype=float), size),
        shear=_embed(_upper_triangular(layer.shear, ndim), size),
        affine=_embed(layer.affine.affine_matrix, size + 1),
        units=("pixel",) + tuple(layer.units),
        axis_labels=(step_axis_label,) + tuple(layer.axis_labels),
    )
