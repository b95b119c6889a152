"""What a segmentation run gives: live events while it runs, and the result it leaves.

``StepUpdate`` and ``SlicesDone`` are the events a :class:`~medconddiff.segmenter.SegmentationRun`
yields; :class:`SegmentationResult` holds the consensus labels, the uncertainty and the kept
trajectory, and re-fuses them without re-running the diffusion.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Union

import numpy as np

from .config import SamplingConfig
from .consensus import first_argmax, skip_first_note
from .consensus_choice import resolved_consensus
from .fusion import Postprocess, fuse_slices, model_pixel_area, scan_labels
from .preprocess import ScanGeometry


@dataclass
class StepUpdate:
    """One denoising step finished for a batch of slices (probabilities on the model grid)."""

    slice_indices: np.ndarray
    seed_index: int
    step_index: int
    num_steps: int
    num_seeds: int
    probabilities: np.ndarray  # (B, K, h, w) float32, canonical slice orientation, plan spacing


@dataclass
class SlicesDone:
    """A batch of slices is fully segmented; ``completed`` of ``total`` slices are done.

    ``labels``/``uncertainty`` are canonical slices on the scan's grid: write them through
    ``geometry.slice_view(array)[slice_indices]`` into a file-ordered array.
    """

    slice_indices: np.ndarray
    labels: np.ndarray        # (B, H, W) uint8
    uncertainty: np.ndarray   # (B, H, W) float32 in [0, 1]
    completed: int
    total: int


SegmentationEvent = Union[StepUpdate, SlicesDone]


@dataclass
class OneShotPass:
    """The one-shot forward of a batch of slices, computed by a run whose consensus takes it (kept by
    the run, not passed on as an event)."""

    slice_indices: np.ndarray
    probabilities: np.ndarray  # (B, K, h, w) float32, like a StepUpdate's


@dataclass
class SegmentationResult:
    """Consensus labels, uncertainty and the kept trajectory of one run.

    ``labels``/``uncertainty`` are full volumes in the input's voxel order; slices that were not
    segmented are 0. ``trajectory`` is the uint8-quantised per-step class probabilities, shaped
    (num_seeds*steps, K, n_slices, h, w) on the model grid (canonical slices at the plan's spacing)
    for the slices in ``slice_indices``. ``geometry`` maps between the two.
    """

    labels: np.ndarray
    uncertainty: np.ndarray
    trajectory: np.ndarray
    slice_indices: np.ndarray
    completed: np.ndarray          # bool per entry of slice_indices
    geometry: ScanGeometry
    sampling: SamplingConfig
    class_names: tuple[str, ...]
    provenance: dict = field(default_factory=dict)
    #: the model's clean-up of consensus labels (LSegDiff's morphology), reapplied by ``refuse``
    postprocess: Optional[Postprocess] = field(default=None, repr=False, compare=False)
    #: denoising steps each slice took (per seed); below ``sampling.steps`` where adaptive sampling
    #: stopped a converged slice early. None means every slice took every step.
    steps_used: Optional[np.ndarray] = None
    #: the one-shot forward's quantised probabilities (K, n_slices, h, w), kept by a run whose consensus
    #: is ``one_shot`` (None otherwise: that consensus cannot be re-fused from this result)
    one_shot: Optional[np.ndarray] = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.steps_used is None:
            self.steps_used = np.full(len(self.slice_indices), self.sampling.steps, np.int16)

    @property
    def is_complete(self) -> bool:
        return bool(self.completed.all())

    @property
    def skip_first_note(self) -> str:
        """What skip-first did where slices took fewer steps than the schedule (see :func:`skip_first_note`)."""
        return skip_first_note(self.sampling.skip_first, self.sampling.consensus, self.steps_used[self.completed])

    def trajectory_step(self, index: int) -> np.ndarray:
        """Entry ``index`` (seed × steps + step) of the trajectory, (K, n_slices, h, w): a slice that
        had stopped by then shows its last step (what it converged to)."""
        steps = self.sampling.steps
        seed, step = divmod(index, steps)
        stopped = np.flatnonzero(self.steps_used <= step)
        if not len(stopped):
            return self.trajectory[index]
        out = self.trajectory[index].copy()
        for used in np.unique(self.steps_used[stopped]):
            positions = stopped[self.steps_used[stopped] == used]
            out[:, positions] = self.trajectory[seed * steps + int(used) - 1][:, positions]
        return out

    @property
    def step_labels(self) -> np.ndarray:
        """Arg-max of every step's x̂_0: (num_seeds*steps, n_slices, h, w) uint8, model grid
        (steps after a slice stopped repeat its last one)."""
        return np.stack([first_argmax(self.trajectory_step(i), axis=0) for i in range(self.trajectory.shape[0])])

    def slice_view(self, array: np.ndarray) -> np.ndarray:
        """A file-ordered volume (e.g. ``labels``) as canonical slices, slice axis first (a view)."""
        return self.geometry.slice_view(array)

    def refuse(self, method: str, skip_first: int = 0, chunk: int = 32) -> "SegmentationResult":
        """A new result with another consensus over the kept trajectory (no diffusion re-run); ``"auto"``
        is the model's recorded choice (the provenance says which)."""
        sampling = dataclasses.replace(self.sampling, consensus=resolved_consensus(method, self.provenance,
                                                                                   self.sampling),
                                       skip_first=skip_first)
        labels = np.zeros_like(self.labels)
        unc = np.zeros_like(self.uncertainty)
        labels_sf, unc_sf = self.geometry.slice_view(labels), self.geometry.slice_view(unc)
        done = np.flatnonzero(self.completed)
        for start in range(0, len(done), chunk):
            positions = done[start:start + chunk]
            one_shot = None if self.one_shot is None else self.one_shot[:, positions]
            fused_labels, fused_unc = fuse_slices(self.trajectory[:, :, positions], sampling, self.geometry,
                                                  self.postprocess, self.steps_used[positions], one_shot)
            labels_sf[self.slice_indices[positions]] = fused_labels
            unc_sf[self.slice_indices[positions]] = fused_unc
        return dataclasses.replace(self, labels=labels, uncertainty=unc, sampling=sampling)

    def step_labels_on_scan(self, step: int, clean: bool = False) -> np.ndarray:
        """One step's x̂_0 labels as canonical slices on the scan's grid: (n_slices, H, W) uint8. ``clean``:
        with the model's clean-up, as the consensus and the one-shot get it — what a step is scored as, so
        that steps, consensus and one-shot are compared alike (the saved trajectory keeps the raw x̂_0)."""
        labels = scan_labels(self.trajectory_step(step).transpose(1, 0, 2, 3), self.geometry)
        if clean and self.postprocess is not None:
            labels = self.postprocess(labels, model_pixel_area(self.geometry))
        return labels
