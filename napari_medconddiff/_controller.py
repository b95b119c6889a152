"""The MedCondDiff state machine without Qt: segment, cancel, re-fuse, keep edits, fine-tune, export.

napari-animation's split: :class:`SegmentationController` drives napari's (Qt-free) viewer model
and layers and tells what happened through psygnal signals; ``_widget.py`` is a thin Qt view over
it. Slow work (loading a model, diffusion, re-fusion, fine-tuning, saving) runs through an injected
*runner*: the widget passes one that makes napari ``thread_worker``s, tests pass :class:`SyncRunner`,
which runs each task at once on the calling thread. Questions to the user (what to do with edited
slices, whether to save a cancelled fine-tuning) go through an injected :class:`Questions`.

**Edits are never lost.** For each scan, a :class:`ResultSet` keeps, next to its result layers, a
*reference*: what the engine last wrote into each voxel of the consensus. A canonical slice is
*edited* when the consensus layer differs from the reference there (napari's ``paint`` event,
emitted by painting, filling, erasing and ``data_setitem``, updates the edited slices live; undo
emits no event, so every decision compares the whole volume again). A re-fusion or a run that would
overwrite edited slices asks first: keep the edits (update only unedited slices), put the result in
a new layer (the edited layer is kept aside, renamed), or replace them. Updates of an existing
consensus go through ``Labels.data_setitem``, so napari's undo brings edits back.

Slice indices here are canonical: slices along the model's slicing direction (axial: inferior →
superior), as the engine counts them.

**Several channels.** A model trained on several channels (``plan.channel_names``, e.g. an MRI's
FLAIR, T1, T1c, T2) takes the scan layer as channel 0 and further Image layers as channels 1…C-1,
in the model's order (:attr:`SegmentSettings.channels`). The result layers belong to the scan
layer; the result set remembers the further layers, so fine-tuning trains on the very image that
was segmented.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Sequence

import numpy as np
from psygnal import Signal

from medconddiff.config import SamplingConfig
from medconddiff.consensus import first_argmax, quantize
from medconddiff.slice_lists import slice_list_text

from . import _result_layers as results_layers
from ._export import ExportSummary, checkpoint_target, default_export_path, default_finetune_path, write_export
from ._geometry import PLAIN_LAYER_STATUS, LayerSpace, ScanSpace
from ._job import (
    ChannelLayer,
    EngineInfo,
    FinetuneJob,
    RunStarted,
    SegmenterCache,
    SegmentRequest,
    SliceChoice,
    channel_count_problem,
    iterate_finetune,
    iterate_run,
    model_channels,
    prepare_finetune,
    prepare_run,
    probe_engine,
    refuse_runs,
    save_finetuned,
)
from ._layers import METADATA_KEY

#: What the consensus methods are called on screen; the engine gets the keys.
CONSENSUS_NAMES = {"mean": "mean", "vote_gated": "vote-gated mean",
                   "uncertainty_weighted": "uncertainty-weighted mean", "last": "last step"}
#: Answers to "this would overwrite edited slices".
KEEP, NEW_LAYER, REPLACE = "keep", "new", "replace"
# User mistakes (wrong checkpoint, bad scan, missing file) are shown as one-line notifications;
# anything else is a bug and goes to napari's error notification with its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, PermissionError, IsADirectoryError)
# The x̂0 layer is redrawn at most this often while steps stream in (every step is still stored).
STEP_REDRAW_INTERVAL_S = 0.1
# Step-by-step status text and fine-tuning progress are shown at most this often (the last step always).
# Every update repaints the window, and where OpenGL is software-rendered (remote desktops, VMs, Xvfb)
# each repaint composites the whole canvas on the CPU: 10 updates a step took half a core from torch.
STATUS_INTERVAL_S = 0.25
# Canonical slices compared at once when looking for edits (bounds the temporary memory).
COMPARE_CHUNK = 16


def _base_level(layer: Any) -> Any:
    """Full-resolution data of a (possibly multiscale) layer; napari's MultiScaleData is no list."""
    return layer.data[0] if layer.multiscale else layer.data


def notify(kind: str, message: str) -> None:
    from napari.utils import notifications

    {"error": notifications.show_error, "warning": notifications.show_warning,
     "info": notifications.show_info}[kind](message)


# ------------------------------------------------------------------------------------- runners


class Task(Protocol):
    def start(self) -> None: ...

    def quit(self) -> None: ...


class Runner(Protocol):
    """``runner(function, *args, yielded=, returned=, errored=, aborted=, finished=)`` → a task, not started.

    Callbacks run on the caller's (GUI) thread; a generator function's values go to ``yielded``;
    ``quit()`` stops a generator at its next yield (then ``aborted``, not ``returned``);
    ``finished`` always comes last.
    """

    def __call__(self, function: Callable, *args: Any, **callbacks: Optional[Callable]) -> Task: ...


class SyncRunner:
    """Runs each task on the calling thread when it is started (tests, scripts). Exceptions raised by
    the task become ``errored``; exceptions raised by callbacks propagate."""

    def __call__(self, function: Callable, *args: Any, **callbacks: Optional[Callable]) -> "_SyncTask":
        return _SyncTask(function, args, callbacks)


class _SyncTask:
    def __init__(self, function: Callable, args: tuple, callbacks: dict):
        self.function, self.args, self.callbacks = function, args, callbacks
        self.quit_requested = False

    def quit(self) -> None:
        self.quit_requested = True

    def _call(self, name: str, *args: Any) -> None:
        callback = self.callbacks.get(name)
        if callback is not None:
            callback(*args)

    def start(self) -> None:
        try:
            self._run()
        finally:
            self._call("finished")

    def _run(self) -> None:
        try:
            value = self.function(*self.args)
        except Exception as error:  # noqa: BLE001 (the task's failure is reported, as a worker would)
            self._call("errored", error)
            return
        if inspect.isgenerator(value):
            generator = value
            while True:
                if self.quit_requested:       # napari's worker checks before each next value
                    generator.close()
                    self._call("aborted")
                    return
                try:
                    event = next(generator)
                except StopIteration as stop:
                    value = stop.value
                    break
                except Exception as error:  # noqa: BLE001
                    self._call("errored", error)
                    return
                self._call("yielded", event)
        self._call("returned", value)


class Questions:
    """What the controller asks the user; the widget answers with dialogs, scripts with these defaults."""

    def edits(self, action: str, slices: list[int]) -> str:
        """``action`` would overwrite edited ``slices``: KEEP, NEW_LAYER or REPLACE (default: keep them)."""
        return KEEP

    def save_cancelled_finetune(self, done: int, total: int, path: Path) -> bool:
        """Fine-tuning was cancelled after ``done`` of ``total`` steps: save those weights to ``path``?"""
        return done > 0


# ------------------------------------------------------------------------------------- state


@dataclass
class SegmentSettings:
    """What the user chose for a segmentation (the widget's controls)."""

    scan: Any                         # the scan layer (the model's first channel)
    checkpoint: str                   # a bundled model's name or a checkpoint path
    device: str = "auto"
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    slices: SliceChoice = field(default_factory=SliceChoice)
    channels: tuple[Any, ...] = ()    # further Image layers: the model's channels 1…C-1, in its order


@dataclass
class FinetuneSettings:
    """What the user chose in the Fine-tune section."""

    start: str                        # checkpoint to start from (the selected model)
    save_path: Path
    class_names: tuple[str, ...]
    slices: Optional[list[int]] = None   # None: the edited slices
    scan_kind: str = "model"          # what the scan is: "model" (as the start model), "CT", "MRI", "other"
    steps: int = 200
    seed: int = 0
    device: str = "auto"
    resegment: Optional[SegmentSettings] = None   # re-segment the remaining slices with the new model


@dataclass
class KeptRun:
    """A finished or cancelled run, kept for re-fusion. Only its model-resolution trajectory is kept;
    its full-volume labels and uncertainty live in the layers."""

    trajectory: np.ndarray
    slice_indices: np.ndarray
    completed: np.ndarray
    shown: np.ndarray                 # per entry of slice_indices: finished and not overwritten by a later run
    geometry: Any
    sampling: SamplingConfig
    postprocess: Any
    class_names: tuple[str, ...]
    provenance: dict
    steps_used: np.ndarray            # per entry of slice_indices: denoising steps the slice took

    @classmethod
    def of(cls, result: Any) -> "KeptRun":
        return cls(result.trajectory, result.slice_indices, result.completed.copy(), result.completed.copy(),
                   result.geometry, result.sampling, result.postprocess, tuple(result.class_names),
                   dict(result.provenance), result.steps_used.copy())

    @property
    def shown_slices(self) -> np.ndarray:
        return self.slice_indices[self.shown]


@dataclass
class ChannelInput:
    """A further channel layer of a scan's last segmentation, and where its voxels are."""

    name: str
    layer: Any                        # None once the user removed it
    space: LayerSpace


class ResultSet:
    """The plugin's result layers of one scan, what the engine last wrote into them, and the kept runs."""

    def __init__(self, scan: Any, scan_id: str, scan_name: str, source: Optional[str], space: ScanSpace,
                 class_names: tuple[str, ...]):
        self.scan = scan                  # None once the user removed it
        self.scan_id = scan_id
        self.scan_name = scan_name
        self.source = source
        self.space = space
        self.class_names = class_names
        self.layers: dict[str, Any] = {}
        self.channels: list[ChannelInput] = []   # the last segmentation's further channels
        self.reference = np.zeros(space.layer_shape, np.uint8)
        self.runs: list[KeptRun] = []
        self.edited: set[int] = set()
        # A consensus made for the operation in progress has no history worth undoing: written directly.
        self.fresh = True
        self.steps_stack: Optional[np.ndarray] = None
        self.steps_first = 0
        self.on_edits: Callable[[], None] = lambda: None
        self._writing = False

    @property
    def consensus(self) -> Any:
        return self.layers.get("consensus")

    def compatible(self, space: ScanSpace) -> bool:
        """Whether a run seen through ``space`` can update these layers slice by slice."""
        old, new = self.space, space
        return (old.layer_shape == new.layer_shape and old.layer.to_layer == new.layer.to_layer
                and old.geometry.slice_axis == new.geometry.slice_axis
                and old.geometry.orientation.to_canonical == new.geometry.orientation.to_canonical)

    # ------------------------------------------------------------ edits
    def watch(self, layer: Any) -> None:
        layer.events.paint.connect(self._on_paint)

    def _on_paint(self, event: Any) -> None:
        # napari emits ``paint`` before it changes the data (outside a mouse stroke), so the slices an
        # edit touched are marked here and compared with the reference at every decision.
        if self._writing:       # our own writes are not edits
            return
        touched: set[int] = set()
        axis = self.space.slice_layer_axis
        for atom in event.value:
            if axis is None:
                touched.add(0)
                continue
            key = getattr(atom, "slice_key", None)      # napari's masked paint/fill atom
            if key is not None:
                mask = getattr(atom, "mask", None)
                if mask is not None:
                    others = tuple(a for a in range(mask.ndim) if a != axis)
                    positions = np.flatnonzero(mask.any(axis=others)) + (key[axis].start or 0)
                else:
                    positions = np.arange(*key[axis].indices(self.space.layer_shape[axis]))
            else:                                         # data_setitem's (indices, old, new)
                positions = np.unique(np.asarray(atom[0][axis]))
            touched.update(int(self.space.slice_of_layer_index(int(p))) for p in positions)
        if not touched <= self.edited:
            self.edited |= touched
            self.on_edits()

    @contextlib.contextmanager
    def writing(self) -> Any:
        """Our writes into the consensus: not counted as edits, one undo step for all of them."""
        layer = self.consensus
        self._writing = True
        try:
            with layer.block_history() if layer is not None and not self.fresh else contextlib.nullcontext():
                yield
        finally:
            self._writing = False

    def edited_among(self, slices: Sequence[int]) -> list[int]:
        """Those of ``slices`` whose consensus differs from what the engine wrote there."""
        layer = self.consensus
        if layer is None or not len(slices):
            return []
        shown, reference = self.space.slices(layer.data), self.space.slices(self.reference)
        return [int(s) for s in slices if not np.array_equal(shown[s], reference[s])]

    def edited_slices(self) -> list[int]:
        """Every edited canonical slice, compared afresh (napari's undo emits no event)."""
        layer = self.consensus
        if layer is None:
            return []
        shown, reference = self.space.slices(layer.data), self.space.slices(self.reference)
        edited = []
        for start in range(0, self.space.n_slices, COMPARE_CHUNK):
            block = (shown[start:start + COMPARE_CHUNK] != reference[start:start + COMPARE_CHUNK]).any(axis=(1, 2))
            edited += [start + int(k) for k in np.flatnonzero(block)]
        if set(edited) != self.edited:
            self.edited = set(edited)
            self.on_edits()
        return edited

    @property
    def shown_slices(self) -> np.ndarray:
        """Canonical slices the layers show engine results for."""
        if not self.runs:
            return np.zeros(0, np.int64)
        return np.unique(np.concatenate([run.shown_slices for run in self.runs]))

    # ------------------------------------------------------------ writing results
    def write(self, slices: np.ndarray, labels: np.ndarray, uncertainty: np.ndarray, policy: str) -> list[int]:
        """Write engine results for canonical ``slices`` (B, H, W each); returns the slices whose
        edits were kept (``policy`` KEEP), which get the new uncertainty but not the new labels."""
        slices = np.asarray(slices)
        kept = self.edited_among(slices) if policy == KEEP else []
        self.space.slices(self.reference)[slices] = labels
        if "uncertainty" in self.layers:
            self.space.slices(self.layers["uncertainty"].data)[slices] = uncertainty
            self.layers["uncertainty"].refresh()
        layer = self.consensus
        write = np.array([k for k, s in enumerate(slices) if int(s) not in kept], dtype=np.intp)
        if layer is None or not len(write):
            return kept
        target = self.space.slices(layer.data)
        indices, new = slices[write], labels[write]
        if self.fresh:
            target[indices] = new
            layer.refresh()
        else:
            # Through data_setitem, changed voxels only: one undo step per write, edits can come back.
            b, r, c = np.nonzero(target[indices] != new)
            if b.size:
                with self.writing():
                    layer.data_setitem(self.space.layer_indices(indices[b], r, c), new[b, r, c])
        return kept

    def summary(self) -> ExportSummary:
        latest = self.runs[-1]
        slices = np.concatenate([run.shown_slices for run in self.runs])
        steps_used = np.concatenate([run.steps_used[run.shown] for run in self.runs])
        order = np.argsort(slices)
        runs = [{"slices": [int(s) for s in run.shown_slices], "checkpoint": run.provenance.get("checkpoint"),
                 "checkpoint_sha256": run.provenance.get("checkpoint_sha256"),
                 "sampling": dataclasses.asdict(run.sampling)} for run in self.runs if run.shown.any()]
        return ExportSummary(slice_indices=slices[order], completed=np.ones(len(slices), bool),
                             steps_used=steps_used[order], class_names=self.class_names,
                             provenance={**latest.provenance, "sampling": dataclasses.asdict(latest.sampling)},
                             runs=runs, complete=all(run.completed.all() for run in self.runs))


@dataclass
class _Pending:
    """A segmentation between Segment and its first result."""

    settings: SegmentSettings
    scan_id: str
    scan_name: str
    source: Optional[str]
    info: Optional[RunStarted] = None
    results: Optional[ResultSet] = None
    policy: str = KEEP
    kept: set = field(default_factory=set)
    started: float = field(default_factory=time.perf_counter)
    last_redraw: float = 0.0
    last_status: float = float("-inf")
    updating: bool = False            # the run updates layers that already held results


@dataclass
class _Finetune:
    settings: FinetuneSettings
    results: ResultSet
    slices: list[int]
    path: Path
    run: Any = None
    done: int = 0
    total: int = 0
    loss: float = float("nan")
    log: list = field(default_factory=list)
    last_shown: float = float("-inf")


# ------------------------------------------------------------------------------------- controller


class SegmentationController:
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
        self.operation = ""
        self.runs_started = 0              # diffusion runs started (tests check re-fusing adds none)
        self._task: Optional[Task] = None
        self._stop_reason: Optional[str] = None
        self._pending: Optional[_Pending] = None
        self._finetune: Optional[_Finetune] = None
        self._wanted_consensus: Optional[tuple[str, int]] = None
        self._refuse_policy = KEEP
        self._refusing: Optional[ResultSet] = None
        self._model_channels: dict[tuple, Optional[tuple[str, ...]]] = {}
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

    def _end(self, how: str) -> None:
        operation, self.operation = self.operation, ""
        self._stop_reason = None
        self._pending = None
        self.busy_changed.emit("")
        if operation == "segmenting":
            self.run_finished.emit(how)
        elif operation in ("fine-tuning", "saving"):
            self.finetune_finished.emit(how)
        self.results_changed.emit()
        if self._wanted_consensus is not None:
            self.set_consensus(*self._wanted_consensus)   # settings changed while busy apply now

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
        """Tell the user why something failed: a notification and the status line."""
        if isinstance(error, USER_ERRORS):   # CheckpointError, ScanError, DatasetError are ValueErrors
            notify("error", f"MedCondDiff: {error}")
        else:
            from napari.utils.notifications import notification_manager

            notification_manager.receive_error(type(error), error, error.__traceback__)
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
        notify("error", f"MedCondDiff: the segmentation engine (torch/timm) could not be imported: {error}")
        self.engine_failed.emit(str(error))

    # ------------------------------------------------------------ segment
    def check_scan(self, layer: Any) -> None:
        if layer is None:
            raise ValueError("open a scan first (File > Open, or File > Open Sample > Liver CT) and pick it "
                             "under Image")
        self._check_image(layer)

    def _check_image(self, layer: Any) -> None:
        if getattr(layer, "rgb", False):
            raise ValueError(f"'{layer.name}' is an RGB image; MedCondDiff segments grey-scale CT/MRI scans")
        if layer.ndim not in (2, 3):
            shape = np.shape(layer.data[0] if layer.multiscale else layer.data)
            raise ValueError(f"'{layer.name}' is {layer.ndim}-D (shape {shape}); pick one channel or time point "
                             "first (e.g. Layers > Split Stack)")

    def view_axes(self, layer: Any) -> tuple[int, ...]:
        """(slider, rows, columns) layer axes as napari shows ``layer`` now (dims order, last two displayed)."""
        offset = self.viewer.dims.ndim - layer.ndim
        order = [axis - offset for axis in self.viewer.dims.order if axis >= offset]
        return tuple(order[-3:]) if layer.ndim == 3 else (0, 1)

    def model_channels(self, checkpoint: str) -> Optional[tuple[str, ...]]:
        """The channels a model takes (its ``plan.channel_names``), read from the checkpoint file without
        torch; None when the file cannot tell (loading it will say why)."""
        from medconddiff.checkpoint import resolve_checkpoint

        path = resolve_checkpoint(checkpoint)
        try:
            stat = path.stat()
        except OSError:
            return None
        # Asked on every model choice and Segment: read each file version's header once.
        key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
        if key not in self._model_channels:
            self._model_channels[key] = model_channels(str(path))
        return self._model_channels[key]

    def check_channels(self, settings: SegmentSettings) -> None:
        """The further channel layers are usable Image layers, and as many as the model takes (when the
        checkpoint says so before loading): else a ValueError saying what to change."""
        seen = {str(settings.scan.unique_id)}
        for layer in settings.channels:
            self._check_image(layer)
            if str(layer.unique_id) in seen:
                raise ValueError(f"'{layer.name}' is picked twice (as the Image and under More channels); "
                                 "each channel of the scan is a layer of its own")
            seen.add(str(layer.unique_id))
        names = self.model_channels(settings.checkpoint)
        problem = None if names is None else channel_count_problem(names, 1 + len(settings.channels))
        if problem is not None:
            raise ValueError(problem)

    def _channel_layer(self, layer: Any) -> ChannelLayer:
        return ChannelLayer(name=layer.name, data=_base_level(layer), metadata=dict(layer.metadata),
                            scale=tuple(layer.scale), view_axes=self.view_axes(layer))

    def _refused_while_busy(self) -> bool:
        """One operation at a time: a second one is refused with a warning naming the first."""
        if self.busy:
            notify("warning", f"MedCondDiff: {self.operation} is in progress; wait or cancel it first")
        return self.busy

    def segment(self, settings: SegmentSettings) -> bool:
        """Start a segmentation (the Segment button); False when it could not start (and why is shown)."""
        if self._refused_while_busy():
            return False
        layer = settings.scan
        try:
            self.check_scan(layer)
            self.check_channels(settings)
            slices = settings.slices
            if slices.mode == "current":
                point = tuple(float(x) for x in layer.world_to_data(self.viewer.dims.point))
                slices = dataclasses.replace(slices, point=point)
            request = SegmentRequest(data=_base_level(layer), metadata=dict(layer.metadata), scale=tuple(layer.scale),
                                     view_axes=self.view_axes(layer), checkpoint=settings.checkpoint,
                                     device=settings.device, sampling=settings.sampling, slices=slices,
                                     name=layer.name,
                                     channels=tuple(self._channel_layer(x) for x in settings.channels))
        except ValueError as error:
            self.fail(error)
            return False
        source = (layer.metadata.get(METADATA_KEY) or {}).get("source") or getattr(layer.source, "path", None)
        self._pending = _Pending(settings, str(layer.unique_id), layer.name, str(source) if source else None)
        self._begin("segmenting")
        self.runs_started += 1
        self.progress.emit(0, 0)
        self.status.emit("Loading the model…")
        self._start(prepare_run, request, self.cache, returned=self._on_prepared, errored=self._on_run_error)
        return True

    def _on_prepared(self, info: RunStarted) -> None:
        self._detach_task()
        pending = self._pending
        if pending is None or self._stop_reason is not None or pending.settings.scan is None:
            self._end(self._stop_reason or "cancelled")   # cancelled (or the scan removed) while the model loaded
            return
        pending.info = info
        results = self._results_for(pending, info)
        slices = info.slice_indices
        pending.policy = self._ask_about_edits(results, f"Segmenting slice(s) {slice_list_text(slices)}", slices)
        pending.results = results
        pending.updating = bool(results.runs)
        results.channels = [ChannelInput(layer.name, layer, space)
                            for layer, space in zip(pending.settings.channels, info.channel_spaces)]
        self.current = results
        self._update_classes(results, info.class_names)
        self._replace_steps_layer(results, info)
        self.progress.emit(0, len(slices))
        geometry_notes = info.space.geometry.notes
        notes = [PLAIN_LAYER_STATUS] if info.space.layer.plain else list(geometry_notes)
        notes += [note for note in info.run.geometry.notes if note not in geometry_notes]   # e.g. intensities
        self.status.emit(f"Segmenting {len(slices)} {info.space.geometry.slicing} slice(s) on {info.device}…"
                         + "".join(f" Note: {note}." for note in notes))
        self.diffusion_started.emit()
        self._start(iterate_run, info.run, yielded=self._on_event, returned=self._on_run_returned,
                    aborted=self._on_run_aborted, errored=self._on_run_error)

    def _results_for(self, pending: _Pending, info: RunStarted) -> ResultSet:
        """The scan's result set (its layers updated slice by slice), or a new one with new layers."""
        results = self.results.get(pending.scan_id)
        if results is not None and not results.compatible(info.space):
            # Another slicing or grid: slices cannot be matched. The old layers stay, as the user's.
            for layer in results.layers.values():
                results_layers.detach(layer)
            results = None
        if results is None:
            results = ResultSet(pending.settings.scan, pending.scan_id, pending.scan_name, pending.source,
                                info.space, info.class_names)
            results.on_edits = lambda: self._edits_changed(results)
            self.results[pending.scan_id] = results
        if results.consensus is None:
            self._add_layers(results)
        else:
            results.fresh = False
        return results

    def _add_layers(self, results: ResultSet) -> None:
        """Uncertainty and consensus layers over the scan (the x̂0 layer comes with each run)."""
        scan = results.scan
        if "uncertainty" not in results.layers:
            results.layers["uncertainty"] = results_layers.make_uncertainty(scan, results.scan_name, results.scan_id)
            self.viewer.layers.insert(self.viewer.layers.index(scan) + 1, results.layers["uncertainty"])
        consensus = results_layers.make_consensus(scan, f"{results.scan_name} consensus", results.reference.copy(),
                                                  results.class_names, results.scan_id)
        self.viewer.layers.append(consensus)
        results.layers["consensus"] = consensus
        results.fresh = True
        results.watch(consensus)
        self.viewer.layers.selection.active = consensus

    def _fork_consensus(self, results: ResultSet) -> None:
        """NEW_LAYER: the edited consensus is set aside (renamed, the user's own), a new one shows the engine's."""
        old = results.layers.pop("consensus")
        results_layers.detach(old)
        old.name = f"{results.scan_name} consensus (your edits)"
        self._add_layers(results)
        results.edited = set()
        self._edits_changed(results)

    def _update_classes(self, results: ResultSet, class_names: tuple[str, ...]) -> None:
        if len(class_names) >= len(results.class_names):   # a fine-tuned model may add classes
            results.class_names = tuple(class_names)
        for role in ("consensus", "steps"):
            if role in results.layers:
                results_layers.set_classes(results.layers[role], results.class_names)
        self.classes_changed.emit(results.class_names)

    def _replace_steps_layer(self, results: ResultSet, info: RunStarted) -> None:
        """The x̂0 layer shows the latest run: a model-grid stack over its span of slices."""
        old = results.layers.pop("steps", None)
        index = None
        if old is not None and old in self.viewer.layers:
            index = self.viewer.layers.index(old)
            self.viewer.layers.remove(old)
        first, last = int(info.slice_indices.min()), int(info.slice_indices.max())
        h, w = info.space.geometry.model_shape
        results.steps_stack = np.zeros((info.total_steps, last - first + 1, h, w), np.uint8)
        results.steps_first = first
        layer = results_layers.make_steps(results.scan, results.scan_name, info.space, results.steps_stack, first,
                                          results.class_names, info.sampling.steps, info.sampling.num_seeds,
                                          results.scan_id)
        if index is None:
            consensus = results.consensus
            index = self.viewer.layers.index(consensus) if consensus in self.viewer.layers else len(self.viewer.layers)
        self.viewer.layers.insert(index, layer)
        results.layers["steps"] = layer
        if results.consensus is not None:
            self.viewer.layers.selection.active = results.consensus

    def _on_event(self, event: Any) -> None:
        from medconddiff.segmenter import SlicesDone, StepUpdate  # already imported by the worker

        pending = self._pending
        if pending is None or pending.results is None:
            return
        if isinstance(event, StepUpdate):
            self._on_step(pending, event)
        elif isinstance(event, SlicesDone):
            kept = pending.results.write(event.slice_indices, event.labels, event.uncertainty, pending.policy)
            pending.kept.update(kept)
            self._show_stopped_slices(pending, event.slice_indices)
            self.progress.emit(event.completed, event.total)

    def _show_stopped_slices(self, pending: _Pending, slice_indices: np.ndarray) -> None:
        """Adaptive steps: on the x̂0 slider, a slice that stopped early keeps showing its last step."""
        results, run = pending.results, pending.info.run if pending.info is not None else None
        if results.steps_stack is None or run is None:
            return
        result = run.result
        steps = result.sampling.steps
        positions = np.searchsorted(result.slice_indices, slice_indices)
        for position, index in zip(positions, slice_indices):
            used = int(result.steps_used[position])
            for seed in range(result.sampling.num_seeds) if used < steps else ():
                last = results.steps_stack[seed * steps + used - 1, index - results.steps_first]
                results.steps_stack[seed * steps + used:(seed + 1) * steps, index - results.steps_first] = last
        if "steps" in results.layers:
            results.layers["steps"].refresh()

    def _on_step(self, pending: _Pending, update: Any) -> None:
        results, info = pending.results, pending.info
        if results.steps_stack is None:
            return
        step = update.seed_index * update.num_steps + update.step_index
        # Arg-max of the quantised probabilities: exactly what the kept trajectory stores (same ties).
        results.steps_stack[step, update.slice_indices - results.steps_first] = \
            first_argmax(quantize(update.probabilities), axis=1)
        now = time.perf_counter()
        if "steps" in results.layers and (now - pending.last_redraw >= STEP_REDRAW_INTERVAL_S
                                          or step == info.total_steps - 1):
            results.layers["steps"].refresh()
            pending.last_redraw = now
        if now - pending.last_status < STATUS_INTERVAL_S and step != info.total_steps - 1:
            return
        pending.last_status = now
        seeds = f" of seed {update.seed_index + 1}/{update.num_seeds}" if update.num_seeds > 1 else ""
        self.status.emit(f"Step {update.step_index + 1}/{update.num_steps}{seeds} for slices "
                         f"{slice_list_text(update.slice_indices)}")

    def _on_run_returned(self, result: Any) -> None:
        self._detach_task()
        self._finish_run(result, "done")

    def _on_run_aborted(self) -> None:
        self._detach_task()
        pending = self._pending
        self._finish_run(pending.info.run.result if pending and pending.info else None,
                         self._stop_reason or "cancelled")

    def _on_run_error(self, error: BaseException) -> None:
        self._detach_task()
        self.fail(error)
        pending = self._pending
        if pending is not None and pending.info is not None and pending.results is not None:
            self._finish_run(pending.info.run.result, "failed")   # failed mid-run: keep what finished
        else:
            self._end("failed")

    def _finish_run(self, result: Any, how: str) -> None:
        pending = self._pending
        if pending is None or result is None or pending.results is None:
            self._end(how)
            return
        results = pending.results
        run = KeptRun.of(result)
        for older in results.runs:      # slices this run finished are no longer shown from older runs
            older.shown &= ~np.isin(older.slice_indices, run.slice_indices[run.completed])
        results.runs = [older for older in results.runs + [run] if older.shown.any()]
        results.fresh = False
        pending.info.run = None         # frees the run's float copy of the scan
        if results.steps_stack is not None:
            # A cancelled batch left some steps drawn for slices that did not finish: clear them.
            results.steps_stack[:, result.slice_indices[~result.completed] - results.steps_first] = 0
            if "steps" in results.layers:
                results.layers["steps"].name = results_layers.steps_name(
                    results.scan_name, result.sampling.steps, result.sampling.num_seeds,
                    result.steps_used[result.completed])
                results.layers["steps"].refresh()
        seconds = time.perf_counter() - pending.started
        finished, total = int(result.completed.sum()), len(result.completed)
        done = result.slice_indices[result.completed]
        text = {"done": f"Done: {total} slice(s) in {seconds:.1f} s "
                        f"({CONSENSUS_NAMES[result.sampling.consensus]} consensus).",
                "cancelled": f"Cancelled: kept {finished} of {total} slices."}.get(
            how, f"Stopped ({how}): kept {finished} of {total} slices.")
        if pending.updating and len(done):
            text += (f" Updated slice(s) {slice_list_text(done)} of the existing result layers; "
                     "the other slices are untouched.")
        if pending.kept:
            text += f" Your edits on slice(s) {slice_list_text(pending.kept)} were kept."
        if how == "done":
            text += " Show the x0 (steps) layer and move the 'diffusion step' slider to replay the diffusion."
        self.status.emit(text)
        self.edited_slices()
        self._end(how)

    # ------------------------------------------------------------ layers removed
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
        """Make ``scan``'s results (if any) the ones re-fusion, export and fine-tuning act on."""
        if scan is not None and str(scan.unique_id) in self.results:
            self.current = self.results[str(scan.unique_id)]
            self.classes_changed.emit(self.current.class_names)
            self._edits_changed(self.current)
            self.results_changed.emit()

    # ------------------------------------------------------------ edits
    def _edits_changed(self, results: ResultSet) -> None:
        if results is self.current:
            self.edits_changed.emit(tuple(sorted(results.edited)))

    def _ask_about_edits(self, results: ResultSet, action: str, slices: Sequence[int]) -> str:
        """How ``action`` may write ``slices``: KEEP or REPLACE. The user is asked when some of them hold
        their edits; "new layer" puts the edited layer aside first, then writes like KEEP."""
        clash = sorted(set(results.edited_slices()) & {int(s) for s in slices})
        choice = self.questions.edits(action, clash) if clash else KEEP
        if choice == NEW_LAYER:
            self._fork_consensus(results)
        return REPLACE if choice == REPLACE else KEEP

    def edited_slices(self) -> list[int]:
        """Edited canonical slices of the current result (compared afresh)."""
        return self.current.edited_slices() if self.current is not None else []

    # ------------------------------------------------------------ re-fuse
    def set_consensus(self, method: str, skip_first: int) -> None:
        """Fuse the kept trajectories again with another consensus (no new diffusion)."""
        self._wanted_consensus = (method, skip_first)
        results = self.current
        if self.busy or results is None or not results.runs or results.consensus is None:
            return            # applied when the operation in progress ends, or to the next run
        if all((run.sampling.consensus, run.sampling.skip_first) == (method, skip_first) for run in results.runs):
            self._wanted_consensus = None
            return
        steps = min(run.sampling.steps for run in results.runs)
        if skip_first >= steps:
            self._wanted_consensus = None
            notify("warning", f"MedCondDiff: skip-first must be below the run's {steps} steps")
            return
        self._wanted_consensus = None
        self._refuse_policy = self._ask_about_edits(
            results, f"Re-fusing with the {CONSENSUS_NAMES[method]} consensus", results.shown_slices)
        self._refusing = results
        self._begin("fusing")
        self.status.emit(f"Re-fusing with the {CONSENSUS_NAMES[method]} consensus, skipping {skip_first} step(s)…")
        self._start(refuse_runs, list(results.runs), method, skip_first, returned=self._on_refused,
                    errored=self._on_refuse_error)

    def _on_refused(self, refused: list) -> None:
        self._detach_task()
        results, self._refusing = self._refusing, None
        kept: list[int] = []
        with results.writing():   # one undo step for the whole re-fusion
            for item in refused:
                kept += results.write(item.slices, item.labels, item.uncertainty, self._refuse_policy)
                item.run.sampling = item.sampling
                item.run.provenance["sampling"] = dataclasses.asdict(item.sampling)
        results.fresh = False
        sampling = refused[-1].sampling
        text = f"Consensus: {CONSENSUS_NAMES[sampling.consensus]}, skipping the first {sampling.skip_first} step(s)."
        if kept:
            text += f" Your edits on slice(s) {slice_list_text(kept)} were kept."
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
                and len(results.shown_slices) > 0)

    def export_default_path(self) -> Path:
        results = self.current
        return default_export_path(results.scan_name, results.source)

    def export_affine_known(self) -> bool:
        return self.current is not None and self.current.space.export_meta().affine_known

    def export(self, path: str | Path, *, overwrite: bool) -> tuple[Path, Path]:
        """Write the consensus layer (with edits) in the scan's voxel order + JSON sidecar."""
        results = self.current
        if not self.can_export:
            raise ValueError("nothing to export yet; run a segmentation first")
        space = results.space
        labels = space.layer.file_view(np.asarray(results.consensus.data))
        meta = space.export_meta()
        written = write_export(path, labels, meta, results.summary(),
                               source=results.source or results.scan_name, edited_slices=results.edited_slices(),
                               overwrite=overwrite)
        unknown = "" if meta.affine_known else \
            " The scan's orientation is unknown: written in the layer's axis order with NIfTI codes 0."
        self.status.emit(f"Exported {written[0].name} and {written[1].name}.{unknown}")
        return written

    # ------------------------------------------------------------ fine-tune
    def finetune_default_path(self) -> Optional[Path]:
        results = self.current
        return None if results is None else default_finetune_path(results.scan_name, results.source)

    def class_table(self, slices: Optional[Sequence[int]] = None) -> list[tuple[int, str]]:
        """(label value, default name) for every label the model knows or the training slices hold;
        a value the model does not know is a new class, ``class_N``."""
        results = self.current
        if results is None:
            return []
        names = list(results.class_names)
        top = len(names) - 1
        layer = results.consensus
        # The edited slices as tracked, not compared afresh: this may run while napari paints.
        slices = sorted(results.edited) if slices is None else list(slices)
        if layer is not None and slices:
            values = results.space.slices(layer.data)[sorted(set(slices))]
            top = max(top, int(values.max()))
        return [(value, names[value] if value < len(names) else f"class_{value}") for value in range(top + 1)]

    def finetune(self, settings: FinetuneSettings) -> bool:
        """Fine-tune the selected model on corrected slices (the Fine-tune button)."""
        if self._refused_while_busy():
            return False
        results = self.current
        try:
            if results is None or results.consensus is None:
                raise ValueError("segment a scan first, correct some slices, then fine-tune")
            if results.scan is None:
                raise ValueError(f"the scan '{results.scan_name}' was removed; open it again to fine-tune")
            slices = sorted(settings.slices) if settings.slices is not None else results.edited_slices()
            if not slices:
                raise ValueError("no edited slices: paint corrections in the consensus layer first, or list slices")
            bad = [s for s in slices if not 0 <= s < results.space.n_slices]
            if bad:
                raise ValueError(f"slice(s) {slice_list_text(bad)} are outside this scan's slices "
                                 f"0–{results.space.n_slices - 1}")
            names = tuple(name.strip() for name in settings.class_names)
            if any(not name for name in names) or len(set(names)) != len(names):
                raise ValueError("every class needs a name, and names must differ")
            labels = np.array(results.space.layer.file_view(np.asarray(results.consensus.data)), dtype=np.uint8)
            top = int(results.space.geometry.slice_view(labels)[slices].max())
            if top >= len(names):
                raise ValueError(f"label {top} is painted on the training slices but has no class name")
            image = results.space.layer.file_view(np.asarray(_base_level(results.scan)))
            channels = self._finetune_channels(results, image.shape, settings.start)
            path = checkpoint_target(settings.save_path)
        except ValueError as error:
            self.fail(error)
            return False
        job = FinetuneJob(start=settings.start, name=results.scan_name, image=image, meta=results.space.layer.meta,
                          labels=labels, slices=tuple(slices), class_names=names, scan_kind=settings.scan_kind,
                          steps=settings.steps,
                          seed=settings.seed, device=settings.device, channels=channels)
        self._finetune = state = _Finetune(settings, results, slices, path, total=settings.steps)
        self._begin("fine-tuning")
        self.progress.emit(0, 0)
        self.status.emit(f"Preparing fine-tuning on slice(s) {slice_list_text(slices)}…")
        self._start(prepare_finetune, job, state.log.append, returned=self._on_finetune_ready,
                    errored=self._on_finetune_error)
        return True

    def _finetune_channels(self, results: ResultSet, shape: tuple[int, ...], start: str) -> tuple[np.ndarray, ...]:
        """File-ordered views of the further channels the scan was last segmented with (views: the
        worker stacks them), checked to be still there and still the scan's shape."""
        views = []
        for channel in results.channels:
            if channel.layer is None:
                raise ValueError(f"'{channel.name}', a channel of '{results.scan_name}', was removed; open it "
                                 "again and segment again to fine-tune")
            view = channel.space.file_view(np.asarray(_base_level(channel.layer)))
            if view.shape != shape:
                raise ValueError(f"'{channel.name}' no longer has the shape of '{results.scan_name}'; "
                                 "segment again to fine-tune")
            views.append(view)
        names = self.model_channels(start)
        problem = None if names is None else channel_count_problem(names, 1 + len(views))
        if problem is not None:
            raise ValueError(f"'{results.scan_name}' was segmented with {1 + len(views)} channel(s), but {problem}, "
                             "and segment again before fine-tuning")
        return tuple(views)

    def _on_finetune_ready(self, run: Any) -> None:
        self._detach_task()
        state = self._finetune
        if state is None or self._stop_reason is not None:
            self._end(self._stop_reason or "cancelled")
            return
        state.run, state.total = run, run.total_steps
        self.progress.emit(0, state.total)
        # What the weight transfer said (e.g. "initialised from …: 310 of 318 tensors copied"): why a new
        # class starts from scratch.
        said = f" {state.log[0].strip()}." if state.log else ""
        self.status.emit(f"Fine-tuning: {state.total} steps on {len(state.slices)} slice(s)…{said}")
        self._start(iterate_finetune, run, yielded=self._on_train_step, returned=self._on_finetune_trained,
                    aborted=self._on_finetune_aborted, errored=self._on_finetune_error)

    def _on_train_step(self, event: Any) -> None:
        state = self._finetune
        if state is None:
            return
        state.done, state.total, state.loss = event.step, event.total_steps, float(event.losses["loss"])
        now = time.perf_counter()
        if now - state.last_shown < STATUS_INTERVAL_S and state.done != state.total:
            return
        state.last_shown = now
        self.progress.emit(state.done, state.total)
        self.finetune_step.emit(state.done, state.total, state.loss)
        self.status.emit(f"Fine-tuning: step {state.done}/{state.total}, loss {state.loss:.4f}")

    def _on_finetune_trained(self, run: Any) -> None:
        self._detach_task()
        self._save_finetuned(resegment=True)

    def _on_finetune_aborted(self) -> None:
        self._detach_task()
        state = self._finetune
        if state is None or self._stop_reason == "closed":
            self._end("cancelled")
            return
        self.status.emit(f"Fine-tuning cancelled after {state.done} of {state.total} steps; "
                         f"the weights of step {state.done} are kept.")
        if state.done and self.questions.save_cancelled_finetune(state.done, state.total, state.path):
            self._save_finetuned(resegment=False)
        else:
            self._finetune = None
            self._end("cancelled")

    def _save_finetuned(self, resegment: bool) -> None:
        state = self._finetune
        self.operation = "saving"
        self.busy_changed.emit("saving")
        self.status.emit(f"Saving the fine-tuned model to {state.path}…")
        self._start(save_finetuned, state.run, state.path, state.settings.device, self.cache,
                    returned=lambda path: self._on_finetune_saved(path, resegment), errored=self._on_finetune_error)

    def _on_finetune_saved(self, path: Path, resegment: bool) -> None:
        self._detach_task()
        state, self._finetune = self._finetune, None
        cancelled = state.done < state.total
        self.model_added.emit(path.stem, str(path))
        self.status.emit(f"Saved the fine-tuned model ({state.done} steps, final loss {state.loss:.4f}) to {path}.")
        self._end("cancelled" if cancelled else "done")
        settings = state.settings.resegment
        if not (resegment and settings is not None):
            return
        results = state.results
        skip = set(state.slices) | set(results.edited_slices())
        remaining = [s for s in range(results.space.n_slices) if s not in skip]
        if not remaining:
            self.status.emit(f"Saved {path.name}; every slice was trained on or edited, nothing to re-segment.")
            return
        self.segment(dataclasses.replace(settings, checkpoint=str(path),
                                         slices=SliceChoice(mode="list", indices=tuple(remaining))))

    def _on_finetune_error(self, error: BaseException) -> None:
        self._detach_task()
        self._finetune = None
        self.fail(error, "Fine-tuning failed")
        self._end("failed")
