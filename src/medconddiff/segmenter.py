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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import torch

from . import __version__
from .checkpoint import Checkpoint, load_checkpoint, load_model_weights
from .config import ExperimentConfig, SamplingConfig
from .consensus import first_argmax, fuse, labels_from_probabilities, quantize, select_steps, uncertainty
from .families import build_model
from .model_interface import DiffusionSegmentationModel
from .nifti import VolumeMeta
from .preprocess import PreparedScan, ScanGeometry, ScanPreprocessor
from .sampling import initial_noise, sample_progressive
from .schedulers import NoiseSchedule, make_scheduler

#: ``postprocess(labels (B, H, W), model_pixel_area) -> labels``: a family's clean-up of consensus labels.
Postprocess = Callable[[np.ndarray, float], np.ndarray]


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

    def __post_init__(self) -> None:
        if self.steps_used is None:
            self.steps_used = np.full(len(self.slice_indices), self.sampling.steps, np.int16)

    @property
    def is_complete(self) -> bool:
        return bool(self.completed.all())

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
        """A new result with another consensus over the kept trajectory (no diffusion re-run)."""
        sampling = dataclasses.replace(self.sampling, consensus=method, skip_first=skip_first)
        labels = np.zeros_like(self.labels)
        unc = np.zeros_like(self.uncertainty)
        labels_sf, unc_sf = self.geometry.slice_view(labels), self.geometry.slice_view(unc)
        done = np.flatnonzero(self.completed)
        for start in range(0, len(done), chunk):
            positions = done[start:start + chunk]
            fused_labels, fused_unc = fuse_slices(self.trajectory[:, :, positions], sampling, self.geometry,
                                                  self.postprocess, self.steps_used[positions])
            labels_sf[self.slice_indices[positions]] = fused_labels
            unc_sf[self.slice_indices[positions]] = fused_unc
        return dataclasses.replace(self, labels=labels, uncertainty=unc, sampling=sampling)

    def step_labels_on_scan(self, step: int) -> np.ndarray:
        """One step's x̂_0 labels as canonical slices on the scan's grid: (n_slices, H, W) uint8."""
        return scan_labels(self.trajectory_step(step).transpose(1, 0, 2, 3), self.geometry)


def argmax_labels(probabilities: torch.Tensor) -> np.ndarray:
    """(B, K, H, W) probabilities → (B, H, W) uint8 labels on the host; equal to ``argmax(dim=1)``.

    torch's CPU arg-max over the class dimension is ~10× slower than comparing class planes, and at
    scan resolution (512²) it cost more than the whole fusion.
    """
    if probabilities.device.type == "cpu":
        return first_argmax(probabilities.numpy(), axis=1)
    return probabilities.argmax(dim=1).to(torch.uint8).cpu().numpy()


def scan_labels(probabilities: np.ndarray | torch.Tensor, geometry: ScanGeometry) -> np.ndarray:
    """(B, K, h, w) model-grid probabilities (float, or uint8-quantised) → (B, H, W) uint8 labels
    on the scan's grid: the one way a prediction becomes labels (bilinear, then arg-max)."""
    if isinstance(probabilities, np.ndarray):
        probabilities = torch.from_numpy(np.ascontiguousarray(probabilities, dtype=np.float32))
    return argmax_labels(geometry.to_scan_grid(probabilities.float()))


def model_pixel_area(geometry: ScanGeometry) -> float:
    """How many scan-grid pixels one model-grid pixel covers."""
    (H, W), (h, w) = geometry.plane_shape, geometry.model_shape
    return (H / h) * (W / w)


def fuse_slices(stack_uint8: np.ndarray, sampling: SamplingConfig, geometry: ScanGeometry,
                postprocess: Optional[Postprocess] = None, steps_used: Optional[np.ndarray] = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """(S, K, B, h, w) quantised trajectory → labels (B, H, W) uint8 and uncertainty (B, H, W) float32
    on the scan's grid. ``postprocess`` cleans the labels (not the uncertainty, which describes the
    raw trajectory). ``steps_used`` (B,): slices that stopped early fuse only the steps they took
    (skip-first then leaves at least their last step)."""
    if steps_used is not None and (np.asarray(steps_used) < sampling.steps).any():
        return _fuse_ragged(stack_uint8, sampling, geometry, postprocess, np.asarray(steps_used))
    fused = fuse(stack_uint8, sampling.consensus, sampling.skip_first, sampling.num_seeds)   # (K, B, h, w)
    labels_small = labels_from_probabilities(fused)
    unc_small = uncertainty(select_steps(stack_uint8, sampling.skip_first, sampling.num_seeds), fused, labels_small)
    labels = scan_labels(fused.transpose(1, 0, 2, 3), geometry)
    if postprocess is not None:
        labels = postprocess(labels, model_pixel_area(geometry))
    unc = geometry.to_scan_grid(torch.from_numpy(unc_small)[:, None])[:, 0].clamp_(0, 1).numpy()
    return labels, unc.astype(np.float32)


def _fuse_ragged(stack_uint8: np.ndarray, sampling: SamplingConfig, geometry: ScanGeometry,
                 postprocess: Optional[Postprocess], steps_used: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """fuse_slices for slices that took different numbers of steps: one fusion per step count."""
    H, W = geometry.plane_shape
    labels = np.zeros((len(steps_used), H, W), np.uint8)
    unc = np.zeros((len(steps_used), H, W), np.float32)
    for used in np.unique(steps_used):
        used = int(used)
        positions = np.flatnonzero(steps_used == used)
        entries = [seed * sampling.steps + i for seed in range(sampling.num_seeds) for i in range(used)]
        taken = dataclasses.replace(sampling, steps=used, skip_first=min(sampling.skip_first, used - 1))
        labels[positions], unc[positions] = fuse_slices(stack_uint8[entries][:, :, positions], taken, geometry,
                                                        postprocess)
    return labels, unc


def converged(previous: torch.Tensor, labels: torch.Tensor, tolerance: float) -> torch.Tensor:
    """(B,) bool: fewer than ``tolerance`` of each slice's foreground pixels changed label."""
    changed = (previous != labels).flatten(1).sum(1)
    foreground = ((previous > 0) | (labels > 0)).flatten(1).sum(1).clamp(min=1)
    return (changed == 0) | (changed < tolerance * foreground)


def _stream_seed(seed: int, slice_index: int) -> int:
    return (seed * 1_000_003 + slice_index * 2) % 2**62


def batches(indices: np.ndarray, sampling: SamplingConfig, geometry: ScanGeometry) -> Iterator[slice]:
    """Positions into ``indices`` of each batch: at most ``batch_size`` slices and (unless a single
    slice exceeds it) ``max_batch_pixels`` padded model pixels."""
    pixels = geometry.padded_shape[0] * geometry.padded_shape[1]
    size = max(1, min(sampling.batch_size, sampling.max_batch_pixels // pixels))
    for start in range(0, len(indices), size):
        yield slice(start, min(start + size, len(indices)))


class SegmentationRun:
    """An iterable run: iterate to drive it, stop iterating to cancel; ``result`` is always valid."""

    def __init__(self, segmenter: "Segmenter", volume: np.ndarray, sampling: SamplingConfig,
                 slices: Optional[Iterable[int]] = None, meta: Optional[VolumeMeta] = None):
        segmenter.config.check_sampling(sampling)
        self.segmenter = segmenter
        self.sampling = sampling
        self.scan: PreparedScan = segmenter.preprocessor.prepare(volume, meta)
        geometry = self.scan.geometry
        n = geometry.n_slices
        indices = np.arange(n) if slices is None else np.unique(np.asarray(list(slices), dtype=np.int64))
        if len(indices) == 0:
            raise ValueError("no slices selected")
        if indices.min() < 0 or indices.max() >= n:
            raise ValueError(f"slice indices must be in [0, {n}) ({geometry.slicing} slices of this scan), "
                             f"got {indices.min()}..{indices.max()}")
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
            steps_used=np.zeros(len(indices), np.int16))
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
            for update in seg.denoise_slices(image, indices, sampling, geometry.model_shape):
                where = np.searchsorted(self.slice_indices, update.slice_indices)
                kept = result.trajectory[update.seed_index * sampling.steps + update.step_index]
                for position, probabilities in zip(where, quantize(update.probabilities)):
                    kept[:, position] = probabilities   # basic indexing: a plain copy (fancy indexing was 10× slower)
                if update.seed_index == 0:
                    result.steps_used[where] = update.step_index + 1
                yield update
            labels, unc = fuse_slices(result.trajectory[:, :, positions], sampling, geometry, result.postprocess,
                                      result.steps_used[positions])
            labels_sf[indices] = labels
            unc_sf[indices] = unc
            result.completed[positions] = True
            yield SlicesDone(indices, labels, unc, int(result.completed.sum()), total)


class Segmenter:
    """A trained model plus its preprocessing plan, on a device; turns scans into segmentations."""

    def __init__(self, model: DiffusionSegmentationModel, config: ExperimentConfig,
                 device: str | torch.device = "auto", checkpoint: Optional[Checkpoint] = None):
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

    def provenance(self, sampling: SamplingConfig, scan: Optional[PreparedScan] = None) -> dict:
        record = {
            "medconddiff_version": __version__,
            "checkpoint": str(self.checkpoint_path) if self.checkpoint_path else None,
            "checkpoint_sha256": self.checkpoint_sha256,
            "model": dataclasses.asdict(self.config.model),
            "plan": dataclasses.asdict(self.config.plan),
            "diffusion": dataclasses.asdict(self.config.diffusion),
            "sampling": dataclasses.asdict(sampling),
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
                       model_shape: Optional[tuple[int, int]] = None) -> Iterator[StepUpdate]:
        """Diffusion for a batch of model inputs (B, C_in, Hp, Wp); one StepUpdate per step and seed,
        its probabilities cropped to ``model_shape`` (h, w) (default: uncropped)."""
        image = image.to(self.device).contiguous(memory_format=self.memory_format)
        batch, height, width = image.shape[0], image.shape[-2], image.shape[-1]
        h, w = model_shape or (height, width)
        with self.autocast(sampling.precision):
            condition = self.model.encode_condition(image)
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
                        cond = self.model.encode_condition(image[active.to(image.device)])
                    x0, probs = self.model.denoise(x, t, cond)
                return x0.float(), probs.float()

            keep = self._keep_fn(sampling, seed_index, steps_used, h, w) if sampling.adaptive else None
            for step in sample_progressive(denoise, scheduler, x_t, generators, keep):
                # Contiguous (B, K, h, w) on the host: channels-last strides would slow every later copy.
                probabilities = step.probabilities[..., :h, :w].contiguous().cpu().numpy()
                yield StepUpdate(np.asarray(slice_indices)[step.active.numpy()], seed_index, step.index,
                                 step.num_steps, sampling.num_seeds, probabilities)

    @staticmethod
    def _keep_fn(sampling: SamplingConfig, seed_index: int, steps_used: torch.Tensor, h: int, w: int):
        """Adaptive steps: the first seed stops each slice once its labels converged (``steps_used``
        records when); further seeds take the same number of steps per slice, so seeds stay comparable."""
        if seed_index > 0:
            return lambda step: step.index + 1 < steps_used[step.active]
        state: dict[str, torch.Tensor] = {}

        def keep(step) -> torch.Tensor:
            labels = torch.from_numpy(argmax_labels(step.probabilities[..., :h, :w].contiguous().cpu()))
            streak = state.get("streak", torch.zeros(len(step.active), dtype=torch.long))
            if "labels" in state:
                streak = torch.where(converged(state["labels"], labels, sampling.convergence_change), streak + 1, 0)
            go_on = streak < sampling.convergence_patience
            steps_used[step.active[~go_on]] = step.index + 1
            state["labels"], state["streak"] = labels[go_on], streak[go_on]
            return go_on

        return keep

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
        indices = np.arange(geometry.n_slices) if slices is None else np.asarray(list(slices))
        last = self.schedule.num_train_timesteps - 1
        sampling = SamplingConfig(batch_size=batch_size, precision=precision)
        for positions in batches(indices, sampling, geometry):
            chunk = indices[positions]
            image = scan.forward(chunk, self.device).contiguous(memory_format=self.memory_format)
            x_t = torch.zeros(self.model.state_shape(len(chunk), *image.shape[-2:]), device=self.device)
            x_t = x_t.contiguous(memory_format=self.memory_format)
            t = torch.full((len(chunk),), last, device=self.device, dtype=torch.long)
            with self.autocast(precision):
                _, probs = self.model.denoise(x_t, t, self.model.encode_condition(image))
            chunk_labels = scan_labels(geometry.crop(probs.float()).cpu(), geometry)
            labels_sf[chunk] = self.model.postprocess(chunk_labels, model_pixel_area(geometry))
        return labels
