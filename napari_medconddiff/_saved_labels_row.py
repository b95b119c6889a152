"""The Segment section's *Saved labels* row: carry on from labels saved in an earlier session.

It lists the Labels layers that lie over the chosen scan (same shape) and are not results this dock keeps
up to date (of any scan still open: another scan's consensus is no saved labels of this one), such as a
DICOM SEG the reader opened over its series or a NIfTI mask opened over its scan; **Continue from them** makes the chosen one the scan's consensus (:mod:`._continue_flow`). The row is
hidden while there is nothing to continue from.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QComboBox, QFormLayout, QLabel, QPushButton, QVBoxLayout, QWidget

from ._layers import full_resolution

__all__ = ["SavedLabelsRow"]


class SavedLabelsRow:
    """A combo of saved Labels layers over the chosen scan and the Continue button."""

    def __init__(self, form: QFormLayout, on_continue: Callable[[], None], is_live_result: Callable[[Any], bool]):
        self.combo = QComboBox()
        self.combo.setToolTip("Labels saved in an earlier session and opened over this scan: a DICOM SEG or RT "
                              "structure set (opened with its series folder, or alone) or a NIfTI mask")
        self.button = QPushButton("Continue from them")
        self.button.setToolTip("Make these labels the scan's consensus, as your edits: the slices they label count "
                               "as verified (Add to training set, Fine-tune) and are kept when you segment again. "
                               "The saved layer is left as it is; Ctrl+Z in the consensus undoes this")
        self.button.clicked.connect(on_continue)
        # The combo above the button, each the row's full width: side by side in a dock of napari's default
        # width, a layer name (`series 2 'CT chest' RTSTRUCT 'planning'`) and the button's text were both cut.
        self.combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.combo.setMinimumContentsLength(12)
        self.container = QWidget()
        column = QVBoxLayout(self.container)
        column.setContentsMargins(0, 0, 0, 0)
        column.addWidget(self.combo)
        column.addWidget(self.button)
        self.label = QLabel("Saved labels")
        self.label.setToolTip(self.combo.toolTip())
        form.addRow(self.label, self.container)
        self._is_live_result = is_live_result     # a layer a run of this dock updates: no saved labels
        self._layers: list[Any] = []
        self._idle = True
        self.refresh((), None)

    def refresh(self, layers: Iterable[Any], scan: Any) -> None:
        """List the saved Labels layers over ``scan`` among ``layers``, keeping the choice where it stays."""
        from napari.layers import Labels

        before = self.chosen()
        shape = np.shape(full_resolution(scan)) if scan is not None else None
        self._layers = [layer for layer in layers if isinstance(layer, Labels)
                        and not self._is_live_result(layer) and np.shape(full_resolution(layer)) == shape]
        self.combo.blockSignals(True)
        self.combo.clear()
        self.combo.addItems([layer.name for layer in self._layers])
        for index, layer in enumerate(self._layers):      # the whole name where the combo shows its start
            self.combo.setItemData(index, layer.name, Qt.ItemDataRole.ToolTipRole)
        ids = [str(layer.unique_id) for layer in self._layers]
        if before is not None and str(before.unique_id) in ids:
            self.combo.setCurrentIndex(ids.index(str(before.unique_id)))
        self.combo.blockSignals(False)
        self.label.setVisible(bool(self._layers))
        self.container.setVisible(bool(self._layers))
        self.set_idle(self._idle)

    def chosen(self) -> Optional[Any]:
        index = self.combo.currentIndex()
        return self._layers[index] if 0 <= index < len(self._layers) else None

    def set_idle(self, idle: bool) -> None:
        self._idle = idle
        self.button.setEnabled(idle and bool(self._layers))
