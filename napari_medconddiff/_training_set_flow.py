"""The Training set flow of the controller: a folder holding an nnU-Net v2 dataset with sparse labels
(:mod:`medconddiff.training_set`) that grows scan by scan.

The user chooses a folder (remembered for the session; created on the first add; never inside the
installed packages), marks canonical slices as *checked* (verified without being edited), and adds
the current scan: its image in file order with the geometry the model sliced it with, and the
consensus layer's labels on the verified slices (edited ∪ checked); every other voxel is the set's
``ignore``. Adding the same scan again merges. Fine-tuning (:mod:`._finetune_flow`) then trains on
every verified voxel of every case in the set as well.

Opening and adding run in a worker: an add writes (and, merging, reads back) gzipped NIfTI volumes,
seconds for a CT, and the summary reads every label file of the set. What the worker needs is copied
here on the GUI thread, as fine-tuning does. :mod:`medconddiff.training_set` imports torch, so it is
imported in the worker only.

A mixin of :class:`~napari_medconddiff._controller.SegmentationController`, which owns the signals,
the state and the task plumbing used here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from psygnal import Signal

from medconddiff.class_match import checked_class_names
from medconddiff.errors import ConfigError, UserInputError
from medconddiff.slice_lists import slice_list_text

from ._job import checkpoint_config, import_engine, stack_channels
from ._layers import dicom_source_of
from ._questions import REMOVE_CASE, REMOVE_OTHER, REMOVE_SLICE
from ._result_set import ResultSet

__all__ = ["TrainingSetFlow", "AddJob", "RemoveJob", "SetState", "package_folders", "check_set_folder",
           "case_name_of", "open_set", "add_to_set", "remove_from_set", "model_class_names", "model_slicing"]

NIFTI_SUFFIXES = (".nii", ".nii.gz")
NEW_SET_TEXT = "new set: created on the first add"


@dataclass(frozen=True)
class SetState:
    """What the widget shows of the chosen set (None where the folder holds no set yet)."""

    folder: Path
    summary: str
    class_names: tuple[str, ...] = ()
    cases: tuple[str, ...] = ()
    case_lines: tuple[str, ...] = ()     # one per case, in ``cases`` order: name, verified slices, classes


@dataclass
class AddJob:
    """Everything an add needs (plain data, copied on the GUI thread)."""

    folder: Path
    name: str                            # file name or layer name: the case id comes from it
    image: np.ndarray                    # channel 0, file order
    channels: tuple[np.ndarray, ...]     # further channels, file order
    meta: Any
    labels: np.ndarray                   # file order; 0 outside the verified slices
    class_names: tuple[str, ...]
    start: str                           # the selected model: its channels name the set's
    scan_kind: str
    slices: tuple[int, ...]              # verified canonical slices along ``slicing``
    slicing: str


@dataclass
class RemoveJob:
    """What taking the current scan (or one slice of it), or a case chosen by name, out of the set needs
    (plain data, GUI-thread copies)."""

    folder: Path
    scan_name: str
    image: Optional[np.ndarray]          # channel 0, file order: the set's case is found by its voxels
    channels: tuple[np.ndarray, ...]
    meta: Any
    slice_index: Optional[int]           # canonical slice along ``slicing`` to unverify; None: the whole case
    slicing: str
    case: Optional[str] = None           # a case chosen from the set's list: removed whole, no scan needed


@dataclass(frozen=True)
class AddOutcome:
    result: Any                          # medconddiff.training_set.AddResult
    state: SetState


def package_folders() -> list[Path]:
    """Folders of the installed packages: a training set is never written inside them."""
    import medconddiff

    import napari_medconddiff

    return [Path(module.__file__).resolve().parent for module in (medconddiff, napari_medconddiff)]


def check_set_folder(folder: str | Path) -> Path:
    """The folder as a usable training-set place (not a file, not inside an installed package); a
    UserInputError saying why not. Whether it holds a set is for :func:`open_set` (a worker)."""
    text = str(folder).strip()
    if not text:
        raise UserInputError("choose a training-set folder")
    path = Path(text).expanduser().resolve()
    for package in package_folders():
        if path == package or package in path.parents:
            raise UserInputError(f"{path} is inside the installed package {package.name}; choose a folder of "
                                 "your own for the training set")
    if path.exists() and not path.is_dir():
        raise UserInputError(f"{path} is a file, not a folder; choose a folder for the training set")
    return path


def case_name_of(results: ResultSet) -> str:
    """What the case id is made from: for a scan read from DICOM, its series and a hash of the series' UID
    (two patients' "series 2 'CT venous'" are two cases; a series' folder may be named after the patient,
    so never the folder); else the scan's NIfTI file name, else its layer name."""
    for layer in (results.scan, results.consensus):
        dicom = dicom_source_of(getattr(layer, "metadata", None))
        if dicom is not None:
            from medconddiff.dicom_inputs import series_case_name

            return series_case_name(dicom)
    source = results.source or ""
    if source.lower().endswith(NIFTI_SUFFIXES):
        return Path(source).name
    return results.scan_name


def model_class_names(checkpoint: str) -> Optional[tuple[str, ...]]:
    """The classes a checkpoint's model segments, from the file's metadata without torch; None when the
    file cannot tell."""
    names = ((checkpoint_config(checkpoint) or {}).get("model") or {}).get("class_names")
    return tuple(str(n) for n in names) if isinstance(names, list) else None


def model_slicing(checkpoint: str) -> Optional[str]:
    """The plane a checkpoint's model segments (axial, coronal, sagittal), from the file's metadata without
    torch; None when the file cannot tell."""
    from medconddiff.config import PreprocessPlan

    config = checkpoint_config(checkpoint)
    if config is None:
        return None
    plan = config.get("plan") or {}          # a format-1 checkpoint has no plan: the default's slicing
    slicing = plan.get("slicing", PreprocessPlan().slicing) if isinstance(plan, dict) else None
    return slicing if isinstance(slicing, str) else None


# ----------------------------------------------------------------------------- worker functions
def _set_state(training_set: Any) -> SetState:
    summary = training_set.summary()
    cases = tuple(training_set.cases)
    return SetState(training_set.root, summary.text(), training_set.class_names, cases,
                    tuple(summary.case_line(case) for case in cases))


def open_set(folder: Path, start: Optional[str]) -> SetState:
    """The set in ``folder`` (worker: reads every label file for the summary). A new or empty folder is
    a set to be created on the first add. A set whose channel count the selected model cannot take
    is refused: nothing could be added to it or trained with it."""
    if not folder.exists() or (folder.is_dir() and not any(folder.iterdir())):
        return SetState(folder, NEW_SET_TEXT)
    import_engine()
    from medconddiff.training_set import TrainingSet, TrainingSetError

    from ._job import model_channels

    training_set = TrainingSet.open(folder)
    wanted = model_channels(start) if start else None
    if wanted is not None and len(wanted) != len(training_set.channel_names):
        raise TrainingSetError(f"{training_set.manifest}: the set holds {len(training_set.channel_names)} "
                               f"channel(s) ({', '.join(training_set.channel_names)}) but the selected model takes "
                               f"{len(wanted)} ({', '.join(wanted)}); choose a set of that kind of scan")
    return _set_state(training_set)


def add_to_set(job: AddJob) -> AddOutcome:
    """Open (or create) the set and add the scan (worker); the set is unchanged when this fails."""
    import_engine()
    from medconddiff.finetune import channel_names_of_kind
    from medconddiff.training_set import TrainingSet

    from ._job import model_channels

    start_channels = model_channels(job.start) or ("CT",) * (1 + len(job.channels))
    channel_names = channel_names_of_kind(job.scan_kind, start_channels) or tuple(start_channels)
    training_set = TrainingSet.open_or_create(job.folder, job.class_names, channel_names)
    image = stack_channels(job.image, job.channels)
    result = training_set.add_scan(job.name, image, job.meta, job.labels, job.class_names,
                                   verified_slices=list(job.slices), slicing=job.slicing, channel_names=channel_names)
    return AddOutcome(result, _set_state(training_set))


def remove_from_set(job: RemoveJob) -> tuple[str, SetState]:
    """Take the scan's case (found by its voxels, whatever name it was added under; or the case the job
    names), or one of its slices, out of the set (worker); (what was done, the set now). The set is
    unchanged when this fails."""
    import_engine()
    from medconddiff.training_set import TrainingSet

    training_set = TrainingSet.open(job.folder)
    case = job.case or training_set.case_holding(stack_channels(job.image, job.channels), job.meta)
    if case is None:
        raise UserInputError(f"the training set {job.folder.name} does not hold the scan '{job.scan_name}'; "
                             "nothing was removed")
    if job.slice_index is None:
        training_set.remove_case(case)
        done = f"case '{case}' removed (its copy of the scan and its verified slices)"
    else:
        left = training_set.unverify_slices(case, [job.slice_index], slicing=job.slicing)
        done = f"slice {job.slice_index} of case '{case}' is no longer verified ({left} verified slice(s) left)"
    return done, _set_state(training_set)


# ----------------------------------------------------------------------------- the mixin
class TrainingSetFlow:
    """Choose a set, mark slices checked, add the current scan (a controller mixin)."""

    training_set_changed = Signal(object)      # SetState, or None when no folder is chosen
    verified_changed = Signal(tuple, tuple)    # edited, checked canonical slices of the current result
    training_set_finished = Signal(str)        # 'done' or 'failed' (an open or an add)

    def _init_training_set(self) -> None:
        self.training_set: Optional[SetState] = None

    @property
    def training_set_folder(self) -> Optional[Path]:
        return self.training_set.folder if self.training_set is not None else None

    def training_set_in_use(self) -> Optional[Path]:
        """The folder fine-tuning trains on: the chosen set, once it holds a case."""
        state = self.training_set
        return state.folder if state is not None and state.cases else None

    # ------------------------------------------------------------ choose
    def choose_training_set(self, folder: str | Path, start: Optional[str] = None) -> bool:
        """Use ``folder`` as the training set (opened in a worker; the summary follows). On failure the
        set chosen before stays."""
        if self._refused_while_busy():
            return False
        try:
            path = check_set_folder(folder)
        except ValueError as error:
            self.fail(error, "Training set not changed")
            self.training_set_changed.emit(self.training_set)    # the view shows the set still in use
            self.training_set_finished.emit("failed")
            return False
        self._begin("opening the training set")
        self.status.emit(f"Opening the training set {path}…")
        self._start(open_set, path, start, returned=self._on_set_opened, errored=self._on_set_error)
        return True

    def _on_set_opened(self, state: SetState) -> None:
        self._detach_task()
        self.training_set = state
        self.status.emit(f"Training set {state.folder}: {state.summary}.")
        self.training_set_changed.emit(state)
        self._end("done")
        self.training_set_finished.emit("done")

    def _on_set_error(self, error: BaseException) -> None:
        self._detach_task()
        self.fail(error, "Training set not changed")
        self.training_set_changed.emit(self.training_set)    # the view shows the set still in use
        self._end("failed")
        self.training_set_finished.emit("failed")

    # ------------------------------------------------------------ verified slices
    def checked_slices(self) -> list[int]:
        results = self.current
        return sorted(results.checked) if results is not None else []

    def verified_slices(self) -> list[int]:
        """Canonical slices of the current result the user verified: edited or marked as checked."""
        return sorted(set(self.edited_slices()) | set(self.checked_slices()))

    def emit_verified(self) -> None:
        self.verified_changed.emit(tuple(self.edited_slices()), tuple(self.checked_slices()))

    def _slice_under_slider(self, results: ResultSet) -> int:
        """The canonical slice of ``results`` under napari's slider."""
        layer = results.scan if results.scan is not None else results.consensus
        self.check_slices_shown(layer, results.space.slice_layer_axis, results.space.geometry.slicing)
        point = tuple(float(x) for x in layer.world_to_data(self.viewer.dims.point))
        if results.space.slice_layer_axis is not None and len(point) < results.space.layer.layer_ndim:
            raise UserInputError("the current slice position is unknown")
        return int(results.space.slice_at(point))

    def _slice_offered_for_removal(self, results: ResultSet) -> Optional[int]:
        """The slice under the slider, or None where napari shows none of the model's slices (a rolled or
        3-D view): then only the whole scan or another case is offered, not a slice nobody looks at."""
        try:
            return self._slice_under_slider(results)
        except UserInputError:
            return None

    def mark_checked(self) -> Optional[int]:
        """Mark the canonical slice under napari's slider as checked: its consensus is right as it is."""
        results = self.current
        try:
            if results is None or results.consensus is None:
                raise UserInputError("segment a scan first, then mark the slices you checked")
            index = self._slice_under_slider(results)
        except ValueError as error:
            self.fail(error)
            return None
        results.checked.add(index)
        self.status.emit(f"Slice {index} marked as checked.")
        self.emit_verified()
        return index

    # ------------------------------------------------------------ add
    def add_to_training_set(self, class_names: Sequence[str], start: str, scan_kind: str = "model") -> bool:
        """Add the current scan's verified slices to the chosen set (in a worker); False when it could
        not start (and why is shown)."""
        if self._refused_while_busy():
            return False
        results = self.current
        try:
            job = self._add_job(results, class_names, start, scan_kind)
        except ValueError as error:
            self.fail(error, "Not added to the training set")
            self.training_set_finished.emit("failed")
            return False
        self._begin("adding to the training set")
        self.progress.emit(0, 0)
        shown = slice_list_text(job.slices)
        self.status.emit(f"Adding '{results.scan_name}' (slice(s) {shown}) to the training set {job.folder}…")
        self._start(add_to_set, job, returned=self._on_added, errored=self._on_set_error)
        return True

    def _add_job(self, results: Optional[ResultSet], class_names: Sequence[str], start: str,
                 scan_kind: str) -> AddJob:
        if self.training_set is None:
            raise UserInputError("choose a training-set folder first")
        if results is None or results.consensus is None:
            raise UserInputError("segment a scan first, correct or check some slices, then add it")
        if results.scan is None:
            raise UserInputError(f"the scan '{results.scan_name}' was removed; open it again to add it")
        slices = self.verified_slices()
        if not slices:
            raise UserInputError("nothing verified yet: paint corrections in the consensus layer, or mark "
                                 "slices as checked")
        names = checked_class_names(class_names)
        space = results.space
        verified = np.zeros(space.geometry.file_shape, dtype=bool)
        space.geometry.slice_view(verified)[slices] = True
        # Copies made here, on the GUI thread: the worker writes the scan as it is now. Labels outside
        # the verified slices are not the user's word: they are not written (the set stores ignore there).
        labels = np.array(space.layer.file_view(np.asarray(results.consensus.data)), dtype=np.uint8)
        labels[~verified] = 0
        top = int(labels.max()) if labels.size else 0
        if top >= len(names):
            raise ConfigError(f"label {top} is painted on a verified slice but has no class name")
        image, channels = self._scan_copies(results, start)
        # The geometry the model sliced the scan with (for a plain layer, the orientation it assumed: the
        # slider's slices are the model's), so that the set slices the case as the user verified it.
        return AddJob(folder=self.training_set.folder, name=case_name_of(results), image=image, channels=channels,
                      meta=space.layer.meta, labels=labels, class_names=names, start=start, scan_kind=scan_kind,
                      slices=tuple(slices), slicing=space.geometry.slicing)

    def _on_added(self, outcome: AddOutcome) -> None:
        self._detach_task()
        result, state = outcome.result, outcome.state
        self.training_set = state
        grown = f"; new class(es): {', '.join(result.added_classes)}" if result.added_classes else ""
        self.status.emit(f"Training set: {result.description()} ({result.verified_slices} verified "
                         f"slice(s)){grown}.")
        self.training_set_changed.emit(state)
        self._end("done")
        self.training_set_finished.emit("done")

    # ------------------------------------------------------------ remove (only when the user says so)
    def remove_from_training_set(self, start: str) -> bool:
        """Ask, then take the current scan, or the slice under the slider, or another case the user chooses
        from the set's list, out of the chosen set (in a worker). Without a segmented scan on screen the
        list is all there is to choose from. False when nothing was started: refused (and why is shown) or
        the user said no."""
        if self._refused_while_busy():
            return False
        results = self.current
        state = self.training_set
        try:
            if state is None or not state.cases:
                raise UserInputError("the training set holds no scan to remove")
            on_screen = results is not None and results.consensus is not None and results.scan is not None
            if on_screen:
                space = results.space
                index = self._slice_offered_for_removal(results)
                image, channels = self._scan_copies(results, start)
        except ValueError as error:
            self.fail(error, "Nothing removed from the training set")
            return False
        folder = state.folder
        answer = self.questions.remove_from_set(results.scan_name, index, folder) if on_screen else REMOVE_OTHER
        if answer == REMOVE_OTHER:
            chosen = self.questions.case_to_remove(state.case_lines, folder)
            if chosen is None or not 0 <= chosen < len(state.cases):
                self.status.emit("Nothing removed from the training set.")
                return False
            case = state.cases[chosen]
            job = RemoveJob(folder, case, None, (), None, None, "", case=case)
        elif answer in (REMOVE_SLICE, REMOVE_CASE):
            job = RemoveJob(folder, results.scan_name, image, channels, space.layer.meta,   # as it was added
                            index if answer == REMOVE_SLICE else None, space.geometry.slicing)
        else:
            self.status.emit("Nothing removed from the training set.")
            return False
        self._begin("removing from the training set")
        self.progress.emit(0, 0)
        self.status.emit(f"Taking '{job.scan_name}' out of the training set {folder}…")
        self._start(remove_from_set, job, returned=lambda outcome: self._on_removed(results, job, outcome),
                    errored=self._on_set_error)
        return True

    def _on_removed(self, results: ResultSet, job: RemoveJob, outcome: tuple[str, SetState]) -> None:
        self._detach_task()
        done, state = outcome
        self.training_set = state
        note = ""
        if job.slice_index is not None:
            # The user said this slice is not right: its mark goes, so the next Add does not bring it back.
            results.checked.discard(job.slice_index)
            if results is self.current and job.slice_index in self.edited_slices():
                note = " It is still edited here: the next Add puts it back."
            self.emit_verified()
        self.status.emit(f"Training set: {done}.{note}")
        self.training_set_changed.emit(state)
        self._end("done")
        self.training_set_finished.emit("done")
