"""The dock's More channels list: further Image layers a multi-channel model takes, ticked and ordered
by the user (checked items in row order are the model's channels 1…C-1)."""

from __future__ import annotations

from typing import Any, Iterable, Optional

from qtpy.QtCore import Qt
from qtpy.QtWidgets import QAbstractItemView, QListWidget, QListWidgetItem

__all__ = ["ChannelsList", "CHANNELS_TIP"]

CHANNELS_TIP = ("Further channels of a multi-channel scan (e.g. MRI sequences) for a model trained on several: "
                "the Image above is the model's first channel, the ticked layers here are its next channels, in "
                "list order (drag a layer to move it). Each must lie on the Image's grid (same shape and "
                "geometry); the results belong to the Image. Tick none for a one-channel model.")
# Rows shown without scrolling: most multi-channel MRI models take 2–4.
CHANNEL_ROWS = 4


class ChannelsList(QListWidget):
    def __init__(self) -> None:
        super().__init__()
        # Checked items in row order are the channels; dragging changes the order to the model's.
        self.setDragDropMode(QAbstractItemView.DragDropMode.InternalMove)
        self.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.setToolTip(CHANNELS_TIP)
        # A DICOM series' layer name is long ("series 9 'CT chest (enhanced conversion)' (acquisition 2)"):
        # a horizontal scroll bar would fill the one-row list and hide the row; the name is shortened in the
        # middle instead (its end tells echoes and phases apart) and shown whole as the row's tooltip.
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.setTextElideMode(Qt.TextElideMode.ElideMiddle)

    def refresh(self, layers: Iterable[Any]) -> None:
        """Show ``layers``, keeping the user's order and ticks (by unique id, so a renamed layer keeps
        its place; napari hands a plugin proxies of its layers, so identity does not work); new layers
        come last, unticked."""
        layers = {str(layer.unique_id): layer for layer in layers}
        listed = [self.item(row) for row in range(self.count())]
        before = [str(item.data(Qt.ItemDataRole.UserRole)) for item in listed]
        ticked = {key for key, item in zip(before, listed) if item.checkState() == Qt.CheckState.Checked}
        order = [key for key in before if key in layers] + [key for key in layers if key not in before]
        self.blockSignals(True)
        self.clear()
        for key in order:
            item = QListWidgetItem(layers[key].name)
            item.setToolTip(layers[key].name)
            item.setData(Qt.ItemDataRole.UserRole, key)
            item.setFlags(Qt.ItemFlag.ItemIsEnabled | Qt.ItemFlag.ItemIsUserCheckable | Qt.ItemFlag.ItemIsSelectable
                          | Qt.ItemFlag.ItemIsDragEnabled)
            item.setCheckState(Qt.CheckState.Checked if key in ticked else Qt.CheckState.Unchecked)
            self.addItem(item)
        self.blockSignals(False)
        # As tall as its rows (up to CHANNEL_ROWS): a one-channel CT user sees one short row, not a box.
        count = self.count()
        row = self.sizeHintForRow(0) if count else self.fontMetrics().height() + 4
        self.setFixedHeight(max(1, min(count, CHANNEL_ROWS)) * row + 2 * self.frameWidth())

    def ticked_ids(self) -> list[str]:
        items = [self.item(row) for row in range(self.count())]
        return [str(item.data(Qt.ItemDataRole.UserRole)) for item in items
                if item.checkState() == Qt.CheckState.Checked]

    def tick(self, names: list[str]) -> None:
        """Tick these layers, in this order (as a user's ticks and drags would)."""
        items = {self.item(row).text(): self.item(row) for row in range(self.count())}
        for row, name in enumerate(names):
            item = self.takeItem(self.row(items[name]))
            self.insertItem(row, item)
        for name, item in items.items():
            item.setCheckState(Qt.CheckState.Checked if name in names else Qt.CheckState.Unchecked)

    def explain(self, names: Optional[tuple[str, ...]]) -> Optional[str]:
        """Set the tooltip for a model taking channels ``names``; returns what the user must do, if it
        takes several."""
        tip, expected = CHANNELS_TIP, None
        if names is not None and len(names) > 1:
            # Said before any run: which layer goes where is what a multi-channel user must get right.
            expected = (f"This model takes {len(names)} channels: {', '.join(names)}. The Image is {names[0]}; "
                        f"tick {', '.join(names[1:])} under More channels, in this order.")
            tip += " " + expected
        elif names is not None:
            tip += f" This model takes one channel ({names[0]}): tick none."
        self.setToolTip(tip)
        return expected
