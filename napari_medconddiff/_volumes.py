"""How much of each class the consensus layer holds, the user's edits included, in millilitres.

Counted on the layer as it is now (painted, erased, undone), with the voxel size of the scan it was
made for: the file's spacing for a scan read from NIfTI or DICOM, the layer's scale for a plain layer
(whose unit napari does not know, so the widget says where the size came from).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from medconddiff.outputs import class_volumes_ml

from ._layers import full_resolution
from ._result_set import ResultSet

__all__ = ["ClassVolumes", "consensus_volumes", "millilitres"]


@dataclass(frozen=True)
class ClassVolumes:
    """Millilitres per class name (background included), whether the voxel size is the scan file's, and
    how many of the scan's slices the engine has segmented (0 for labels continued from a file)."""

    ml: dict[str, float]
    size_from_file: bool
    slices_segmented: int = 0
    slices: int = 0

    @property
    def partial(self) -> bool:
        """Whether runs so far covered only part of the scan: its volumes are not the organ's yet."""
        return 0 < self.slices_segmented < self.slices


def consensus_volumes(results: Optional[ResultSet]) -> Optional[ClassVolumes]:
    """The volumes in ``results``' consensus layer; None when it has none (never segmented, or removed)."""
    layer = results.consensus if results is not None else None
    if layer is None:
        return None
    meta = results.space.export_meta()
    counted = class_volumes_ml(full_resolution(layer.data), meta.spacing, results.class_names)
    return ClassVolumes({name: value["ml"] for name, value in counted.items()}, bool(meta.affine_known),
                        len(results.shown_slices), results.space.n_slices)


def millilitres(ml: float) -> str:
    """A volume as a reader compares volumes: 1,523 ml, 12.4 ml, 0.083 ml (three significant digits below 100)."""
    if ml >= 100:
        return f"{ml:,.0f} ml"
    if ml >= 10:
        return f"{ml:.1f} ml"
    if ml >= 1:
        return f"{ml:.2f} ml"
    return f"{ml:.3f} ml" if ml > 0 else "0 ml"
