"""What runs in the widget's worker threads: load a checkpoint, then run the Segmenter.

Two phases, so the GUI can add the result layers between them (adding napari layers is GUI work
that should not compete with a running diffusion): :func:`prepare_run` loads the model and sets
the run up from plain data (the layer's array, metadata and scale) and returns :class:`RunStarted`;
:func:`iterate_run` then streams the Segmenter's own ``StepUpdate``/``SlicesDone`` events, which
the GUI thread applies to the layers. torch is imported here, in a worker, through
:mod:`napari_medconddiff._torch_import`; nothing here touches Qt or shown layers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import numpy as np

from medconddiff.config import SamplingConfig

from ._geometry import layer_axis_of
from ._layers import layer_to_volume

SLICE_MODES = ("current", "all", "range")

# Slices denoised together. On CPU small batches let finished slices appear (and the progress bar
# move) every few seconds; a GPU wants larger ones. Results do not depend on the batch size: every
# slice draws its noise from a stream of its own.
CPU_BATCH_SIZE = 4
GPU_BATCH_SIZE = 16


class DefaultModelMissing(FileNotFoundError):
    """The bundled default checkpoint is not installed."""


@dataclass(frozen=True)
class SliceChoice:
    """Which slices to segment: the one under the dims slider, all of them, or first..last."""

    mode: str = "all"
    point: tuple[float, ...] = ()   # the dims position in the scan layer's data coordinates
    first: int = 0
    last: int = 0                   # inclusive

    def __post_init__(self) -> None:
        if self.mode not in SLICE_MODES:
            raise ValueError(f"slice mode must be one of {SLICE_MODES}, not {self.mode!r}")


@dataclass
class SegmentRequest:
    data: Any                       # the scan layer's data (layer axis order; numpy or array-like)
    metadata: dict
    scale: tuple[float, ...]
    checkpoint: Optional[str]       # None: the bundled default model; a path or a bundled model name
    device: str
    sampling: SamplingConfig
    slices: SliceChoice = field(default_factory=SliceChoice)


@dataclass
class RunStarted:
    """The model is loaded and the run is set up; ``run.result`` is what Cancel keeps."""

    run: Any                        # medconddiff.segmenter.SegmentationRun
    class_names: tuple[str, ...]
    slice_axis: int
    image_size: int
    sampling: SamplingConfig
    slice_indices: np.ndarray
    device: str
    checkpoint: str

    @property
    def total_steps(self) -> int:
        return self.sampling.steps * self.sampling.num_seeds


@dataclass
class EngineInfo:
    devices: list[str]
    default_checkpoint: str
    default_checkpoint_exists: bool


def probe_engine() -> EngineInfo:
    """Import the engine (off the GUI thread) and report devices and the bundled model's state.

    It also imports, here in the background, what the first run would otherwise import on the GUI
    thread and stall it for a second or more: timm (loaded when a model is built) and the modules
    napari needs for a Labels layer with features (pandas, scipy).
    """
    segmenter = import_engine()
    import timm  # noqa: F401

    from napari.layers import Labels

    Labels(np.zeros((1, 1), np.uint8), features={"index": [0], "class": ["background"]},
           colormap={None: (1, 1, 1, 1), 0: (0, 0, 0, 0)})  # a model object only: never shown
    from medconddiff.checkpoint import default_checkpoint_path

    path = default_checkpoint_path()
    return EngineInfo(segmenter.available_devices(), str(path), path.is_file())


def import_engine():
    from ._torch_import import import_segmenter

    return import_segmenter()


def resolve_slices(choice: SliceChoice, volume_shape: tuple[int, ...], slice_axis: int, layer_ndim: int
                   ) -> np.ndarray:
    """Slice indices along the engine's ``slice_axis`` of the NIfTI-ordered volume."""
    count = volume_shape[slice_axis]
    if choice.mode == "all":
        return np.arange(count)
    if choice.mode == "current":
        layer_axis = layer_axis_of(slice_axis, layer_ndim)
        if layer_axis is None:          # a 2-D image: its one slice
            return np.arange(count)
        if layer_axis >= len(choice.point):
            raise ValueError("the current slice position is unknown; choose 'All slices' or a range")
        index = int(np.clip(np.round(choice.point[layer_axis]), 0, count - 1))
        return np.array([index])
    if not 0 <= choice.first <= choice.last < count:
        raise ValueError(f"slice range {choice.first}–{choice.last} is outside this scan's slices 0–{count - 1}")
    return np.arange(choice.first, choice.last + 1)


def prepare_run(request: SegmentRequest) -> RunStarted:
    """Load the model and set the run up (worker thread); nothing is denoised yet."""
    engine = import_engine()
    from medconddiff.checkpoint import default_checkpoint_path

    if request.checkpoint is None and not default_checkpoint_path().is_file():
        raise DefaultModelMissing(f"the bundled default model is not installed yet ({default_checkpoint_path()}); "
                                  "choose 'Checkpoint file…' and pick a .safetensors checkpoint")
    segmenter = engine.Segmenter.from_checkpoint(request.checkpoint, device=request.device)
    layer_ndim = np.ndim(request.data[0] if isinstance(request.data, (list, tuple)) else request.data)
    volume, _ = layer_to_volume(request.data, request.metadata, scale=request.scale)
    axis = segmenter.config.preprocess.slice_axis
    if layer_ndim == 2 and axis != 2:
        raise ValueError(f"this model slices volume axis {axis}; it cannot segment a 2-D image")
    slices = resolve_slices(request.slices, volume.shape, axis, layer_ndim)
    batch = GPU_BATCH_SIZE if segmenter.device.type == "cuda" else CPU_BATCH_SIZE
    sampling = dataclasses.replace(request.sampling, batch_size=batch)
    run = segmenter.run(volume, sampling, slices)
    return RunStarted(run=run, class_names=segmenter.class_names, slice_axis=axis,
                      image_size=segmenter.config.model.image_size, sampling=sampling,
                      slice_indices=run.slice_indices, device=str(segmenter.device),
                      checkpoint=str(segmenter.checkpoint_path))


def iterate_run(run: Any) -> Iterator[Any]:
    """Generator for napari's thread_worker: the Segmenter's StepUpdate/SlicesDone events.

    ``worker.quit()`` stops it at the next yield (within one denoising step); ``run.result`` then
    holds the finished slices.
    """
    for event in run:
        yield event
    return run.result
