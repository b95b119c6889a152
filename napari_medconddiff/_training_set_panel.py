"""The dock's Training set section: the set's folder, which slices of the scan are verified (edited or
marked as checked), Mark slice as checked, Add to training set, Remove from set…, and what the set holds.

The logic is the controller's (:mod:`._training_set_flow`); this is its view.
"""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from qtpy.QtCore import QTimer, Signal
from qtpy.QtWidgets import QFileDialog, QFormLayout, QGroupBox, QHBoxLayout, QLabel, QLineEdit, QPushButton, QToolButton

from medconddiff.errors import UserInputError
from medconddiff.slice_lists import slice_list_text

from ._qt_lifetime import alive
from ._training_set_flow import SetState

if TYPE_CHECKING:
    from ._widget import SegmentWidget

__all__ = ["TrainingSetPanel", "NO_SET_TEXT"]

NO_SET_TEXT = "No training set chosen: choose a folder to keep your corrections for later fine-tuning"


class TrainingSetPanel(QGroupBox):
    """See the module docstring; ``finished`` re-emits the controller's ``training_set_finished``."""

    finished = Signal(str)        # 'done' or 'failed': an open or an add ended

    def __init__(self, owner: "SegmentWidget"):
        super().__init__("Training set")
        self.owner = owner
        self.controller = owner.controller
        self.setToolTip("A folder (an nnU-Net v2 dataset) that collects the slices you verified, scan by scan; "
                        "Fine-tune then learns from all of it")
        form = QFormLayout(self)
        self.folder_edit = QLineEdit()
        self.folder_edit.setPlaceholderText("choose or type a folder")
        self.folder_edit.setToolTip("The training-set folder: an existing set, or a new or empty folder (the set "
                                    "is created there on the first add). Type a path and press Enter, or "
                                    "choose one. Remembered while napari runs")
        self.folder_edit.returnPressed.connect(self._on_folder_typed)
        self.browse_button = QToolButton()
        self.browse_button.setText("…")
        self.browse_button.setToolTip("Choose the training-set folder")
        self.browse_button.clicked.connect(self.browse)
        row = QHBoxLayout()
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.folder_edit)
        row.addWidget(self.browse_button)
        form.addRow("Folder", row)
        self.verified_label = QLabel("Verified slices: none yet")
        self.verified_label.setWordWrap(True)
        self.verified_label.setToolTip("Slices of this scan that Add writes with their labels: the ones you "
                                       "edited and the ones you marked as checked. Every other voxel is "
                                       "stored as 'ignore' and teaches nothing")
        form.addRow(self.verified_label)
        buttons = QHBoxLayout()
        self.mark_button = QPushButton("Mark slice as checked")
        self.mark_button.setToolTip("The slice under the slider is right as it is: add it as verified "
                                    "without editing it")
        self.mark_button.clicked.connect(self.controller.mark_checked)
        self.add_button = QPushButton("Add to training set")
        self.add_button.setToolTip("Write this scan and its verified slices into the set; adding the same scan "
                                   "again merges its slices (nothing added before is lost)")
        self.add_button.clicked.connect(self.add)
        buttons.addWidget(self.mark_button)
        buttons.addWidget(self.add_button)
        form.addRow(buttons)
        self.remove_button = QPushButton("Remove from set…")
        self.remove_button.setToolTip("Take this scan out of the set, or only the slice under the slider (a slice "
                                      "added by mistake), or another of the set's cases chosen from a list; asks "
                                      "first. Your layers are not changed")
        self.remove_button.clicked.connect(self.remove)
        form.addRow(self.remove_button)
        self.summary_label = QLabel(NO_SET_TEXT)
        self.summary_label.setWordWrap(True)
        self.summary_label.setToolTip("What the set holds: cases, verified slices, and labelled voxels per class")
        form.addRow(self.summary_label)

        c = self.controller
        c.training_set_changed.connect(self.show_set)
        c.training_set_finished.connect(self.finished.emit)
        c.verified_changed.connect(self._on_verified)
        c.edits_changed.connect(self._on_verified)
        c.results_changed.connect(self._on_verified)
        c.busy_changed.connect(self._on_busy)
        self.show_set(c.training_set)
        self._on_busy(c.operation)

    # ------------------------------------------------------------------ controller → view
    def show_set(self, state: Optional[SetState]) -> None:
        if state is None:
            self.folder_edit.setText("")
            self.summary_label.setText(NO_SET_TEXT)
            return
        self.folder_edit.setText(str(state.folder))
        self.summary_label.setText(f"Holds: {state.summary}")
        self.owner.finetune_panel.suggest_replay()

    def _on_verified(self, *_: Any) -> None:
        # napari tells about a paint before it changes the data: look at the layer once it has.
        ref = weakref.ref(self)

        def show() -> None:
            panel = ref()
            if panel is not None and alive(panel):
                panel.show_verified()

        QTimer.singleShot(0, show)

    def show_verified(self) -> None:
        c = self.controller
        edited, checked = c.edited_slices(), c.checked_slices()
        parts = []
        if edited:
            parts.append(f"edited {slice_list_text(edited)}")
        if checked:
            parts.append(f"checked {slice_list_text(checked)}")
        self.verified_label.setText("Verified slices: " + ("; ".join(parts) if parts else "none yet"))

    def _on_busy(self, operation: str) -> None:
        idle = not operation
        for control in (self.add_button, self.mark_button, self.remove_button, self.browse_button, self.folder_edit):
            control.setEnabled(idle)
        if idle:
            self.show_verified()

    # ------------------------------------------------------------------ user actions
    def _on_folder_typed(self) -> None:
        self.choose(self.folder_edit.text())

    def browse(self) -> None:
        start = self.controller.training_set_folder
        chosen = QFileDialog.getExistingDirectory(self, "Choose or create the training-set folder",
                                                  str(start) if start else "")
        if chosen:
            self.choose(chosen)

    def choose(self, folder: str) -> None:
        try:
            start = self.owner.checkpoint()
        except ValueError:
            start = None            # no usable model chosen yet: the set's channels are checked on adding
        self.controller.choose_training_set(folder, start)

    def remove(self) -> None:
        if self.typed_folder_not_in_use("Nothing removed from the training set"):
            return
        start = self._selected_model("Nothing removed from the training set")
        if start is not None:
            self.controller.remove_from_training_set(start)

    def add(self) -> None:
        if self.typed_folder_not_in_use("Not added to the training set"):
            return
        start = self._selected_model("Not added to the training set")
        if start is not None:
            self.controller.add_to_training_set(self.owner.class_names(), start,
                                                self.owner.finetune_panel.ft_kind_combo.currentData())

    def typed_folder_not_in_use(self, failure: str) -> bool:
        """Whether the Folder field reads another folder than the set in use (typed, Enter not pressed): then
        nothing may act on the set, which the field does not show (the user is told)."""
        typed = self.folder_edit.text().strip()
        in_use = self.controller.training_set_folder
        if not typed and in_use is None:
            return False
        if typed and in_use is not None and Path(typed).expanduser().resolve() == Path(in_use).resolve():
            return False
        shown = f"reads {typed}" if typed else "is empty"
        using = f"the set in use is {in_use}" if in_use is not None else "no set is in use"
        self.controller.fail(UserInputError(f"the training-set Folder field {shown}, but {using}: press Enter in "
                                            "the field to use what it reads"), failure)
        return True

    def _selected_model(self, failure: str) -> Optional[str]:
        """The selected model's checkpoint, or None once the user is told why there is none."""
        try:
            return self.owner.checkpoint()
        except ValueError as error:
            self.controller.fail(error, failure)
            return None
