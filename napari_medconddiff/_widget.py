"""The MedCondDiff dock widget: a thin Qt view over :class:`~napari_medconddiff._controller.SegmentationController`.

Flow: pick an Image layer, a model, sampling settings and which slices, click Segment (a model
trained on several channels, e.g. MRI sequences, also takes the layers ticked under More channels). The
controller runs the model in napari ``thread_worker``s (made in :mod:`._qt_worker`, the only Qt part of
running) and fills three result layers as slices finish:

* ``<scan> consensus`` (Labels, class colours and names): the fused segmentation, editable;
* ``<scan> uncertainty`` (Image, inferno, additive): disagreement between steps, 0..1;
* ``<scan> x̂0 (N steps)`` (Labels): each step's arg-max x̂0 at model resolution, with the step as
  the first axis, so napari's own dims slider scrubs through the diffusion.

Cancel keeps the finished slices. Changing the consensus method or skip-first re-fuses the kept
trajectories (no new diffusion). A run or re-fusion that would overwrite slices you edited asks
first (keep my edits / new layer / replace; :mod:`._dialogs`). The Fine-tune section
(:mod:`._finetune_panel`) trains the model on corrected slices and re-segments the others with it.
Export saves the consensus as NIfTI + JSON sidecar, or as a DICOM SEG when the scan came from DICOM.

This module imports neither torch nor the engine: both are imported in worker threads.
"""

from __future__ import annotations

import weakref
from functools import partial
from pathlib import Path
from typing import Any, Optional

from qtpy.QtCore import QEvent, Qt, QTimer, Signal
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from medconddiff.config import PRECISIONS
from medconddiff.errors import SliceSpecError
from medconddiff.slice_lists import SLICE_SYNTAX, parse_slice_spec

from . import _dialogs
from . import _result_layers as results_layers
from ._channels_list import ChannelsList
from ._class_legend import ClassLegend
from ._controller import SegmentationController, SegmentSettings
from ._dialogs import DialogQuestions, ask_edit_choice, ask_save_cancelled_finetune
from ._export import DICOM_RTSTRUCT_FILTER, DICOM_SEG_FILTER, NIFTI_FILTER, export_targets
from ._finetune_panel import CANONICAL_TIP, FinetunePanel
from ._job import EngineInfo, SliceChoice
from ._model_picker import BUNDLED, CHECKPOINT_FILE, DEFAULT_MODEL, LATENT_MODEL, ModelPicker
from ._notifications import notify
from ._qt_lifetime import CloseWatcher, alive, connect_weakly
from ._qt_worker import QtWorkers
from ._saved_labels_row import SavedLabelsRow
from ._sampling_form import SamplingForm
from ._scroll_area import VerticalScrollArea
from ._training_set_panel import TrainingSetPanel

SLICE_LABELS = {"current": "Current slice", "all": "All slices", "range": "Slice range"}
SLICES_FORMAT = "%v / %m slices"


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
        self._workers = QtWorkers()
        self._docked = False          # set once napari puts the widget in its dock
        self._window_watcher: Optional[CloseWatcher] = None
        self.controller = SegmentationController(napari_viewer, runner=self._workers.run,
                                                 questions=DialogQuestions(self))
        self._build_ui()
        self._connect_controller()
        for name in ("inserted", "removed", "moved", "reordered"):
            connect_weakly(getattr(self.viewer.layers.events, name), self, "_on_layers_changed")
        for layer in self.viewer.layers:
            connect_weakly(layer.events.name, self, "_on_layers_changed")
        self.destroyed.connect(partial(QtWorkers.stop_all, self._workers))
        self.destroyed.connect(self.controller.close)
        self._refresh_layer_choices()
        self.controller.probe()

    @property
    def runs_started(self) -> int:
        return self.controller.runs_started

    # ------------------------------------------------------------------ UI
    def _build_ui(self) -> None:
        from magicgui.widgets import create_widget
        from napari.layers import Image

        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        scroll = VerticalScrollArea()
        outer.addWidget(scroll)
        body = QWidget()
        scroll.setWidget(body)
        layout = QVBoxLayout(body)
        form = QFormLayout()
        layout.addLayout(form)

        # magicgui's layer-typed combo keeps its choices from the viewer's layers (reset_choices on
        # layer events); its choices leave out this plugin's own result layers (the uncertainty is an Image).
        self.layer_combo = create_widget(annotation=Image, label="Image", options={"choices": self._scan_choices})
        self.layer_combo.tooltip = "The scan to segment: a 2-D or 3-D grey-scale Image layer (CT or MRI)"
        self.layer_combo.changed.connect(self._on_scan_choice)
        form.addRow("Image", self.layer_combo.native)
        self.saved_labels = SavedLabelsRow(form, self.continue_from_saved,
                                           lambda layer: self.controller.live_results_of(layer) is not None)

        self.model_picker = ModelPicker(form, self, self._on_model_choice)
        picker = self.model_picker
        self.model_combo, self.checkpoint_edit, self.checkpoint_row, self.model_status = \
            picker.model_combo, picker.checkpoint_edit, picker.checkpoint_row, picker.model_status
        self.channels_list = ChannelsList()
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
        self.sampling_form = SamplingForm(form, self._on_consensus_settings)
        sampling = self.sampling_form
        self.steps_spin, self.adaptive_check, self.seed_spin, self.seeds_spin, self.consensus_combo, self.skip_spin = \
            (sampling.steps_spin, sampling.adaptive_check, sampling.seed_spin, sampling.seeds_spin,
             sampling.consensus_combo, sampling.skip_spin)
        self._build_slices(form)
        self._build_actions(layout)

        self.finetune_panel = FinetunePanel(self)
        panel = self.finetune_panel
        # The panel's controls under the names tests and scripts drive the dock by.
        self.ft_slices_edit, self.ft_edited_label, self.class_table = \
            panel.ft_slices_edit, panel.ft_edited_label, panel.class_table
        self.ft_kind_combo, self.ft_steps_spin, self.ft_seed_spin = \
            panel.ft_kind_combo, panel.ft_steps_spin, panel.ft_seed_spin
        self.ft_resegment_check, self.finetune_button, self.ft_cancel_button, self.ft_progress = \
            panel.ft_resegment_check, panel.finetune_button, panel.ft_cancel_button, panel.ft_progress
        self.training_set_panel = TrainingSetPanel(self)     # made after the panel it updates, shown above it
        layout.addWidget(self.training_set_panel)
        layout.addWidget(panel)
        layout.addStretch(1)
        for combo in body.findChildren(QComboBox):   # long model names must not widen the dock
            combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
            combo.setMinimumContentsLength(8)

        self._on_model_choice()
        self._on_slice_mode()
        self._on_busy("")

    def _build_slices(self, form: QFormLayout) -> None:
        self.slice_combo = QComboBox()
        for mode, label in SLICE_LABELS.items():
            self.slice_combo.addItem(label, mode)
        self.slice_combo.setCurrentIndex(list(SLICE_LABELS).index("all"))
        self.slice_combo.setToolTip("Segment the slice under napari's slider, every slice, or the slices typed "
                                    "under Range. " + CANONICAL_TIP)
        self.slice_combo.currentIndexChanged.connect(self._on_slice_mode)
        form.addRow("Slices", self.slice_combo)
        self.range_edit = QLineEdit()
        self.range_edit.setPlaceholderText("e.g. 40-42 (inclusive) or 40:43, 50")
        self.range_edit.setToolTip(f"Slices to segment, written as for the command line: {SLICE_SYNTAX}. "
                                   + CANONICAL_TIP)
        self.range_label = QLabel("Range (a-b, a:b)")
        self.range_label.setToolTip(self.range_edit.toolTip())
        form.addRow(self.range_label, self.range_edit)

    def _build_actions(self, layout: QVBoxLayout) -> None:
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
        self.progress.setFormat("")          # no count until a run knows how many slices it segments
        self.progress.setToolTip("Slices finished")
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        layout.addWidget(self.progress)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.status.setToolTip("What the plugin is doing, or did last")
        layout.addWidget(self.status)
        self.legend = ClassLegend(self.controller)
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

    # ------------------------------------------------------------------ controller → view
    def _connect_controller(self) -> None:
        c = self.controller
        c.status.connect(self._on_status)
        c.progress.connect(self._on_progress)
        c.busy_changed.connect(self._on_busy)
        c.results_changed.connect(self._on_results_changed)
        c.classes_changed.connect(self.finetune_panel.refresh_class_table)
        c.edits_changed.connect(self._on_edits)
        c.engine_ready.connect(self._on_engine_probed)
        c.engine_failed.connect(self._on_engine_error)
        c.input_removed.connect(self._on_input_removed)
        c.finetune_step.connect(self.finetune_panel.show_step)
        c.model_added.connect(self.model_picker.add_model)
        # Re-emitted as the widget's Qt signals (what Qt code and pytest-qt wait on).
        c.run_finished.connect(self.run_finished.emit)
        c.diffusion_started.connect(self.diffusion_started.emit)
        c.consensus_updated.connect(self._show_shown_consensus)
        c.consensus_updated.connect(self.consensus_updated.emit)
        c.finetune_finished.connect(self.finetune_finished.emit)

    def _on_status(self, text: str) -> None:
        self.status.setText(text)

    def _on_progress(self, value: int, maximum: int) -> None:
        finetuning = self.controller.operation == "fine-tuning"
        bar = self.ft_progress if finetuning else self.progress
        if not finetuning:
            bar.setFormat(SLICES_FORMAT if maximum else "")   # maximum 0: busy, count not known yet
        bar.setRange(0, maximum)
        bar.setValue(value)

    def _on_busy(self, operation: str) -> None:
        idle = not operation
        self.segment_button.setEnabled(idle)
        self.saved_labels.set_idle(idle)
        self.finetune_button.setEnabled(idle)
        self.cancel_button.setEnabled(operation == "segmenting")
        self.ft_cancel_button.setEnabled(operation == "fine-tuning")
        if idle:
            for bar in (self.progress, self.ft_progress):
                if bar.maximum() == 0:       # no busy indicator left running
                    bar.setRange(0, 1)
        self._update_buttons()

    def _on_results_changed(self) -> None:
        self._update_buttons()
        # Which result layers a run updates changed (a scan removed, layers set aside): saved labels may too.
        self.saved_labels.refresh(self.viewer.layers, self.selected_layer())
        results = self.controller.current
        if results is not None and not self.controller.busy:
            self._suggest_scan_kind(results.scan)

    def _update_buttons(self) -> None:
        # Export needs a kept slice or an edit (saved labels continued from); Most uncertain slice a kept slice.
        can = self.controller.can_export
        results = self.controller.current
        self.uncertain_button.setEnabled(can and results is not None and len(results.shown_slices) > 0)
        self.export_button.setEnabled(can)

    def _on_edits(self, slices: tuple[int, ...]) -> None:
        # napari tells about a paint before it changes the data: look at the layer once it has.
        ref = weakref.ref(self)

        def show() -> None:
            widget = ref()
            if widget is not None and alive(widget):
                widget.finetune_panel.show_edits()

        QTimer.singleShot(0, show)

    def class_names(self) -> tuple[str, ...]:
        return self.finetune_panel.class_names()

    def _on_input_removed(self, name: str) -> None:
        # napari removes every layer when its window closes: that is not worth a warning. Decide once
        # the close (if any) has happened, from the event loop.
        window = self.window()
        if self._window_watcher is None and window is not self:
            self._window_watcher = CloseWatcher(self)
            window.installEventFilter(self._window_watcher)
        ref = weakref.ref(self)

        def warn() -> None:
            widget = ref()
            if widget is None or not alive(widget) or (widget._window_watcher and widget._window_watcher.closing):
                return
            notify("warning", f"MedCondDiff: '{name}' was removed; segmentation stopped, finished slices are kept")

        QTimer.singleShot(0, warn)

    # ------------------------------------------------------------------ inputs
    def _scan_choices(self, *_: Any) -> list[tuple[str, Any]]:
        from napari.layers import Image

        return [(layer.name, layer) for layer in self.viewer.layers
                if isinstance(layer, Image) and not results_layers.is_own_result(layer)
                and not results_layers.is_result_image(layer)]

    def _on_layers_changed(self, event: Any = None) -> None:
        if event is not None and getattr(event, "type", "") == "inserted":
            connect_weakly(event.value.events.name, self, "_on_layers_changed")
        self._refresh_layer_choices()
        self._update_buttons()

    def _refresh_layer_choices(self) -> None:
        before = self.selected_layer()
        with self.layer_combo.changed.blocked():
            self.layer_combo.reset_choices()
            # A first choice, or one whose layer went: the active layer if it is a scan, as the user expects.
            active = self.viewer.layers.selection.active
            if before is None and active is not None:
                for layer in self.layer_combo.choices:
                    if layer.unique_id == active.unique_id:
                        self.layer_combo.value = layer
        after = self.selected_layer()
        # By unique id: napari hands a plugin proxies of its layers, so the same layer is not always the same object.
        if (before is None) != (after is None) or (after is not None and after.unique_id != before.unique_id):
            self._on_scan_choice()
        else:
            self._refresh_channel_choices()
            self.saved_labels.refresh(self.viewer.layers, after)

    def _refresh_channel_choices(self) -> None:
        """The More channels list: every other Image layer that is no result of ours."""
        scan = self.selected_layer()
        scan_id = str(scan.unique_id) if scan is not None else None
        self.channels_list.refresh(layer for _, layer in self._scan_choices() if str(layer.unique_id) != scan_id)
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
        return tuple(by_id[key] for key in self.channels_list.ticked_ids() if key in by_id)

    def set_channels(self, names: list[str]) -> None:
        """Tick these layers under More channels, in this order (as a user's ticks and drags would)."""
        self.channels_list.tick(names)

    def selected_layer(self) -> Any:
        layer = self.layer_combo.value
        return layer if layer is not None and layer in self.viewer.layers else None

    def _on_scan_choice(self, *_: Any) -> None:
        self._refresh_channel_choices()      # the scan itself is no further channel
        scan = self.selected_layer()
        self.saved_labels.refresh(self.viewer.layers, scan)
        self.controller.focus(scan)
        # The picked scan's fusion, not the last one's: a change of the box re-fuses the picked scan's runs.
        self._show_shown_consensus()
        self._suggest_scan_kind(scan)

    def _suggest_scan_kind(self, scan: Any) -> None:
        self.finetune_panel.suggest_scan_kind(scan, self._model_channel_names())

    def _on_model_choice(self, *_: Any) -> None:
        self._show_model_status()

    def _show_model_status(self, *_: Any) -> None:
        names = self._model_channel_names()
        self.model_picker.show_status(self.controller.engine, self.channels_list.explain(names))
        if hasattr(self, "finetune_panel"):
            self.finetune_panel.show_model_channels(names)
            current = self.controller.current
            self._suggest_scan_kind(current.scan if current is not None else self.selected_layer())
        self._show_channels_row(names)

    def _model_channel_names(self) -> Optional[tuple[str, ...]]:
        """The chosen model's channels, from its checkpoint's config (no torch); None if not known yet."""
        try:
            return self.controller.model_channels(self.checkpoint())
        except ValueError:       # no usable file chosen yet
            return None

    def _on_slice_mode(self, *_: Any) -> None:
        enabled = self.slice_combo.currentData() == "range"
        self.range_edit.setEnabled(enabled)
        self.range_label.setEnabled(enabled)

    def _on_engine_probed(self, info: EngineInfo) -> None:
        current = self.device_combo.currentText()
        self.device_combo.clear()
        self.device_combo.addItems(info.devices)
        if current in info.devices:
            self.device_combo.setCurrentText(current)
        self._show_model_status()
        self.engine_ready.emit()

    def _on_engine_error(self, message: str) -> None:
        self.model_picker.show_engine_error(message)

    # ------------------------------------------------------------------ actions
    def checkpoint(self) -> str:
        """The chosen model: a bundled model's name or a checkpoint path; a user error for a bad file choice."""
        return self.model_picker.checkpoint(self.controller.engine)

    def _slice_choice(self) -> SliceChoice:
        mode = self.slice_combo.currentData()
        if mode != "range":
            return SliceChoice(mode=mode)
        text = self.range_edit.text()
        # The syntax is checked here; the slices against the scan's own count once the model knows it.
        if not parse_slice_spec(text, what="Range").ranges:
            raise SliceSpecError(f"Range is empty; write {SLICE_SYNTAX}")
        return SliceChoice(mode="typed", text=text)

    def segment_settings(self, scan: Any) -> SegmentSettings:
        return SegmentSettings(scan=scan, checkpoint=self.checkpoint(), device=self.device_combo.currentText(),
                               sampling=self.sampling_form.config(self.precision_combo.currentText()),
                               slices=self._slice_choice(), channels=self.selected_channels())

    def segment(self) -> None:
        """Start a run on the chosen layer (the Segment button)."""
        try:
            settings = self.segment_settings(self.selected_layer())
        except ValueError as error:
            self.controller.fail(error)
            return
        self.controller.segment(settings)

    def continue_from_saved(self) -> None:
        """Make the chosen saved labels the chosen scan's consensus (the Continue button)."""
        try:      # the model counts the slices and names the classes; the slice and sampling settings play no part
            settings = SegmentSettings(scan=self.selected_layer(), checkpoint=self.checkpoint(),
                                       device=self.device_combo.currentText())
        except ValueError as error:
            self.controller.fail(error)
            return
        self.controller.continue_from(settings, self.saved_labels.chosen())

    def _show_shown_consensus(self) -> None:
        asked = self.controller.shown_consensus()
        if asked is not None:
            self.sampling_form.show_consensus(*asked)

    def _on_consensus_settings(self, *_: Any) -> None:
        self.controller.set_consensus(*self.sampling_form.consensus())

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
        dicom = self.controller.export_dicom_source() is not None
        title = "Export segmentation as DICOM SEG, RT structure set or NIfTI" if dicom else "Export segmentation as NIfTI"
        if not self.controller.export_affine_known():
            title += " (orientation unknown: the layer's axis order, NIfTI codes 0)"
        filters = f"{DICOM_SEG_FILTER};;{DICOM_RTSTRUCT_FILTER};;{NIFTI_FILTER}" if dicom else NIFTI_FILTER
        chosen, chosen_filter = QFileDialog.getSaveFileName(self, title, str(self.controller.export_default_path()),
                                                            filters)
        if not chosen:
            return
        rtstruct = dicom and chosen_filter == DICOM_RTSTRUCT_FILTER
        nifti, sidecar = export_targets(chosen, dicom_seg=dicom and chosen_filter in (DICOM_SEG_FILTER,
                                                                                     DICOM_RTSTRUCT_FILTER))
        # The save dialog already asked about the file it returned; ask about any other file we would replace.
        existing = [path for path in (nifti, sidecar) if path.exists() and path != Path(chosen)]
        if existing and not _dialogs.confirm_replace(self, existing):
            return
        try:
            # The names in the class table: a class the user painted and named is exported under that name.
            written = self.controller.export(nifti, overwrite=True, rtstruct=rtstruct,
                                             class_names=self.class_names())
        except (ValueError, OSError) as error:
            self.controller.fail(error, "Export failed")
            return
        notify("info", f"MedCondDiff: saved {written[0].name} and {written[1].name}")   # no patient's folder

    def finetune(self) -> None:
        """Fine-tune the selected model on the chosen slices (the Fine-tune button)."""
        self.finetune_panel.finetune()

    def closeEvent(self, event: Any) -> None:  # noqa: N802 (Qt API)
        self._stop_work()
        super().closeEvent(event)

    def changeEvent(self, event: Any) -> None:  # noqa: N802 (Qt API)
        # The dock's × (napari's remove_dock_widget) only takes the widget out of its dock, with no
        # closeEvent: losing the dock is the close. Hiding (a tab, the hide button) keeps the parent.
        if event.type() == QEvent.Type.ParentChange:
            if self.parent() is not None:
                self._docked = True
            elif self._docked:
                self._stop_work()
        super().changeEvent(event)

    def _stop_work(self) -> None:
        """The widget is closing: stop its workers and let go of the viewer (nothing it started goes on)."""
        self.controller.close()
        self._workers.stop_all()


__all__ = ["SegmentWidget", "ask_edit_choice", "ask_save_cancelled_finetune", "BUNDLED", "CHECKPOINT_FILE",
           "DEFAULT_MODEL", "LATENT_MODEL"]
