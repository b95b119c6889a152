"""The Continue flow of the controller: carry on from labels saved in an earlier session.

A DICOM SEG exported yesterday (the reader opens it as a Labels layer over its series), or a NIfTI
mask opened over its scan, becomes the scan's consensus, so that checking slices, **Add to training
set**, **Fine-tune** and **Export** work on it as on today's corrections. The saved labels go in as
the user's own edits, slice by slice: each slice that holds a label replaces the consensus there
and, where it differs from what the engine wrote (on a scan not segmented yet: wherever it holds a
label), is edited, hence verified, and kept by later runs unless the user says otherwise. A slice the
saved labels leave empty is not taken: nothing says anyone checked it (an export holds every slice),
and taking it would teach the model that the slice is empty. Slices the user has edited in this
session are replaced only after the same question a run asks (keep them, put them aside in a layer of
their own, or replace them). The saved layer itself is left as it is; the load is one napari undo step.

The model is loaded first (in a worker): its slicing is what counts the slices, and its classes
name the values where the saved layer names none.

A mixin of :class:`~napari_medconddiff._controller.SegmentationController`, which owns the state,
the signals and the task plumbing used here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from medconddiff.class_match import body_outline_classes, keep_classes
from medconddiff.errors import UserInputError
from medconddiff.slice_lists import slice_list_text

from ._job import SpaceRequest, prepare_space
from ._layers import LABELS_FROM_KEY, METADATA_KEY, full_resolution
from ._result_set import classes_agree
from ._segment_flow import SegmentSettings, scan_source

__all__ = ["ContinueFlow", "saved_label_names"]


@dataclass
class _Continue:
    settings: SegmentSettings
    saved: Any                        # the Labels layer the labels come from
    labels: np.ndarray                # a copy of its data, made when Continue was clicked
    scan_id: str
    source: Optional[str]


def saved_label_names(layer: Any) -> Optional[tuple[str, ...]]:
    """The class names a Labels layer carries (a SEG's segments, a dataset's classes, this plugin's
    results: its ``features`` table's ``class`` column), or None."""
    features = getattr(layer, "features", None)
    if features is None or "class" not in getattr(features, "columns", ()):
        return None
    names = tuple(str(name) for name in features["class"])
    return names or None


def _is_structure_set(layer: Any) -> bool:
    """Whether a Labels layer was read from an RT structure set (this plugin's reader says so)."""
    return ((getattr(layer, "metadata", None) or {}).get(METADATA_KEY) or {}).get(LABELS_FROM_KEY) == "RTSTRUCT"


class ContinueFlow:
    """Saved labels → the scan's consensus, as the user's edits (a controller mixin)."""

    def continue_from(self, settings: SegmentSettings, saved: Any) -> bool:
        """Make the Labels layer ``saved`` the consensus of ``settings.scan`` (the Continue button);
        False when it could not start (and why is shown)."""
        if self._refused_while_busy():
            return False
        scan = settings.scan
        try:
            self.check_scan(scan)
            labels = self._saved_labels(scan, saved)
        except ValueError as error:
            self.fail(error, "Not loaded")
            return False
        self._continuing = _Continue(settings, saved, labels, str(scan.unique_id), scan_source(scan))
        request = SpaceRequest(shape=tuple(np.shape(full_resolution(scan))), metadata=dict(scan.metadata),
                               scale=tuple(scan.scale), view_axes=self.view_axes(scan),
                               checkpoint=settings.checkpoint, device=settings.device)
        self._begin("loading saved labels")
        self.progress.emit(0, 0)
        self.status.emit(f"Loading the model to put '{saved.name}' into the consensus of '{scan.name}'…")
        self._start(prepare_space, request, self.cache, returned=self._on_space, errored=self._on_continue_error)
        return True

    def _saved_labels(self, scan: Any, saved: Any) -> np.ndarray:
        from napari.layers import Labels

        if not isinstance(saved, Labels):
            raise UserInputError("choose a Labels layer to continue from")
        live = self.live_results_of(saved)
        if live is not None and live.scan_id == str(scan.unique_id):
            raise UserInputError(f"'{saved.name}' is already this plugin's consensus; edit it directly")
        if live is not None:     # another open scan's consensus: its labels would become this scan's edits
            raise UserInputError(f"'{saved.name}' is this plugin's result of '{live.scan_name}', another open scan; "
                                 f"pick '{live.scan_name}' under Image to edit it")
        if saved.ndim != scan.ndim or np.shape(full_resolution(saved)) != np.shape(full_resolution(scan)) \
                or not np.allclose(saved.scale, scan.scale) or not np.allclose(saved.translate, scan.translate):
            raise UserInputError(f"'{saved.name}' does not lie on the voxels of '{scan.name}' (another shape, voxel "
                                 "size or position); open the labels saved for this scan")
        labels = np.array(full_resolution(saved), copy=True)
        if not labels.any():
            raise UserInputError(f"'{saved.name}' holds no label: there is nothing to continue from")
        if labels.min() < 0:
            raise UserInputError(f"'{saved.name}' holds negative labels")
        return labels

    def _on_space(self, prepared: tuple) -> None:
        self._detach_task()
        job, self._continuing = self._continuing, None
        scan = job.settings.scan if job is not None else None
        if scan is None or scan not in self.viewer.layers:       # the scan was removed while the model loaded
            self._end(self._stop_reason or "cancelled")
            return
        space, model_classes = prepared
        saved = job.saved
        names = saved_label_names(saved) or model_classes
        results = self.results.get(job.scan_id)
        left_out: tuple[str, ...] = ()
        outlines = tuple(body_outline_classes(names))
        # A planning structure set holds a plan's contours, not corrections of this model: which to take is asked
        # (its External covers every slice: taken, every slice would count as corrected).
        if outlines or (_is_structure_set(saved) and len(names) > 2):
            dropped = self.questions.classes_to_leave_out(saved.name, tuple(names), outlines)
            if dropped is None:
                self.status.emit(f"Nothing was loaded from '{saved.name}'.")
                self._end("cancelled")
                return
            if dropped:
                kept = keep_classes(names, [str(i) for i in range(1, len(names)) if i not in dropped], job.labels)
                job.labels, names, left_out = kept.apply(job.labels), kept.class_names, kept.left_out
        try:
            if not job.labels.any():
                raise UserInputError(f"'{saved.name}' holds no label beside what was left out "
                                     f"({', '.join(left_out)}): there is nothing to continue from")
            if results is not None and (results.consensus is None or not results.compatible(space)):
                raise UserInputError(f"'{scan.name}' has result layers this plugin no longer updates; remove them, "
                                     "or open the scan again, to continue from saved labels")
            if results is not None and not classes_agree(names, results.class_names):
                raise UserInputError(f"'{saved.name}' names its classes {list(names)}, this scan's consensus "
                                     f"{list(results.class_names)}: label values would change meaning")
            top = int(job.labels.max()) if job.labels.size else 0
            if top >= max(len(names), len(results.class_names) if results is not None else 0):
                raise UserInputError(f"'{saved.name}' holds label {top}, beyond its classes {list(names)}")
        except UserInputError as error:
            self.fail(error, "Not loaded")
            self._end("failed")
            return
        if results is None:
            results = self._new_results(scan, job.scan_id, scan.name, job.source, space, tuple(names))
        self._follow(results)
        self._update_classes(results, tuple(names))
        # Today's edits on the slices the saved labels would replace: the user says (keep, new layer, replace).
        policy = self._ask_about_edits(results, f"Continuing from '{saved.name}'", results.labelled_slices(job.labels))
        taken, kept, edited = results.load(job.labels, policy)
        self._edits_changed(results)
        # A value named otherwise by the model would be renamed by its next run: say so now.
        renamed = "" if classes_agree(names, model_classes) else (
            f" Their classes ({', '.join(names[1:])}) are not the model's ({', '.join(model_classes[1:])}): "
            "fine-tune on them before segmenting, or the model's names replace theirs.")
        kept_text = f" Your edits on slice(s) {slice_list_text(kept)} were kept." if kept else ""
        kept_text += f" Left out (background here): {', '.join(left_out)}." if left_out else ""
        self.status.emit(f"Continuing from the saved labels: their slice(s) {slice_list_text(taken) or 'none'} are "
                         f"in the consensus now, and count as your edits where they differ from what the model wrote "
                         f"(edited: {slice_list_text(edited) or 'none'}): verified for the training set and "
                         "fine-tuning, kept when you segment again. Slices they leave empty were not taken. The "
                         "saved layer is left as it is; Ctrl+Z in the consensus layer undoes this."
                         + kept_text + renamed)
        self._end("done")

    def _on_continue_error(self, error: BaseException) -> None:
        self._detach_task()
        self._continuing = None
        self.fail(error, "Not loaded")
        self._end("failed")
