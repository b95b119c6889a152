"""The MedCondDiff state machine without Qt: segment, cancel, re-fuse, keep edits, fine-tune, export.

napari-animation's split: :class:`SegmentationController` drives napari's (Qt-free) viewer model
and layers and tells what happened through psygnal signals; ``_widget.py`` is a thin Qt view over
it. Slow work (loading a model, diffusion, re-fusion, fine-tuning, saving) runs through an injected
*runner* (:mod:`._runners`). Questions to the user (what to do with edited slices, whether to save a
cancelled fine-tuning) go through an injected :class:`~._questions.Questions`.

Where each part lives: the Segment flow in :mod:`._segment_flow`, carrying on from saved labels in
:mod:`._continue_flow`, the Fine-tune flow in :mod:`._finetune_flow`, the Training set flow in
:mod:`._training_set_flow`, one scan's layers, runs and edits in :mod:`._result_set` and
:mod:`._edits`; this module holds the state, the signals, the task plumbing, re-fusion, inspection
and export.

**Edits are never lost.** A re-fusion or a run that would overwrite edited slices asks first: keep
the edits (update only unedited slices), put the result in a new layer (the edited layer is kept
aside, renamed), or replace them. Strokes painted after the question are kept whatever the answer.
Each user action on an existing consensus is one napari undo step.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
from psygnal import Signal

from medconddiff.config import ONE_SHOT
from medconddiff.consensus import skip_first_note
from medconddiff.consensus_choice import resolved_consensus
from medconddiff.errors import UserInputError
from medconddiff.geometry import SLICE_AXIS, Orientation, Reorientation, affine_is_usable
from medconddiff.slice_lists import slice_list_text

from . import _result_layers as results_layers
from ._edits import KEEP, NEW_LAYER, REPLACE, WritePolicy
from ._export import ExportSummary, default_export_path, padded_class_names, write_export
from ._continue_flow import ContinueFlow
from ._finetune_flow import CANCELLED_BEFORE_TRAINING, FinetuneFlow, FinetuneSettings, _Finetune
from ._job import EngineInfo, SegmenterCache, SliceChoice, probe_engine, refuse_runs
from ._layers import dicom_source_of, full_resolution, stored_geometry
from ._notifications import notify, report_error
from ._questions import Questions
from ._result_set import ChannelInput, KeptRun, ResultSet
from ._runners import Runner, SyncRunner, Task
from ._segment_flow import CONSENSUS_NAMES, SegmentFlow, SegmentSettings, _Pending
from ._training_set_flow import TrainingSetFlow, model_slicing
from ._volumes import ClassVolumes, consensus_volumes

__all__ = ["SegmentationController", "SegmentSettings", "FinetuneSettings", "Questions", "SyncRunner", "Runner",
           "Task", "ResultSet", "KeptRun", "ChannelInput", "ExportSummary", "SliceChoice", "CONSENSUS_NAMES",
           "KEEP", "NEW_LAYER", "REPLACE", "notify", "ClassVolumes"]


# The last status of an operation cancelled before its first step (while its model loaded or its data
# were prepared): Cancel's "after the current step…" must not stay as if something were still to come.
CANCELLED_BEFORE = {"segmenting": "Cancelled before the model had loaded; nothing was segmented.",
                    "fine-tuning": CANCELLED_BEFORE_TRAINING}


def export_class_names(names: Sequence[str], top_label: int) -> tuple[str, ...]:
    """A name for every label ``0..top_label``: those given (a blank one, or a painted value beyond them,
    named ``class N`` as napari's File > Save names it), so that a DICOM SEG has a segment per label."""
    named = [str(name).strip() or f"class {value}" for value, name in enumerate(names)]
    return tuple(padded_class_names(named, top_label))


class SegmentationController(SegmentFlow, ContinueFlow, FinetuneFlow, TrainingSetFlow):
    """Runs segmentations, re-fusions and fine-tuning for a viewer; see the module docstring."""

    status = Signal(str)
    progress = Signal(int, int)            # value, maximum (maximum 0: busy, length unknown)
    busy_changed = Signal(str)             # the operation now running, '' when idle
    run_finished = Signal(str)             # 'done', 'cancelled', 'failed' or why it stopped
    diffusion_started = Signal()           # the model is loaded and the result layers are in place
    consensus_updated = Signal()
    results_changed = Signal()             # what can be exported / inspected changed
    classes_changed = Signal(tuple)
    edits_changed = Signal(tuple)          # edited canonical slices of the current result
    labels_shown = Signal()                # the current consensus layer's content may have changed
    engine_ready = Signal(object)          # EngineInfo
    engine_failed = Signal(str)
    input_removed = Signal(str)            # the scan of a running segmentation was removed (its name)
    finetune_step = Signal(int, int, float)   # step, total steps, loss
    finetune_finished = Signal(str)        # 'done', 'cancelled', 'failed'
    model_added = Signal(str, str)         # name, checkpoint path of a fine-tuned model

    def __init__(self, viewer: Any, runner: Optional[Runner] = None, questions: Optional[Questions] = None):
        self.viewer = viewer
        self.runner: Runner = runner or SyncRunner()
        self.questions = questions or Questions()
        self.cache = SegmenterCache()
        self.engine: Optional[EngineInfo] = None
        self.results: dict[str, ResultSet] = {}
        self.current: Optional[ResultSet] = None
        self._picked_id: Optional[str] = None   # the scan last focused (the dock's Image); None: never told
        self.operation = ""
        self.runs_started = 0              # diffusion runs started (tests check re-fusing adds none)
        self._task: Optional[Task] = None
        self._stop_reason: Optional[str] = None
        self._pending: Optional[_Pending] = None
        self._finetune: Optional[_Finetune] = None
        self._continuing = None            # saved labels waiting for the model (ContinueFlow)
        self._wanted_consensus: Optional[tuple[str, int]] = None
        self._refuse_policy = WritePolicy()
        self._refusing: Optional[ResultSet] = None
        self._model_channels: dict[tuple, Optional[tuple[str, ...]]] = {}
        self._init_training_set()
        viewer.layers.events.removed.connect(self._on_layer_removed)

    # ------------------------------------------------------------ tasks and operations
    @property
    def busy(self) -> bool:
        return bool(self.operation)

    def _start(self, function: Callable, *args: Any, **callbacks: Optional[Callable]) -> None:
        task = None

        def finished() -> None:
            # Only a task that ended without a handler taking over (quit before returning) ends here.
            if self._task is task:
                self._task = None
                if self._stop_reason == "cancelled":     # the user's Cancel: say it is done, not still coming
                    self.status.emit(CANCELLED_BEFORE.get(self.operation, "Cancelled."))
                self._end(self._stop_reason or "cancelled")

        task = self.runner(function, *args, finished=finished, **callbacks)
        self._task = task
        task.start()

    def _detach_task(self) -> None:
        """A handler takes over from the task that called it (before any dialog: its queued
        ``finished`` may arrive while the dialog is open)."""
        self._task = None

    def _begin(self, operation: str) -> None:
        self.operation = operation
        self._stop_reason = None
        self.busy_changed.emit(operation)

    def _end(self, how: str, apply_wanted: bool = True) -> None:
        """The operation in progress ended (``how``: done, cancelled, failed, …). A consensus chosen while it
        ran applies now, unless ``apply_wanted`` is False (another operation follows; it applies after)."""
        operation, self.operation = self.operation, ""
        self._stop_reason = None
        if self._pending is not None and self._pending.results is not None:
            self._pending.results.end_undo_step()     # a run that ended before its own end handler
        self._pending = None
        self.busy_changed.emit("")
        if operation == "segmenting":
            self.run_finished.emit(how)
        elif operation in ("fine-tuning", "saving"):
            self.finetune_finished.emit(how)
        self.results_changed.emit()
        if apply_wanted:
            self._apply_wanted_consensus()

    def _apply_wanted_consensus(self) -> None:
        if self._wanted_consensus is not None:
            self.set_consensus(*self._wanted_consensus)   # settings changed while busy apply now

    def _refused_while_busy(self) -> bool:
        """One operation at a time: a second one is refused with a warning naming the first."""
        if self.busy:
            notify("warning", f"MedCondDiff: {self.operation} is in progress; wait or cancel it first")
        return self.busy

    def cancel(self) -> None:
        """Stop what runs: diffusion after the current step (finished slices are kept), fine-tuning
        after the current optimizer step (its weights are kept and can be saved)."""
        if self._task is not None and self.operation in ("segmenting", "fine-tuning"):
            self._stop_reason = self._stop_reason or "cancelled"
            self.status.emit("Cancelling after the current step…")
            self._task.quit()

    def close(self) -> None:
        """Stop everything (the widget or the viewer is closing); no more signals are acted on."""
        try:
            self.viewer.layers.events.removed.disconnect(self._on_layer_removed)
        except (TypeError, ValueError, RuntimeError):
            pass
        if self._task is not None:
            self._stop_reason = "closed"
            self._task.quit()
        self._task = None

    def fail(self, error: BaseException, what: str = "Failed") -> None:
        """Tell the user why something failed: a notification (one line for a user error, the traceback
        behind napari's details button for anything else) and the status line."""
        report_error(error)
        self.status.emit(f"{what}: {error}")

    # ------------------------------------------------------------ engine
    def probe(self) -> None:
        """Import the engine in the background and report devices and the bundled model's state."""
        task = self.runner(probe_engine, returned=self._on_probed, errored=self._on_probe_error)
        task.start()

    def _on_probed(self, info: EngineInfo) -> None:
        self.engine = info
        self.engine_ready.emit(info)

    def _on_probe_error(self, error: BaseException) -> None:
        # Not the user's doing: napari's error notification, with the traceback that says what is broken.
        self.fail(error, "The segmentation engine (torch/timm) could not be imported")
        self.engine_failed.emit(str(error))

    # ------------------------------------------------------------ the slice under the slider
    def check_slices_shown(self, layer: Any, slice_axis: Optional[int], slicing: str) -> None:
        """A UserInputError unless napari shows one of ``layer``'s ``slicing`` slices (``slice_axis``: the layer
        axis they follow each other along), so that "the current slice" is the one the user looks at: in a
        rolled view (sagittal) or in 3-D the slider's point names a slice nobody sees; nor does it beyond the
        layer's slices (a longer scan open beside it set the slider's range), where napari shows it empty."""
        dims = self.viewer.dims
        if slice_axis is None:       # a 2-D layer: its one slice
            return
        if dims.ndisplay == 3 or dims.ndim - layer.ndim + slice_axis in dims.displayed:
            raise UserInputError(f"napari shows no {slicing} slice: show {slicing} slices in 2-D (the slider "
                                 "through them) to act on the current slice")
        point = layer.world_to_data(dims.point)
        index = np.round(point[slice_axis]) if len(point) > slice_axis else 0.0
        if not 0 <= index <= np.shape(full_resolution(layer))[slice_axis] - 1:    # napari's own test for a slice
            raise UserInputError(f"the slider is outside the slices of '{layer.name}'; move it onto one of them "
                                 "to act on the current slice")

    def model_slice_axis(self, layer: Any, checkpoint: str) -> tuple[Optional[int], str]:
        """(the layer axis ``checkpoint``'s model slices ``layer`` along, its slicing), known before the model
        loads: a plain layer is sliced along napari's slider; a scan read from a file along the model's plane
        in its orientation. Axis None for a 2-D layer or a single image (one slice)."""
        slicing = model_slicing(checkpoint) or "axial"
        if layer.ndim != 3 or 1 in tuple(layer.data.shape):
            return None, slicing
        stored = stored_geometry(layer.metadata)
        if stored is None:
            return self.view_axes(layer)[0], slicing
        meta, to_layer = stored
        usable = meta.affine_known and affine_is_usable(meta.affine)
        to_canonical = Orientation.of(meta.affine).to_canonical if usable else Reorientation.identity()
        return to_canonical.inverse().then(to_layer).axes.index(SLICE_AXIS[slicing]), slicing

    # ------------------------------------------------------------ layers removed, focus
    def _on_layer_removed(self, event: Any) -> None:
        removed_id = str(event.value.unique_id)
        for results in list(self.results.values()):
            for role, layer in list(results.layers.items()):
                if str(layer.unique_id) == removed_id:
                    del results.layers[role]
            if removed_id == results.scan_id:
                results.scan = None    # do not keep a removed scan's data alive
            for channel in results.channels:
                if channel.layer is not None and str(channel.layer.unique_id) == removed_id:
                    channel.layer = None
        pending = self._pending
        if pending is not None and removed_id == pending.scan_id:
            pending.settings.scan = None
            if self._task is not None:
                self._stop_reason = "input layer removed"
                self._task.quit()
                self.input_removed.emit(pending.scan_name)
        self.results_changed.emit()

    def focus(self, scan: Any) -> None:
        """Make ``scan``'s results the ones re-fusion, export, marking, adding and fine-tuning act on; a scan
        without results leaves them none (they must not act on another scan than the one shown as chosen).
        None (no scan chosen, as while the scan list refreshes) changes nothing."""
        if scan is None:
            return
        self._picked_id = str(scan.unique_id)
        results = self.results.get(self._picked_id)
        if results is None:
            if self.current is not None:
                self.current = None
                self.edits_changed.emit(())
                self.results_changed.emit()
                if not self.busy:       # the last run's "Done: …" was another scan's
                    self.status.emit(f"No result for '{scan.name}' yet: click Segment.")
            return
        if results is not self.current and not self.busy:
            self.status.emit(f"Showing the results of '{scan.name}'.")
        self.current = results
        self.classes_changed.emit(results.class_names)
        self._edits_changed(results)
        self.results_changed.emit()

    def live_results_of(self, layer: Any) -> Optional[ResultSet]:
        """The result set that keeps ``layer`` up to date (a result layer of a scan still open), or None: the
        user's labels, a layer set aside, the results of a scan removed (and opened again), or of a dock
        closed and opened again, which no run of this dock would update."""
        layer_id = str(layer.unique_id)
        return next((results for results in self.results.values() if results.scan is not None
                     and any(str(held.unique_id) == layer_id for held in results.layers.values())), None)

    def _follow(self, results: ResultSet) -> None:
        """A run or a load starting on ``results`` makes them the current ones only when their scan is the one
        picked (or none ever was): a scan picked while it prepared keeps the dock (Mark, Add, Export, Fine-tune,
        the legend) acting on it, and ``results`` fill in the background until their scan is picked again."""
        if self._picked_id is None or self._picked_id == results.scan_id:
            self.current = results

    # ------------------------------------------------------------ edits
    def _edits_changed(self, results: ResultSet) -> None:
        if results is self.current:
            self.edits_changed.emit(tuple(sorted(results.edited)))

    def _labels_shown(self, results: ResultSet) -> None:
        if results.follow_undo() and not self.busy and results is self.current:
            sampling = results.runs[-1].sampling
            self.status.emit(f"Consensus: {CONSENSUS_NAMES[sampling.consensus]}, skipping the first "
                             f"{sampling.skip_first} step(s), as the labels undone or redone show.")
            self.consensus_updated.emit()
        if results is self.current:
            self.labels_shown.emit()

    def class_volumes(self) -> Optional[ClassVolumes]:
        """Millilitres per class in the current consensus layer, the user's edits included."""
        return consensus_volumes(self.current)

    def _ask_about_edits(self, results: ResultSet, action: str, slices: Sequence[int]) -> WritePolicy:
        """How ``action`` may write ``slices``. The user is asked when some of them hold edits or are marked
        as checked: KEEP and
        NEW_LAYER (which puts the edited layer aside first) overwrite none; REPLACE overwrites those
        slices as they are now, and no stroke painted after the question."""
        clash = results.protected_among(slices)
        choice = self.questions.edits(action, clash) if clash else KEEP
        if choice == NEW_LAYER:
            self._fork_consensus(results)
        return results.policy_replacing(clash) if choice == REPLACE else WritePolicy()

    def _fork_consensus(self, results: ResultSet) -> None:
        """NEW_LAYER: the edited consensus is set aside (renamed, the user's own), a new one shows the engine's."""
        old = results.layers.pop("consensus")
        results_layers.detach(old)
        old.name = f"{results.scan_name} consensus (your edits)"
        self._add_layers(results, place_like=old)
        results.edited = set()
        results.checked = set()     # the marks were on what the set-aside layer shows
        self._edits_changed(results)

    def edited_slices(self) -> list[int]:
        """Edited canonical slices of the current result (compared afresh)."""
        return self.current.edited_slices() if self.current is not None else []

    # ------------------------------------------------------------ re-fuse
    def shown_consensus(self) -> Optional[tuple[str, int]]:
        """(consensus, skip-first) as asked for the labels the current consensus layer shows, if known."""
        results = self.current
        return results.runs[-1].asked if results is not None and results.runs else None

    def set_consensus(self, method: str, skip_first: int) -> None:
        """Fuse the kept trajectories again with another consensus (no new diffusion)."""
        self._wanted_consensus = (method, skip_first)
        results = self.current
        if self.busy or results is None or not results.runs or results.consensus is None:
            return            # applied when the operation in progress ends, or to the next run
        results.follow_undo()     # after a Ctrl-Z of a re-fusion, the fusion it brought back is the one to compare
        resolved = [resolved_consensus(method, run.provenance, run.sampling) for run in results.runs]
        if all((run.sampling.consensus, run.sampling.skip_first) == (used, skip_first)
               for run, used in zip(results.runs, resolved)):
            self._wanted_consensus = None
            return
        steps = min(run.sampling.steps for run in results.runs)
        if skip_first >= steps:
            self._wanted_consensus = None
            notify("warning", f"MedCondDiff: skip-first must be below the run's {steps} steps")
            return
        if any(used == ONE_SHOT and run.one_shot is None for run, used in zip(results.runs, resolved)):
            self._wanted_consensus = None     # the form keeps the choice: the next run computes what it needs
            notify("warning", "MedCondDiff: the shown result did not keep the one-shot forward; click Segment to "
                              "segment with it")
            return
        self._wanted_consensus = None
        self._refuse_policy = self._ask_about_edits(
            results, f"Re-fusing with the {CONSENSUS_NAMES[method]} consensus", results.shown_slices)
        self._refusing = results
        self._refusing_asked = (method, skip_first)
        self._begin("fusing")
        self.status.emit(f"Re-fusing with the {CONSENSUS_NAMES[method]} consensus, skipping {skip_first} step(s)…")
        self._start(refuse_runs, list(results.runs), method, skip_first, returned=self._on_refused,
                    errored=self._on_refuse_error)

    def _on_refused(self, refused: list) -> None:
        self._detach_task()
        results, self._refusing = self._refusing, None
        kept: list[int] = []
        start = results.fusion_start()
        with results.one_undo_step():   # every run's slices: one Ctrl-Z undoes the whole re-fusion
            for item in refused:
                kept += results.write(item.slices, item.labels, item.uncertainty, self._refuse_policy)
                item.run.sampling, item.run.asked = item.sampling, self._refusing_asked
                item.run.provenance["sampling"] = dataclasses.asdict(item.sampling)
        results.record_fusion(start)
        results.fresh = False
        sampling = refused[-1].sampling
        text = f"Consensus: {CONSENSUS_NAMES[sampling.consensus]}, skipping the first {sampling.skip_first} step(s)."
        if kept:
            text += f" Your edits on slice(s) {slice_list_text(kept)} were kept."
        steps_used = np.concatenate([item.run.steps_used[item.run.shown] for item in refused])
        short = skip_first_note(sampling.skip_first, sampling.consensus, steps_used)
        if short:
            text += f" Note: {short}."
        self.status.emit(text)
        self._end("done")
        self.consensus_updated.emit()

    def _on_refuse_error(self, error: BaseException) -> None:
        self._detach_task()
        self._refusing = None
        self.fail(error)
        self._end("failed")

    # ------------------------------------------------------------ inspect
    def most_uncertain_slice(self) -> Optional[tuple[int, float]]:
        """(canonical slice, its mean uncertainty) over the slices with results."""
        results = self.current
        if results is None or "uncertainty" not in results.layers:
            return None
        shown = results.shown_slices
        if len(shown) == 0:
            return None
        per_slice = results.space.slices(results.layers["uncertainty"].data)[shown].mean(axis=(1, 2))
        best = int(np.argmax(per_slice))
        return int(shown[best]), float(per_slice[best])

    def go_to_slice(self, index: int) -> None:
        """Move napari's slider to canonical slice ``index`` of the current result's scan."""
        results = self.current
        if results is None:
            return
        layer = results.scan if results.scan is not None else results.consensus
        axis, position = results.space.layer_position(index)
        if layer is None or axis is None:
            return
        point = np.asarray(layer.world_to_data(self.viewer.dims.point), dtype=float)
        point[axis] = position
        world = layer.data_to_world(point)
        self.viewer.dims.set_point(self.viewer.dims.ndim - layer.ndim + axis, float(world[axis]))

    # ------------------------------------------------------------ export
    @property
    def can_export(self) -> bool:
        results = self.current
        return (not self.busy and results is not None and results.consensus is not None
                and (len(results.shown_slices) > 0 or bool(results.edited)))

    def export_default_path(self) -> Path:
        results = self.current
        return default_export_path(results.scan_name, results.source, self.export_dicom_source())

    def export_dicom_source(self) -> Any:
        """The DICOM series the current scan was read from (Export then offers DICOM SEG), or None."""
        results = self.current
        if results is None:
            return None
        for layer in (results.consensus, results.scan):
            source = dicom_source_of(getattr(layer, "metadata", None))
            if source is not None:
                return source
        return None

    def export_affine_known(self) -> bool:
        return self.current is not None and self.current.space.export_meta().affine_known

    def export(self, path: str | Path, *, overwrite: bool, rtstruct: bool = False,
               class_names: Optional[Sequence[str]] = None) -> tuple[Path, Path]:
        """Write the consensus layer (with edits) in the scan's voxel order + JSON sidecar (a ``.dcm`` path: a
        DICOM SEG, or where ``rtstruct`` an RT structure set of contours). ``class_names``: the names the user
        gave the labels (the class table), else the model's."""
        results = self.current
        if not self.can_export:
            raise UserInputError("nothing to export yet; run a segmentation first")
        space = results.space
        labels = space.layer.file_view(np.asarray(results.consensus.data))
        meta = space.export_meta()
        summary = results.summary()
        names = export_class_names(class_names or summary.class_names, int(labels.max()) if labels.size else 0)
        written = write_export(path, labels, meta, dataclasses.replace(summary, class_names=names),
                               source=results.source, scan_name=results.scan_name,
                               edited_slices=results.edited_slices(),
                               overwrite=overwrite, dicom=self.export_dicom_source(), rtstruct=rtstruct)
        unknown = "" if meta.affine_known else \
            " The scan's orientation is unknown: written in the layer's axis order with NIfTI codes 0."
        self.status.emit(f"Exported {written[0].name} and {written[1].name}.{unknown}")
        return written
