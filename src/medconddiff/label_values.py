"""Label maps handed to the Python API: class values as whole numbers, whatever their array type.

``load_volume`` reads a label file as float32 (it reads any scan so), and arrays from other libraries come
as floats too: whole-valued floats are class values; a fraction, a negative value or NaN is no class, and
casting it (0.75 → 0, 1.5 → 1, −1 → 255) would train or store another segmentation than the one given.
"""

from __future__ import annotations

import numpy as np

from .errors import UserInputError

__all__ = ["whole_label_values"]


def whole_label_values(labels: np.ndarray, where: str, error: type[Exception] = UserInputError) -> np.ndarray:
    """``labels`` as non-negative integers of the smallest type that holds them (bool → uint8; whole-valued
    floats cast); ``error`` (naming ``where``) for a fraction, a negative value, NaN or a non-numeric type."""
    from .nifti_read import smallest_label_dtype

    labels = np.asarray(labels)
    if labels.dtype.kind == "b":
        return labels.astype(np.uint8)
    if labels.dtype.kind == "f":
        if not np.isfinite(labels).all():
            raise error(f"{where}: the labels hold NaN or infinite values; class values are whole numbers 0, 1, 2, …")
        fractional = labels[labels != np.rint(labels)]
        if fractional.size:
            raise error(f"{where}: the labels hold {fractional.flat[0]:g}, not a class value (whole numbers 0, 1, "
                        "2, …; read a label file with load_labels)")
    elif labels.dtype.kind not in "iu":
        raise error(f"{where}: labels of type {labels.dtype} are no class values (whole numbers 0, 1, 2, …)")
    if labels.size and labels.min() < 0:
        raise error(f"{where}: the labels hold {labels.min():g}; class values are whole numbers 0, 1, 2, …")
    top = int(labels.max()) if labels.size else 0
    return labels.astype(smallest_label_dtype(top), copy=False)
