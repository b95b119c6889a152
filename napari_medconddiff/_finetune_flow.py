"""The Fine-tune flow of the controller: train the selected model a little on corrected slices,
save it (only where the user said, never over the checkpoint being fine-tuned, never over an
existing file without an explicit yes), and re-segment the other slices with it.

A mixin of :class:`~napari_medconddiff._controller.SegmentationController`, which owns the state,
the signals and the task plumbing it uses.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from medconddiff.class_match import checked_class_names
from medconddiff.errors import ConfigError, SliceSpecError, UserInputError
from medconddiff.slice_lists import slice_list_text

from ._export import checkpoint_target, default_finetune_path
from ._job import FinetuneJob, SliceChoice, channel_count_problem, iterate_finetune, prepare_finetune, save_finetuned
from ._notifications import notify
from ._result_set import ResultSet
from ._segment_flow import STATUS_INTERVAL_S, SegmentSettings, own_copy
from ._training_set_flow import case_name_of

__all__ = ["FinetuneSettings", "FinetuneFlow", "same_file", "CANCELLED_BEFORE_TRAINING"]

CANCELLED_BEFORE_TRAINING = "Cancelled before fine-tuning began; no model was trained or saved."


@dataclass
class FinetuneSettings:
    """What the user chose in the Fine-tune section."""

    start: str                        # checkpoint to start from (the selected model)
    save_path: Path
    class_names: tuple[str, ...]
    slices: Optional[list[int]] = None   # None: the edited slices
    scan_kind: str = "model"          # what the scan is: "model" (as the start model), "CT", "MRI", "other"
    steps: Optional[int] = None       # None: the engine's default for the scans learned from
    seed: int = 0
    device: str = "auto"
    resegment: Optional[SegmentSettings] = None   # re-segment the remaining slices with the new model
    # The user explicitly said yes to replacing the file at save_path (a save dialog's question). Without
    # it an existing file is never replaced.
    replace_existing: bool = False
    # Mix in the slices the start model was trained on (the bundled sample), so it keeps its classes.
    replay: bool = False


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


def same_file(checkpoint: str, path: Path) -> bool:
    """Whether ``checkpoint`` (a bundled model's name or a path) is the file at ``path``."""
    from medconddiff.checkpoint import resolve_checkpoint

    start = resolve_checkpoint(checkpoint).expanduser()
    try:
        return start.resolve() == path.expanduser().resolve() or (path.exists() and start.samefile(path))
    except OSError:
        return False


def trained_on(run: Any, scan_slices: int) -> str:
    """What a fine-tuning run learns from, as the status line says it."""
    text = f"{scan_slices} slice(s) of this scan"
    if getattr(run, "training_set", None) is not None:
        cases = [n for n, s in run.set_slices.items() if s]
        text += (f" and {sum(len(run.set_slices[n]) for n in cases)} verified slice(s) of {len(cases)} case(s) "
                 "in the training set")
    if getattr(run, "replay", None) is not None:
        text += f", replaying {sum(len(v) for v in run.replay.slices_by_case.values())} of the start model's slices"
    return text


class FinetuneFlow:
    """Fine-tune → save → re-segment (a controller mixin)."""

    def finetune_default_path(self) -> Optional[Path]:
        results = self.current
        return None if results is None else default_finetune_path(results.scan_name, results.source,
                                                                  self.export_dicom_source())

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
        slices = [s for s in slices if 0 <= s < results.space.n_slices]
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
                raise UserInputError("segment a scan first, correct some slices, then fine-tune")
            if results.scan is None:
                raise UserInputError(f"the scan '{results.scan_name}' was removed; open it again to fine-tune")
            slices = sorted(settings.slices) if settings.slices is not None else results.edited_slices()
            training_set = self.training_set_in_use()
            if not slices and training_set is None:
                raise SliceSpecError("no edited slices: paint corrections in the consensus layer first, "
                                     "or list slices")
            bad = [s for s in slices if not 0 <= s < results.space.n_slices]
            if bad:
                raise SliceSpecError(f"slice(s) {slice_list_text(bad)} are outside this scan's slices "
                                     f"0–{results.space.n_slices - 1}")
            names = checked_class_names(settings.class_names)
            path = checkpoint_target(settings.save_path)
            self._check_save_path(settings, path)
            labels = np.array(results.space.layer.file_view(np.asarray(results.consensus.data)), dtype=np.uint8)
            top = int(results.space.geometry.slice_view(labels)[slices].max()) if slices else 0
            if top >= len(names):
                raise ConfigError(f"label {top} is painted on the training slices but has no class name")
            # Copies made here, on the GUI thread: the worker trains on the scan as it is now, whatever
            # the user does to the layers meanwhile.
            image, channels = self._scan_copies(results, settings.start)
        except ValueError as error:
            self.fail(error)
            return False
        job = FinetuneJob(start=settings.start, name=results.scan_name, image=image, meta=results.space.layer.meta,
                          labels=labels, slices=tuple(slices), class_names=names, scan_kind=settings.scan_kind,
                          steps=settings.steps,
                          seed=settings.seed, device=settings.device, channels=channels,
                          training_set=training_set, case_name=case_name_of(results), replay=settings.replay)
        self._finetune = state = _Finetune(settings, results, slices, path, total=settings.steps or 0)
        self._begin("fine-tuning")
        self.progress.emit(0, 0)
        what = f"slice(s) {slice_list_text(slices)}" if slices else "no slice of this scan"
        self.status.emit(f"Preparing fine-tuning on {what}" + (" and the training set…" if training_set else "…"))
        self._start(prepare_finetune, job, state.log.append, returned=self._on_finetune_ready,
                    errored=self._on_finetune_error)
        return True

    @staticmethod
    def _check_save_path(settings: FinetuneSettings, path: Path) -> None:
        # Files named by name, folders not at all: the status line and notifications must not show a
        # folder named after the patient (where a series' fine-tuned model is proposed).
        if same_file(settings.start, path):
            raise UserInputError(f"{path.name} is the checkpoint being fine-tuned; save the fine-tuned model "
                                 "under another name")
        if path.exists() and not settings.replace_existing:
            raise UserInputError(f"{path.name} exists; choose another name, or confirm replacing it in the save "
                                 "dialog")
        # Checked before training too, so that minutes of training do not end at a folder that cannot be written.
        there = next((folder for folder in (path.parent, *path.parent.parents) if folder.exists()), None)
        if there is not None and not there.is_dir():
            raise UserInputError(f"{there.name} is a file, not a folder; choose another place for the fine-tuned "
                                 "model")
        if there is not None and not os.access(there, os.W_OK):
            raise UserInputError(f"{path.name}: cannot write into its folder (read-only, or permission denied); "
                                 "choose another place for the fine-tuned model")

    def _scan_copies(self, results: ResultSet, start: str) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
        """File-ordered copies of the scan and of the further channels it was last segmented with (what a
        worker may read while the user goes on editing), checked against ``start``'s channel count."""
        image = results.space.layer.file_view(np.asarray(own_copy(results.scan)))
        return image, self._finetune_channels(results, image.shape, start)

    def _finetune_channels(self, results: ResultSet, shape: tuple[int, ...], start: str) -> tuple[np.ndarray, ...]:
        """File-ordered copies of the further channels the scan was last segmented with, checked to be
        still there and still the scan's shape."""
        views = []
        for channel in results.channels:
            if channel.layer is None:
                raise UserInputError(f"'{channel.name}', a channel of '{results.scan_name}', was removed; open "
                                     "it again and segment again to fine-tune")
            view = channel.space.file_view(np.asarray(own_copy(channel.layer)))
            if view.shape != shape:
                raise UserInputError(f"'{channel.name}' no longer has the shape of '{results.scan_name}'; "
                                     "segment again to fine-tune")
            views.append(view)
        names = self.model_channels(start)
        problem = None if names is None else channel_count_problem(names, 1 + len(views))
        if problem is not None:
            raise UserInputError(f"'{results.scan_name}' was segmented with {1 + len(views)} channel(s), but "
                                 f"{problem}, and segment again before fine-tuning")
        return tuple(views)

    def _on_finetune_ready(self, run: Any) -> None:
        self._detach_task()
        state = self._finetune
        if state is None or self._stop_reason is not None:
            if self._stop_reason == "cancelled":     # cancelled as the preparation returned
                self.status.emit(CANCELLED_BEFORE_TRAINING)
            self._end(self._stop_reason or "cancelled")
            return
        state.run, state.total = run, run.total_steps
        self.progress.emit(0, state.total)
        # What the weight transfer said (e.g. "initialised from …: 310 of 318 tensors copied"): why a new
        # class starts from scratch.
        said = f" {state.log[0].strip()}." if state.log else ""
        for warning in run.warnings:
            notify("warning", f"MedCondDiff: {warning}")
        self.status.emit(f"Fine-tuning: {state.total} steps on {trained_on(run, len(state.slices))}…{said}")
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
        try:    # the file system may have changed while training ran
            self._check_save_path(state.settings, state.path)
        except UserInputError as error:
            self._on_save_failed(error, resegment)
            return
        self.operation = "saving"
        self.busy_changed.emit("saving")
        self.status.emit(f"Saving the fine-tuned model to {state.path.name}…")   # the name: no patient's folder
        self._start(save_finetuned, state.run, state.path, state.settings.device, self.cache,
                    state.settings.replace_existing,
                    returned=lambda path: self._on_finetune_saved(path, resegment),
                    errored=lambda error: self._on_save_failed(error, resegment))

    def _on_save_failed(self, error: BaseException, resegment: bool) -> None:
        """The trained weights could not be written to the chosen file: the user may name another (the
        weights are still in memory) before they are let go."""
        self._detach_task()
        state = self._finetune
        if state is None or state.run is None or self._stop_reason == "closed" or \
                not isinstance(error, (OSError, ValueError)):
            self._on_finetune_error(error)
            return
        self.status.emit(f"Could not save the fine-tuned model: {error}")
        elsewhere = self.questions.save_finetuned_elsewhere(str(error), state.path)
        if elsewhere is None:
            self._on_finetune_error(error)
            return
        state.path, replace_existing = elsewhere
        state.settings = dataclasses.replace(state.settings, save_path=state.path, replace_existing=replace_existing)
        self._save_finetuned(resegment)

    def _on_finetune_saved(self, path: Path, resegment: bool) -> None:
        self._detach_task()
        state, self._finetune = self._finetune, None
        cancelled = state.done < state.total
        self.model_added.emit(path.stem, str(path))
        self.status.emit(f"Saved the fine-tuned model ({state.done} steps, final loss {state.loss:.4f}) to "
                         f"{path.name}; its {state.run.consensus_choice.describe()}.")
        settings = self._resegment_settings(state, path) if resegment else None
        # A consensus chosen while this ran applies once the re-segment ends (it would refuse the re-segment
        # as busy if it started re-fusing now).
        self._end("cancelled" if cancelled else "done", apply_wanted=settings is None)
        if settings is not None and not self.segment(settings):
            self._apply_wanted_consensus()

    def _resegment_settings(self, state: _Finetune, path: Path) -> Optional[SegmentSettings]:
        """How to segment, with the saved model, the slices the user neither trained on, edited nor
        checked; None (and why, on the status line) when there are none or the scan is gone."""
        settings = state.settings.resegment
        if settings is None:
            return None
        results = state.results
        if results.scan is None or results.scan is not settings.scan:
            self.status.emit(f"Saved {path.name}; its scan is no longer open, so nothing was re-segmented.")
            return None
        # Slices the user edited, or marked as checked (right as they are), are theirs: not re-segmented.
        skip = set(state.slices) | set(results.protected_among(range(results.space.n_slices)))
        remaining = [s for s in range(results.space.n_slices) if s not in skip]
        if not remaining:
            self.status.emit(f"Saved {path.name}; every slice was trained on or edited, nothing to re-segment.")
            return None
        return dataclasses.replace(settings, checkpoint=str(path),
                                   slices=SliceChoice(mode="list", indices=tuple(remaining)))

    def _on_finetune_error(self, error: BaseException) -> None:
        self._detach_task()
        self._finetune = None
        self.fail(error, "Fine-tuning failed")
        self._end("failed")
