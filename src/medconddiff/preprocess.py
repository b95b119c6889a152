"""The one path from a scan to model slices and from model outputs back to the scan's grid.

Inference (the :class:`~medconddiff.segmenter.Segmenter`'s run and one-shot), training crops and
evaluation all go through :class:`ScanPreprocessor`, following the checkpoint's
:class:`~medconddiff.config.PreprocessPlan`:

1. **Orientation.** The scan is viewed in the closest canonical orientation (RAS; a permutation
   and flips of its axes, so nothing is interpolated and results map back exactly). A scan without
   a usable affine is taken in voxel order, with a warning.
2. **Slicing.** Canonical slices are cut across the plan's direction (axial: along S).
3. **Intensity.** Each channel is normalised by the plan's scheme (a fixed CT window, or the scan's
   own percentiles / z-score), with statistics computed once per scan.
4. **Spacing.** Each slice is resampled in-plane to the plan's spacing, keeping its aspect ratio
   and field of view, and padded to a multiple of the network stride (the network is fully
   convolutional: no fixed input size).
5. **Back.** Model probabilities are cropped, resampled to the scan's in-plane grid (bilinear),
   then turned into labels by arg-max, and written through a view into arrays in the scan's own
   voxel order.

Arrays here: volumes in file order ``(i, j, k)`` or ``(i, j, k, C)`` with channels last, as
:func:`medconddiff.nifti.load_volume` returns them; spacing in mm per file axis (``meta.spacing``).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .config import NETWORK_STRIDE, PreprocessPlan
from .errors import UserInputError
from .geometry import SLICE_AXIS, Orientation
from .hounsfield import looks_like_hounsfield  # noqa: F401  (re-exported: finetune and callers use it from here)
from .nifti_read import sanitize_nonfinite
from .profiling import PREPROCESS, engine_part
from .volume_meta import VolumeMeta, spatial_shape_3d

#: Voxels used to estimate a scan's intensity percentiles (a regular subsample: same result,
#: a fraction of the memory and time on a 512×512×300 scan).
PERCENTILE_SAMPLE = 2_000_000


class ScanError(UserInputError):
    """A scan the model cannot be run on (wrong dimensionality, no finite voxels, ...)."""


def check_volume(volume: np.ndarray) -> np.ndarray:
    """A float32 ``(i, j, k)`` or ``(i, j, k, C)`` array, or a clear ScanError.

    2-D images become one slice ``(X, Y, 1)``; NaN/Inf voxels are replaced by the lowest finite
    intensity with a warning.
    """
    cleaned, bad = checked_volume_and_nonfinite(volume)
    if bad:
        warnings.warn(nonfinite_note(bad), stacklevel=2)
    return cleaned


def checked_volume_and_nonfinite(volume: np.ndarray) -> tuple[np.ndarray, int]:
    """:func:`check_volume` without its warning: the checked float32 volume and how many NaN/Inf voxels
    it replaced (for a note that names the scan, as a run's notes do)."""
    volume = np.asarray(volume)
    if volume.ndim == 2:
        volume = volume[..., None]
    if volume.ndim not in (3, 4):
        raise ScanError(f"expected a 2-D or 3-D scan (or 3-D with channels last), got {volume.ndim}-D data "
                        f"of shape {volume.shape}")
    if volume.dtype.kind not in "fiub":
        raise ScanError(f"scan data must be numeric, got dtype {volume.dtype}")
    if min(volume.shape) == 0:
        raise ScanError(f"the scan is empty (shape {volume.shape})")
    cleaned, bad = sanitize_nonfinite(volume.astype(np.float32, copy=False))
    if bad == volume.size:
        raise ScanError("the scan has no finite voxel (all NaN or Inf)")
    return cleaned, int(bad)


def nonfinite_note(count: int) -> str:
    return f"{count} NaN/Inf voxels were replaced by the lowest finite intensity"


def with_channels(volume: np.ndarray, expected: int) -> np.ndarray:
    """``(i, j, k)`` → ``(i, j, k, 1)``; a channel count the model does not expect is a ScanError."""
    if volume.ndim == 3:
        volume = volume[..., None]
    if volume.shape[3] != expected:
        raise ScanError(f"the model expects {expected} channel(s) but the scan has {volume.shape[3]}; "
                        + ("give one file (or layer) per channel in the model's order" if expected > 1 else
                           "choose one channel of the 4-D scan (--channel)"))
    return volume


@dataclass(frozen=True)
class ChannelIntensity:
    """``(clip(x, low, high) - center) / scale``: one channel's intensity normalisation."""

    low: float
    high: float
    center: float
    scale: float

    @property
    def background(self) -> float:
        """The normalised value of the low clip: what padding and out-of-view voxels get."""
        return (self.low - self.center) / self.scale

    def apply(self, values: np.ndarray) -> np.ndarray:
        out = np.clip(values, self.low, self.high).astype(np.float32, copy=False)
        out -= np.float32(self.center)
        out /= np.float32(self.scale)
        return out

    def to_dict(self) -> dict:
        return {"low": self.low, "high": self.high, "center": self.center, "scale": self.scale}


def _subsample(values: np.ndarray) -> np.ndarray:
    flat = values.reshape(-1) if values.flags.c_contiguous else np.ascontiguousarray(values).reshape(-1)
    step = max(1, flat.size // PERCENTILE_SAMPLE)
    return flat[::step]


def channel_intensity(channel: np.ndarray, scheme: str, plan: PreprocessPlan) -> ChannelIntensity:
    """The normalisation of one channel (a 3-D array) under ``scheme``."""
    if scheme == "ct_window":
        low, high = (float(v) for v in plan.window)
    else:
        sample = _subsample(channel)
        low, high = (float(v) for v in np.percentile(sample, plan.percentiles))
    if scheme in ("ct_window", "percentile"):
        if not high > low:   # a constant scan: nothing to see; map it to mid-grey, never divide by zero
            return ChannelIntensity(low, low, low, 1.0)
        return ChannelIntensity(low, high, (low + high) / 2, (high - low) / 2)
    sample = np.clip(_subsample(channel), low, high)
    body = sample[sample > low]
    body = body if body.size >= 16 else sample
    mean, std = float(body.mean()), float(body.std())
    return ChannelIntensity(low, high, mean, std if std > 1e-6 else 1.0)


def hounsfield_note(plan: PreprocessPlan, channels: Sequence[int]) -> str:
    names = ", ".join(f"{c} ({plan.channel_names[c]})" for c in channels)
    low, high = (f"{v:g}" for v in plan.window)
    return (f"channel {names} has no voxel below 0, so it does not look like CT in Hounsfield units, "
            f"yet the model applies its CT window [{low}, {high}] HU; to fine-tune on MRI or other images, say "
            "what the scan is (napari: Fine-tune, Scan is; command line: finetune --channel-names)")


@dataclass(frozen=True)
class ScanGeometry:
    """Where a scan's slices come from and where results go back: orientation, grids, sizes.

    ``plane_shape`` (H, W) is a canonical slice on the scan's grid, ``model_shape`` (h, w) the same
    field of view at the plan's spacing, ``padded_shape`` (Hp, Wp) that grid padded at its far
    edges to a multiple of the network stride.
    """

    file_shape: tuple[int, int, int]
    orientation: Orientation
    slice_axis: int                        # canonical axis that is sliced
    slicing: str                           # its anatomical name
    canonical_spacing: tuple[float, float, float]
    plane_shape: tuple[int, int]
    model_shape: tuple[int, int]
    padded_shape: tuple[int, int]
    notes: tuple[str, ...] = ()

    @property
    def canonical_shape(self) -> tuple[int, ...]:
        return self.orientation.to_canonical.shape(self.file_shape)

    @property
    def n_slices(self) -> int:
        return self.canonical_shape[self.slice_axis]

    @property
    def plane_axes(self) -> tuple[int, int]:
        return tuple(a for a in range(3) if a != self.slice_axis)  # type: ignore[return-value]

    @property
    def plane_spacing(self) -> tuple[float, float]:
        return tuple(self.canonical_spacing[a] for a in self.plane_axes)  # type: ignore[return-value]

    @property
    def slice_spacing(self) -> float:
        return self.canonical_spacing[self.slice_axis]

    def slice_view(self, array: np.ndarray, first_axis: int = 0) -> np.ndarray:
        """View of a file-order array (axes ``first_axis``…+2; others ride along) as canonical
        slices, slice axis first: ``view[s]`` is canonical slice ``s`` (H, W, ...). Writable."""
        canonical = self.orientation.to_canonical.apply(array, first_axis)
        return np.moveaxis(canonical, first_axis + self.slice_axis, first_axis)

    def to_model_grid(self, slices: torch.Tensor, pad_values: Sequence[float] | float = 0.0,
                      mode: str = "bilinear") -> torch.Tensor:
        """(B, C, H, W) scan-grid slices → (B, C, Hp, Wp): resampled to the plan's spacing, padded."""
        if tuple(slices.shape[-2:]) != self.plane_shape:
            raise ValueError(f"slices of shape {tuple(slices.shape[-2:])} are not this scan's {self.plane_shape}")
        if tuple(slices.shape[-2:]) != self.model_shape:
            if mode == "nearest":
                slices = F.interpolate(slices, size=self.model_shape, mode="nearest-exact")
            else:
                slices = F.interpolate(slices, size=self.model_shape, mode="bilinear", align_corners=False,
                                       antialias=True)
        return pad_to(slices, self.padded_shape, pad_values)

    def crop(self, padded: torch.Tensor) -> torch.Tensor:
        """(B, K, Hp, Wp) → (B, K, h, w): drop the stride padding."""
        h, w = self.model_shape
        return padded[..., :h, :w]

    def to_scan_grid(self, probabilities: torch.Tensor) -> torch.Tensor:
        """(B, K, h, w) (or padded) model-grid probabilities → (B, K, H, W) on the scan's grid, bilinear."""
        if tuple(probabilities.shape[-2:]) == self.padded_shape:
            probabilities = self.crop(probabilities)
        if tuple(probabilities.shape[-2:]) == self.plane_shape:
            return probabilities
        return F.interpolate(probabilities, size=self.plane_shape, mode="bilinear", align_corners=False)

    def to_dict(self) -> dict:
        """What a sidecar records about how the scan was seen."""
        return {
            "file_axis_codes": list(self.orientation.file_codes),
            "orientation_known": self.orientation.known,
            "to_canonical": self.orientation.to_canonical.to_dict(),
            "slicing": self.slicing,
            "canonical_slice_axis": self.slice_axis,
            "slices": self.n_slices,
            "scan_plane": list(self.plane_shape),
            "scan_plane_spacing_mm": [round(s, 6) for s in self.plane_spacing],
            "model_plane": list(self.model_shape),
            "padded_plane": list(self.padded_shape),
            "notes": list(self.notes),
        }


def pad_to(tensor: torch.Tensor, shape: tuple[int, int], values: Sequence[float] | float = 0.0) -> torch.Tensor:
    """Pad (B, C, h, w) at the bottom/right to ``shape`` with a constant per channel."""
    h, w = tensor.shape[-2:]
    if (h, w) == tuple(shape):
        return tensor
    out = tensor.new_empty(tensor.shape[:-2] + tuple(shape))
    values = [float(values)] * tensor.shape[1] if np.isscalar(values) else [float(v) for v in values]
    for channel, value in enumerate(values):
        out[:, channel].fill_(value)
    out[..., :h, :w] = tensor
    return out


def padded_size(size: int, stride: int = NETWORK_STRIDE) -> int:
    return max(stride, int(math.ceil(size / stride)) * stride)


#: A model slice side outside these bounds (pixels at the plan's spacing) says the voxel size is wrong,
#: e.g. metres or microns written as mm, not that the anatomy is that size: under MIN_SLICE_PIXELS from a side
#: of at least one network stride of voxels (a 512-voxel CT in metres: 0.4 pixels), or over MAX_SLICE_PIXELS
#: (16 m at 1 mm; the same CT in microns would be 358 000 pixels and run out of memory).
MIN_SLICE_PIXELS = 4
MAX_SLICE_PIXELS = 16384


def check_slice_size(plane: Sequence[int], plane_spacing: Sequence[float], target_spacing: Sequence[float]) -> None:
    """Refuse a slice of ``plane`` voxels (rows, columns) of ``plane_spacing`` mm whose resampling to
    ``target_spacing`` mm would give an implausibly small or large model slice; ScanError naming the spacing."""
    sides = [n * s / t for n, s, t in zip(plane, plane_spacing, target_spacing)]
    too_small = any(n >= NETWORK_STRIDE and side < MIN_SLICE_PIXELS for n, side in zip(plane, sides))
    if not too_small and max(sides) <= MAX_SLICE_PIXELS:
        return
    raise ScanError(f"a slice of {plane[0]} × {plane[1]} voxels of {plane_spacing[0]:.4g} × "
                    f"{plane_spacing[1]:.4g} mm would be {sides[0]:.3g} × {sides[1]:.3g} pixels at the model's {target_spacing[0]:g} × "
                    f"{target_spacing[1]:g} mm: that voxel size is implausible; check the voxel size (pixdim) and "
                    "the spatial units (xyzt_units) in the scan's header")


class ScanPreprocessor:
    """A plan, applied: scan → :class:`PreparedScan` (model slices) and results back."""

    def __init__(self, plan: PreprocessPlan, stride: int = NETWORK_STRIDE):
        self.plan = plan
        self.stride = stride

    def geometry(self, file_shape: Sequence[int], meta: Optional[VolumeMeta]) -> ScanGeometry:
        """How a scan of ``file_shape`` (spatial, file order) with ``meta`` is sliced and resampled."""
        file_shape = tuple(int(s) for s in file_shape[:3])
        notes: list[str] = []
        described = meta.spatial_shape if meta is not None else None
        shape = tuple(spatial_shape_3d(file_shape))
        if described is not None and tuple(described) != shape and sorted(described) == sorted(shape):
            # SimpleITK's (z, y, x) array with nibabel's meta: the spacing would go to the wrong axes. (An array
            # of another size, e.g. padded, keeps the meta for its spacing and orientation.)
            raise ScanError(f"the volume's shape {file_shape} is not the {tuple(described)} its meta describes "
                            "(axes in another order?); give the array in the file's voxel order (i, j, k)")
        if meta is None:
            meta = VolumeMeta.identity(known=False)
            note = "no geometry was given with the array (1 mm voxels assumed)"
        else:
            note = meta.geometry_note
        orientation = Orientation.of(meta.affine, known=meta.affine_known, note=note)
        if not orientation.known:
            notes.append(f"{orientation.note}: voxel axes taken as R, A, S")
        elif note:
            notes.append(note)        # where an assumed affine came from (e.g. a plain napari layer)
        to_canonical = orientation.to_canonical
        spacing = tuple(float(meta.spacing[a]) for a in to_canonical.axes)
        slice_axis = SLICE_AXIS[self.plan.slicing]
        flat = [axis for axis in range(3) if file_shape[axis] == 1]
        if meta.original_ndim == 2 or len(flat) == 1:
            # A single image is segmented in its own plane, whatever the plan's direction and whichever file
            # axis it lies across (a sagittal slice stored as 1 × rows × columns).
            own_axis = to_canonical.axes.index(2 if meta.original_ndim == 2 else flat[0])
            if own_axis != slice_axis:
                notes.append(f"a single {_plane_name(own_axis)} image: segmented in its own plane, not "
                             f"{self.plan.slicing}ly as the model was trained")
            slice_axis = own_axis
        plane_axes = [a for a in range(3) if a != slice_axis]
        canonical_shape = to_canonical.shape(file_shape)
        plane = tuple(canonical_shape[a] for a in plane_axes)
        plane_spacing = tuple(spacing[a] for a in plane_axes)
        check_slice_size(plane, plane_spacing, self.plan.target_spacing)
        model = tuple(max(1, int(round(n * s / t)))
                      for n, s, t in zip(plane, plane_spacing, self.plan.target_spacing))
        padded = tuple(padded_size(n, self.stride) for n in model)
        return ScanGeometry(file_shape, orientation, slice_axis, _plane_name(slice_axis), spacing,  # type: ignore[arg-type]
                            plane, model, padded, tuple(notes))  # type: ignore[arg-type]

    def prepare(self, volume: np.ndarray, meta: Optional[VolumeMeta] = None) -> "PreparedScan":
        """Check a scan, measure its intensities and geometry; nothing is resampled yet."""
        volume, nonfinite = checked_volume_and_nonfinite(volume)
        volume = with_channels(volume, self.plan.num_channels)
        geometry = self.geometry(volume.shape[:3], meta)
        if nonfinite:       # a note of this scan (printed with its name, kept in its sidecar), not a warning
            geometry = dataclasses.replace(geometry, notes=geometry.notes + (nonfinite_note(nonfinite),))
        # Measured on the canonical view: every n-th voxel taken in file order would differ between two files
        # of the same anatomy stored in other voxel orders (percentile and z-score channels above 4 M voxels).
        intensities = tuple(channel_intensity(geometry.slice_view(volume[..., c]), self.plan.scheme_of(c),
                                              self.plan) for c in range(volume.shape[3]))
        unlike_ct = [c for c in range(volume.shape[3])
                     if self.plan.scheme_of(c) == "ct_window" and not looks_like_hounsfield(volume[..., c])]
        if unlike_ct:
            note = hounsfield_note(self.plan, unlike_ct)
            geometry = dataclasses.replace(geometry, notes=geometry.notes + (note,))
        return PreparedScan(self.plan, geometry, volume, intensities)


def _plane_name(slice_axis: int) -> str:
    return {v: k for k, v in SLICE_AXIS.items()}[slice_axis]


class PreparedScan:
    """A scan ready to be fed slice by slice: ``forward`` gives model input, ``inverse`` takes it back."""

    def __init__(self, plan: PreprocessPlan, geometry: ScanGeometry, volume: np.ndarray,
                 intensities: Sequence[ChannelIntensity]):
        self.plan = plan
        self.geometry = geometry
        self.volume = volume                       # (i, j, k, C) float32, file order
        self.intensities = tuple(intensities)
        self._slices = geometry.slice_view(volume)  # (n, H, W, C) view

    @property
    def n_slices(self) -> int:
        return self.geometry.n_slices

    @property
    def pad_values(self) -> list[float]:
        """Per input channel (channels × context offsets): the background value padding gets."""
        per_channel = [i.background for i in self.intensities]
        return per_channel * (2 * self.plan.context_slices + 1)

    def context_positions(self, index: int) -> list[float]:
        """Slice positions (fractional indices) of slice ``index`` and its context neighbours."""
        n = self.plan.context_slices
        step = self.plan.context_mm / self.geometry.slice_spacing if n else 0.0
        return [min(max(index + m * step, 0.0), self.n_slices - 1.0) for m in range(-n, n + 1)]

    def _slice_at(self, position: float) -> np.ndarray:
        """(H, W, C) raw intensities at a fractional slice position (linear between slices)."""
        below = int(math.floor(position))
        weight = position - below
        if weight < 1e-6 or below + 1 >= self.n_slices:
            return self._slices[min(below, self.n_slices - 1)]
        return (1 - weight) * self._slices[below] + weight * self._slices[below + 1]

    def normalised_slices(self, indices: Sequence[int]) -> np.ndarray:
        """(B, C_in, H, W) float32 normalised slices on the scan's grid, context channels included."""
        indices = [int(i) for i in indices]
        if any(not 0 <= i < self.n_slices for i in indices):
            raise ValueError(f"slice indices must be in [0, {self.n_slices})")
        batch = []
        for index in indices:
            planes = [self._slice_at(p) for p in self.context_positions(index)]   # each (H, W, C)
            channels = [intensity.apply(plane[..., c]) for plane in planes
                        for c, intensity in enumerate(self.intensities)]
            batch.append(np.stack(channels))
        return np.stack(batch)

    def forward(self, indices: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
        """(B, C_in, Hp, Wp) model input for canonical slices ``indices``."""
        with engine_part(PREPROCESS):
            slices = torch.from_numpy(self.normalised_slices(indices)).to(device)
            return self.geometry.to_model_grid(slices, self.pad_values)

    def labels_forward(self, labels: np.ndarray, indices: Sequence[int]) -> torch.Tensor:
        """(B, h, w) int64 reference labels on the model grid (nearest neighbour), unpadded (training)."""
        view = self.geometry.slice_view(labels)
        planes = torch.from_numpy(np.ascontiguousarray(view[list(indices)]).astype(np.float32))[:, None]
        geometry = self.geometry
        if tuple(planes.shape[-2:]) != geometry.model_shape:
            planes = F.interpolate(planes, size=geometry.model_shape, mode="nearest-exact")
        return planes[:, 0].round().long()

    def inverse(self, probabilities: torch.Tensor) -> torch.Tensor:
        """(B, K, h|Hp, w|Wp) model probabilities → (B, K, H, W) on the scan's grid."""
        return self.geometry.to_scan_grid(probabilities)

    def intensity_record(self) -> list[dict]:
        return [{"channel": name, "scheme": self.plan.scheme_of(c), **self.intensities[c].to_dict()}
                for c, name in enumerate(self.plan.channel_names)]
