"""One scan's results: its result layers, what the engine last wrote into them, its kept runs, its edits.

**Edits are never lost.** Next to its layers, a :class:`ResultSet` keeps a *reference*: what the
engine last wrote into each voxel of the consensus. A canonical slice is *edited* when the consensus
differs from the reference there (:mod:`napari_medconddiff._edits`). Writes that would overwrite an
edit follow a :class:`~napari_medconddiff._edits.WritePolicy` (the user's answer); writes into an
existing consensus are undoable, one napari undo step per user action.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np

from medconddiff.class_match import class_key
from medconddiff.config import SamplingConfig
from medconddiff.outputs import recorded_name

from ._edits import UndoStep, WritePolicy, differing_slices, touched_slices
from ._export import ExportSummary
from ._geometry import LayerSpace, ScanSpace
from ._result_layers import EDITED_KEY

__all__ = ["KeptRun", "ChannelInput", "ResultSet", "FusionStart", "classes_agree"]


def classes_agree(names: Sequence[str], others: Sequence[str]) -> bool:
    """Whether two class lists give the values they share the same names (one may be longer)."""
    shared = min(len(names), len(others))
    return [class_key(n) for n in names[1:shared]] == [class_key(n) for n in others[1:shared]]


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
    one_shot: Optional[np.ndarray] = None   # the one-shot forward, kept by a run with that consensus
    asked: Optional[tuple[str, int]] = None  # the consensus and skip-first the form asked for (``auto`` kept)

    @classmethod
    def of(cls, result: Any) -> "KeptRun":
        return cls(result.trajectory, result.slice_indices, result.completed.copy(), result.completed.copy(),
                   result.geometry, result.sampling, result.postprocess, tuple(result.class_names),
                   dict(result.provenance), result.steps_used.copy(), result.one_shot)

    @property
    def shown_slices(self) -> np.ndarray:
        return self.slice_indices[self.shown]


@dataclass
class _Fusion:
    """A re-fusion of the kept ``runs``: per run, (sampling, asked) before and after it, and the digests
    (before, after) of each consensus slice whose labels it changed."""

    runs: list
    before: list
    after: list
    changed: dict


@dataclass
class FusionStart:
    """What a re-fusion is about to replace (:meth:`ResultSet.fusion_start`)."""

    runs: list
    settings: list
    digests: dict
    position: int


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
        self._scan_name = scan_name
        self.source = source
        self.space = space
        self.class_names = class_names
        self.layers: dict[str, Any] = {}
        self.channels: list[ChannelInput] = []   # the last segmentation's further channels
        self.reference = np.zeros(space.layer_shape, np.uint8)
        self.runs: list[KeptRun] = []
        self.edited: set[int] = set()
        # Canonical slices the user marked as checked (right as the engine wrote them): verified, and kept
        # from later runs as edits are; the mark goes when the user lets a run replace the slice.
        self.checked: set[int] = set()
        # A consensus made for the operation in progress has no history worth undoing: written directly.
        self.fresh = True
        self.steps_stack: Optional[np.ndarray] = None
        self.steps_first = 0
        self.on_edits: Callable[[], None] = lambda: None
        self.on_labels_shown: Callable[[], None] = lambda: None   # the consensus layer's content may have changed
        self._writing = False
        self._undo_step: Optional[UndoStep] = None
        self._undo_depth = 0
        # Per canonical slice, digests of every content the engine wrote there (the reference's past): napari's
        # Ctrl-Z of a re-fusion or a re-run brings an earlier engine version back, which is no edit, though
        # it differs from the reference (written outside napari's history).
        self._engine_versions: dict[int, set[bytes]] = {}
        # The re-fusions of the kept runs, oldest first: napari's Ctrl-Z of one brings the labels of the fusion
        # before back, and the runs' sampling (sidecar, status, the Consensus box) must follow (follow_undo).
        self._fusions: list[_Fusion] = []
        self.follow_scan_name()

    @property
    def consensus(self) -> Any:
        return self.layers.get("consensus")

    @property
    def scan_name(self) -> str:
        """The scan layer's name as it is now (a user who renames it, e.g. to take a patient's name out,
        renames what is made from it: result layers, export and fine-tune names, training-set cases);
        the last one it had once the scan is removed."""
        if self.scan is not None and self.scan.name != self._scan_name:
            self._rename_layers(self._scan_name, self.scan.name)
            self._scan_name = self.scan.name
        return self._scan_name

    def follow_scan_name(self) -> None:
        """Rename the result layers as soon as the user renames the scan layer."""
        if self.scan is not None:
            self.scan.events.name.connect(lambda event: self.scan_name)

    def _rename_layers(self, old: str, new: str) -> None:
        for layer in self.layers.values():
            if layer.name.startswith(f"{old} "):
                layer.name = f"{new}{layer.name[len(old):]}"

    def compatible(self, space: ScanSpace) -> bool:
        """Whether a run seen through ``space`` can update these layers slice by slice."""
        old, new = self.space, space
        return (old.layer_shape == new.layer_shape and old.layer.to_layer == new.layer.to_layer
                and old.geometry.slice_axis == new.geometry.slice_axis
                and old.geometry.orientation.to_canonical == new.geometry.orientation.to_canonical)

    # ------------------------------------------------------------ edits
    def watch(self, layer: Any) -> None:
        layer.events.paint.connect(self._on_paint)
        # ``set_data`` follows every change napari shows: a stroke, an undo or redo (which emit no
        # ``paint``), our own writes; also a move of the slider.
        layer.events.set_data.connect(lambda event: self.on_labels_shown())

    def _on_paint(self, event: Any) -> None:
        # napari emits ``paint`` before it changes the data (outside a mouse stroke), so the slices an
        # edit touched are marked here and compared with the reference at every decision.
        if self._writing:       # our own writes are not edits
            return
        touched = touched_slices(event, self.space)
        if not touched <= self.edited:
            self.edited |= touched
            self._edits_changed()

    def edited_among(self, slices: Sequence[int]) -> list[int]:
        """Those of ``slices`` whose consensus differs from what the engine wrote there."""
        layer = self.consensus
        if layer is None or not len(slices):
            return []
        shown, reference = self.space.slices(layer.data), self.space.slices(self.reference)
        return [int(s) for s in slices
                if not np.array_equal(shown[s], reference[s]) and not self._engine_wrote(int(s), shown[s])]

    def _engine_wrote(self, slice_index: int, content: np.ndarray) -> bool:
        """Whether ``content`` is a version of the slice the engine wrote earlier (brought back by an undo)."""
        versions = self._engine_versions.get(slice_index)
        return bool(versions) and _digest(content) in versions

    def protected_among(self, slices: Sequence[int]) -> list[int]:
        """Those of ``slices`` a run may not overwrite without asking: edited, or marked as checked."""
        wanted = {int(s) for s in slices}
        return sorted((set(self.edited_slices()) | self.checked) & wanted)

    def edited_slices(self) -> list[int]:
        """Every edited canonical slice, compared afresh (napari's undo emits no event)."""
        layer = self.consensus
        if layer is None:
            return []
        shown = self.space.slices(layer.data)
        edited = [s for s in differing_slices(shown, self.space.slices(self.reference), self.space.n_slices)
                  if not self._engine_wrote(s, shown[s])]
        if set(edited) != self.edited:
            self.edited = set(edited)
            self._edits_changed()
        return edited

    def _edits_changed(self) -> None:
        # On the layer too: napari's File > Save writes a DICOM SEG of it as SEMIAUTOMATIC where it holds edits.
        if self.consensus is not None:
            self.consensus.metadata[EDITED_KEY] = bool(self.edited)
        self.on_edits()

    def policy_replacing(self, slices: Sequence[int]) -> WritePolicy:
        """The user answered "replace" for the edited ``slices``: they may be overwritten as they are now."""
        layer = self.consensus
        return WritePolicy() if layer is None else WritePolicy.replacing(slices, self.space.slices(layer.data))

    @property
    def shown_slices(self) -> np.ndarray:
        """Canonical slices the layers show engine results for."""
        if not self.runs:
            return np.zeros(0, np.int64)
        return np.unique(np.concatenate([run.shown_slices for run in self.runs]))

    # ------------------------------------------------------------ re-fusions and napari's undo
    def fusion_start(self) -> FusionStart:
        """The runs' settings, where in the re-fusions' history the layer stands, and the shown slices'
        digests, before a re-fusion writes."""
        position = self._fusion_position()
        self._apply_fusion_settings(position)
        return FusionStart(list(self.runs), [(run.sampling, run.asked) for run in self.runs],
                           self._shown_digests(self.shown_slices), position)

    def record_fusion(self, start: FusionStart) -> None:
        """A re-fusion begun at ``start`` has written (one undo step) and set the runs' sampling and asked."""
        if not self._same_runs(start.runs):
            return
        after = self._shown_digests(list(start.digests))
        changed = {s: (start.digests[s], after[s]) for s in start.digests if start.digests[s] != after[s]}
        settings = [(run.sampling, run.asked) for run in start.runs]
        if not changed:
            # No label changed, so napari recorded no undo step: the labels where the history stands are now
            # described by the new settings, on both sides of that point.
            if start.position > 0:
                self._fusions[start.position - 1].after = settings
            if start.position < len(self._fusions):
                self._fusions[start.position].before = settings
            return
        # A new undo step drops napari's redo history: the re-fusions undone are gone with it.
        del self._fusions[start.position:]
        self._fusions.append(_Fusion(start.runs, start.settings, settings, changed))

    def follow_undo(self) -> bool:
        """Give the kept runs the sampling of the fusion the consensus layer shows: a Ctrl-Z (or redo) of a
        re-fusion brings another one's labels back. True when a run's sampling changed."""
        return self._apply_fusion_settings(self._fusion_position())

    def _fusion_position(self) -> int:
        """How many of the recorded re-fusions the layer shows (the newest undone ones are not): per
        re-fusion one slice is compared (this runs at every change napari shows), the first it changed
        that holds its labels before or after; slices the user painted since are skipped."""
        if self._fusions and not all(self._same_runs(fusion.runs) for fusion in self._fusions):
            self._fusions = []          # a run since: its labels are no fusion's to follow
        position = len(self._fusions)
        while position > 0 and self._shows_before(self._fusions[position - 1]):
            position -= 1
        return position

    def _apply_fusion_settings(self, position: int) -> bool:
        if not self._fusions:
            return False
        shown = self._fusions[position - 1].after if position > 0 else self._fusions[0].before
        changed = False
        for run, (sampling, asked) in zip(self.runs, shown):
            if (run.sampling, run.asked) != (sampling, asked):
                run.sampling, run.asked, changed = sampling, asked, True
                run.provenance["sampling"] = dataclasses.asdict(sampling)
        return changed

    def _same_runs(self, runs: list) -> bool:
        return len(runs) == len(self.runs) and all(a is b for a, b in zip(runs, self.runs))

    def _shows_before(self, fusion: _Fusion) -> bool:
        layer = self.consensus
        if layer is None:
            return False
        shown = self.space.slices(layer.data)
        for s, (before, after) in fusion.changed.items():
            now = _digest(shown[s])
            if now in (before, after):
                return now == before
        return False

    def _shown_digests(self, slices: Sequence[int]) -> dict[int, bytes]:
        layer = self.consensus
        if layer is None:
            return {}
        shown = self.space.slices(layer.data)
        return {int(s): _digest(shown[s]) for s in slices}

    # ------------------------------------------------------------ one user action, one undo step
    def begin_undo_step(self) -> None:
        """Writes from now until :meth:`end_undo_step` are one napari undo step (calls nest)."""
        self._undo_depth += 1
        if self._undo_depth == 1 and self.consensus is not None:
            self._undo_step = UndoStep(self.consensus)

    def end_undo_step(self) -> None:
        if self._undo_depth == 0:
            return
        self._undo_depth -= 1
        if self._undo_depth == 0:
            step, self._undo_step = self._undo_step, None
            if step is not None:
                with self._own_writes():
                    step.commit()

    @contextlib.contextmanager
    def one_undo_step(self) -> Any:
        self.begin_undo_step()
        try:
            yield
        finally:
            self.end_undo_step()

    @contextlib.contextmanager
    def _own_writes(self) -> Any:
        """Our writes into the consensus: not counted as edits."""
        before, self._writing = self._writing, True
        try:
            yield
        finally:
            self._writing = before

    # ------------------------------------------------------------ writing results
    def write(self, slices: np.ndarray, labels: np.ndarray, uncertainty: np.ndarray, policy: WritePolicy) -> list[int]:
        """Write engine results for canonical ``slices`` (B, H, W each); returns the edited or checked slices
        that ``policy`` keeps, which get the new uncertainty but not the new labels."""
        slices = np.asarray(slices)
        layer = self.consensus
        kept = []
        if layer is not None:
            shown = self.space.slices(layer.data)
            # As protected_among, but comparing only these slices: this runs for every batch a run writes.
            protected = set(self.edited_among(slices)) | (self.checked & {int(s) for s in slices})
            kept = sorted(s for s in protected if not policy.may_overwrite(s, shown[s]))
            self.checked -= protected - set(kept)       # replaced as the user allowed: no longer what they checked
        # The reference changes only here, so every version it held is among those recorded.
        for k, s in enumerate(slices):
            self._engine_versions.setdefault(int(s), set()).add(_digest(labels[k]))
        self.space.slices(self.reference)[slices] = labels
        if "uncertainty" in self.layers:
            self.space.slices(self.layers["uncertainty"].data)[slices] = uncertainty
            self.layers["uncertainty"].refresh()
        write = np.array([k for k, s in enumerate(slices) if int(s) not in kept], dtype=np.intp)
        if layer is None or not len(write):
            return kept
        target = self.space.slices(layer.data)
        indices, new = slices[write], labels[write]
        if self.fresh:
            target[indices] = new
            layer.refresh()
            return kept
        # Changed voxels only, recorded for undo (edits come back); one step per user action.
        b, r, c = np.nonzero(target[indices] != new)
        if b.size:
            self._write_undoable(layer, self.space.layer_indices(indices[b], r, c), new[b, r, c])
        return kept

    def _write_undoable(self, layer: Any, where: tuple[np.ndarray, ...], values: np.ndarray) -> None:
        """Write ``values`` at layer indices ``where`` of the consensus ``layer``, in the user action's
        undo step."""
        with self.one_undo_step():
            step = self._undo_step
            if step is not None and step.layer is layer:
                step.write(where, values)
                layer.refresh()
            else:       # the step began on a consensus the user has since removed: its own undo step
                with self._own_writes(), layer.block_history():
                    layer.data_setitem(where, values)

    def labelled_slices(self, labels: np.ndarray) -> list[int]:
        """The canonical slices of layer-shaped ``labels`` that hold a label."""
        return [int(s) for s in np.flatnonzero(self.space.slices(np.asarray(labels)).any(axis=(1, 2)))]

    def load(self, labels: np.ndarray, policy: WritePolicy) -> tuple[list[int], list[int], list[int]]:
        """Put layer-shaped ``labels`` (saved in an earlier session) into the consensus as the user's own,
        slice by slice: every canonical slice that holds a label replaces the consensus there, except an
        edited slice that ``policy`` keeps. A slice the saved labels leave empty is not taken (nothing says
        anyone checked it; an export holds every slice). The reference keeps what the engine wrote, so a
        taken slice that differs from it is an edit, kept by later runs unless the user says otherwise.
        One napari undo step; returns (the slices taken, the edited slices kept, every edited slice)."""
        layer = self.consensus
        labels = np.asarray(labels, dtype=layer.data.dtype)
        wanted = self.labelled_slices(labels)
        shown = self.space.slices(layer.data)
        kept = [s for s in self.edited_among(wanted) if not policy.may_overwrite(s, shown[s])]
        taken = [s for s in wanted if s not in kept]
        mask = np.zeros(labels.shape, bool)
        self.space.slices(mask)[taken] = True
        where = np.nonzero((layer.data != labels) & mask)
        if where[0].size:
            self._write_undoable(layer, where, labels[where])
        self.fresh = False
        return taken, kept, self.edited_slices()

    def summary(self) -> ExportSummary:
        self.follow_undo()
        if not self.runs:       # labels loaded from an earlier session, nothing segmented since
            empty = np.zeros(0, np.int64)
            return ExportSummary(slice_indices=empty, completed=np.zeros(0, bool), steps_used=empty,
                                 class_names=self.class_names, provenance={}, runs=[], complete=True)
        latest = self.runs[-1]
        slices = np.concatenate([run.shown_slices for run in self.runs])
        steps_used = np.concatenate([run.steps_used[run.shown] for run in self.runs])
        order = np.argsort(slices)
        runs = [{"slices": [int(s) for s in run.shown_slices],
                 "checkpoint": recorded_name(run.provenance.get("checkpoint")),
                 "checkpoint_sha256": run.provenance.get("checkpoint_sha256"),
                 "sampling": dataclasses.asdict(run.sampling)} for run in self.runs if run.shown.any()]
        return ExportSummary(slice_indices=slices[order], completed=np.ones(len(slices), bool),
                             steps_used=steps_used[order], class_names=self.class_names,
                             provenance={**latest.provenance, "sampling": dataclasses.asdict(latest.sampling)},
                             runs=runs, complete=all(run.completed.all() for run in self.runs))


def _digest(slice_labels: np.ndarray) -> bytes:
    """A slice's labels as a short digest (its shape and bytes)."""
    import hashlib

    content = np.ascontiguousarray(slice_labels)
    return hashlib.blake2b(repr(content.shape).encode() + content.tobytes(), digest_size=16).digest()

