"""What runs in worker threads: load a checkpoint, run the Segmenter, re-fuse, fine-tune, save.

Every function here takes and returns plain data (arrays, dataclasses, the engine's own objects)
and touches neither Qt nor shown layers, so the controller can run them in napari's
``thread_worker`` or, in tests, synchronously. torch is imported here, in the worker, through
:mod:`napari_medconddiff._torch_import`.

Segmentation has two phases so that the GUI can add or update result layers in between (and ask
the user about edited slices): :func:`prepare_run` loads the model (cached) and sets the run up;
:func:`iterate_run` streams the Segmenter's ``StepUpdate``/``SlicesDone`` events.

A model trained on several channels (an MRI's FLAIR, T1, T1c, T2: ``plan.channel_names``) takes
the scan as the selected layer (channel 0) plus one further layer per channel, in the model's
order: each is read into file order through its own :class:`LayerSpace`, checked to lie on the
scan's grid, and stacked channels-last, as :func:`medconddiff.nifti.load_channels` gives them.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from medconddiff.config import SamplingConfig

from medconddiff.errors import SliceSpecError, UserInputError

from ._geometry import LayerSpace, ScanSpace
from ._layers import full_resolution

SLICE_MODES = ("current", "all", "range", "list", "typed")

# Slices denoised together. On CPU small batches let finished slices appear (and the progress bar
# move) every few seconds; a GPU wants larger ones. Results do not depend on the batch size: every
# slice draws its noise from a stream of its own.
CPU_BATCH_SIZE = 4
GPU_BATCH_SIZE = 16
# Slices re-fused at once (bounds the memory of the model-grid probabilities).
REFUSE_CHUNK = 32
# The channels of one scan must lie on one grid: their affines may differ by this much (mm), as
# load_channels allows for one file per channel (rounding in the headers, nothing more).
CHANNEL_AFFINE_TOLERANCE_MM = 1e-3


class DefaultModelMissing(FileNotFoundError):
    """The bundled default checkpoint is not installed."""


@dataclass(frozen=True)
class SliceChoice:
    """Which canonical slices to segment: the one through the dims point, all, first..last, a list, or
    a slice list as typed (:mod:`medconddiff.slice_lists`, read against the scan's own slice count)."""

    mode: str = "all"
    point: tuple[float, ...] = ()   # the dims position in the scan layer's data coordinates
    first: int = 0
    last: int = 0                   # inclusive
    indices: tuple[int, ...] = ()   # mode "list"
    text: str = ""                  # mode "typed", e.g. "40-42, 50:55"

    def __post_init__(self) -> None:
        if self.mode not in SLICE_MODES:
            raise ValueError(f"slice mode must be one of {SLICE_MODES}, not {self.mode!r}")


@dataclass
class ChannelLayer:
    """A further channel of a multi-channel scan: an Image layer as the worker needs it."""

    name: str
    data: Any                       # full resolution, layer axis order: the controller's own copy, or a lazy array
    metadata: dict
    scale: tuple[float, ...]
    view_axes: tuple[int, ...]


@dataclass
class SegmentRequest:
    data: Any                       # the scan at full resolution, layer axis order: a copy of its own, or lazy
    metadata: dict
    scale: tuple[float, ...]
    view_axes: tuple[int, ...]      # (slider, rows, columns) layer axes: how a plain layer is shown
    checkpoint: str                 # a bundled model's name or a checkpoint path
    device: str
    sampling: SamplingConfig
    slices: SliceChoice = field(default_factory=SliceChoice)
    name: str = "the scan"          # the scan layer's name, for messages
    channels: tuple[ChannelLayer, ...] = ()   # the model's channels 1…C-1, in its order


@dataclass
class RunStarted:
    """The model is loaded and the run is set up; ``run.result`` is what Cancel keeps."""

    run: Any                        # medconddiff.segmenter.SegmentationRun
    space: ScanSpace
    class_names: tuple[str, ...]
    sampling: SamplingConfig
    slice_indices: np.ndarray
    device: str
    checkpoint: str
    channel_spaces: tuple[LayerSpace, ...] = ()   # where each further channel layer's voxels are

    @property
    def total_steps(self) -> int:
        return self.sampling.steps * self.sampling.num_seeds


@dataclass
class EngineInfo:
    devices: list[str]
    default_checkpoint: str
    default_checkpoint_exists: bool


def import_engine():
    from ._torch_import import import_segmenter

    return import_segmenter()


def probe_engine() -> EngineInfo:
    """Import the engine (off the GUI thread) and report devices and the bundled model's state.

    It also imports, here in the background, what the first run would otherwise import on the GUI
    thread and stall it for a second or more: timm (loaded when a model is built) and the modules
    napari needs for a Labels layer with features (pandas, scipy).
    """
    segmenter = import_engine()
    from medconddiff.backbone import import_timm

    import_timm()

    from napari.layers import Labels

    Labels(np.zeros((1, 1), np.uint8), features={"index": [0], "class": ["background"]},
           colormap={None: (1, 1, 1, 1), 0: (0, 0, 0, 0)})  # a model object only: never shown
    from medconddiff.checkpoint import default_checkpoint_path

    path = default_checkpoint_path()
    return EngineInfo(segmenter.available_devices(), str(path), path.is_file())


class SegmenterCache:
    """Loaded Segmenters by (checkpoint file, its mtime and size, device): a second Segment with the
    same model reuses the loaded weights instead of reading and hashing the checkpoint again, and a
    checkpoint rewritten on disk is loaded afresh."""

    def __init__(self, size: int = 2):
        self.size = size
        self._items: dict[tuple, Any] = {}
        self._lock = threading.Lock()

    @staticmethod
    def key(checkpoint: str, device: str) -> tuple:
        from medconddiff.checkpoint import resolve_checkpoint

        path = resolve_checkpoint(checkpoint).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path.name}")   # no patient's folder
        stat = path.stat()
        return (str(path), stat.st_mtime_ns, stat.st_size, device)

    def get(self, checkpoint: str, device: str) -> Any:
        """The Segmenter of ``checkpoint`` on ``device`` (worker thread: may load it)."""
        engine = import_engine()
        key = self.key(checkpoint, device)
        with self._lock:
            if key in self._items:
                self._items[key] = self._items.pop(key)     # most recently used last
                return self._items[key]
        segmenter = engine.Segmenter.from_checkpoint(key[0], device=device)
        with self._lock:
            self._items[key] = segmenter
            while len(self._items) > self.size:
                self._items.pop(next(iter(self._items)))
        return segmenter


def resolve_slices(choice: SliceChoice, space: ScanSpace) -> np.ndarray:
    """Canonical slice indices (along the model's slicing direction) of a slice choice."""
    count = space.n_slices
    if choice.mode == "all":
        return np.arange(count)
    if choice.mode == "current":
        if space.slice_layer_axis is not None and len(choice.point) < space.layer.layer_ndim:
            raise SliceSpecError("the current slice position is unknown; choose 'All slices' or a range")
        return np.array([space.slice_at(choice.point)])
    if choice.mode == "range":
        if not 0 <= choice.first <= choice.last < count:
            raise SliceSpecError(f"slice range {choice.first}–{choice.last} is outside this scan's slices "
                                 f"0–{count - 1} ({space.geometry.slicing} slices)")
        return np.arange(choice.first, choice.last + 1)
    if choice.mode == "typed":
        from medconddiff.slice_lists import parse_slice_spec

        typed = parse_slice_spec(choice.text, what="Range").indices(count, where=f"this {space.geometry.slicing} scan")
        choice = dataclasses.replace(choice, indices=tuple(typed))
    indices = np.unique(np.asarray(choice.indices, dtype=np.int64))
    if len(indices) == 0:
        raise SliceSpecError("no slices to segment")
    if indices.min() < 0 or indices.max() >= count:
        raise SliceSpecError(f"slices {indices.min()}–{indices.max()} are outside this scan's slices "
                             f"0–{count - 1}")
    return indices


def check_checkpoint(checkpoint: str) -> None:
    """A missing bundled default model is a clear message, not a traceback."""
    from medconddiff.checkpoint import default_checkpoint_path, resolve_checkpoint

    if resolve_checkpoint(checkpoint) == default_checkpoint_path() and not default_checkpoint_path().is_file():
        raise DefaultModelMissing(f"the bundled default model is not installed yet ({default_checkpoint_path()}); "
                                  "choose 'Checkpoint file…' and pick a .safetensors checkpoint")


def checkpoint_config(checkpoint: str) -> Optional[dict]:
    """A checkpoint's config as recorded in the file's metadata, read without torch or its weights; None
    when the file cannot tell (missing, not a checkpoint): loading it will then say what is wrong."""
    from safetensors import SafetensorError, safe_open

    from medconddiff.checkpoint import resolve_checkpoint

    try:
        with safe_open(str(resolve_checkpoint(checkpoint)), framework="np") as reader:
            config = json.loads((reader.metadata() or {})["config"])
    except (SafetensorError, OSError, KeyError, ValueError, TypeError):
        return None
    return config if isinstance(config, dict) else None


def model_channels(checkpoint: str) -> Optional[tuple[str, ...]]:
    """The input channels a checkpoint's model takes (``plan.channel_names``), from
    :func:`checkpoint_config`; None when the file cannot tell."""
    config = checkpoint_config(checkpoint)
    if config is None:
        return None
    plan = config.get("plan")
    if plan is None:
        return ("CT",)          # a format-1 checkpoint: one CT channel (see checkpoint._upgrade_legacy_config)
    if not isinstance(plan, dict):
        return None
    from medconddiff.config import PreprocessPlan

    names = plan.get("channel_names", PreprocessPlan().channel_names)    # a key left out has its default
    return tuple(str(name) for name in names) if isinstance(names, (list, tuple)) and names else None


def channel_count_problem(names: Sequence[str], given: int) -> Optional[str]:
    """What to do when a model taking channels ``names`` is given ``given`` layers (the scan and
    the ticked More channels), or None when they match."""
    expected = len(names)
    if given == expected:
        return None
    if expected == 1:
        return "this model takes one channel; untick More channels"
    wanted = f"the model expects {expected} channels ({', '.join(names)})"
    if given < expected:
        more = expected - given
        return f"{wanted}: pick {more} more layer{'s' if more > 1 else ''} under More channels"
    return f"{wanted}: tick only {expected - 1} layer{'s' if expected > 2 else ''} under More channels"


def channel_spaces(scan: LayerSpace, scan_data: np.ndarray, scan_scale: Sequence[float], scan_name: str,
                   channels: Sequence[ChannelLayer], slicing: str) -> list[LayerSpace]:
    """Where each further channel layer's voxels are, checked to be the scan's voxels: the same
    file-ordered shape and affine (within :data:`CHANNEL_AFFINE_TOLERANCE_MM`); else a ValueError
    naming the layer."""
    spaces = []
    share = "the channels of a scan must share one grid (resample it onto the scan first)"
    for channel in channels:
        data = np.asarray(full_resolution(channel.data))
        space = LayerSpace.of_layer(data.ndim, channel.metadata, channel.scale, channel.view_axes, slicing)
        if space.plain != scan.plain:
            # Only one of the two layers knows its anatomy, so their geometries cannot be compared. A layer
            # drawn voxel for voxel over the scan (same shape and voxel size, e.g. computed from it in
            # napari) holds the scan's voxels: it is read the way the scan is.
            same_size = len(channel.scale) == len(scan_scale) and np.allclose(
                np.abs(channel.scale), np.abs(scan_scale), atol=CHANNEL_AFFINE_TOLERANCE_MM)
            if data.shape != scan_data.shape or not same_size:
                raise UserInputError(f"'{channel.name}' (shape {data.shape}, voxel size {_sizes(channel.scale)}) is "
                                     f"not drawn voxel for voxel over '{scan_name}' (shape {scan_data.shape}, voxel "
                                     f"size {_sizes(scan_scale)}); {share}")
            space = scan
        if space.file_view(data).shape != scan.file_view(scan_data).shape:
            raise UserInputError(f"'{channel.name}' has shape {data.shape} but '{scan_name}' has "
                                 f"{scan_data.shape}; {share}")
        difference = float(np.abs(space.meta.affine - scan.meta.affine).max())
        if difference > CHANNEL_AFFINE_TOLERANCE_MM:
            raise UserInputError(f"'{channel.name}' lies elsewhere than '{scan_name}': their affines differ by "
                                 f"up to {difference:.4g} mm; {share}")
        spaces.append(space)
    return spaces


def _sizes(scale: Sequence[float]) -> str:
    return " × ".join(f"{abs(float(s)):g}" for s in scale) + " mm"


def stack_channels(volume: np.ndarray, channels: Sequence[np.ndarray]) -> np.ndarray:
    """File-ordered channel 0 and further channels (same shape) → ``(i, j, k, C)`` float32, channels
    last: what the engine and :class:`~medconddiff.finetune.LabelledScan` take. With no further
    channels ``volume`` itself is returned: the caller hands in arrays of its own (the controller
    copies the layers on the GUI thread), never a layer's live buffer."""
    if not channels:
        return volume
    out = np.empty(volume.shape + (1 + len(channels),), np.float32)
    out[..., 0] = volume
    for index, channel in enumerate(channels, start=1):
        out[..., index] = channel
    return out


def prepare_run(request: SegmentRequest, cache: SegmenterCache) -> RunStarted:
    """Load the model (or reuse it) and set the run up (worker thread); nothing is denoised yet."""
    check_checkpoint(request.checkpoint)
    segmenter = cache.get(request.checkpoint, request.device)
    # The engine would say "give one file per channel": in the widget, the More channels row is what to change.
    problem = channel_count_problem(segmenter.plan.channel_names, 1 + len(request.channels))
    if problem is not None:
        raise UserInputError(problem)
    data = np.asarray(full_resolution(request.data))
    space = scan_space(segmenter, data.shape, request.metadata, request.scale, request.view_axes)
    layer_space = space.layer
    spaces = channel_spaces(layer_space, data, request.scale, request.name, request.channels,
                            segmenter.plan.slicing)
    volume = stack_channels(layer_space.file_view(data), [space.file_view(np.asarray(full_resolution(channel.data)))
                                                         for space, channel in zip(spaces, request.channels)])
    slices = resolve_slices(request.slices, space)
    batch = GPU_BATCH_SIZE if segmenter.device.type == "cuda" else CPU_BATCH_SIZE
    sampling = dataclasses.replace(request.sampling, batch_size=batch)
    run = segmenter.run(volume, sampling, slices, meta=layer_space.meta)
    return RunStarted(run=run, space=space, class_names=segmenter.class_names, sampling=sampling,
                      slice_indices=run.slice_indices, device=str(segmenter.device),
                      checkpoint=str(segmenter.checkpoint_path), channel_spaces=tuple(spaces))


def scan_space(segmenter: Any, shape: tuple[int, ...], metadata: dict, scale: tuple[float, ...],
               view_axes: tuple[int, ...]) -> ScanSpace:
    """How a scan layer of ``shape`` maps onto ``segmenter``'s canonical slices."""
    layer_space = LayerSpace.of_layer(len(shape), metadata, scale, view_axes, segmenter.plan.slicing)
    file_shape = layer_space.file_view(np.broadcast_to(np.uint8(0), shape)).shape[:3]
    return ScanSpace(layer_space, segmenter.preprocessor.geometry(file_shape, layer_space.meta))


@dataclass(frozen=True)
class SpaceRequest:
    """What :func:`prepare_space` needs of a scan layer (no voxels: the geometry is all it reads)."""

    shape: tuple[int, ...]
    metadata: dict
    scale: tuple[float, ...]
    view_axes: tuple[int, ...]
    checkpoint: str
    device: str


def prepare_space(request: SpaceRequest, cache: SegmenterCache) -> tuple[ScanSpace, tuple[str, ...]]:
    """Load the model (or reuse it) for its slicing and classes (worker thread): the scan's space and the
    model's class names."""
    check_checkpoint(request.checkpoint)
    segmenter = cache.get(request.checkpoint, request.device)
    space = scan_space(segmenter, request.shape, request.metadata, request.scale, request.view_axes)
    return space, tuple(segmenter.class_names)


def iterate_run(run: Any) -> Iterator[Any]:
    """Generator for a worker: the Segmenter's StepUpdate/SlicesDone events.

    Quitting the worker stops it at the next yield (within one denoising step); ``run.result``
    then holds the finished slices.
    """
    for event in run:
        yield event
    return run.result


@dataclass
class Refused:
    """One kept run fused again: labels/uncertainty (B, H, W) on the scan grid for canonical ``slices``."""

    run: Any
    sampling: SamplingConfig
    slices: np.ndarray
    labels: np.ndarray
    uncertainty: np.ndarray


def refuse_runs(runs: Sequence[Any], method: str, skip_first: int) -> list[Refused]:
    """Another consensus over each kept run's trajectory, for the slices it still shows.

    The same fusion as :meth:`SegmentationResult.refuse` (``fuse_slices``), computed only for the
    slices the layers show, so no full-volume arrays are made per run.
    """
    from medconddiff.consensus_choice import resolved_consensus
    from medconddiff.segmenter import fuse_slices

    import_engine()
    out = []
    for run in runs:
        # "auto": each run's own model's choice (runs of several models may share the layers).
        used = resolved_consensus(method, run.provenance, run.sampling)
        sampling = dataclasses.replace(run.sampling, consensus=used, skip_first=skip_first)
        positions = np.flatnonzero(run.shown)
        labels = np.zeros((len(positions),) + tuple(run.geometry.plane_shape), np.uint8)
        unc = np.zeros(labels.shape, np.float32)
        for start in range(0, len(positions), REFUSE_CHUNK):
            chunk = positions[start:start + REFUSE_CHUNK]
            one_shot = None if run.one_shot is None else run.one_shot[:, chunk]
            labels[start:start + len(chunk)], unc[start:start + len(chunk)] = fuse_slices(
                run.trajectory[:, :, chunk], sampling, run.geometry, run.postprocess, run.steps_used[chunk], one_shot)
        out.append(Refused(run, sampling, run.slice_indices[positions], labels, unc))
    return out


@dataclass
class FinetuneJob:
    """Everything a fine-tuning worker needs (plain data: file-ordered arrays and their meta)."""

    start: str                      # checkpoint path or bundled name
    name: str
    image: np.ndarray               # channel 0, file order
    meta: Any
    labels: np.ndarray
    slices: tuple[int, ...]
    class_names: tuple[str, ...]
    steps: Optional[int]              # None: the engine's default for the scans learned from
    seed: int
    device: str
    channels: tuple[np.ndarray, ...] = ()   # further channels (file order, the image's shape), stacked here
    scan_kind: str = "model"        # medconddiff.finetune.SCAN_KINDS: what the scan is, if not the model's kind
    training_set: Optional[Path] = None   # a training-set folder: every verified voxel of its cases too
    case_name: str = ""             # the scan's case name in that set (file or layer name)
    replay: bool = False            # mix in the slices the start model was trained on


def prepare_finetune(job: FinetuneJob, log: Callable[[str], None]) -> Any:
    """Set fine-tuning up (worker thread: slices resampled, model built from the start checkpoint)
    through :func:`medconddiff.finetune.finetune`, the path the command line takes."""
    import_engine()
    from medconddiff.checkpoint import load_checkpoint
    from medconddiff.finetune import LabelledScan, channel_names_of_kind, finetune

    start = load_checkpoint(job.start, allow_legacy=True)
    channel_names = channel_names_of_kind(job.scan_kind, start.config.plan.channel_names)
    image = stack_channels(job.image, job.channels)     # the scan the model segmented, all its channels
    slices, training_set, case = list(job.slices), None, None
    if job.training_set is not None:
        from medconddiff.training_set import TrainingSet, case_id_from_name

        training_set = TrainingSet.open(job.training_set)
        # The set's case of this scan, whatever name it was added under (found by its voxels).
        case = training_set.case_holding(image, job.meta)
        if case is not None:    # slices the set holds of this scan are trained once, from the set
            held = set(training_set.verified_slices(case, start.config.plan.slicing))
            slices = [s for s in slices if s not in held]
        else:                   # not in the set: a scan of its own, even if a case has its name
            case = case_id_from_name(job.case_name)
            case = case if case not in training_set.cases else f"{case} (not in the set)"
    # The scan names its case, so that the default steps count it once (layers, set or both).
    scans = [LabelledScan(job.name, image, job.meta, job.labels, slices, case=case)] if slices else []
    return finetune(start, scans, class_names=job.class_names, channel_names=channel_names, steps=job.steps,
                    seed=job.seed, device=job.device, log=log, training_set=training_set, replay=job.replay)


def iterate_finetune(run: Any) -> Iterator[Any]:
    """Generator for a worker: one TrainStep per optimizer step. Quitting stops after the step in
    progress; ``run`` keeps the weights of the last completed step (and can still be saved)."""
    for event in run:
        yield event
    return run


def save_finetuned(run: Any, path: Path, device: str, cache: SegmenterCache, overwrite: bool = False) -> Path:
    """Write the fine-tuned checkpoint and load it for re-segmenting. An existing file is replaced only
    with ``overwrite`` (the user's explicit yes)."""
    saved = run.save(path, overwrite=overwrite)
    cache.get(str(saved), device)
    return Path(saved)
