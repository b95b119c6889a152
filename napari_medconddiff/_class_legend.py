"""The widget's class legend: each class's colour, label value and name and, once a scan is segmented,
its volume in the consensus layer (the user's edits included; :mod:`._volumes` counts it).

The count follows every change napari shows (a stroke, an undo, a streaming run) once the layer has
been still for :data:`VOLUMES_DELAY_MS`, so that a stroke or a run is counted once, not at every event.
"""

from __future__ import annotations

from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import QLabel

from . import _result_layers as results_layers
from ._controller import SegmentationController
from ._qt_lifetime import alive
from ._volumes import millilitres

__all__ = ["ClassLegend", "VOLUMES_DELAY_MS"]

#: How long the consensus layer must stay unchanged before the volumes are counted again.
VOLUMES_DELAY_MS = 400


class ClassLegend(QLabel):
    """A rich-text label kept current by the controller's signals."""

    def __init__(self, controller: SegmentationController):
        super().__init__("")
        self.controller = controller
        self.setTextFormat(Qt.TextFormat.RichText)
        self.setWordWrap(True)
        self.setToolTip("Label values and class names of the model; after a segmentation, how much of each "
                        "class the consensus layer holds, your edits included")
        self._names: tuple[str, ...] = ()
        self._recount = QTimer(self)
        self._recount.setSingleShot(True)
        self._recount.setInterval(VOLUMES_DELAY_MS)
        self._recount.timeout.connect(self.refresh)
        controller.classes_changed.connect(self.show_classes)
        for signal in (controller.labels_shown, controller.results_changed, controller.consensus_updated):
            signal.connect(self.recount_later)

    def show_classes(self, class_names: tuple[str, ...]) -> None:
        self._names = tuple(class_names)
        self.refresh()

    def recount_later(self) -> None:
        if alive(self):
            self._recount.start()

    def refresh(self) -> None:
        if not alive(self):
            return
        volumes = self.controller.class_volumes()
        items = []
        for index, name in enumerate(self._names[1:], start=1):
            r, g, b, _ = (int(255 * c) for c in results_layers.class_color(index))
            size = f" <b>{millilitres(volumes.ml[name])}</b>" if volumes is not None and name in volumes.ml else ""
            items.append(f"<span style='color: rgb({r},{g},{b});'>■</span> {index} {name}{size}")
        text = ("Classes (volume in the consensus layer): " if volumes is not None else "Classes: ") \
            + " &nbsp; ".join(items)
        notes = []
        if volumes is not None and volumes.partial:
            notes.append(f"{volumes.slices_segmented} of {volumes.slices} slices segmented")
        if volumes is not None and not volumes.size_from_file:
            notes.append("voxel size from the layer's scale")
        if notes:
            text += f" <i>({'; '.join(notes)})</i>"
        self.setText(text)
