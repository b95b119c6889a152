"""The MedCondDiff dock widget: segment the chosen scan and show what the diffusion did.

Flow: pick an Image layer, a model, sampling settings and which slices, click Segment. The run
happens in a napari ``thread_worker`` (:func:`napari_medconddiff._job.segmentation_job`); every
event it yields is applied here, on the GUI thread, to three result layers that appear as soon as
the model is loaded and fill in as slices finish:

* ``<scan> consensus`` (Labels, class colours and names): the fused segmentation, editable;
* ``<scan> uncertainty`` (Image, inferno, additive): disagreement between steps, 0..1;
* ``<scan> x̂0 (N steps)`` (Labels): each step's arg-max x̂0 at model resolution, with the step as
  the first axis, so napari's own dims slider scrubs through the diffusion.

Cancel keeps the finished slices. Changing the consensus method or skip-first afterwards re-fuses
the kept trajectory (no new diffusion). Export saves the consensus layer as NIfTI + JSON sidecar.

This module imports neither torch nor the engine: both are imported in worker threads.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Optional

import numpy as np
from qtpy.QtCore import Qt, Signal
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QMessageBox,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from medconddiff.config import CONSENSUS_METHODS, SamplingConfig
from medconddiff.consensus import first_argmax, quantize

from . import _result_layers as results
from ._geometry import layer_axis_of, slice_first_view, stack_to_layer_order
from ._job import EngineInfo, RunStarted, SegmentRequest, SliceChoice, iterate_run, prepare_run, probe_engine
from ._layers import METADATA_KEY

DEFAULT_MODEL = "Bundled default model"
LATENT_MODEL = "Bundled LSegDiff model (latent)"
CHECKPOINT_FILE = "Checkpoint file…"
SLICE_LABELS = {"current": "Current slice", "all": "All slices", "range": "Slice range"}
# User mistakes (wrong checkpoint, bad scan, missing file) are shown as one-line notifications;
# anything else is a bug and goes to napari's error notification with its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, PermissionError, IsADirectoryError)
# The x̂0 layer is redrawn at most this often while steps stream in (every step is still stored).
STEP_REDRAW_INTERVAL_S = 0.1


def _bundled_exists(name: str) -> bool:
    from medconddiff.checkpoint import bundled_checkpoint_path  # no torch: a path check only

    return bundled_checkpoint_path(name).is_file()


def _notify(kind: str, message: str) -> None:
    from napari.utils import notifications

    {"error": notifications.show_error, "warning": notifications.show_warning,
     "info": notifications.show_info}[kind](message)


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


@dataclass
class _Workers:
    """The widget's running workers, kept apart from the widget so cleanup needs no widget."""

    items: set = field(default_factory=set)

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


@dataclass
class _Session:
    """One segmentation run and its result layers, from Segment to the next Segment."""

    # napari hands plugins PublicOnlyProxy objects (a new proxy per access): layers are kept by
    # reference and compared by unique_id, never with `is` or weak references.
    scan: Any                              # the scan layer; None once the user removed it
    scan_id: str
    scan_name: str
    source: Optional[str]
    worker: Any = None
    started: float = field(default_factory=time.perf_counter)
    info: Optional[RunStarted] = None
    layers: dict = field(default_factory=dict)          # role -> layer (dropped when the user removes it)
    views: dict = field(default_factory=dict)           # role -> writable engine-order view of its data
    result: Any = None                                  # SegmentationResult shown in the layers
    stop_reason: Optional[str] = None
    last_redraw: float = 0.0
    previous: Optional["_Session"] = None               # shown again if this run never gets going


class SegmentWidget(QWidget):
    """Dock widget (npe2 command ``napari-medconddiff.segment_widget``)."""

    run_finished = Signal(str)       # 'done', 'cancelled', 'failed' or why it stopped
    diffusion_started = Signal()     # the model is loaded and the result layers are in place
    consensus_updated = Signal()
    engine_ready = Signal()

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self._workers = _Workers()
        self._session: Optional[_Session] = None
        self._engine: Optional[EngineInfo] = None
        self._refusing = False
        self._refuse_pending = False
        self.runs_started = 0            # diffusion runs started by this widget (tests check re-fusing adds none)
        self._build_ui()
        for name in ("inserted", "removed", "moved", "reordered"):
            _connect_weakly(getattr(self.viewer.layers.events, name), self, "_on_layers_changed")
        _connect_weakly(self.viewer.layers.events.removed, self, "_on_layer_removed")
        for layer in self.viewer.layers:
            _connect_weakly(layer.events.name, self, "_on_layers_changed")
        self.destroyed.connect(partial(_Workers.stop_all, self._workers))
        self._refresh_layer_choices()
        self._start_engine_probe()

    # ------------------------------------------------------------------ UI
    def _build_ui(self) -> None:
        layout = QVBoxLayout(self)
        form = QFormLayout()
        layout.addLayout(form)

        self.layer_combo = QComboBox()
        self.layer_combo.setToolTip("A 2-D or 3-D grey-scale Image layer (CT or MRI)")
        form.addRow("Image", self.layer_combo)

        self.model_combo = QComboBox()
        self.model_combo.addItems([DEFAULT_MODEL] + ([LATENT_MODEL] if _bundled_exists("lsegdiff-liver") else [])
                                  + [CHECKPOINT_FILE])
        self.model_combo.currentIndexChanged.connect(self._on_model_choice)
        form.addRow("Model", self.model_combo)
        self.checkpoint_edit = QLineEdit()
        self.checkpoint_edit.setPlaceholderText("path/to/model.safetensors")
        self.checkpoint_browse = QToolButton()
        self.checkpoint_browse.setText("…")
        self.checkpoint_browse.clicked.connect(self._browse_checkpoint)
        row = QHBoxLayout()
        row.addWidget(self.checkpoint_edit)
        row.addWidget(self.checkpoint_browse)
        self.checkpoint_row = QWidget()
        self.checkpoint_row.setLayout(row)
        row.setContentsMargins(0, 0, 0, 0)
        form.addRow("Checkpoint", self.checkpoint_row)
        self.model_status = QLabel("Checking for the bundled model…")
        self.model_status.setWordWrap(True)
        form.addRow(self.model_status)

        self.device_combo = QComboBox()
        self.device_combo.addItems(["auto", "cpu"])   # CUDA devices are added once torch is imported
        self.device_combo.setToolTip("'auto' uses the first CUDA GPU when there is one, else the CPU")
        form.addRow("Device", self.device_combo)

        defaults = SamplingConfig()
        self.steps_spin = self._spin(1, 1000, defaults.steps, "Denoising steps per seed")
        self.steps_spin.valueChanged.connect(self._on_steps_changed)
        form.addRow("Steps", self.steps_spin)
        self.seed_spin = self._spin(0, 2**31 - 1, defaults.seed, "Seed of the initial noise")
        form.addRow("Seed", self.seed_spin)
        self.seeds_spin = self._spin(1, 64, defaults.num_seeds, "Independent runs pooled into one consensus")
        form.addRow("Number of seeds", self.seeds_spin)
        self.consensus_combo = QComboBox()
        self.consensus_combo.addItems(list(CONSENSUS_METHODS))
        self.consensus_combo.setCurrentText(defaults.consensus)
        # Widget texts spell x̂0 as "x0": Qt mis-places the combining hat when it wraps a label.
        self.consensus_combo.setToolTip("How the predicted x0 of all steps are fused. Changing it re-fuses the "
                                        "last run at once (no new diffusion) and replaces edits in its consensus")
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
        self.slice_combo.currentIndexChanged.connect(self._on_slice_mode)
        form.addRow("Slices", self.slice_combo)
        self.first_spin = self._spin(0, 100_000, 0, "First slice (along the model's slicing axis)")
        self.last_spin = self._spin(0, 100_000, 0, "Last slice, included")
        row = QHBoxLayout()
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.first_spin)
        row.addWidget(QLabel("to"))
        row.addWidget(self.last_spin)
        self.range_row = QWidget()
        self.range_row.setLayout(row)
        form.addRow("Range", self.range_row)

        buttons = QHBoxLayout()
        self.segment_button = QPushButton("Segment")
        self.segment_button.clicked.connect(self.segment)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.clicked.connect(self.cancel)
        buttons.addWidget(self.segment_button)
        buttons.addWidget(self.cancel_button)
        layout.addLayout(buttons)
        self.progress = QProgressBar()
        self.progress.setFormat("%v / %m slices")
        self.progress.setValue(0)
        layout.addWidget(self.progress)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        layout.addWidget(self.status)
        self.legend = QLabel("")
        self.legend.setTextFormat(Qt.TextFormat.RichText)
        layout.addWidget(self.legend)

        tools = QHBoxLayout()
        self.uncertain_button = QPushButton("Most uncertain slice")
        self.uncertain_button.setToolTip("Move the slider to the slice with the highest mean uncertainty")
        self.uncertain_button.clicked.connect(self.go_to_most_uncertain_slice)
        self.export_button = QPushButton("Export…")
        self.export_button.setToolTip("Save the consensus layer (with your edits) as NIfTI + JSON sidecar")
        self.export_button.clicked.connect(self.export)
        tools.addWidget(self.uncertain_button)
        tools.addWidget(self.export_button)
        layout.addLayout(tools)
        layout.addStretch(1)

        self._on_model_choice()
        self._on_slice_mode()
        self._set_running(False)

    @staticmethod
    def _spin(low: int, high: int, value: int, tip: str) -> QSpinBox:
        spin = QSpinBox()
        spin.setRange(low, high)
        spin.setValue(value)
        spin.setToolTip(tip)
        return spin

    def _set_running(self, running: bool) -> None:
        self.segment_button.setEnabled(not running)
        self.cancel_button.setEnabled(running)
        has_result = self._session is not None and self._session.result is not None
        self.uncertain_button.setEnabled(has_result and not running)
        self.export_button.setEnabled(has_result and not running)

    def _set_status(self, text: str) -> None:
        self.status.setText(text)

    # ------------------------------------------------------------------ inputs
    def _on_layers_changed(self, event: Any = None) -> None:
        if event is not None and getattr(event, "type", "") == "inserted":
            _connect_weakly(event.value.events.name, self, "_on_layers_changed")
        self._refresh_layer_choices()

    def _refresh_layer_choices(self) -> None:
        from napari.layers import Image

        current = self.layer_combo.currentText()
        names = [layer.name for layer in self.viewer.layers
                 if isinstance(layer, Image) and not results.is_own_result(layer)]
        self.layer_combo.blockSignals(True)
        self.layer_combo.clear()
        self.layer_combo.addItems(names)
        active = self.viewer.layers.selection.active
        if current in names:
            self.layer_combo.setCurrentText(current)
        elif active is not None and active.name in names:
            self.layer_combo.setCurrentText(active.name)
        self.layer_combo.blockSignals(False)

    def selected_layer(self) -> Any:
        name = self.layer_combo.currentText()
        return self.viewer.layers[name] if name and name in self.viewer.layers else None

    def _on_model_choice(self, *_: Any) -> None:
        use_file = self.model_combo.currentText() == CHECKPOINT_FILE
        self.checkpoint_row.setVisible(use_file)
        self._show_model_status()

    def _show_model_status(self) -> None:
        if self.model_combo.currentText() == CHECKPOINT_FILE:
            self.model_status.setText("A .safetensors checkpoint written by `medconddiff train`.")
            self.model_status.setStyleSheet("")
        elif self.model_combo.currentText() == LATENT_MODEL:
            self.model_status.setText("Bundled LSegDiff liver model: diffusion in a mask-VAE latent, "
                                      "morphological clean-up.")
            self.model_status.setStyleSheet("")
        elif self._engine is None:
            self.model_status.setText("Checking for the bundled model…")
            self.model_status.setStyleSheet("")
        elif self._engine.default_checkpoint_exists:
            self.model_status.setText(f"Bundled liver model: {Path(self._engine.default_checkpoint).name}")
            self.model_status.setStyleSheet("")
        else:
            self.model_status.setText("The bundled default model is not installed yet "
                                      f"({self._engine.default_checkpoint}). Choose 'Checkpoint file…'.")
            self.model_status.setStyleSheet("color: #e07050;")

    def _browse_checkpoint(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Choose a MedCondDiff checkpoint", self.checkpoint_edit.text(),
                                              "safetensors checkpoint (*.safetensors);;All files (*)")
        if path:
            self.checkpoint_edit.setText(path)

    def _on_steps_changed(self, steps: int) -> None:
        self.skip_spin.setMaximum(max(0, steps - 1))

    def _on_slice_mode(self, *_: Any) -> None:
        self.range_row.setEnabled(self.slice_combo.currentData() == "range")

    def _start_engine_probe(self) -> None:
        from napari.qt.threading import create_worker

        worker = create_worker(probe_engine, _ignore_errors=True)
        worker.returned.connect(self._on_engine_probed)
        worker.errored.connect(self._on_engine_error)
        worker.finished.connect(partial(self._workers.items.discard, worker))
        self._workers.items.add(worker)
        worker.start()

    def _on_engine_probed(self, info: EngineInfo) -> None:
        self._engine = info
        current = self.device_combo.currentText()
        self.device_combo.clear()
        self.device_combo.addItems(info.devices)
        if current in info.devices:
            self.device_combo.setCurrentText(current)
        self._show_model_status()
        self.engine_ready.emit()

    def _on_engine_error(self, error: BaseException) -> None:
        self.model_status.setText(f"The segmentation engine could not be loaded: {error}")
        self.model_status.setStyleSheet("color: #e07050;")
        _notify("error", f"MedCondDiff: the segmentation engine (torch/timm) could not be imported: {error}")

    # ------------------------------------------------------------------ segment
    def _checkpoint(self) -> Optional[str]:
        """None for the bundled model; raises ValueError for a missing file choice."""
        if self.model_combo.currentText() == LATENT_MODEL:
            return "lsegdiff-liver"   # a bundled model's name; the engine resolves it to its file
        if self.model_combo.currentText() == DEFAULT_MODEL:
            if self._engine is not None and not self._engine.default_checkpoint_exists:
                raise ValueError("the bundled default model is not installed yet; choose 'Checkpoint file…' "
                                 "and pick a .safetensors checkpoint")
            return None
        text = self.checkpoint_edit.text().strip()
        if not text:
            raise ValueError("choose a checkpoint file (Model: 'Checkpoint file…')")
        path = Path(text).expanduser()
        if not path.is_file():
            raise ValueError(f"checkpoint not found: {path}")
        return str(path)

    def _sampling(self) -> SamplingConfig:
        return SamplingConfig(steps=self.steps_spin.value(), seed=self.seed_spin.value(),
                              num_seeds=self.seeds_spin.value(), consensus=self.consensus_combo.currentText(),
                              skip_first=self.skip_spin.value())

    def _check_scan(self, layer: Any) -> None:
        if layer is None:
            raise ValueError("open a scan first (File > Open, or File > Open Sample > Liver CT) and pick it "
                             "under Image")
        if getattr(layer, "rgb", False):
            raise ValueError(f"'{layer.name}' is an RGB image; MedCondDiff segments grey-scale CT/MRI scans")
        if layer.ndim not in (2, 3):
            shape = np.shape(layer.data[0] if layer.multiscale else layer.data)
            raise ValueError(f"'{layer.name}' is {layer.ndim}-D (shape {shape}); pick one channel or time point "
                             "first (e.g. Layers > Split Stack)")

    def _slice_choice(self, layer: Any) -> SliceChoice:
        mode = self.slice_combo.currentData()
        point = tuple(float(x) for x in layer.world_to_data(self.viewer.dims.point))
        return SliceChoice(mode=mode, point=point, first=self.first_spin.value(), last=self.last_spin.value())

    def segment(self) -> None:
        """Start a run on the chosen layer (the Segment button)."""
        if self._session is not None and self._session.worker is not None:
            _notify("warning", "A segmentation is already running; cancel it first")
            return
        layer = self.selected_layer()
        try:
            self._check_scan(layer)
            request = SegmentRequest(data=layer.data, metadata=dict(layer.metadata), scale=tuple(layer.scale),
                                     checkpoint=self._checkpoint(), device=self.device_combo.currentText(),
                                     sampling=self._sampling(), slices=self._slice_choice(layer))
        except ValueError as error:
            _notify("error", f"MedCondDiff: {error}")
            return
        from napari.qt.threading import create_worker

        source = (layer.metadata.get(METADATA_KEY) or {}).get("source") or getattr(layer.source, "path", None)
        session = _Session(scan=layer, scan_id=str(layer.unique_id), scan_name=layer.name,
                           source=str(source) if source else None, previous=self._session)
        # Phase 1 (worker): load the model. Phase 2 (GUI): add the result layers. Phase 3 (worker): diffusion.
        worker = create_worker(prepare_run, request, _ignore_errors=True)
        session.worker = worker
        worker.returned.connect(self._on_prepared)
        worker.errored.connect(self._on_run_error)
        worker.finished.connect(partial(self._on_prepare_finished, worker))
        worker.finished.connect(partial(self._workers.items.discard, worker))
        self._workers.items.add(worker)
        self._session = session
        self.runs_started += 1
        self.progress.setRange(0, 0)     # busy until the number of slices is known
        self._set_status("Loading the model…")
        self._set_running(True)
        worker.start()

    def _on_prepared(self, info: RunStarted) -> None:
        session = self._session
        if session is None or session.stop_reason is not None or session.scan is None:
            return                       # cancelled (or the scan was removed) while the model loaded
        from napari.qt.threading import create_worker

        session.info = info
        session.previous = None
        self._replace_result_layers(session, session.scan, info)
        self.progress.setRange(0, len(info.slice_indices))
        self.progress.setValue(0)
        self._show_legend(info.class_names)
        self._set_status(f"Segmenting {len(info.slice_indices)} slice(s) on {info.device}…")
        worker = create_worker(iterate_run, info.run, _ignore_errors=True)
        session.worker = worker
        session.started = time.perf_counter()
        worker.yielded.connect(self._on_event)
        worker.returned.connect(self._on_returned)
        worker.aborted.connect(self._on_aborted)
        worker.errored.connect(self._on_run_error)
        worker.finished.connect(self._on_worker_finished)
        worker.finished.connect(partial(self._workers.items.discard, worker))
        self._workers.items.add(worker)
        worker.start()
        self.diffusion_started.emit()

    def _on_prepare_finished(self, worker: Any) -> None:
        session = self._session
        if session is None or session.worker is not worker:
            return                       # the diffusion worker took over
        session.worker = None
        how = session.stop_reason or "failed"
        if how != "failed":
            self._set_status(f"Stopped ({how}) before any slice was segmented.")
        self._session = session.previous   # the last result stays usable (re-fuse, export)
        self.progress.setRange(0, 1)
        self._set_running(False)
        self.run_finished.emit(how)

    def cancel(self) -> None:
        """Stop the run after the current denoising step; finished slices are kept."""
        session = self._session
        if session is not None and session.worker is not None:
            session.stop_reason = session.stop_reason or "cancelled"
            self._set_status("Cancelling after the current step…")
            session.worker.quit()

    # ------------------------------------------------------------------ run events (GUI thread)
    def _on_event(self, event: Any) -> None:
        session = self._session
        if session is None:
            return
        from medconddiff.segmenter import SlicesDone, StepUpdate  # already imported by the worker

        if isinstance(event, StepUpdate):
            self._on_step(session, event)
        elif isinstance(event, SlicesDone):
            self._on_slices_done(session, event)

    def _replace_result_layers(self, session: _Session, scan: Any, info: RunStarted) -> None:
        old = results.own_results(self.viewer.layers, session.scan_id)
        positions = [self.viewer.layers.index(layer) for layer in old]
        for layer in old:
            self.viewer.layers.remove(layer)
        layer_ndim = scan.ndim
        stack = np.zeros((info.total_steps, len(info.slice_indices), info.image_size, info.image_size), np.uint8)
        made = {
            "uncertainty": results.make_uncertainty(scan, session.scan_name, session.scan_id),
            "steps": results.make_steps(scan, session.scan_name, stack_to_layer_order(stack, info.slice_axis,
                                                                                       layer_ndim),
                                        layer_axis_of(info.slice_axis, layer_ndim), int(info.slice_indices[0]),
                                        info.class_names, info.sampling.steps, info.sampling.num_seeds,
                                        session.scan_id),
            "consensus": results.make_consensus(scan, session.scan_name, info.class_names, session.scan_id),
        }
        # Old layers' place in the list if there were any (the user may have moved them), else above the scan.
        index = min(positions) if positions else self.viewer.layers.index(scan) + 1
        for role in results.ROLES:
            self.viewer.layers.insert(min(index, len(self.viewer.layers)), made[role])
            index += 1
        session.layers = dict(made)
        session.views = {
            "consensus": slice_first_view(made["consensus"].data, info.slice_axis),
            "uncertainty": slice_first_view(made["uncertainty"].data, info.slice_axis),
            "steps": stack,
        }
        self.viewer.layers.selection.active = made["consensus"]

    def _on_step(self, session: _Session, update: Any) -> None:
        info = session.info
        if info is None or "steps" not in session.layers:
            return
        positions = np.searchsorted(info.slice_indices, update.slice_indices)
        step = update.seed_index * update.num_steps + update.step_index
        # Arg-max of the quantised probabilities: exactly what the kept trajectory stores (same ties).
        session.views["steps"][step, positions] = first_argmax(quantize(update.probabilities), axis=1)
        now = time.perf_counter()
        if now - session.last_redraw >= STEP_REDRAW_INTERVAL_S or step == info.total_steps - 1:
            session.layers["steps"].refresh()
            session.last_redraw = now
        done = int(self.progress.value())
        self._set_status(f"{done}/{len(info.slice_indices)} slices done · step {update.step_index + 1}/"
                         f"{update.num_steps}" + (f" of seed {update.seed_index + 1}/{update.num_seeds}"
                                                  if update.num_seeds > 1 else "")
                         + f" for slices {int(update.slice_indices[0])}–{int(update.slice_indices[-1])}")

    def _on_slices_done(self, session: _Session, done: Any) -> None:
        for role, values in (("consensus", done.labels), ("uncertainty", done.uncertainty)):
            if role in session.layers:
                session.views[role][done.slice_indices] = values
                session.layers[role].refresh()
        self.progress.setValue(done.completed)

    def _on_returned(self, result: Any) -> None:
        session = self._session
        if session is None or result is None:
            return
        self._finish(session, result, "done")

    def _on_aborted(self) -> None:
        session = self._session
        if session is None:
            return
        run = session.info.run if session.info is not None else None
        result = run.result if run is not None else session.result
        self._finish(session, result, session.stop_reason or "cancelled")

    def _finish(self, session: _Session, result: Any, how: str) -> None:
        seconds = time.perf_counter() - session.started
        if result is None:       # stopped before the model was loaded
            self._set_status("Stopped before any slice was segmented.")
            return
        session.result = result
        if session.info is not None:
            session.info.run = None      # frees the run's float copy of the scan and the model
        if "steps" in session.layers:
            # A cancelled batch left some steps drawn for slices that did not finish: clear them.
            session.views["steps"][:, ~result.completed] = 0
            session.layers["steps"].refresh()
        for role in ("consensus", "uncertainty"):
            if role in session.layers:
                session.layers[role].refresh()
        finished = int(result.completed.sum())
        total = len(result.completed)
        if how == "done":
            self._set_status(f"Done: {total} slice(s) in {seconds:.1f} s ({result.sampling.consensus} consensus). "
                             "Show the x0 (steps) layer and move the 'diffusion step' slider to replay the diffusion.")
        elif how == "cancelled":
            self._set_status(f"Cancelled: kept {finished} of {total} slices.")
        else:
            self._set_status(f"Stopped ({how}): kept {finished} of {total} slices.")

    def _on_run_error(self, error: BaseException) -> None:
        session = self._session
        self._on_error(error)
        if session is None:
            return
        session.stop_reason = "failed"
        if session.info is not None and session.info.run is not None:   # failed mid-run: keep what finished
            self._finish(session, session.info.run.result, "failed")

    def _on_error(self, error: BaseException) -> None:
        if isinstance(error, USER_ERRORS):   # CheckpointError and ScanError are ValueErrors
            _notify("error", f"MedCondDiff: {error}")
        else:
            from napari.utils.notifications import notification_manager

            notification_manager.receive_error(type(error), error, error.__traceback__)
        self._set_status(f"Failed: {error}")

    def _on_worker_finished(self) -> None:
        session = self._session
        how = "done"
        if session is not None:
            session.worker = None
            how = session.stop_reason or "done"
        self._set_running(False)
        self.run_finished.emit(how)
        self._on_consensus_settings()   # consensus settings changed during the run apply now

    # ------------------------------------------------------------------ layers removed / widget closed
    def _on_layer_removed(self, event: Any) -> None:
        session = self._session
        if session is None:
            return
        removed_id = str(event.value.unique_id)
        for role, layer in list(session.layers.items()):
            if str(layer.unique_id) == removed_id:
                del session.layers[role]
        if removed_id != session.scan_id:
            return
        session.scan = None        # do not keep a removed scan's data alive
        if session.worker is not None:
            session.stop_reason = "input layer removed"
            session.worker.quit()
            _notify("warning", f"MedCondDiff: '{session.scan_name}' was removed; segmentation stopped, "
                               "finished slices are kept")

    def closeEvent(self, event: Any) -> None:  # noqa: N802 (Qt API)
        self._workers.stop_all()
        super().closeEvent(event)

    # ------------------------------------------------------------------ re-fuse
    def _on_consensus_settings(self, *_: Any) -> None:
        session = self._session
        if session is None or session.result is None or session.worker is not None:
            return
        method, skip = self.consensus_combo.currentText(), self.skip_spin.value()
        if (method, skip) == (session.result.sampling.consensus, session.result.sampling.skip_first):
            return
        if skip >= session.result.sampling.steps:
            _notify("warning", f"MedCondDiff: skip-first must be below the run's {session.result.sampling.steps} "
                               "steps")
            return
        if self._refusing:
            self._refuse_pending = True
            return
        from napari.qt.threading import create_worker

        self._refusing = True
        self._set_status(f"Re-fusing with {method}, skipping {skip} step(s)…")
        worker = create_worker(session.result.refuse, method, skip, _ignore_errors=True)
        worker.returned.connect(partial(self._on_refused, session))
        worker.errored.connect(self._on_error)
        worker.finished.connect(self._on_refuse_finished)
        worker.finished.connect(partial(self._workers.items.discard, worker))
        self._workers.items.add(worker)
        worker.start()

    def _on_refused(self, session: _Session, result: Any) -> None:
        if session is not self._session:
            return
        session.result = result
        axis = result.slice_axis
        for role, values in (("consensus", result.labels), ("uncertainty", result.uncertainty)):
            if role in session.layers:
                np.moveaxis(session.views[role], 0, axis)[...] = values
                session.layers[role].refresh()
        self._set_status(f"Consensus: {result.sampling.consensus}, skipping the first "
                         f"{result.sampling.skip_first} step(s).")
        self.consensus_updated.emit()

    def _on_refuse_finished(self) -> None:
        self._refusing = False
        if self._refuse_pending:
            self._refuse_pending = False
            self._on_consensus_settings()

    # ------------------------------------------------------------------ tools
    def _show_legend(self, class_names: tuple[str, ...]) -> None:
        items = []
        for index, name in enumerate(class_names[1:], start=1):
            r, g, b, _ = (int(255 * c) for c in results.class_color(index))
            items.append(f"<span style='color: rgb({r},{g},{b});'>■</span> {index} {name}")
        self.legend.setText("Classes: " + " &nbsp; ".join(items))

    def most_uncertain_slice(self) -> Optional[tuple[int, float]]:
        """(slice index along the model's slice axis, its mean uncertainty) over the finished slices."""
        session = self._session
        if session is None or session.result is None:
            return None
        result = session.result
        done = result.slice_indices[result.completed]
        if len(done) == 0:
            return None
        per_slice = np.moveaxis(result.uncertainty, result.slice_axis, 0)[done].mean(axis=(1, 2))
        best = int(np.argmax(per_slice))
        return int(done[best]), float(per_slice[best])

    def go_to_most_uncertain_slice(self) -> None:
        found = self.most_uncertain_slice()
        session = self._session
        if found is None or session is None:
            _notify("info", "MedCondDiff: no finished slices yet")
            return
        index, value = found
        layer = session.layers.get("consensus") or session.scan
        axis = layer_axis_of(session.result.slice_axis, layer.ndim) if layer is not None else None
        if axis is not None:
            point = np.asarray(layer.world_to_data(self.viewer.dims.point), dtype=float)
            point[axis] = index
            world = layer.data_to_world(point)
            world_axis = self.viewer.dims.ndim - layer.ndim + axis
            self.viewer.dims.set_point(world_axis, float(world[axis]))
        self._set_status(f"Most uncertain slice: {index} (mean uncertainty {value:.3f}).")

    def export(self) -> None:
        """Save the consensus layer (including edits) as NIfTI + JSON sidecar, asking before replacing files."""
        from napari.utils.notifications import show_info

        from ._export import default_export_path, export_targets, write_export

        session = self._session
        layer = session.layers.get("consensus") if session is not None else None
        if session is None or session.result is None or layer is None:
            _notify("warning", "MedCondDiff: nothing to export yet; run a segmentation first")
            return
        start = default_export_path(session.scan_name, session.source)
        chosen, _ = QFileDialog.getSaveFileName(self, "Export segmentation as NIfTI", str(start),
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
            written = write_export(nifti, layer, session.result, session.scan_name, overwrite=True)
        except (ValueError, OSError) as error:
            _notify("error", f"MedCondDiff: export failed: {error}")
            return
        show_info(f"MedCondDiff: saved {written[0]} and {written[1].name}")
        self._set_status(f"Exported {written[0].name} and {written[1].name}.")


__all__ = ["SegmentWidget"]
