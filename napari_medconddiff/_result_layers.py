"""The layers a segmentation adds, and how the plugin recognises its own layers.

A result layer carries ``metadata[MARKER_KEY] = {"role", "scan", "layer"}``: its role, the
``unique_id`` of the scan it was computed from, and its own ``unique_id``. Only layers whose
marker names themselves are the plugin's (a duplicated layer copies the metadata but gets a new
id, so the user's copies and the user's layers that merely share a name are never touched).

Consensus and uncertainty layers have the scan layer's shape, data order and transforms; the x̂0
layer is a model-resolution stack placed over the scan (:meth:`ScanSpace.stack_placement`).
"""

from __future__ import annotations

import copy
from typing import Any, Optional, Sequence

import numpy as np

from ._geometry import ScanSpace, same_place_kwargs, stack_overlay_kwargs
from ._layers import METADATA_KEY, TO_LAYER_KEY, full_resolution

MARKER_KEY = "medconddiff_result"
EDITED_KEY = "medconddiff_edited"
SET_ASIDE_KEY = "medconddiff_set_aside"   # the role a result layer had before it became the user's    # a consensus the user edited (File > Save: its DICOM SEG is SEMIAUTOMATIC)
STEP_AXIS_LABEL = "diffusion step"   # the dims slider that scrubs the x̂0 stack

# Class colours (RGBA) by label value; background is transparent. Liver red, tumour green, then
# well separated hues for models with more classes.
CLASS_COLORS = (
    (0.0, 0.0, 0.0, 0.0),
    (0.90, 0.25, 0.25, 1.0),
    (0.20, 0.85, 0.30, 1.0),
    (0.25, 0.55, 1.00, 1.0),
    (1.00, 0.85, 0.20, 1.0),
    (0.85, 0.35, 0.95, 1.0),
    (0.20, 0.90, 0.90, 1.0),
    (1.00, 0.55, 0.15, 1.0),
)
OTHER_LABEL_COLOR = (1.0, 1.0, 1.0, 1.0)   # labels a user paints beyond the model's classes


def class_color(index: int) -> tuple[float, float, float, float]:
    return CLASS_COLORS[index] if index < len(CLASS_COLORS) else OTHER_LABEL_COLOR


def class_colormap(num_classes: int) -> dict:
    colors: dict = {None: OTHER_LABEL_COLOR}
    colors.update({index: class_color(index) for index in range(num_classes)})
    return colors


def class_features(class_names: Sequence[str]) -> dict:
    """Labels ``features`` so napari's status bar names the class under the cursor."""
    return {"index": np.arange(len(class_names)), "class": list(class_names)}


def marker(layer: Any) -> Optional[dict]:
    value = getattr(layer, "metadata", {}).get(MARKER_KEY)
    return value if isinstance(value, dict) else None


def is_own_result(layer: Any) -> bool:
    """A result layer this plugin created (not a copy of one)."""
    mark = marker(layer)
    return mark is not None and mark.get("layer") == str(layer.unique_id)


def is_result_of(layer: Any, scan: Any) -> bool:
    """A result layer this plugin made from ``scan`` (that very layer). The results of a scan the user
    removed and opened again are the user's labels for the new layer: they may be continued from."""
    return is_own_result(layer) and scan is not None and marker(layer).get("scan") == str(scan.unique_id)


def _scan_metadata(scan: Any) -> dict:
    """The scan's NIfTI metadata, so File > Save and Export write the scan's affine."""
    return {key: copy.deepcopy(scan.metadata[key]) for key in (METADATA_KEY, TO_LAYER_KEY) if key in scan.metadata}


def detach(layer: Any) -> None:
    """Make a result layer the user's own: later runs and re-fusions leave it alone. What it was stays said
    (``SET_ASIDE_KEY``): an uncertainty map set aside is still no scan to segment."""
    mark = layer.metadata.pop(MARKER_KEY, None)
    if isinstance(mark, dict):
        layer.metadata[SET_ASIDE_KEY] = mark.get("role")


def is_result_image(layer: Any) -> bool:
    """An uncertainty map of this plugin, in use or set aside: never offered as a scan or channel."""
    mark = marker(layer)
    return (mark is not None and mark.get("role") == "uncertainty") or \
        layer.metadata.get(SET_ASIDE_KEY) == "uncertainty"


def _stamp(layer: Any, role: str, scan_id: str) -> Any:
    layer.metadata[MARKER_KEY] = {"role": role, "scan": scan_id, "layer": str(layer.unique_id)}
    return layer


def make_consensus(scan: Any, name: str, data: np.ndarray, class_names: Sequence[str], scan_id: str) -> Any:
    """The editable consensus Labels over ``scan`` (``data`` has the scan layer's shape)."""
    from napari.layers import Labels

    layer = Labels(data, name=name, metadata=_scan_metadata(scan), colormap=class_colormap(len(class_names)),
                   features=class_features(class_names), opacity=0.5, **same_place_kwargs(scan))
    return _stamp(layer, "consensus", scan_id)


def set_classes(layer: Any, class_names: Sequence[str]) -> None:
    """Colours and names of a Labels layer for a (possibly longer) class list."""
    layer.colormap = class_colormap(len(class_names))
    layer.features = class_features(class_names)


def make_uncertainty(scan: Any, scan_name: str, scan_id: str) -> Any:
    from napari.layers import Image

    shape = np.shape(full_resolution(scan))[:scan.ndim]
    layer = Image(np.zeros(shape, np.float32), name=f"{scan_name} uncertainty", metadata=_scan_metadata(scan),
                  colormap="inferno", blending="additive", contrast_limits=(0.0, 1.0), opacity=0.8,
                  **same_place_kwargs(scan))
    return _stamp(layer, "uncertainty", scan_id)


def steps_name(scan_name: str, steps: int, num_seeds: int, steps_used: Optional[np.ndarray] = None) -> str:
    """``<scan> x̂0 (10 steps)``; after an adaptive run, the steps its slices took."""
    if steps_used is not None and len(steps_used) and int(np.min(steps_used)) < steps:
        low, high = int(np.min(steps_used)), int(np.max(steps_used))
        taken = (f"adaptive: {low} of {steps} steps" if low == high else
                 f"adaptive: {low}–{high} of {steps} steps, mean {float(np.mean(steps_used)):.1f}")
        count = f"{num_seeds} seeds × {taken}" if num_seeds > 1 else taken
    else:
        count = f"{num_seeds} seeds × {steps} steps" if num_seeds > 1 else f"{steps} steps"
    return f"{scan_name} x̂0 ({count})"


def make_steps(scan: Any, scan_name: str, space: ScanSpace, stack: np.ndarray, first_slice: int,
               class_names: Sequence[str], steps: int, num_seeds: int, scan_id: str) -> Any:
    """Per-step arg-max of x̂0 at model resolution, step axis first, overlaid on the scan.

    ``stack`` (S, n, h, w) holds canonical model-grid slices from ``first_slice`` on; the layer's
    data are a view of it in the scan layer's axis order, so filling the stack fills the layer.
    """
    from napari.layers import Labels

    scale, offset = space.stack_placement(stack.shape, first_slice)
    # No NIfTI metadata: the stack is at model resolution, so the scan's affine does not describe it.
    layer = Labels(space.stack_view(stack), name=steps_name(scan_name, steps, num_seeds), metadata={},
                   colormap=class_colormap(len(class_names)), features=class_features(class_names), opacity=0.5,
                   visible=False,   # a diagnostic: shown on demand, it would cover the consensus
                   **stack_overlay_kwargs(scan, scale, offset, STEP_AXIS_LABEL))
    return _stamp(layer, "steps", scan_id)
