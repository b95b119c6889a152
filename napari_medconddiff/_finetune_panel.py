"""The dock's Fine-tune section: which slices to learn, the class names, what the scan is, steps, seed,
and the Fine-tune / Cancel buttons with their progress bar."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
)

from medconddiff.errors import UserInputError
from medconddiff.finetune_steps import finetune_steps_rule
from medconddiff.hounsfield import looks_like_hounsfield
from medconddiff.slice_lists import SLICE_SYNTAX, parse_slices, slice_list_text

from . import _dialogs
from ._finetune_flow import FinetuneSettings
from ._form_controls import spin_box
from ._layers import full_resolution

if TYPE_CHECKING:
    from ._widget import SegmentWidget

__all__ = ["FinetunePanel", "SCAN_KIND_CHOICES", "FINETUNE_STEPS", "CANONICAL_TIP"]

FINETUNE_STEPS = 0      # "auto": the engine's default for the scans learned from
#: The Fine-tune section's "Scan is" menu: medconddiff.finetune.SCAN_KINDS and what the user reads.
SCAN_KIND_CHOICES = (("model", "as the model"), ("CT", "CT (Hounsfield units)"), ("MRI", "MRI (z-scored per scan)"),
                     ("other", "other (z-scored per scan)"))
SCAN_KIND_TIP = ("What the scan is. 'As the model' keeps the model's intensity scheme (the bundled models: a CT "
                 "window in Hounsfield units). For an MRI or another image with a CT model choose MRI or other: "
                 "intensities are then z-scored per scan, and the fine-tuned model records the new kind.")
REPLAY_TIP = ("Also train on the slices the start model learned from (a bundled model: the bundled liver "
              "sample), a quarter of every batch, so it keeps the classes it knew. On by default when a bundled "
              "model learns a new class")
CANONICAL_TIP = ("Slices are canonical slices: counted along the model's slicing direction in the scan's "
                 "anatomical orientation (axial: from inferior to superior), whatever order the file stores "
                 "them in.")


def not_hounsfield(scan: Any) -> bool:
    """Whether ``scan`` (a layer) does not look like CT in Hounsfield units
    (:func:`medconddiff.hounsfield.looks_like_hounsfield`). A lazy array is not read on the GUI thread:
    False."""
    data = full_resolution(scan)
    return isinstance(data, np.ndarray) and data.size > 0 and not looks_like_hounsfield(data)


class FinetunePanel(QGroupBox):
    def __init__(self, owner: "SegmentWidget"):
        super().__init__("Fine-tune from your corrections")
        self.owner = owner
        self.controller = owner.controller
        # Names the user typed in the class table, {label value: name} by the result (scan id, model classes) they
        # were typed on: another scan's table, or another model's classes, were not renamed; back on the scan, are.
        self._typed_names: dict[tuple, dict[int, str]] = {}
        # "Scan is" as the user chose it, by scan (unique id): a choice made for an MRI must not make the CT
        # picked next join a set or be fine-tuned as an MRI. The scan the menu now shows the kind of:
        self._kinds_chosen: dict[Optional[str], str] = {}
        self._kind_for: Optional[str] = None
        self._hounsfield_cache: dict[tuple, bool] = {}
        self.setToolTip("Train the selected model a little on slices you corrected in the consensus layer, "
                        "save it, and re-segment the other slices with it")
        form = QFormLayout(self)
        self.ft_slices_edit = QLineEdit()
        self.ft_slices_edit.setPlaceholderText("edited slices (or e.g. 10, 12, 20-24)")
        self.ft_slices_edit.setToolTip("Slices whose consensus labels are learned. Empty: the slices you edited. "
                                       f"Write {SLICE_SYNTAX}. With a training set chosen, every verified slice "
                                       "of its cases is learned too (a slice of this scan already in the set is "
                                       "learned from the set: add the scan again after new edits). "
                                       + CANONICAL_TIP)
        self.ft_slices_edit.editingFinished.connect(self.refresh_class_table)
        form.addRow("Train on", self.ft_slices_edit)
        self.ft_edited_label = QLabel("Edited slices: none yet")
        self.ft_edited_label.setWordWrap(True)
        self.ft_edited_label.setToolTip("Slices of the consensus layer that differ from what the model wrote")
        form.addRow(self.ft_edited_label)
        self.class_table = QTableWidget(0, 2)
        self.class_table.setHorizontalHeaderLabels(["Label", "Class name"])
        self.class_table.verticalHeader().setVisible(False)
        self.class_table.horizontalHeader().setSectionResizeMode(1, QHeaderView.ResizeMode.Stretch)
        self.class_table.setSelectionMode(QAbstractItemView.SelectionMode.NoSelection)
        self.class_table.setToolTip("Each label value the model will learn and its class name. A value the model "
                                    "does not know (painted with a new label) becomes a new class: name it here")
        self.class_table.itemChanged.connect(self._on_class_renamed)
        form.addRow(self.class_table)
        self.ft_kind_combo = QComboBox()
        for kind, text in SCAN_KIND_CHOICES:
            self.ft_kind_combo.addItem(text, kind)
        self.ft_kind_combo.setToolTip(SCAN_KIND_TIP)
        self.ft_kind_combo.activated.connect(self._on_kind_chosen)     # the user's own choice, not ours
        form.addRow("Scan is", self.ft_kind_combo)
        self.ft_steps_spin = spin_box(0, 100_000, FINETUNE_STEPS, "Optimizer steps (4 slice crops each); auto: "
                                      f"{finetune_steps_rule()} (this one and each case of the training set)")
        self.ft_steps_spin.setSpecialValueText("auto")     # shown at the minimum, 0
        form.addRow("Steps", self.ft_steps_spin)
        self.ft_seed_spin = spin_box(0, 2**31 - 1, 0, "Seed of sampling, augmentation and new layers: the same "
                                  "seed and inputs give the same model")
        form.addRow("Seed", self.ft_seed_spin)
        self.ft_resegment_check = QCheckBox("Then re-segment the other slices")
        self.ft_resegment_check.setChecked(True)
        self.ft_resegment_check.setToolTip("After fine-tuning, segment the slices that were neither trained on "
                                           "nor edited with the new model; only those slices change")
        form.addRow(self.ft_resegment_check)
        self.ft_replay_check = QCheckBox("Replay the start model's training slices")
        self.ft_replay_check.setToolTip(REPLAY_TIP)
        self.ft_replay_check.clicked.connect(self._on_replay_chosen)     # the user's own choice, not ours
        form.addRow(self.ft_replay_check)
        self._replay_chosen_by_user = False
        owner.model_combo.currentIndexChanged.connect(self.suggest_replay)
        buttons = QHBoxLayout()
        self.finetune_button = QPushButton("Fine-tune…")
        self.finetune_button.setToolTip("Choose where to save the model, then fine-tune (in the background)")
        self.finetune_button.clicked.connect(self.finetune)
        self.ft_cancel_button = QPushButton("Cancel")
        self.ft_cancel_button.setToolTip("Stop after the current step; the weights so far can still be saved")
        self.ft_cancel_button.clicked.connect(self.controller.cancel)
        buttons.addWidget(self.finetune_button)
        buttons.addWidget(self.ft_cancel_button)
        form.addRow(buttons)
        self.ft_progress = QProgressBar()
        self.ft_progress.setFormat("not started")
        self.ft_progress.setToolTip("Fine-tuning steps done; the loss is shown in the status line")
        self.ft_progress.setValue(0)
        form.addRow(self.ft_progress)

    # ------------------------------------------------------------------ what the scan is
    def show_model_channels(self, names: Optional[tuple[str, ...]]) -> None:
        self.ft_kind_combo.setItemText(0, "as the model" + (f" ({', '.join(names)})" if names else ""))

    def _on_kind_chosen(self, *_: Any) -> None:
        self._kinds_chosen[self._kind_for] = self.ft_kind_combo.currentData()

    def suggest_scan_kind(self, scan: Any, model_names: Optional[tuple[str, ...]]) -> None:
        """Default "Scan is" from the scan: MRI when a CT model would get a scan with no voxel below 0
        (a CT window on it cost a T1 0.87 → 0.41 Dice), saying why; the user's own choice for this scan stays."""
        self._kind_for = str(scan.unique_id) if scan is not None else None
        chosen = self._kinds_chosen.get(self._kind_for)
        if chosen is not None:
            if self.ft_kind_combo.currentData() != chosen:     # back on a scan from another: its choice again
                self.ft_kind_combo.setCurrentIndex(self.ft_kind_combo.findData(chosen))
                self.ft_kind_combo.setToolTip(SCAN_KIND_TIP)
            return
        ct_model = model_names is None or all(name.upper() == "CT" for name in model_names)
        reason = None
        if scan is not None and ct_model:
            key = (str(scan.unique_id), id(full_resolution(scan)))
            if key not in self._hounsfield_cache:
                self._hounsfield_cache = {key: not_hounsfield(scan)}     # one scan at a time is enough
            if self._hounsfield_cache[key]:
                reason = (f"Set to MRI because '{scan.name}' has no voxel below 0, so it is no CT in Hounsfield "
                          "units and a CT window would flatten it. Choose 'other' for a non-MRI image.")
        self.ft_kind_combo.setCurrentIndex(self.ft_kind_combo.findData("MRI" if reason else "model"))
        self.ft_kind_combo.setToolTip(SCAN_KIND_TIP + (" " + reason if reason else ""))

    # ------------------------------------------------------------------ slices and classes
    def finetune_slices(self) -> Optional[list[int]]:
        """The typed training slices (None: the edited ones), read as every slice list of the project."""
        results = self.controller.current
        count = results.space.n_slices if results is not None else None
        return parse_slices(self.ft_slices_edit.text(), count, what="Train on")

    def show_edits(self) -> None:
        results = self.controller.current
        slices = sorted(results.edited) if results is not None else []
        self.ft_edited_label.setText(f"Edited slices: {slice_list_text(slices)}" if slices
                                     else "Edited slices: none yet")
        self.refresh_class_table()

    def refresh_class_table(self, *_: Any) -> None:
        try:
            slices = self.finetune_slices()
        except ValueError:
            slices = None
        rows = self.controller.class_table(slices)
        typed = self._names_typed()
        self.class_table.blockSignals(True)
        self.class_table.setRowCount(len(rows))
        for row, (value, name) in enumerate(rows):
            label = QTableWidgetItem(str(value))
            label.setFlags(Qt.ItemFlag.ItemIsEnabled)
            self.class_table.setItem(row, 0, label)
            self.class_table.setItem(row, 1, QTableWidgetItem(typed.get(value, name)))
        self.class_table.blockSignals(False)
        # Tall enough for every class of a usual model without an inner scroll bar.
        table = self.class_table
        shown_rows = min(max(len(rows), 1), 6)
        row_height = table.verticalHeader().defaultSectionSize()
        table.setFixedHeight(table.horizontalHeader().height() + shown_rows * row_height + 2 * table.frameWidth())
        self.suggest_replay()

    def _names_typed(self) -> dict[int, str]:
        """The names typed for the current result's label values (its scan, its model's classes)."""
        current = self.controller.current
        if current is None:
            return {}
        return self._typed_names.setdefault((current.scan_id, tuple(current.class_names)), {})

    def _on_replay_chosen(self, *_: Any) -> None:
        self._replay_chosen_by_user = True

    def suggest_replay(self, *_: Any) -> None:
        """Replay on when the start model is a bundled one and the class list grows (the scan's classes or
        the training set's go beyond the model's); the user's own choice stays."""
        if self._replay_chosen_by_user:
            return
        from ._model_picker import BUNDLED
        from ._training_set_flow import model_class_names

        bundled = self.owner.model_combo.currentData() in BUNDLED.values()
        known = model_class_names(self.owner.model_combo.currentData()) if bundled else None
        state = self.controller.training_set
        wanted = set(self.class_names()[1:]) | set(state.class_names[1:] if state is not None else ())
        self.ft_replay_check.setChecked(bool(known) and not wanted <= set(known[1:]))

    def _on_class_renamed(self, item: QTableWidgetItem) -> None:
        if item.column() == 1:
            self._names_typed()[item.row()] = item.text().strip()
            self.suggest_replay()

    def class_names(self) -> tuple[str, ...]:
        return tuple(self.class_table.item(row, 1).text().strip() for row in range(self.class_table.rowCount()))

    def show_step(self, step: int, total: int, loss: float) -> None:
        # The loss stays on the bar once the status line has moved on (to the re-segmentation).
        self.ft_progress.setFormat(f"%v / %m steps · loss {loss:.3f}")
        self.ft_progress.setRange(0, total)
        self.ft_progress.setValue(step)

    # ------------------------------------------------------------------ the Fine-tune button
    def finetune(self) -> None:
        """Fine-tune the selected model on the chosen slices."""
        owner, controller = self.owner, self.controller
        results = controller.current
        if owner.training_set_panel.typed_folder_not_in_use("Not fine-tuned"):
            return      # it would train on a set the Folder field does not show
        try:
            if results is None:
                raise UserInputError("segment a scan first, correct some slices, then fine-tune")
            slices = self.finetune_slices()
            start = owner.checkpoint()
            resegment = None
            if self.ft_resegment_check.isChecked() and results.scan is not None:
                resegment = owner.segment_settings(results.scan)
        except ValueError as error:
            controller.fail(error)
            return
        chosen, _ = QFileDialog.getSaveFileName(self, "Save the fine-tuned model as",
                                                str(controller.finetune_default_path()),
                                                "safetensors checkpoint (*.safetensors)")
        if not chosen:
            return
        try:
            target = _dialogs.confirmed_checkpoint_target(self, chosen)
        except ValueError as error:
            controller.fail(error)
            return
        if target is None:
            return
        self.ft_progress.setFormat("%v / %m steps")
        controller.finetune(FinetuneSettings(start=start, save_path=target, class_names=self.class_names(),
                                             slices=slices, scan_kind=self.ft_kind_combo.currentData(),
                                             steps=self.ft_steps_spin.value() or None,
                                             seed=self.ft_seed_spin.value(),
                                             device=owner.device_combo.currentText(), resegment=resegment,
                                             replace_existing=target.exists(),
                                             replay=self.ft_replay_check.isChecked()))
