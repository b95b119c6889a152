"""The user's edits in a consensus layer: which slices they touched, which an action may overwrite,
and how one action's writes become one napari undo step.

A canonical slice is *edited* when the consensus layer differs from what the engine last wrote there
(the result set's *reference*). napari's ``paint`` event (painting, filling, erasing,
``data_setitem``) tells which slices a user's edit touched; undo emits no event, so every decision
compares the whole volume again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

__all__ = ["KEEP", "NEW_LAYER", "REPLACE", "COMPARE_CHUNK", "WritePolicy", "UndoStep", "touched_slices",
           "differing_slices"]

#: Answers to "this would overwrite edited slices".
KEEP, NEW_LAYER, REPLACE = "keep", "new", "replace"
# Canonical slices compared at once when looking for edits (bounds the temporary memory).
COMPARE_CHUNK = 16


@dataclass
class WritePolicy:
    """Which edited slices an action may overwrite: those the user answered "replace" for, as they were
    when asked. A stroke painted after the question (on any slice) is an edit the answer did not cover:
    it is kept. The default policy overwrites no edit."""

    replace: dict[int, np.ndarray] = field(default_factory=dict)   # canonical slice → its content when asked

    @classmethod
    def replacing(cls, slices: Iterable[int], shown: np.ndarray) -> "WritePolicy":
        """Allow overwriting ``slices`` as ``shown`` (the consensus's canonical slices) holds them now."""
        return cls({int(s): np.array(shown[int(s)]) for s in slices})

    def may_overwrite(self, index: int, now: np.ndarray) -> bool:
        asked = self.replace.get(int(index))
        return asked is not None and np.array_equal(asked, now)


class UndoStep:
    """The writes of one user action (a run streaming its slices, a re-fusion) into a Labels layer,
    committed as ONE napari undo step.

    napari's ``block_history`` groups only what is written inside one ``with`` block, and a nested
    block commits when it exits; a run writes its slices over many event-loop turns, while the user
    may paint. So the writes go straight into the data and are recorded here; :meth:`commit` turns
    them into one ``data_setitem`` (one history item). A voxel the user painted over after it was
    written is left out, so undoing the action never undoes a later stroke.
    """

    def __init__(self, layer: Any):
        self.layer = layer
        self._flat: list[np.ndarray] = []
        self._old: list[np.ndarray] = []
        self._new: list[np.ndarray] = []

    def write(self, indices: tuple[np.ndarray, ...], values: np.ndarray) -> None:
        data = self.layer.data
        values = np.asarray(values, dtype=data.dtype)
        old = data[indices]
        changed = old != values
        indices = tuple(axis[changed] for axis in indices)
        self._flat.append(np.ravel_multi_index(indices, data.shape))
        self._old.append(old[changed])
        self._new.append(values[changed])
        data[indices] = values[changed]

    def commit(self) -> None:
        if not self._flat:
            return
        flat, old, new = (np.concatenate(parts) for parts in (self._flat, self._old, self._new))
        self._flat, self._old, self._new = [], [], []
        # A voxel written twice: undo restores what it held before the first write.
        voxels, first = np.unique(flat, return_index=True)
        _, last_reversed = np.unique(flat[::-1], return_index=True)
        old, new = old[first], new[len(flat) - 1 - last_reversed]
        data = self.layer.data
        indices = np.unravel_index(voxels, data.shape)
        standing = data[indices] == new
        indices = tuple(axis[standing] for axis in indices)
        if not indices[0].size:
            return
        # Put the old values back quietly and write the new ones through napari: one history item,
        # undoable and redoable like a stroke. Nothing is drawn in between (one GUI-thread call).
        data[indices] = old[standing]
        with self.layer.block_history():
            self.layer.data_setitem(indices, new[standing])


def touched_slices(event: Any, space: Any) -> set[int]:
    """Canonical slices a napari ``paint`` event's atoms touch, in a :class:`~._geometry.ScanSpace`
    (a 2-D layer has one slice, 0)."""
    slice_axis, layer_shape = space.slice_layer_axis, space.layer_shape
    touched: set[int] = set()
    for atom in event.value:
        if slice_axis is None:
            touched.add(0)
            continue
        key = getattr(atom, "slice_key", None)      # napari's masked paint/fill atom
        if key is not None:
            mask = getattr(atom, "mask", None)
            if mask is not None:
                others = tuple(a for a in range(mask.ndim) if a != slice_axis)
                positions = np.flatnonzero(mask.any(axis=others)) + (key[slice_axis].start or 0)
            else:
                positions = np.arange(*key[slice_axis].indices(layer_shape[slice_axis]))
        else:                                         # data_setitem's (indices, old, new)
            positions = np.unique(np.asarray(atom[0][slice_axis]))
        touched.update(int(space.slice_of_layer_index(int(p))) for p in positions)
    return touched


def differing_slices(shown: np.ndarray, reference: np.ndarray, count: int) -> list[int]:
    """Canonical slices where ``shown`` differs from ``reference`` (both canonical views), compared in chunks."""
    found: list[int] = []
    for start in range(0, count, COMPARE_CHUNK):
        block = (shown[start:start + COMPARE_CHUNK] != reference[start:start + COMPARE_CHUNK]).any(axis=(1, 2))
        found += [start + int(k) for k in np.flatnonzero(block)]
    return found
