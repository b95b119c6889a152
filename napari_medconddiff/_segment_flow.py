"""The Segment flow of the controller: check the inputs, load the model, add or update the result
layers, stream finished slices into them, keep the run for re-fusion.

A mixin of :class:`~napari_medconddiff._controller.SegmentationController` (which owns the state,
the signals and the task plumbing it uses). Slice indices are canonical: slices along the model's
slicing direction (axial: inferior → superior), as the engine counts them.

**Several channels.** A model trained on several channels (``plan.channel_names``, e.g. an MRI's
FLAIR, T1, T1c, T2) takes the scan layer as channel 0 and further Image layers as channels 1…C-1,
in the model's order (:attr:`SegmentSettings.channels`). The result layers belong to the scan
layer; the result set remembers the further layers, so fine-tuning trains on the very image that
was segmented.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from medconddiff.config import SamplingConfig
from medconddiff.consensus import first_argmax, quantize
from medconddiff.errors import UserInputError
from medconddiff.slice_lists import slice_list_text

from . import _result_layers as results_layers
from ._edits import WritePolicy
from ._geometry import PLAIN_LAYER_STATUS
from ._job import (
    ChannelLayer,
    RunStarted,
    SegmentRequest,
    SliceChoice,
    channel_count_problem,
    iterate_run,
    model_channels,
    prepare_run,
)
from ._layers import METADATA_KEY, full_resolution
from ._result_set import ChannelInput, KeptRun, ResultSet, classes_agree

__all__ = ["SegmentSettings", "SegmentFlow", "CONSENSUS_NAMES", "own_copy", "scan_source"]

#: What the consensus methods are called on screen; the engine gets the keys.
CONSENSUS_NAMES = {"auto": "the model's choice", "mean": "mean", "vote_gated": "vote-gated mean",
                   "uncertainty_weighted": "uncertainty-weighted mean", "last": "last step",
                   "late_mean": "mean of the later half", "one_shot": "one-shot forward"}
# The x̂0 layer is redrawn at most this often while steps stream in (every step is still stored).
STEP_REDRAW_INTERVAL_S = 0.1
# Step-by-step status text and fine-tuning progress are shown at most this often (the last step always).
# Every update repaints the window, and where OpenGL is software-rendered (remote desktops, VMs, Xvfb)
# each repaint composites the whole canvas on the CPU: 10 updates a step took half a core from torch.
STATUS_INTERVAL_S = 0.25


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
class _Pending:
    """A segmentation between Segment and its first result."""

    settings: SegmentSettings
    scan_id: str
    scan_name: str
    source: Optional[str]
    info: Optional[RunStarted] = None
    results: Optional[ResultSet] = None
    policy: WritePolicy = field(default_factory=WritePolicy)
    kept: set = field(default_factory=set)
    started: float = field(default_factory=time.perf_counter)
    last_redraw: float = 0.0
    last_status: float = float("-inf")
    updating: bool = False            # the run updates layers that already held results
    apart: str = ""                   # why the run got new layers beside the scan's earlier ones


def scan_source(layer: Any) -> Optional[str]:
    """The file a scan layer was read from (this plugin's record, else napari's), or None."""
    source = (layer.metadata.get(METADATA_KEY) or {}).get("source") or getattr(layer.source, "path", None)
    return str(source) if source else None


def own_copy(layer_or_data: Any) -> Any:
    """The full-resolution data of a layer, as a worker may read it while the user goes on editing.

    A numpy array is the layer's own buffer, which the GUI thread can change at any time (a float32
    scan with no further channels reached the engine uncopied): copied here, on the GUI thread, as
    float32, the engine's input type, so that ``check_volume`` makes no second copy (an int16 CT costs
    one float32 copy, as before). A lazy array (dask, zarr) is read into a new array by the worker's
    ``np.asarray``: no copy needed.
    """
    level = full_resolution(layer_or_data)
    return np.array(level, dtype=np.float32, copy=True) if isinstance(level, np.ndarray) else level


class SegmentFlow:
    """Segment: inputs → model → result layers → streamed slices → kept run (a controller mixin)."""

    # ------------------------------------------------------------ inputs
    def check_scan(self, layer: Any) -> None:
        if layer is None:
            raise UserInputError("open a scan first (File > Open, or File > Open Sample > Liver CT) and pick it "
                                 "under Image")
        if layer not in self.viewer.layers:
            raise UserInputError(f"'{layer.name}' is no longer open in napari; open it again to segment it")
        self._check_image(layer)

    def _check_image(self, layer: Any) -> None:
        if getattr(layer, "rgb", False):
            raise UserInputError(f"'{layer.name}' is an RGB image; MedCondDiff segments grey-scale CT/MRI scans")
        if layer.ndim not in (2, 3):
            shape = np.shape(full_resolution(layer))
            raise UserInputError(f"'{layer.name}' is {layer.ndim}-D (shape {shape}); pick one channel or time "
                                 "point first (e.g. Layers > Split Stack)")

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
        checkpoint says so before loading): else a UserInputError saying what to change."""
        seen = {str(settings.scan.unique_id)}
        for layer in settings.channels:
            self._check_image(layer)
            if str(layer.unique_id) in seen:
                raise UserInputError(f"'{layer.name}' is picked twice (as the Image and under More channels); "
                                     "each channel of the scan is a layer of its own")
            seen.add(str(layer.unique_id))
        names = self.model_channels(settings.checkpoint)
        problem = None if names is None else channel_count_problem(names, 1 + len(settings.channels))
        if problem is not None:
            raise UserInputError(problem)

    def _channel_layer(self, layer: Any) -> ChannelLayer:
        return ChannelLayer(name=layer.name, data=own_copy(layer), metadata=dict(layer.metadata),
                            scale=tuple(layer.scale), view_axes=self.view_axes(layer))

    # ------------------------------------------------------------ segment
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
                self.check_slices_shown(layer, *self.model_slice_axis(layer, settings.checkpoint))
                point = tuple(float(x) for x in layer.world_to_data(self.viewer.dims.point))
                slices = dataclasses.replace(slices, point=point)
            request = SegmentRequest(data=own_copy(layer), metadata=dict(layer.metadata), scale=tuple(layer.scale),
                                     view_axes=self.view_axes(layer), checkpoint=settings.checkpoint,
                                     device=settings.device, sampling=settings.sampling, slices=slices,
                                     name=layer.name,
                                     channels=tuple(self._channel_layer(x) for x in settings.channels))
        except ValueError as error:
            self.fail(error)
            return False
        self._pending = _Pending(settings, str(layer.unique_id), layer.name, scan_source(layer))
        self._begin("segmenting")
        self.runs_started += 1
        self.progress.emit(0, 0)
        self.status.emit("Loading the model…")
        self._start(prepare_run, request, self.cache, returned=self._on_prepared, errored=self._on_run_error)
        return True

    def _on_prepared(self, info: RunStarted) -> None:
        self._detach_task()
        try:
            self._start_diffusion(info)
        except Exception as error:     # whatever went wrong, the widget must not stay busy
            self._on_run_error(error)

    def _start_diffusion(self, info: RunStarted) -> None:
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
        results.begin_undo_step()        # the whole run, however many batches, is one undo step
        results.channels = [ChannelInput(layer.name, layer, space)
                            for layer, space in zip(pending.settings.channels, info.channel_spaces)]
        self._follow(results)
        self._update_classes(results, info.class_names)
        self._replace_steps_layer(results, info)
        self.progress.emit(0, len(slices))
        geometry_notes = info.space.geometry.notes
        notes = [PLAIN_LAYER_STATUS] if info.space.layer.plain else list(geometry_notes)
        notes += [note for note in info.run.geometry.notes if note not in geometry_notes]   # e.g. intensities
        self.status.emit(f"Segmenting {len(slices)} {info.space.geometry.slicing} slice(s) on {info.device}…"
                         + "".join(f" Note: {note}." for note in notes)
                         + (f" {pending.apart}" if pending.apart else ""))
        self.diffusion_started.emit()
        self._start(iterate_run, info.run, yielded=self._on_event, returned=self._on_run_returned,
                    aborted=self._on_run_aborted, errored=self._on_run_error)

    def _results_for(self, pending: _Pending, info: RunStarted) -> ResultSet:
        """The scan's result set (its layers updated slice by slice), or a new one with new layers."""
        results = self.results.get(pending.scan_id)
        apart, tag = None, ""
        if results is not None and not results.compatible(info.space):
            apart, tag = "this run slices the scan another way", f"{results.space.geometry.slicing} slices"
        elif results is not None and not classes_agree(info.class_names, results.class_names):
            old_classes = ", ".join(results.class_names[1:])
            apart = (f"this model's classes ({', '.join(info.class_names[1:])}) are not those of the layers "
                     f"({old_classes})")
            tag = old_classes
        if apart is not None:
            # Slices cannot be matched, or label values would change meaning: the old layers stay, as the
            # user's, named by what sets them apart, so that the new layers take the plain names (not
            # napari's "[1]") and the layer list tells the two apart.
            for layer in results.layers.values():
                results_layers.detach(layer)
                if layer in self.viewer.layers:
                    layer.name = f"{layer.name} ({tag})"
            pending.apart = (f"The earlier result layers of '{pending.scan_name}' are left as they are, yours now, "
                             f"named '… ({tag})' (later runs leave them alone): {apart}.")
            results = None
        if results is None:
            results = self._new_results(pending.settings.scan, pending.scan_id, pending.scan_name, pending.source,
                                        info.space, info.class_names)
        elif results.consensus is None:
            self._add_layers(results)
        else:
            results.fresh = False
        return results

    def _new_results(self, scan: Any, scan_id: str, scan_name: str, source: Optional[str], space: Any,
                     class_names: tuple[str, ...]) -> ResultSet:
        """A new result set for ``scan``, with its uncertainty and consensus layers."""
        results = ResultSet(scan, scan_id, scan_name, source, space, class_names)
        results.on_edits = lambda: self._edits_changed(results)
        results.on_labels_shown = lambda: self._labels_shown(results)
        self.results[scan_id] = results
        self._add_layers(results)
        return results

    def _add_layers(self, results: ResultSet, place_like: Any = None) -> None:
        """Uncertainty and consensus layers over the scan (the x̂0 layer comes with each run); where the user
        removed the scan, placed as ``place_like`` (an earlier consensus of it) is."""
        scan = results.scan if results.scan is not None else place_like
        if "uncertainty" not in results.layers:
            results.layers["uncertainty"] = results_layers.make_uncertainty(scan, results.scan_name, results.scan_id)
            at = self.viewer.layers.index(results.scan) + 1 if results.scan in self.viewer.layers else \
                len(self.viewer.layers)
            self.viewer.layers.insert(at, results.layers["uncertainty"])
        consensus = results_layers.make_consensus(scan, f"{results.scan_name} consensus", results.reference.copy(),
                                                  results.class_names, results.scan_id)
        results.layers["consensus"] = consensus      # held before napari tells of it: no saved labels to offer
        self.viewer.layers.append(consensus)
        results.fresh = True
        results.watch(consensus)
        self.viewer.layers.selection.active = consensus

    def _update_classes(self, results: ResultSet, class_names: tuple[str, ...]) -> None:
        if len(class_names) >= len(results.class_names):   # a fine-tuned model may add classes
            results.class_names = tuple(class_names)
        for role in ("consensus", "steps"):
            if role in results.layers:
                results_layers.set_classes(results.layers[role], results.class_names)
        if results is self.current:      # another scan's run must not rename the picked scan's classes
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

    # ------------------------------------------------------------ streamed results
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

    # ------------------------------------------------------------ the run ends
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
        if pending is not None and pending.results is not None:
            pending.results.end_undo_step()
        if pending is None or result is None or pending.results is None:
            self._end(how)
            return
        results = pending.results
        run = KeptRun.of(result)
        run.asked = (pending.settings.sampling.consensus, pending.settings.sampling.skip_first)
        for older in results.runs:      # slices this run finished are no longer shown from older runs
            older.shown &= ~np.isin(older.slice_indices, run.slice_indices[run.completed])
        results.runs = [older for older in results.runs + [run] if older.shown.any()]
        results.fresh = False
        # The run holds the scan's copy made for it (or its float32 cast): dropping it frees that copy.
        pending.info.run = None
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
                        f"({CONSENSUS_NAMES[result.sampling.consensus]} consensus{_choice_note(result)}).",
                "cancelled": f"Cancelled: kept {finished} of {total} slices."}.get(
            how, f"Stopped ({how}): kept {finished} of {total} slices.")
        if pending.updating and len(done):
            text += (f" Updated slice(s) {slice_list_text(done)} of the existing result layers; "
                     "the other slices are untouched.")
        if pending.kept:
            text += f" Your edits on slice(s) {slice_list_text(pending.kept)} were kept."
        if result.skip_first_note:
            text += f" Note: {result.skip_first_note}."
        if pending.apart:      # said when the run began too; the line that stays must say it again
            text += f" {pending.apart}"
        if how == "done":
            text += " Show the x0 (steps) layer and move the 'diffusion step' slider to replay the diffusion."
        self.status.emit(text)
        self.edited_slices()
        self._end(how)


def _choice_note(result) -> str:
    """How the model came to the consensus it used, when it was the model's own recorded choice."""
    from medconddiff.consensus_choice import ConsensusChoice

    record = result.provenance.get("consensus_choice")
    if not record or record.get("method") != result.sampling.consensus:
        return ""
    return f": the model's own, {ConsensusChoice.from_dict(record).origin()}"
