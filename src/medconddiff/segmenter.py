"""The one inference object: the CLI, the napari widget, the evaluator and the tests all use it.

Volumes are numpy arrays in their file's voxel order ``(i, j, k)`` (or ``(i, j, k, C)`` with
channels last), with the :class:`~medconddiff.nifti.VolumeMeta` that
:func:`medconddiff.nifti.load_volume` returns: its affine says where the voxels lie, its spacing
how big they are. The checkpoint's plan (:class:`~medconddiff.config.PreprocessPlan`) says how the
scan becomes model slices; :class:`~medconddiff.preprocess.ScanPreprocessor` does it, so results do
not depend on how a scan is stored. Results come back in the input's voxel order and shape.

    volume, meta = load_volume("scan.nii.gz")
    segmenter = Segmenter.from_checkpoint()                   # bundled default model
    result = segmenter.segment(volume, meta=meta)             # run to the end
    run = segmenter.run(volume, SamplingConfig(steps=10), meta=meta)
    for event in run: ...                                     # live: StepUpdate / SlicesDone events
    run.result                                                # finished slices, also after a break

Slice indices (``slices=``, ``SlicesDone.slice_indices``) count canonical slices along the plan's
direction (axial: inferior → superior); ``result.geometry.slice_view(array)`` shows any
file-ordered array that way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import platform
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch

from . import __version__
from .adaptive import converged, keep_sampling
from .checkpoint import Checkpoint, load_checkpoint, load_model_weights
from .config import ONE_SHOT, ExperimentConfig, SamplingConfig
from .consensus import quantize
from .consensus_choice import FALLBACK as CONSENSUS_FALLBACK
from .consensus_choice import ConsensusChoice, recorded_choice
from .devices import available_devices, resolve_device
from .errors import SliceSpecError
from .families import build_model
from .fusion import Postprocess, argmax_labels, fuse_slices, model_pixel_area, scan_labels
from .model_interface import DiffusionSegmentationModel
from .nifti import VolumeMeta
from .preprocess import PreparedScan, ScanGeometry, ScanPreprocessor
from .profiling import DENOISE, ENCODE_CONDITION, QUANTIZE, engine_part
from .sampling import initial_noise, sample_progressive
from .schedulers import NoiseSchedule, make_scheduler
from .segmentation_result import OneShotPass, SegmentationEvent, SegmentationResult, SlicesDone, StepUpdate

# Names that lived here before the split, imported from here by the CLI, the plugin and the tests.
__all__ = ["Segmenter", "SegmentationRun", "SegmentationResult", "SegmentationEvent", "SlicesDone", "StepUpdate",
           "Postprocess", "resolve_device", "available_devices", "argmax_labels", "scan_labels", "model_pixel_area",
           "fuse_slices", "converged", "batches", "selected_slices"]


def _stream_seed(seed: int, slice_index: int) -> int:
    return (seed * 1_000_003 + slice_index * 2) % 2**62


def batches(indices: np.ndarray, sampling: SamplingConfig, geometry: ScanGeometry) -> Iterator[slice]:
    """Positions into ``indices`` of each batch: at most ``batch_size`` slices and (unless a single
    slice exceeds it) ``max_batch_pixels`` padded model pixels."""
    pixels = geometry.padded_shape[0] * geometry.padded_shape[1]
    size = max(1, min(sampling.batch_size, sampling.max_batch_pixels // pixels))
    for start in range(0, len(indices), size):
        yield slice(start, min(start + size, len(indices)))


def selected_slices(slices: Optional[Iterable[int]], geometry: ScanGeometry) -> np.ndarray:
    """The canonical slice indices a caller asked for, as int64 in the order given (None = all), or a
    SliceSpecError naming the first index that is not a slice of this scan and the valid range.

    A negative index is refused, not counted from the end: it would write into another slice."""
    n = geometry.n_slices
    if slices is None:
        return np.arange(n)
    values = np.asarray(list(slices))
    if values.size == 0:
        raise SliceSpecError("no slices selected")
    if values.ndim != 1 or values.dtype.kind not in "iuf":
        raise SliceSpecError(f"slice indices must be whole numbers, got {list(values.ravel())[:5]}")
    whole = np.isfinite(values) & (values == np.round(values)) if values.dtype.kind == "f" else np.ones(len(values), bool)
    inside = whole & (values >= 0) & (values < n)
    if not inside.all():
        bad = values[~inside][0]
        shown = int(bad) if whole[~inside][0] else float(bad)
        raise SliceSpecError(f"slice {shown} is not a slice of this scan: slice indices must be in [0, {n}), "
                             f"whole numbers 0 to {n - 1} (its {geometry.slicing} slices)")
    return values.astype(np.int64)


class SegmentationRun:
    """An iterable run: iterate to drive it, stop iterating to cancel; ``result`` is always valid."""

    def __init__(self, segmenter: "Segmenter", volume: np.ndarray, sampling: SamplingConfig,
                 slices: Optional[Iterable[int]] = None, meta: Optional[VolumeMeta] = None):
        segmenter.config.check_sampling(sampling)
        sampling = segmenter.resolve_sampling(sampling)
        self.segmenter = segmenter
        self.sampling = sampling
        self.scan: PreparedScan = segmenter.preprocessor.prepare(volume, meta)
        geometry = self.scan.geometry
        indices = np.unique(selected_slices(slices, geometry))
        self.slice_indices = indices
        h, w = geometry.model_shape
        total_steps = sampling.steps * sampling.num_seeds
        self.result = SegmentationResult(
            labels=np.zeros(geometry.file_shape, np.uint8),
            uncertainty=np.zeros(geometry.file_shape, np.float32),
            trajectory=np.zeros((total_steps, segmenter.num_classes, len(indices), h, w), np.uint8),
            slice_indices=indices, completed=np.zeros(len(indices), bool), geometry=geometry,
            sampling=sampling, class_names=segmenter.class_names,
            provenance=segmenter.provenance(sampling, self.scan), postprocess=segmenter.model.postprocess,
            steps_used=np.zeros(len(indices), np.int16),
            one_shot=(np.zeros((segmenter.num_classes, len(indices), h, w), np.uint8)
                      if sampling.consensus == ONE_SHOT else None))
        self._iterator: Optional[Iterator[SegmentationEvent]] = None

    @property
    def geometry(self) -> ScanGeometry:
        return self.scan.geometry

    def __len__(self) -> int:
        return len(self.slice_indices)

    def __iter__(self) -> Iterator[SegmentationEvent]:
        if self._iterator is None:
            self._iterator = self._generate()
        return self._iterator

    def _generate(self) -> Iterator[SegmentationEvent]:
        seg, sampling, result, geometry = self.segmenter, self.sampling, self.result, self.geometry
        labels_sf = geometry.slice_view(result.labels)
        unc_sf = geometry.slice_view(result.uncertainty)
        total = len(self.slice_indices)
        for positions in batches(self.slice_indices, sampling, geometry):
            indices = self.slice_indices[positions]
            image = self.scan.forward(indices, seg.device)
            one_shot = result.one_shot is not None
            for update in seg.denoise_slices(image, indices, sampling, geometry.model_shape, one_shot=one_shot):
                where = np.searchsorted(self.slice_indices, update.slice_indices)
                if isinstance(update, OneShotPass):
                    for position, probabilities in zip(where, quantize(update.probabilities)):
                        result.one_shot[:, position] = probabilities
                    continue
                kept = result.trajectory[update.seed_index * sampling.steps + update.step_index]
                with engine_part(QUANTIZE):
                    quantized = quantize(update.probabilities)
                for position, probabilities in zip(where, quantized):
                    kept[:, position] = probabilities   # basic indexing: a plain copy (fancy indexing was 10× slower)
                if update.seed_index == 0:
                    result.steps_used[where] = update.step_index + 1
                yield update
            labels, unc = fuse_slices(result.trajectory[:, :, positions], sampling, geometry, result.postprocess,
                                      result.steps_used[positions],
                                      None if result.one_shot is None else result.one_shot[:, positions])
            labels_sf[indices] = labels
            unc_sf[indices] = unc
            result.completed[positions] = True
            yield SlicesDone(indices, labels, unc, int(result.completed.sum()), total)


class Segmenter:
    """A trained model plus its preprocessing plan, on a device; turns scans into segmentations."""

    def __init__(self, model: DiffusionSegmentationModel, config: ExperimentConfig,
                 device: str | torch.device = "auto", checkpoint: Optional[Checkpoint] = None,
                 consensus_choice: Optional[ConsensusChoice] = None):
        self.config = config
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        # On CPU, oneDNN's convolutions run 1.2–1.5× faster on channels-last tensors (benchmark: 384²
        # slices, 2 threads); the model and its inputs are converted (the model in place).
        self.memory_format = torch.channels_last if self.device.type == "cpu" else torch.contiguous_format
        self.model.to(memory_format=self.memory_format)
        self.schedule = NoiseSchedule(config.diffusion)
        self.preprocessor = ScanPreprocessor(config.plan)
        self.checkpoint_path: Optional[Path] = checkpoint.path if checkpoint else None
        self.checkpoint_sha256 = checkpoint.sha256 if checkpoint else ""
        self.checkpoint_extra = checkpoint.extra if checkpoint else {}
        #: The consensus this model uses under ``consensus="auto"`` and why (None: no choice recorded → mean).
        self.consensus_choice: Optional[ConsensusChoice] = consensus_choice or recorded_choice(self.checkpoint_extra)

    @classmethod
    def from_checkpoint(cls, path: str | Path | None = None, device: str | torch.device = "auto") -> "Segmenter":
        """Load a checkpoint (None = the bundled default model) onto ``device`` ('auto', 'cpu', 'cuda')."""
        checkpoint = load_checkpoint(path)
        # The checkpoint holds the trained backbone: the pretrained file it started from is not needed.
        model = build_model(dataclasses.replace(checkpoint.config.model, backbone_weights=None),
                            in_channels=checkpoint.config.plan.input_channels)
        load_model_weights(model, checkpoint)
        return cls(model, checkpoint.config, device=device, checkpoint=checkpoint)

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.config.model.class_names)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def plan(self):
        return self.config.plan

    def arithmetic(self, precision: str = "auto") -> str:
        """'bf16' or 'fp32': what ``precision`` (SamplingConfig.precision) means on this device."""
        if precision == "auto":
            return "bf16" if self.device.type == "cuda" else "fp32"
        return precision

    def autocast(self, precision: str = "auto") -> contextlib.AbstractContextManager:
        """The autocast context the network runs in under ``precision``."""
        if self.arithmetic(precision) == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def resolve_sampling(self, sampling: SamplingConfig) -> SamplingConfig:
        """``sampling`` with the model's own choices filled in: ``step_cap=0`` → its measured step cap
        (``steps`` without one); ``consensus="auto"`` → its recorded consensus for such a run (``mean``
        without one, or for a run past the cap the choice was measured at: ConsensusChoice.method_for)."""
        choice = self.consensus_choice
        if sampling.step_cap == 0:
            cap = (choice.step_cap_for(sampling.consensus, sampling.steps) if choice is not None else None) \
                or sampling.steps
            sampling = dataclasses.replace(sampling, step_cap=min(cap, sampling.steps))
        if sampling.consensus == "auto":
            method = choice.method_for(sampling) if choice else CONSENSUS_FALLBACK
            sampling = dataclasses.replace(sampling, consensus=method)
        return sampling

    def provenance(self, sampling: SamplingConfig, scan: Optional[PreparedScan] = None) -> dict:
        record = {
            "medconddiff_version": __version__,
            "checkpoint": str(self.checkpoint_path) if self.checkpoint_path else None,
            "checkpoint_sha256": self.checkpoint_sha256,
            "model": dataclasses.asdict(self.config.model),
            "plan": dataclasses.asdict(self.config.plan),
            "diffusion": dataclasses.asdict(self.config.diffusion),
            "sampling": dataclasses.asdict(sampling),
            "consensus_choice": self.consensus_choice.to_dict() if self.consensus_choice is not None else None,
            "device": str(self.device),
            "arithmetic": self.arithmetic(sampling.precision),
            "torch": torch.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        }
        if scan is not None:
            record["geometry"] = scan.geometry.to_dict()
            record["intensity"] = scan.intensity_record()
        return record

    def run(self, volume: np.ndarray, sampling: SamplingConfig | None = None,
            slices: Optional[Iterable[int]] = None, *, meta: Optional[VolumeMeta] = None) -> SegmentationRun:
        """A lazy run over the scan; nothing is denoised until it is iterated.

        ``meta`` (from :func:`~medconddiff.nifti.load_volume`) gives orientation and spacing; without
        it the voxel axes are taken as R, A, S at 1 mm, with a warning.
        """
        return SegmentationRun(self, volume, sampling or SamplingConfig(), slices, meta)

    def segment(self, volume: np.ndarray, sampling: SamplingConfig | None = None,
                slices: Optional[Iterable[int]] = None, *, meta: Optional[VolumeMeta] = None,
                progress: Optional[Callable[[int, int], None]] = None) -> SegmentationResult:
        """Run to the end; ``progress(completed, total)`` is called after every batch of slices."""
        run = self.run(volume, sampling, slices, meta=meta)
        for event in run:
            if progress is not None and isinstance(event, SlicesDone):
                progress(event.completed, event.total)
        return run.result

    @torch.inference_mode()
    def denoise_slices(self, image: torch.Tensor, slice_indices: Sequence[int], sampling: SamplingConfig,
                       model_shape: Optional[tuple[int, int]] = None, *, one_shot: bool = False
                       ) -> Iterator[StepUpdate | OneShotPass]:
        """Diffusion for a batch of model inputs (B, C_in, Hp, Wp); one StepUpdate per step and seed,
        its probabilities cropped to ``model_shape`` (h, w) (default: uncropped). With ``one_shot``, a
        OneShotPass comes first: the one-shot forward on the same backbone features."""
        image = image.to(self.device).contiguous(memory_format=self.memory_format)
        batch, height, width = image.shape[0], image.shape[-2], image.shape[-1]
        h, w = model_shape or (height, width)
        with self.autocast(sampling.precision), engine_part(ENCODE_CONDITION):
            condition = self.model.encode_condition(image)
        if one_shot:
            probabilities = self._one_shot_pass(condition, height, width, sampling.precision)
            yield OneShotPass(np.asarray(slice_indices), probabilities[..., :h, :w].contiguous().cpu().numpy())
        steps_used = torch.full((batch,), sampling.steps, dtype=torch.long)   # set by the first seed
        for seed_index in range(sampling.num_seeds):
            scheduler = make_scheduler(sampling.scheduler, self.schedule, sampling.steps, eta=sampling.eta,
                                       clip_range=self.model.state_clip_range)
            seed = sampling.seed + seed_index
            x_t = self._initial_noise(batch, height, width, seed, slice_indices)
            # Step noise (DDPM, DDIM eta>0) per slice, from a stream of its own keyed like its initial
            # noise: a slice's result does not depend on the batch it is in.
            generators = [initial_noise((1,), _stream_seed(seed, int(i)) + 1)[1] for i in slice_indices]
            subsets: dict[tuple[int, ...], list[torch.Tensor]] = {}

            def denoise(x: torch.Tensor, t: torch.Tensor, active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                key = tuple(active.tolist())
                if key not in subsets:   # the condition of the slices still sampled (changes rarely)
                    subsets.clear()
                    subsets[key] = condition if len(key) == batch else [c[active.to(c.device)] for c in condition]
                cond = subsets[key]
                with self.autocast(sampling.precision):
                    if sampling.reextract_features:  # the reference code's behaviour, for benchmarks
                        with engine_part(ENCODE_CONDITION):
                            cond = self.model.encode_condition(image[active.to(image.device)])
                    with engine_part(DENOISE):
                        x0, probs = self.model.denoise(x, t, cond)
                return x0.float(), probs.float()

            keep = keep_sampling(sampling, seed_index, steps_used, h, w) if sampling.adaptive else None
            for step in sample_progressive(denoise, scheduler, x_t, generators, keep):
                # Contiguous (B, K, h, w) on the host: channels-last strides would slow every later copy.
                probabilities = step.probabilities[..., :h, :w].contiguous().cpu().numpy()
                yield StepUpdate(np.asarray(slice_indices)[step.active.numpy()], seed_index, step.index,
                                 step.num_steps, sampling.num_seeds, probabilities)

    def _initial_noise(self, batch: int, height: int, width: int, seed: int, slice_indices: Sequence[int]
                       ) -> torch.Tensor:
        # One stream per slice, so a slice's result does not depend on which batch it landed in.
        noise = [initial_noise(self.model.state_shape(1, height, width), _stream_seed(seed, int(i)))[0]
                 for i in slice_indices]
        return torch.cat(noise).to(self.device).contiguous(memory_format=self.memory_format)

    @torch.inference_mode()
    def one_shot(self, volume: np.ndarray, slices: Optional[Iterable[int]] = None, batch_size: int = 16, *,
                 meta: Optional[VolumeMeta] = None, precision: str = "auto") -> np.ndarray:
        """Deterministic single forward (x_T = 0 at the last timestep): the no-diffusion baseline.

        Returns labels in the input's voxel order."""
        scan = self.preprocessor.prepare(volume, meta)
        geometry = scan.geometry
        labels = np.zeros(geometry.file_shape, np.uint8)
        labels_sf = geometry.slice_view(labels)
        indices = selected_slices(slices, geometry)
        sampling = SamplingConfig(batch_size=batch_size, precision=precision)
        for positions in batches(indices, sampling, geometry):
            chunk = indices[positions]
            image = scan.forward(chunk, self.device).contiguous(memory_format=self.memory_format)
            with self.autocast(precision), engine_part(ENCODE_CONDITION):
                condition = self.model.encode_condition(image)
            probs = self._one_shot_pass(condition, *image.shape[-2:], precision)
            # Quantised as a run keeps its steps and a one-shot consensus: the same labels either way.
            quantized = quantize(geometry.crop(probs).cpu().numpy())
            chunk_labels = scan_labels(quantized, geometry)
            labels_sf[chunk] = self.model.postprocess(chunk_labels, model_pixel_area(geometry))
        return labels

    def _one_shot_pass(self, condition: Sequence[torch.Tensor], height: int, width: int, precision: str
                       ) -> torch.Tensor:
        """Class probabilities (B, K, height, width) of x̂0 from x_T = 0 at the last timestep, float32."""
        batch = condition[0].shape[0]
        x_t = torch.zeros(self.model.state_shape(batch, height, width), device=self.device)
        x_t = x_t.contiguous(memory_format=self.memory_format)
        t = torch.full((batch,), self.schedule.num_train_timesteps - 1, device=self.device, dtype=torch.long)
        with self.autocast(precision), engine_part(DENOISE):
            _, probs = self.model.denoise(x_t, t, condition)
        return probs.float()
