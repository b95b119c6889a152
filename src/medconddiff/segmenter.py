"""The one inference object: the CLI, the napari widget, the evaluator and the tests all use it.

Volumes are numpy arrays in NIfTI voxel order (as :func:`medconddiff.nifti.load_volume` returns
them); the checkpoint's ``preprocess.slice_axis`` says which axis is sliced. Results come back in the
same order and shape as the input.

    segmenter = Segmenter.from_checkpoint()             # bundled default model
    result = segmenter.segment(volume)                  # run to the end
    run = segmenter.run(volume, SamplingConfig(steps=10))
    for event in run: ...                               # live: StepUpdate / SlicesDone events
    run.result                                          # finished slices, also after a break
"""

from __future__ import annotations

import contextlib
import dataclasses
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import torch

from . import __version__
from .checkpoint import Checkpoint, load_checkpoint, load_model_weights
from .config import ExperimentConfig, SamplingConfig
from .consensus import first_argmax, fuse, labels_from_probabilities, quantize, select_steps, uncertainty
from .model import build_model
from .preprocess import check_volume, intensity_range, normalise_intensity, resize_probabilities, to_model_input
from .sampling import initial_noise, sample_progressive
from .schedulers import NoiseSchedule, make_scheduler


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' → CUDA when present, else CPU; an explicit 'cuda' without a GPU is a clear error."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("CUDA was requested but no CUDA device is available; use --device cpu or auto")
    return torch.device(device)


def available_devices() -> list[str]:
    devices = ["auto", "cpu"]
    devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return devices


@dataclass
class StepUpdate:
    """One denoising step finished for a batch of slices (probabilities at model resolution)."""

    slice_indices: np.ndarray
    seed_index: int
    step_index: int
    num_steps: int
    num_seeds: int
    probabilities: np.ndarray  # (B, K, h, w) float32


@dataclass
class SlicesDone:
    """A batch of slices is fully segmented; ``completed`` of ``total`` slices are done."""

    slice_indices: np.ndarray
    labels: np.ndarray        # (B, H, W) uint8, scan resolution, slice axis first
    uncertainty: np.ndarray   # (B, H, W) float32 in [0, 1]
    completed: int
    total: int


SegmentationEvent = Union[StepUpdate, SlicesDone]


@dataclass
class SegmentationResult:
    """Consensus labels, uncertainty and the kept trajectory of one run.

    ``trajectory`` is uint8-quantised per-step class probabilities, shaped
    (num_seeds*steps, K, n_slices, h, w) at model resolution, for the slices in ``slice_indices``
    (compact: a 512×512×300 scan at 10 steps keeps 10×K×300×h×w bytes). ``labels``/``uncertainty``
    are full volumes in the input's axis order; slices that were not segmented are 0.
    """

    labels: np.ndarray
    uncertainty: np.ndarray
    trajectory: np.ndarray
    slice_indices: np.ndarray
    completed: np.ndarray          # bool per entry of slice_indices
    slice_axis: int
    sampling: SamplingConfig
    class_names: tuple[str, ...]
    provenance: dict = field(default_factory=dict)
    #: the model's clean-up of consensus labels (LSegDiff's morphology), reapplied by ``refuse``
    postprocess: Optional[Callable[[np.ndarray], np.ndarray]] = field(default=None, repr=False, compare=False)

    @property
    def is_complete(self) -> bool:
        return bool(self.completed.all())

    @property
    def step_labels(self) -> np.ndarray:
        """Arg-max of every step's x̂_0: (num_seeds*steps, n_slices, h, w) uint8."""
        return first_argmax(self.trajectory, axis=1)

    def refuse(self, method: str, skip_first: int = 0, chunk: int = 32) -> "SegmentationResult":
        """A new result with another consensus over the kept trajectory (no diffusion re-run)."""
        sampling = dataclasses.replace(self.sampling, consensus=method, skip_first=skip_first)
        labels = np.zeros_like(self.labels)
        unc = np.zeros_like(self.uncertainty)
        labels_sf = np.moveaxis(labels, self.slice_axis, 0)
        unc_sf = np.moveaxis(unc, self.slice_axis, 0)
        shape = labels_sf.shape[1:]
        done = np.flatnonzero(self.completed)
        for start in range(0, len(done), chunk):
            positions = done[start:start + chunk]
            fused_labels, fused_unc = fuse_slices(self.trajectory[:, :, positions], sampling, shape,
                                                  self.postprocess)
            labels_sf[self.slice_indices[positions]] = fused_labels
            unc_sf[self.slice_indices[positions]] = fused_unc
        return dataclasses.replace(self, labels=labels, uncertainty=unc, sampling=sampling)


def argmax_labels(probabilities: torch.Tensor) -> np.ndarray:
    """(B, K, H, W) probabilities → (B, H, W) uint8 labels on the host; equal to ``argmax(dim=1)``.

    torch's CPU arg-max over the class dimension is ~10× slower than comparing class planes, and at
    scan resolution (512²) it cost more than the whole fusion.
    """
    if probabilities.device.type == "cpu":
        return first_argmax(probabilities.numpy(), axis=1)
    return probabilities.argmax(dim=1).to(torch.uint8).cpu().numpy()


def labels_at(probabilities: np.ndarray | torch.Tensor, shape: tuple[int, int]) -> np.ndarray:
    """(B, K, h, w) probabilities (float, or uint8-quantised) → (B, H, W) uint8 labels at ``shape``.

    The one way a model-resolution prediction becomes scan-resolution labels: bilinear resize of
    the probabilities, then arg-max (consensus, one-shot, per-step labels and their evaluation).
    """
    if isinstance(probabilities, np.ndarray):
        probabilities = torch.from_numpy(np.ascontiguousarray(probabilities, dtype=np.float32))
    return argmax_labels(resize_probabilities(probabilities.float(), shape))


def fuse_slices(stack_uint8: np.ndarray, sampling: SamplingConfig, shape: tuple[int, int],
                postprocess: Optional[Callable[[np.ndarray], np.ndarray]] = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """(S, K, B, h, w) quantised trajectory → labels (B, H, W) uint8 and uncertainty (B, H, W).

    ``postprocess`` cleans the labels (not the uncertainty, which describes the raw trajectory)."""
    fused = fuse(stack_uint8, sampling.consensus, sampling.skip_first, sampling.num_seeds)   # (K, B, h, w)
    labels_small = labels_from_probabilities(fused)
    unc_small = uncertainty(select_steps(stack_uint8, sampling.skip_first, sampling.num_seeds), fused, labels_small)
    labels = labels_at(fused.transpose(1, 0, 2, 3), shape)
    if postprocess is not None:
        labels = postprocess(labels)
    unc = resize_probabilities(torch.from_numpy(unc_small)[:, None], shape)[:, 0].clamp_(0, 1).numpy()
    return labels, unc.astype(np.float32)


def _stream_seed(seed: int, slice_index: int) -> int:
    return (seed * 1_000_003 + slice_index * 2) % 2**62


class SegmentationRun:
    """An iterable run: iterate to drive it, stop iterating to cancel; ``result`` is always valid."""

    def __init__(self, segmenter: "Segmenter", volume: np.ndarray, sampling: SamplingConfig,
                 slices: Optional[Iterable[int]] = None):
        self.segmenter = segmenter
        self.sampling = sampling
        self.volume = check_volume(volume)
        axis = segmenter.config.preprocess.slice_axis
        self.slice_axis = axis
        n = self.volume.shape[axis]
        indices = np.arange(n) if slices is None else np.unique(np.asarray(list(slices), dtype=np.int64))
        if len(indices) == 0:
            raise ValueError("no slices selected")
        if indices.min() < 0 or indices.max() >= n:
            raise ValueError(f"slice indices must be in [0, {n}), got {indices.min()}..{indices.max()}")
        self.slice_indices = indices
        size = segmenter.config.model.image_size
        total_steps = sampling.steps * sampling.num_seeds
        self.result = SegmentationResult(
            labels=np.zeros(self.volume.shape, np.uint8),
            uncertainty=np.zeros(self.volume.shape, np.float32),
            trajectory=np.zeros((total_steps, segmenter.num_classes, len(indices), size, size), np.uint8),
            slice_indices=indices, completed=np.zeros(len(indices), bool), slice_axis=axis,
            sampling=sampling, class_names=segmenter.class_names, provenance=segmenter.provenance(sampling),
            postprocess=segmenter.postprocess)
        self._iterator: Optional[Iterator[SegmentationEvent]] = None

    def __len__(self) -> int:
        return len(self.slice_indices)

    def __iter__(self) -> Iterator[SegmentationEvent]:
        if self._iterator is None:
            self._iterator = self._generate()
        return self._iterator

    def _generate(self) -> Iterator[SegmentationEvent]:
        seg, sampling, result = self.segmenter, self.sampling, self.result
        volume_sf = np.moveaxis(self.volume, self.slice_axis, 0)
        labels_sf = np.moveaxis(result.labels, self.slice_axis, 0)
        unc_sf = np.moveaxis(result.uncertainty, self.slice_axis, 0)
        low, high = intensity_range(self.volume, seg.config.preprocess)
        shape = volume_sf.shape[1:]
        total = len(self.slice_indices)
        for start in range(0, total, sampling.batch_size):
            positions = slice(start, min(start + sampling.batch_size, total))
            indices = self.slice_indices[positions]
            slices = normalise_intensity(volume_sf[indices], low, high)
            for update in seg.denoise_slices(slices, indices, sampling):
                result.trajectory[update.seed_index * sampling.steps + update.step_index, :, positions] = \
                    quantize(update.probabilities).transpose(1, 0, 2, 3)
                yield update
            labels, unc = fuse_slices(result.trajectory[:, :, positions], sampling, shape, seg.postprocess)
            labels_sf[indices] = labels
            unc_sf[indices] = unc
            result.completed[positions] = True
            yield SlicesDone(indices, labels, unc, int(result.completed.sum()), total)


class Segmenter:
    """A trained model plus its preprocessing, on a device; turns volumes into segmentations."""

    def __init__(self, model: torch.nn.Module, config: ExperimentConfig, device: str | torch.device = "auto",
                 checkpoint: Optional[Checkpoint] = None):
        self.config = config
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.schedule = NoiseSchedule(config.diffusion)
        self.checkpoint_path: Optional[Path] = checkpoint.path if checkpoint else None
        self.checkpoint_sha256 = checkpoint.sha256 if checkpoint else ""
        self.checkpoint_extra = checkpoint.extra if checkpoint else {}
        # LSegDiff cleans its consensus labels morphologically; the pixel family has no such step.
        self.postprocess: Optional[Callable[[np.ndarray], np.ndarray]] = getattr(model, "postprocess", None)

    @classmethod
    def from_checkpoint(cls, path: str | Path | None = None, device: str | torch.device = "auto") -> "Segmenter":
        """Load a checkpoint (None = the bundled default model) onto ``device`` ('auto', 'cpu', 'cuda')."""
        checkpoint = load_checkpoint(path)
        # The checkpoint holds the trained backbone: the pretrained file it started from is not needed.
        model = build_model(dataclasses.replace(checkpoint.config.model, backbone_weights=None))
        load_model_weights(model, checkpoint)
        return cls(model, checkpoint.config, device=device, checkpoint=checkpoint)

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.config.model.class_names)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def provenance(self, sampling: SamplingConfig) -> dict:
        return {
            "medconddiff_version": __version__,
            "checkpoint": str(self.checkpoint_path) if self.checkpoint_path else None,
            "checkpoint_sha256": self.checkpoint_sha256,
            "model": dataclasses.asdict(self.config.model),
            "preprocess": dataclasses.asdict(self.config.preprocess),
            "diffusion": dataclasses.asdict(self.config.diffusion),
            "sampling": dataclasses.asdict(sampling),
            "device": str(self.device),
            "torch": torch.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        }

    def run(self, volume: np.ndarray, sampling: SamplingConfig | None = None,
            slices: Optional[Iterable[int]] = None) -> SegmentationRun:
        """A lazy run over the volume; nothing is computed until it is iterated."""
        return SegmentationRun(self, volume, sampling or SamplingConfig(), slices)

    def segment(self, volume: np.ndarray, sampling: SamplingConfig | None = None,
                slices: Optional[Iterable[int]] = None,
                progress: Optional[Callable[[int, int], None]] = None) -> SegmentationResult:
        """Run to the end; ``progress(completed, total)`` is called after every batch of slices."""
        run = self.run(volume, sampling, slices)
        for event in run:
            if progress is not None and isinstance(event, SlicesDone):
                progress(event.completed, event.total)
        return run.result

    def _model_input(self, slices: np.ndarray) -> torch.Tensor:
        return to_model_input(slices, self.config.model.image_size, self.device)

    @torch.inference_mode()
    def denoise_slices(self, slices: np.ndarray, slice_indices: Sequence[int], sampling: SamplingConfig
                       ) -> Iterator[StepUpdate]:
        """Diffusion for a batch of normalised slices (B, H, W); one StepUpdate per step and seed."""
        image = self._model_input(slices)
        batch, size = image.shape[0], image.shape[-1]
        with self._autocast():
            condition = self.model.encode_condition(image)
        for seed_index in range(sampling.num_seeds):
            # Latent states are not in [-1, 1]: the model says how far x̂_0 is clipped (None = not at all).
            scheduler = make_scheduler(sampling.scheduler, self.schedule, sampling.steps, eta=sampling.eta,
                                       clip_range=getattr(self.model, "state_clip_range", 1.0))
            x_t = self._initial_noise(batch, size, sampling.seed + seed_index, slice_indices)
            # Step noise (DDPM, DDIM eta>0) comes from a stream of its own, keyed like the initial noise.
            _, generator = initial_noise((1,), _stream_seed(sampling.seed + seed_index, int(slice_indices[0])) + 1)

            def denoise(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                cond = condition
                with self._autocast():
                    if sampling.reextract_features:  # the reference code's behaviour, for benchmarks
                        cond = self.model.encode_condition(image)
                    x0, probs = self.model.denoise(x, t, cond)
                return x0.float(), probs.float()

            for step in sample_progressive(denoise, scheduler, x_t, generator):
                yield StepUpdate(np.asarray(slice_indices), seed_index, step.index, step.num_steps,
                                 sampling.num_seeds, step.probabilities.cpu().numpy())

    def _initial_noise(self, batch: int, size: int, seed: int, slice_indices: Sequence[int]) -> torch.Tensor:
        # One stream per slice, so a slice's result does not depend on which batch it landed in.
        noise = [initial_noise(self.model.state_shape(1, size, size), _stream_seed(seed, int(i)))[0]
                 for i in slice_indices]
        return torch.cat(noise).to(self.device)

    @torch.inference_mode()
    def one_shot(self, volume: np.ndarray, slices: Optional[Iterable[int]] = None, batch_size: int = 16
                 ) -> np.ndarray:
        """Deterministic single forward (x_T = 0 at the last timestep): the no-diffusion baseline."""
        volume = check_volume(volume)
        axis = self.config.preprocess.slice_axis
        volume_sf = np.moveaxis(volume, axis, 0)
        labels = np.zeros(volume.shape, np.uint8)
        labels_sf = np.moveaxis(labels, axis, 0)
        low, high = intensity_range(volume, self.config.preprocess)
        indices = np.arange(volume_sf.shape[0]) if slices is None else np.asarray(list(slices))
        last = self.schedule.num_train_timesteps - 1
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            image = self._model_input(normalise_intensity(volume_sf[chunk], low, high))
            size = image.shape[-1]
            x_t = torch.zeros(self.model.state_shape(len(chunk), size, size), device=self.device)
            t = torch.full((len(chunk),), last, device=self.device, dtype=torch.long)
            with self._autocast():
                _, probs = self.model.denoise(x_t, t, self.model.encode_condition(image))
            chunk_labels = labels_at(probs, volume_sf.shape[1:])
            labels_sf[chunk] = self.postprocess(chunk_labels) if self.postprocess is not None else chunk_labels
        return labels
