"""The MedCondDiff dock widget: a thin Qt view over :class:`~napari_medconddiff._controller.SegmentationController`.

Flow: pick an Image layer, a model, sampling settings and which slices, click Segment (a model
trained on several channels, e.g. MRI sequences, also takes the layers ticked under More channels). The
controller runs the model in napari ``thread_worker``s (made here, the only Qt part of running) and
fills three result layers as slices finish:

* ``<scan> consensus`` (Labels, class colours and names): the fused segmentation, editable;
* ``<scan> uncertainty`` (Image, inferno, additive): disagreement between steps, 0..1;
* ``<scan> x̂0 (N steps)`` (Labels): each step's arg-max x̂0 at model resolution, with the step as
  the first axis, so napari's own dims slider scrubs through the diffusion.

Cancel keeps the finished slices. Changing the consensus method or skip-first re-fuses the kept
trajectories (no new diffusion). A run or re-fusion that would overwrite slices you edited asks
first (keep my edits / new layer / replace). Fine-tune trains the model on corrected slices and
re-segments the others with it. Export saves the consensus as NIfTI + JSON sidecar.

This module imports neither torch nor the engine: both are imported in worker threads.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional

from qtpy.QtCore import QEvent, QObject, QSize, Qt, QTimer, Signal
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
    QListWidget,
    QListWidgetItem,
    QMessageBox,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from medconddiff.config import CONSENSUS_METHODS, PRECISIONS, SamplingConfig

from . import _result_layers as results_layers
from ._controller import (
    CONSENSUS_NAMES,
    KEEP,
    NEW_LAYER,
    REPLACE,
    FinetuneSettings,
    Questions,
    SegmentationController,
    SegmentSettings,
    notify,
)
from medconddiff.slice_lists import parse_slice_list, slice_list_text

from ._export import checkpoint_target, export_targets
from ._job import EngineInfo, SliceChoice

DEFAULT_MODEL = "Bundled default model"
LATENT_MODEL = "Bundled LSegDiff model (latent)"
CHECKPOINT_FILE = "Checkpoint file…"
#: The checkpoint each model menu entry stands for (a bundled model's name); None: the file field.
BUNDLED = {DEFAULT_MODEL: "default", LATENT_MODEL: "lsegdiff-liver"}
SLICE_LABELS = {"current": "Current slice", "all": "All slices", "range": "Slice range"}
FINETUNE_STEPS = 200
#: The Fine-tune section's "Scan is" menu: medconddiff.finetune.SCAN_KINDS and what the user reads.
SCAN_KIND_CHOICES = (("model", "as the model"), ("CT", "CT (Hounsfield units)"), ("MRI", "MRI (z-scored per scan)"),
                     ("other", "other (z-scored per scan)"))
CHANNELS_TIP = ("Further channels of a multi-channel scan (e.g. MRI sequences) for a model trained on several: "
                "the Image above is the model's first channel, the ticked layers here are its next channels, in "
                "list order (drag a layer to move it). Each must lie on the Image's grid (same shape and "
                "geometry); the results belong to the Image. Tick none for a one-channel model.")
# Rows of the More channels list shown without scrolling: most multi-channel MRI models take 2–4.
CHANNEL_ROWS = 4
CANONICAL_TIP = ("Slices are canonical slices: counted along the model's slicing direction in the scan's "
                 "anatomical orientation (axial: from inferior to superior), whatever order the file stores "
                 "them in.")


def _bundled_exists(name: str) -> bool:
    from medconddiff.checkpoint import bundled_checkpoint_path  # no torch: a path check only

    return bundled_checkpoint_path(name).is_file()


def _alive(widget: QWidget) -> bool:
    try:
        widget.objectName()
    except RuntimeError:  # the C++ widget is gone, only its Python wrapper is left
        return False
    return True


def _connect_weakly(emitter: Any, widget: "SegmentWidget", method: str) -> None:
    """Connect a napari event to ``widget.method`` without keeping the widget (or its viewer) alive."""
    ref = weakref.ref(widget)

    def forward(event: Any) -> None:
        target = ref()
        if target is None or not _alive(target):
            emitter.disconnect(forward)
            return
        getattr(target, method)(event)

    emitter.connect(forward)


def ask_edit_choice(parent: QWidget, action: str, slices: list[int]) -> str:
    """Ask what to do with edited slices a result would overwrite: KEEP, NEW_LAYER or REPLACE."""
    box = QMessageBox(parent)
    box.setIcon(QMessageBox.Icon.Question)
    box.setWindowTitle("Edited slices")
    box.setText(f"{action} would overwrite your edits on slice(s) {slice_list_text(slices)}.")
    box.setInformativeText("Keep my edits: update only the slices you did not edit.\n"
                           "New layer: put the result in a new consensus layer; your edited layer stays as it is.\n"
                           "Replace: overwrite the edits (Edit ▸ Undo in the layer brings them back).")
    keep = box.addButton("Keep my edits", QMessageBox.ButtonRole.AcceptRole)
    new = box.addButton("New layer", QMessageBox.ButtonRole.ActionRole)
    box.addButton("Replace", QMessageBox.ButtonRole.DestructiveRole)
    box.setDefaultButton(keep)
    box.setEscapeButton(keep)    # closing the question never loses an edit
    box.exec()
    clicked = box.clickedButton()
    return KEEP if clicked is keep else NEW_LAYER if clicked is new else REPLACE


def ask_save_cancelled_finetune(parent: QWidget, done: int, total: int, path: Path) -> bool:
    answer = QMessageBox.question(
        parent, "Fine-tuning cancelled",
        f"Fine-tuning stopped after {done} of {total} steps. Save the weights of step {done} to\n{path}?",
        QMessageBox.StandardButton.Save | QMessageBox.StandardButton.Discard, QMessageBox.StandardButton.Save)
    return answer == QMessageBox.StandardButton.Save


class _DialogQuestions(Questions):
    """The controller's questions, asked with dialogs over the widget."""

    def __init__(self, widget: "SegmentWidget"):
        self._widget = weakref.ref(widget)

    def edits(self, action: str, slices: list[int]) -> str:
        widget = self._widget()
        return ask_edit_choice(widget, action, slices) if widget is not None and _alive(widget) else KEEP

    def save_cancelled_finetune(self, done: int, total: int, path: Path) -> bool:
        widget = self._widget()
        if widget is None or not _alive(widget):
            return False
        return ask_save_cancelled_finetune(widget, done, total, path)


@dataclass
class _Workers:
    """The widget's running workers, kept apart from the widget so cleanup needs no widget."""

    items: set = field(default_factory=set)

    def run(self, function: Callable, *args: Any, **callbacks: Optional[Callable]) -> Any:
        """The controller's runner: a napari thread worker whose signals call back on the GUI thread."""
        from napari.qt.threading import create_worker

        worker = create_worker(function, *args, _ignore_errors=True)
        for name, callback in callbacks.items():
            if callback is not None and hasattr(worker, name):   # function workers have no yielded/aborted
                getattr(worker, name).connect(callback)
        worker.finished.connect(partial(self.items.discard, worker))
        self.items.add(worker)
        return worker

    def stop_all(self) -> None:
        for worker in list(self.items):
            for name in ("yielded", "returned", "errored", "aborted", "finished"):
                try:
                    getattr(worker, name).disconnect()
                except (TypeError, RuntimeError, AttributeError):  # no such signal / nothing connected / gone
                    pass
            try:
                worker.quit()
            except RuntimeError:   # already deleted by Qt: it has finished
                pass
        self.items.clear()


class _CloseWatcher(QObject):
    """Notes when napari's main window closes: the layers it removes then are not the user's doing."""

    def __init__(self, parent: QObject):
        super().__init__(parent)
        self.closing = False

    def eventFilter(self, obj: QObject, event: QEvent) -> bool:  # noqa: N802 (Qt API)
        if event.type() == QEvent.Type.Close:
            self.closing = True
        return False


class _VerticalScrollArea(QScrollArea):
    """Scrolls vertically only, and asks for the width its content needs: a short dock scrolls
    instead of clipping the status line or the fine-tune section, and nothing is cut on the right."""

    def __init__(self) -> None:
        super().__init__()
        self.setWidgetResizable(True)
        self.setFrameShape(QScrollArea.Shape.NoFrame)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)

    def eventFilter(self, obj: QObject, event: QEvent) -> bool:  # noqa: N802 (Qt API)
        # The content's needs change once napari's style is applied: ask the dock for room again.
        if obj is self.widget() and event.type() == QEvent.Type.LayoutRequest:
            self.updateGeometry()
        return super().eventFilter(obj, event)

    def _width(self, content: int) -> int:
        return content + self.verticalScrollBar().sizeHint().width() + 2 * self.frameWidth()

    def minimumSizeHint(self) -> QSize:  # noqa: N802 (Qt API)
        hint = super().minimumSizeHint()
        return QSize(self._width(self.widget().minimumSizeHint().width()), hint.height()) if self.widget() else hint

    def sizeHint(self) -> QSize:  # noqa: N802 (Qt API)
        hint = super().sizeHint()
        return QSize(self._width(self.widget().sizeHint().width()), hint.height()) if self.widget() else hint


class SegmentWidget(QWidget):
    """Dock widget (npe2 command ``napari-medconddiff.segment_widget``)."""

    run_finished = Signal(str)       # 'done', 'cancelled', 'failed' or why it stopped
    diffusion_started = Signal()     # the model is loaded and the result layers are in place
    consensus_updated = Signal()
    engine_ready = Signal()
    finetune_finished = Signal(str)  # 'done', 'cancelled', 'failed'

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self._workers = _Workers()
        self._window_watcher: Optional[_CloseWatcher] = None
        self._class_names_by_value: dict[int, str] = {}
        self.controller = SegmentationController(napari_viewer, runner=self._workers.run,
                                                 questions=_DialogQuestions(self))
        self._build_ui()
        self._connect_controller()
        for name in ("inserted", "removed", "moved", "reordered"):
            _connect_weakly(getattr(self.viewer.layers.events, name), self, "_on_layers_changed")
        for layer in self.viewer.layers:
            _connect_weakly(layer.events.name, self, "_on_layers_changed")
        self.destroyed.connect(partial(_Workers.stop_all, self._workers))
        self.destroyed.connect(self.controller.close)
        self._refresh_layer_choices()
        self.controller.probe()

    @property
    def runs_started(self) -> int:
        return self.controller.runs_started

    # ------------------------------------------------------------------ UI
    def _build_ui(self) -> None:
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        scroll = _VerticalScrollArea()
        outer.addWidget(scroll)
        body = QWidget()
        scroll.setWidget(body)
        layout = QVBoxLayout(body)
        form = QFormLayout()
        layout.addLayout(form)

        self.layer_combo = QComboBox()
        self.layer_combo.setToolTip("The scan to segment: a 2-D or 3-D grey-scale Image layer (CT or MRI)")
        self.layer_combo.currentIndexChanged.connect(self._on_scan_choice)
        form.addRow("Image", self.layer_combo)

        self.model_combo = QComboBox()
        self.model_combo.addItem(DEFAULT_MODEL, BUNDLED[DEFAULT_MODEL])
        if _bundled_exists("lsegdiff-liver"):
            self.model_combo.addItem(LATENT_MODEL, BUNDLED[LATENT_MODEL])
        self.model_combo.addItem(CHECKPOINT_FILE, None)
        self.model_combo.setToolTip("The model: a bundled liver model, a fine-tuned model made here, or any "
                                    ".safetensors checkpoint written by `medconddiff train`")
        self.model_combo.currentIndexChanged.connect(self._on_model_choice)
        form.addRow("Model", self.model_combo)
        self.checkpoint_edit = QLineEdit()
        self.checkpoint_edit.setPlaceholderText("path/to/model.safetensors")
        self.checkpoint_edit.setToolTip("Path of a .safetensors checkpoint")
        self.checkpoint_edit.textChanged.connect(self._show_model_status)
        self.checkpoint_browse = QToolButton()
        self.checkpoint_browse.setText("…")
        self.checkpoint_browse.setToolTip("Choose a checkpoint file")
        self.checkpoint_browse.clicked.connect(self._browse_checkpoint)
        row = QHBoxLayout()
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.checkpoint_edit)
        row.addWidget(self.checkpoint_browse)
        self.checkpoint_row = QWidget()
        self.checkpoint_row.setLayout(row)
        form.addRow(self.checkpoint_row)     # spans the form: no empty label when it is hidden
        self.model_status = QLabel("Checking for the bundled model…")
        self.model_status.setWordWrap(True)
        form.addRow(self.model_status)
        self.channels_list = QListWidget()
        # Checked items in row order are the channels; dragging changes the order to the model's.
        self.channels_list.setDragDropMode(QAbstractItemView.DragDropMode.InternalMove)
        self.channels_list.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.channels_list.setToolTip(CHANNELS_TIP)
        self.channels_label = QLabel("More channels")
        form.addRow(self.channels_label, self.channels_list)

        self.device_combo = QComboBox()
        self.device_combo.addItems(["auto", "cpu"])   # CUDA devices are added once torch is imported
        self.device_combo.setToolTip("'auto' uses the first CUDA GPU when there is one, else the CPU")
        form.addRow("Device", self.device_combo)
        self.precision_combo = QComboBox()
        self.precision_combo.addItems(list(PRECISIONS))
        self.precision_combo.setToolTip("Network arithmetic. 'auto': bf16 on a GPU, fp32 on the CPU. 'bf16' on the "
                                        "CPU is about 1.5x faster on CPUs with AVX-512 BF16 or AMX (slower on "
                                        "others); labels change on well under 1 % of voxels")
        form.addRow("Precision", self.precision_combo)

        defaults = SamplingConfig()
        self.steps_spin = self._spin(1, 1000, defaults.steps, "Denoising steps per seed")
        self.steps_spin.valueChanged.connect(self._on_steps_changed)
        form.addRow("Steps", self.steps_spin)
        self.adaptive_check = QCheckBox("Stop each slice once it has converged")
        self.adaptive_check.setChecked(defaults.adaptive)
        self.adaptive_check.setToolTip("Adaptive steps: a slice stops denoising once fewer than "
                                       f"{defaults.convergence_change:.0%} of its foreground pixels change label "
                                       f"for {defaults.convergence_patience} steps in a row; Steps is then the most "
                                       "it takes. The x0 slider repeats a stopped slice's last step.")
        form.addRow("Adaptive", self.adaptive_check)
        self.seed_spin = self._spin(0, 2**31 - 1, defaults.seed, "Seed of the initial noise")
        form.addRow("Seed", self.seed_spin)
        self.seeds_spin = self._spin(1, 64, defaults.num_seeds, "Independent runs pooled into one consensus")
        form.addRow("Number of seeds", self.seeds_spin)
        self.consensus_combo = QComboBox()
        for method in CONSENSUS_METHODS:
            self.consensus_combo.addItem(CONSENSUS_NAMES[method], method)
        self.consensus_combo.setCurrentIndex(self.consensus_combo.findData(defaults.consensus))
        # Widget texts spell x̂0 as "x0": Qt mis-places the combining hat when it wraps a label.
        self.consensus_combo.setToolTip("How the predicted x0 of all steps are fused. Changing it re-fuses the "
                                        "last results at once (no new diffusion); it asks before touching "
                                        "slices you edited")
        self.consensus_combo.currentIndexChanged.connect(self._on_consensus_settings)
        form.addRow("Consensus", self.consensus_combo)
        self.skip_spin = self._spin(0, defaults.steps - 1, defaults.skip_first,
                                    "Leave the first (noisiest) k steps out of the consensus")
        self.skip_spin.valueChanged.connect(self._on_consensus_settings)
        form.addRow("Skip first steps", self.skip_spin)

        self.slice_combo = QComboBox()
        for mode, label in SLICE_LABELS.items():
            self.slice_combo.addItem(label, mode)
        self.slice_combo.setCurrentIndex(list(SLICE_LABELS).index("all"))
        self.slice_combo.setToolTip("Segment the slice under napari's slider, every slice, or a range. "
                                    + CANONICAL_TIP)
        self.slice_combo.currentIndexChanged.connect(self._on_slice_mode)
        form.addRow("Slices", self.slice_combo)
        self.first_spin = self._spin(0, 100_000, 0, "First slice of the range. " + CANONICAL_TIP)
        self.last_spin = self._spin(0, 100_000, 0, "Last slice of the range, included. " + CANONICAL_TIP)
        row = QHBoxLayout()
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.first_spin)
        row.addWidget(QLabel("to"))
        row.addWidget(self.last_spin)
        self.range_row = QWidget()
        self.range_row.setLayout(row)
        self.range_row.setToolTip(CANONICAL_TIP)
        form.addRow("Range", self.range_row)

        buttons = QHBoxLayout()
        self.segment_button = QPushButton("Segment")
        self.segment_button.setToolTip("Segment the chosen slices. A run on some slices updates only those "
                                       "slices of this scan's existing result layers")
        self.segment_button.clicked.connect(self.segment)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setToolTip("Stop after the current denoising step; finished slices are kept")
        self.cancel_button.clicked.connect(self.controller.cancel)
        buttons.addWidget(self.segment_button)
        buttons.addWidget(self.cancel_button)
        layout.addLayout(buttons)
        self.progress = QProgressBar()
        self.progress.setFormat("%v / %m slices")
        self.progress.setToolTip("Slices finished")
        self.progress.setValue(0)
        layout.addWidget(self.progress)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.status.setToolTip("What the plugin is doing, or did last")
        layout.addWidget(self.status)
        self.legend = QLabel("")
        self.legend.setTextFormat(Qt.TextFormat.RichText)
        self.legend.setWordWrap(True)
        self.legend.setToolTip("Label values and class names of the model")
        layout.addWidget(self.legend)

        tools = QHBoxLayout()
        self.uncertain_button = QPushButton("Most uncertain slice")
        self.uncertain_button.setToolTip("Move the slider to the slice with the highest mean uncertainty")
        self.uncertain_button.clicked.connect(self.go_to_most_uncertain_slice)
        self.export_button = QPushButton("Export…")
        self.export_button.setToolTip("Save the consensus layer (with your edits) as NIfTI in the scan's own voxel "
                                      "order and affine, plus a JSON sidecar")
        self.export_button.clicked.connect(self.export)
        tools.addWidget(self.uncertain_button)
        tools.addWidget(self.export_button)
        layout.addLayout(tools)

        layout.addWidget(self._build_finetune())
        layout.addStretch(1)
        for combo in body.findChildren(QComboBox):   # long model names must not widen the dock
            combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
            combo.setMinimumContentsLength(8)

        self._on_model_choice()
        self._on_slice_mode()
        self._on_busy("")

    def _build_finetune(self) -> QGroupBox:
        box = QGroupBox("Fine-tune from your corrections")
        box.setToolTip("Train the selected model a little on slices you corrected in the consensus layer, "
                       "save it, and re-segment the other slices with it")
        form = QFormLayout(box)
        self.ft_slices_edit = QLineEdit()
        self.ft_slices_edit.setPlaceholderText("edited slices (or e.g. 10, 12, 20-24)")
        self.ft_slices_edit.setToolTip("Slices whose consensus labels are learned. Empty: the slices you edited. "
                                       + CANONICAL_TIP)
        self.ft_slices_edit.editingFinished.connect(self._refresh_class_table)
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
        self.ft_kind_combo.setToolTip("What the scan is. 'As the model' keeps the model's intensity scheme (the "
                                      "bundled models: a CT window in Hounsfield units). For an MRI or another "
                                      "image with a CT model choose MRI or other: intensities are then z-scored "
                                      "per scan, and the fine-tuned model records the new kind")
        form.addRow("Scan is", self.ft_kind_combo)
        self.ft_steps_spin = self._spin(1, 100_000, FINETUNE_STEPS, "Optimizer steps (4 slice crops each)")
        form.addRow("Steps", self.ft_steps_spin)
        self.ft_seed_spin = self._spin(0, 2**31 - 1, 0, "Seed of sampling, augmentation and new layers: the same "
                                       "seed and inputs give the same model")
        form.addRow("Seed", self.ft_seed_spin)
        self.ft_resegment_check = QCheckBox("Then re-segment the other slices")
        self.ft_resegment_check.setChecked(True)
        self.ft_resegment_check.setToolTip("After fine-tuning, segment the slices that were neither trained on "
                                           "nor edited with the new model; only those slices change")
        form.addRow(self.ft_resegment_check)
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
        return box

    @staticmethod
    def _spin(low: int, high: int, value: int, tip: str) -> QSpinBox:
        spin = QSpinBox()
        spin.setRange(low, high)
        spin.setValue(value)
        spin.setToolTip(tip)
        return spin

    # ------------------------------------------------------------------ controller → view
    def _connect_controller(self) -> None:
        c = self.controller
        c.status.connect(self._on_status)
        c.progress.connect(self._on_progress)
        c.busy_changed.connect(self._on_busy)
        c.results_changed.connect(self._update_buttons)
        c.classes_changed.connect(self._show_legend)
        c.classes_changed.connect(self._refresh_class_table)
        c.edits_changed.connect(self._on_edits)
        c.engine_ready.connect(self._on_engine_probed)
        c.engine_failed.connect(self._on_engine_error)
        c.input_removed.connect(self._on_input_removed)
        c.finetune_step.connect(self._on_finetune_step)
        c.model_added.connect(self._on_model_added)
        # Re-emitted as the widget's Qt signals (what Qt code and pytest-qt wait on).
        c.run_finished.connect(self._emit_run_finished)
        c.diffusion_started.connect(self._emit_diffusion_started)
        c.consensus_updated.connect(self._emit_consensus_updated)
        c.finetune_finished.connect(self._emit_finetune_finished)

    def _emit_run_finished(self, how: str) -> None:
        self.run_finished.emit(how)

    def _emit_diffusion_started(self) -> None:
        self.diffusion_started.emit()

    def _emit_consensus_updated(self) -> None:
        self.consensus_updated.emit()

    def _emit_finetune_finished(self, how: str) -> None:
        self.finetune_finished.emit(how)

    def _on_status(self, text: str) -> None:
        self.status.setText(text)

    def _on_progress(self, value: int, maximum: int) -> None:
        bar = self.ft_progress if self.controller.operation == "fine-tuning" else self.progress
        bar.setRange(0, maximum)
        bar.setValue(value)

    def _on_busy(self, operation: str) -> None:
        idle = not operation
        self.segment_button.setEnabled(idle)
        self.finetune_button.setEnabled(idle)
        self.cancel_button.setEnabled(operation == "segmenting")
        self.ft_cancel_button.setEnabled(operation == "fine-tuning")
        if idle:
            for bar in (self.progress, self.ft_progress):
                if bar.maximum() == 0:       # no busy indicator left running
                    bar.setRange(0, 1)
        self._update_buttons()

    def _update_buttons(self) -> None:
        # Export and Most uncertain slice need at least one kept slice.
        can = self.controller.can_export
        self.uncertain_button.setEnabled(can)
        self.export_button.setEnabled(can)

    def _show_legend(self, class_names: tuple[str, ...]) -> None:
        items = []
        for index, name in enumerate(class_names[1:], start=1):
            r, g, b, _ = (int(255 * c) for c in results_layers.class_color(index))
            items.append(f"<span style='color: rgb({r},{g},{b});'>■</span> {index} {name}")
        self.legend.setText("Classes: " + " &nbsp; ".join(items))

    def _on_edits(self, slices: tuple[int, ...]) -> None:
        # napari tells about a paint before it changes the data: look at the layer once it has.
        QTimer.singleShot(0, self._show_edits)

    def _show_edits(self) -> None:
        if not _alive(self):
            return
        results = self.controller.current
        slices = sorted(results.edited) if results is not None else []
        self.ft_edited_label.setText(f"Edited slices: {slice_list_text(slices)}" if slices
                                     else "Edited slices: none yet")
        self._refresh_class_table()

    def _refresh_class_table(self, *_: Any) -> None:
        try:
            slices = self._finetune_slices()
        except ValueError:
            slices = None
        rows = self.controller.class_table(slices)
        self.class_table.blockSignals(True)
        self.class_table.setRowCount(len(rows))
        for row, (value, name) in enumerate(rows):
            label = QTableWidgetItem(str(value))
            label.setFlags(Qt.ItemFlag.ItemIsEnabled)
            self.class_table.setItem(row, 0, label)
            self.class_table.setItem(row, 1, QTableWidgetItem(self._class_names_by_value.get(value, name)))
        self.class_table.blockSignals(False)
        # Tall enough for every class of a usual model without an inner scroll bar.
        table = self.class_table
        shown_rows = min(max(len(rows), 1), 6)
        table.setFixedHeight(table.horizontalHeader().height() + shown_rows * table.verticalHeader().defaultSectionSize()
                             + 2 * table.frameWidth())

    def _on_class_renamed(self, item: QTableWidgetItem) -> None:
        if item.column() == 1:
            self._class_names_by_value[item.row()] = item.text().strip()

    def class_names(self) -> tuple[str, ...]:
        return tuple(self.class_table.item(row, 1).text().strip() for row in range(self.class_table.rowCount()))

    def _on_finetune_step(self, step: int, total: int, loss: float) -> None:
        # The loss stays on the bar once the status line has moved on (to the re-segmentation).
        self.ft_progress.setFormat(f"%v / %m steps · loss {loss:.3f}")
        self.ft_progress.setRange(0, total)
        self.ft_progress.setValue(step)

    def _on_model_added(self, name: str, path: str) -> None:
        index = self.model_combo.findData(path)
        if index < 0:
            index = self.model_combo.findText(CHECKPOINT_FILE)
            self.model_combo.insertItem(index, name, path)
            self.model_combo.setItemData(index, f"Fine-tuned here: {path}", Qt.ItemDataRole.ToolTipRole)
        self.model_combo.setCurrentIndex(index)

    def _on_input_removed(self, name: str) -> None:
        # napari removes every layer when its window closes: that is not worth a warning. Decide once
        # the close (if any) has happened, from the event loop.
        window = self.window()
        if self._window_watcher is None and window is not self:
            self._window_watcher = _CloseWatcher(self)
            window.installEventFilter(self._window_watcher)
        ref = weakref.ref(self)

        def warn() -> None:
            widget = ref()
            if widget is None or not _alive(widget) or (widget._window_watcher and widget._window_watcher.closing):
                return
            notify("warning", f"MedCondDiff: '{name}' was removed; segmentation stopped, finished slices are kept")

        QTimer.singleShot(0, warn)

    # ------------------------------------------------------------------ inputs
    def _on_layers_changed(self, event: Any = None) -> None:
        if event is not None and getattr(event, "type", "") == "inserted":
            _connect_weakly(event.value.events.name, self, "_on_layers_changed")
        self._refresh_layer_choices()
        self._update_buttons()

    def _refresh_layer_choices(self) -> None:
        from napari.layers import Image

        current = self.layer_combo.currentText()
        names = [layer.name for layer in self.viewer.layers
                 if isinstance(layer, Image) and not results_layers.is_own_result(layer)]
        self.layer_combo.blockSignals(True)
        self.layer_combo.clear()
        self.layer_combo.addItems(names)
        active = self.viewer.layers.selection.active
        if current in names:
            self.layer_combo.setCurrentText(current)
        elif active is not None and active.name in names:
            self.layer_combo.setCurrentText(active.name)
        self.layer_combo.blockSignals(False)
        self._refresh_channel_choices()

    def _refresh_channel_choices(self) -> None:
        """The More channels list: every other Image layer, keeping the user's order and ticks (by layer,
        so a renamed layer keeps its place); new layers come last, unticked."""
        from napari.layers import Image

        scan = self.selected_layer()
        # By unique id: napari hands a plugin proxies of its layers, so the same layer is not always the same object.
        scan_id = str(scan.unique_id) if scan is not None else None
        layers = {str(layer.unique_id): layer for layer in self.viewer.layers
                  if isinstance(layer, Image) and not results_layers.is_own_result(layer)
                  and str(layer.unique_id) != scan_id}
        listed = [self.channels_list.item(row) for row in range(self.channels_list.count())]
        before = [str(item.data(Qt.ItemDataRole.UserRole)) for item in listed]
        ticked = {key for key, item in zip(before, listed) if item.checkState() == Qt.CheckState.Checked}
        order = [key for key in before if key in layers] + [key for key in layers if key not in before]
        self.channels_list.blockSignals(True)
        self.channels_list.clear()
        for key in order:
            item = QListWidgetItem(layers[key].name)
            item.setData(Qt.ItemDataRole.UserRole, key)
            item.setFlags(Qt.ItemFlag.ItemIsEnabled | Qt.ItemFlag.ItemIsUserCheckable | Qt.ItemFlag.ItemIsSelectable
                          | Qt.ItemFlag.ItemIsDragEnabled)
            item.setCheckState(Qt.CheckState.Checked if key in ticked else Qt.CheckState.Unchecked)
            self.channels_list.addItem(item)
        self.channels_list.blockSignals(False)
        # As tall as its rows (up to CHANNEL_ROWS): a one-channel CT user sees one short row, not a box.
        count = self.channels_list.count()
        row = self.channels_list.sizeHintForRow(0) if count else self.channels_list.fontMetrics().height() + 4
        self.channels_list.setFixedHeight(max(1, min(count, CHANNEL_ROWS)) * row + 2 * self.channels_list.frameWidth())
        self._show_channels_row(self._model_channel_names())

    def _show_channels_row(self, names: Optional[tuple[str, ...]]) -> None:
        """More channels is shown when there is a layer to tick or the model (taking ``names``) needs one:
        a user with one CT open sees no empty box; a multi-channel model's user sees where the channels go."""
        visible = self.channels_list.count() > 0 or (names is not None and len(names) > 1)
        self.channels_label.setVisible(visible)
        self.channels_list.setVisible(visible)

    def selected_channels(self) -> tuple[Any, ...]:
        """The layers ticked under More channels, in list order: the model's channels 1…C-1."""
        by_id = {str(layer.unique_id): layer for layer in self.viewer.layers}
        items = [self.channels_list.item(row) for row in range(self.channels_list.count())]
        return tuple(by_id[key] for key in (str(item.data(Qt.ItemDataRole.UserRole)) for item in items
                                            if item.checkState() == Qt.CheckState.Checked) if key in by_id)

    def set_channels(self, names: list[str]) -> None:
        """Tick these layers under More channels, in this order (as a user's ticks and drags would)."""
        items = {self.channels_list.item(row).text(): self.channels_list.item(row)
                 for row in range(self.channels_list.count())}
        for row, name in enumerate(names):
            item = self.channels_list.takeItem(self.channels_list.row(items[name]))
            self.channels_list.insertItem(row, item)
        for name, item in items.items():
            item.setCheckState(Qt.CheckState.Checked if name in names else Qt.CheckState.Unchecked)

    def selected_layer(self) -> Any:
        name = self.layer_combo.currentText()
        return self.viewer.layers[name] if name and name in self.viewer.layers else None

    def _on_scan_choice(self, *_: Any) -> None:
        self._refresh_channel_choices()      # the scan itself is no further channel
        self.controller.focus(self.selected_layer())

    def _on_model_choice(self, *_: Any) -> None:
        self.checkpoint_row.setVisible(self.model_combo.currentText() == CHECKPOINT_FILE)
        self._show_model_status()

    def _show_model_status(self, *_: Any) -> None:
        text, warn = self.model_combo.currentText(), False
        engine = self.controller.engine
        if text == CHECKPOINT_FILE:
            message = "A .safetensors checkpoint written by `medconddiff train` or fine-tuned here."
        elif text == LATENT_MODEL:
            message = "Bundled LSegDiff liver model: diffusion in a mask-VAE latent, morphological clean-up."
        elif text != DEFAULT_MODEL:
            message = f"Fine-tuned model: {self.model_combo.currentData()}"
        elif engine is None:
            message = "Checking for the bundled model…"
        elif engine.default_checkpoint_exists:
            message = f"Bundled liver model: {Path(engine.default_checkpoint).name}"
        else:
            message, warn = ("The bundled default model is not installed yet "
                             f"({engine.default_checkpoint}). Choose 'Checkpoint file…'."), True
        names = self._model_channel_names()
        tip = CHANNELS_TIP
        if names is not None and len(names) > 1:
            # Said before any run: which layer goes where is what a multi-channel user must get right.
            expected = (f"This model takes {len(names)} channels: {', '.join(names)}. The Image is {names[0]}; "
                        f"tick {', '.join(names[1:])} under More channels, in this order.")
            message += " " + expected
            tip += " " + expected
        elif names is not None:
            tip += f" This model takes one channel ({names[0]}): tick none."
        self.model_status.setText(message)
        self.model_status.setStyleSheet("color: #e07050;" if warn else "")
        self.channels_list.setToolTip(tip)
        self.ft_kind_combo.setItemText(0, "as the model" + (f" ({', '.join(names)})" if names else ""))
        self._show_channels_row(names)

    def _model_channel_names(self) -> Optional[tuple[str, ...]]:
        """The chosen model's channels, from its checkpoint's config (no torch); None if not known yet."""
        try:
            return self.controller.model_channels(self._checkpoint())
        except ValueError:       # no usable file chosen yet
            return None

    def _browse_checkpoint(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Choose a MedCondDiff checkpoint", self.checkpoint_edit.text(),
                                              "safetensors checkpoint (*.safetensors);;All files (*)")
        if path:
            self.checkpoint_edit.setText(path)

    def _on_steps_changed(self, steps: int) -> None:
        self.skip_spin.setMaximum(max(0, steps - 1))

    def _on_slice_mode(self, *_: Any) -> None:
        self.range_row.setEnabled(self.slice_combo.currentData() == "range")

    def _on_engine_probed(self, info: EngineInfo) -> None:
        current = self.device_combo.currentText()
        self.device_combo.clear()
        self.device_combo.addItems(info.devices)
        if current in info.devices:
            self.device_combo.setCurrentText(current)
        self._show_model_status()
        self.engine_ready.emit()

    def _on_engine_error(self, message: str) -> None:
        self.model_status.setText(f"The segmentation engine could not be loaded: {message}")
        self.model_status.setStyleSheet("color: #e07050;")

    # ------------------------------------------------------------------ actions
    def _checkpoint(self) -> str:
        """The chosen model: a bundled model's name or a checkpoint path; ValueError for a bad file choice."""
        data = self.model_combo.currentData()
        if data == BUNDLED[DEFAULT_MODEL]:
            engine = self.controller.engine
            if engine is not None and not engine.default_checkpoint_exists:
                raise ValueError("the bundled default model is not installed yet; choose 'Checkpoint file…' "
                                 "and pick a .safetensors checkpoint")
            return data
        if data is not None:
            return data
        text = self.checkpoint_edit.text().strip()
        if not text:
            raise ValueError("choose a checkpoint file (Model: 'Checkpoint file…')")
        path = Path(text).expanduser()
        if not path.is_file():
            raise ValueError(f"checkpoint not found: {path}")
        return str(path)

    def _sampling(self) -> SamplingConfig:
        return SamplingConfig(steps=self.steps_spin.value(), seed=self.seed_spin.value(),
                              num_seeds=self.seeds_spin.value(), consensus=self.consensus_combo.currentData(),
                              skip_first=self.skip_spin.value(), adaptive=self.adaptive_check.isChecked(),
                              precision=self.precision_combo.currentText())

    def _segment_settings(self, scan: Any) -> SegmentSettings:
        return SegmentSettings(scan=scan, checkpoint=self._checkpoint(), device=self.device_combo.currentText(),
                               sampling=self._sampling(),
                               slices=SliceChoice(mode=self.slice_combo.currentData(), first=self.first_spin.value(),
                                                  last=self.last_spin.value()),
                               channels=self.selected_channels())

    def segment(self) -> None:
        """Start a run on the chosen layer (the Segment button)."""
        try:
            settings = self._segment_settings(self.selected_layer())
        except ValueError as error:
            self.controller.fail(error)
            return
        self.controller.segment(settings)

    def _on_consensus_settings(self, *_: Any) -> None:
        self.controller.set_consensus(self.consensus_combo.currentData(), self.skip_spin.value())

    def most_uncertain_slice(self) -> Optional[tuple[int, float]]:
        """(canonical slice, its mean uncertainty) over the slices with results."""
        return self.controller.most_uncertain_slice()

    def go_to_most_uncertain_slice(self) -> None:
        found = self.controller.most_uncertain_slice()
        if found is None:
            notify("info", "MedCondDiff: no finished slices yet")
            return
        index, value = found
        self.controller.go_to_slice(index)
        self.status.setText(f"Most uncertain slice: {index} (mean uncertainty {value:.3f}).")

    def export(self) -> None:
        """Save the consensus layer (including edits) as NIfTI + JSON sidecar, asking before replacing files."""
        if not self.controller.can_export:
            notify("warning", "MedCondDiff: nothing to export yet; run a segmentation first")
            return
        title = "Export segmentation as NIfTI"
        if not self.controller.export_affine_known():
            title += " (orientation unknown: the layer's axis order, NIfTI codes 0)"
        chosen, _ = QFileDialog.getSaveFileName(self, title, str(self.controller.export_default_path()),
                                                "NIfTI (*.nii.gz *.nii)")
        if not chosen:
            return
        nifti, sidecar = export_targets(chosen)
        # The save dialog already asked about the file it returned; ask about any other file we would replace.
        existing = [path for path in (nifti, sidecar) if path.exists() and path != Path(chosen)]
        if existing:
            names = "\n".join(str(path) for path in existing)
            answer = QMessageBox.question(self, "Replace files?", f"These files exist and will be replaced:\n{names}",
                                          QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
                                          QMessageBox.StandardButton.No)
            if answer != QMessageBox.StandardButton.Yes:
                return
        try:
            written = self.controller.export(nifti, overwrite=True)
        except (ValueError, OSError) as error:
            self.controller.fail(error, "Export failed")
            return
        notify("info", f"MedCondDiff: saved {written[0]} and {written[1].name}")

    def _finetune_slices(self) -> Optional[list[int]]:
        text = self.ft_slices_edit.text().strip()
        return parse_slice_list(text) if text else None

    def finetune(self) -> None:
        """Fine-tune the selected model on the chosen slices (the Fine-tune button)."""
        controller = self.controller
        results = controller.current
        try:
            if results is None:
                raise ValueError("segment a scan first, correct some slices, then fine-tune")
            slices = self._finetune_slices()
            start = self._checkpoint()
            resegment = None
            if self.ft_resegment_check.isChecked() and results.scan is not None:
                resegment = self._segment_settings(results.scan)
        except ValueError as error:
            controller.fail(error)
            return
        chosen, _ = QFileDialog.getSaveFileName(self, "Save the fine-tuned model as",
                                                str(controller.finetune_default_path()),
                                                "safetensors checkpoint (*.safetensors)")
        if not chosen:
            return
        try:
            target = checkpoint_target(chosen)
        except ValueError as error:
            controller.fail(error)
            return
        # The save dialog asked about the name it returned, not about the one with ".safetensors" added.
        if target != Path(chosen) and target.exists():
            answer = QMessageBox.question(self, "Replace file?", f"{target} exists and will be replaced.",
                                          QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
                                          QMessageBox.StandardButton.No)
            if answer != QMessageBox.StandardButton.Yes:
                return
        self.ft_progress.setFormat("%v / %m steps")
        controller.finetune(FinetuneSettings(start=start, save_path=target, class_names=self.class_names(),
                                             slices=slices, scan_kind=self.ft_kind_combo.currentData(),
                                             steps=self.ft_steps_spin.value(),
                                             seed=self.ft_seed_spin.value(), device=self.device_combo.currentText(),
                                             resegment=resegment))

    def closeEvent(self, event: Any) -> None:  # noqa: N802 (Qt API)
        self.controller.close()
        self._workers.stop_all()
        super().closeEvent(event)


__all__ = ["SegmentWidget", "ask_edit_choice", "ask_save_cancelled_finetune"]
