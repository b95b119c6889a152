"""A dataset's fingerprint (spacings, shapes, foreground intensities, class frequencies) and the
preprocessing plan it implies: nnU-Net's idea, for our 2-D slicing.

Spacings and shapes are given in the **canonical RAS order** (axis 0 towards the patient's right,
1 anterior, 2 superior; see :mod:`medconddiff.geometry`), in millimetres and voxels, whatever the
order of the file axes. Foreground intensities are sampled (seeded, at most ``max_voxels_per_case``
per case) from the voxels whose label is above 0, in the file's own units (HU for CT).

Plan rules of :func:`plan_from_fingerprint`:

* **slicing**: the canonical axis with the largest median spacing, if that spacing is at least
  twice both others (a coarse through-plane direction: 5 mm axial CT slices → ``axial``, a 4 mm
  sagittal stack → ``sagittal``); otherwise ``axial``.
* **target_spacing**: the median spacings of the two in-plane canonical axes, in increasing axis
  order (the rows then columns of a canonical slice), rounded to 3 decimals (µm).
* **intensity**, per channel: a channel named "CT" (case-insensitive, also as a word inside a name
  such as "CT_arterial" or "venous-ct", but not "SPECT") → ``ct_window`` with ``window`` the
  dataset's foreground 0.5 and 99.5 percentiles of the first CT channel; any other channel (MRI,
  T1, FLAIR, ...) → ``zscore``.
* ``percentiles``, ``context_slices``, ``context_mm`` (and ``window`` when no channel is CT) come
  from ``base``, or from the :class:`~medconddiff.config.PreprocessPlan` defaults.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .config import PreprocessPlan
from .dataset_layout import DatasetDescription, DatasetError, load_case_image
from .errors import ConfigError
from .geometry import SLICE_AXIS, Orientation
from .nifti import VolumeMeta, load_labels, smallest_label_dtype

#: Percentiles of the foreground intensities kept per channel.
FOREGROUND_PERCENTILES = (0.5, 50.0, 99.5)
#: How much coarser than both other axes an axis must be to be sliced across.
ANISOTROPY_RATIO = 2.0
_CT_NAME = re.compile(r"(?<![a-z])ct(?![a-z])", re.IGNORECASE)


@dataclass
class ChannelFingerprint:
    """Foreground intensities of one channel, pooled over the sampled voxels of every case."""

    name: str
    foreground_percentiles: tuple[float, float, float]   # FOREGROUND_PERCENTILES (0.5, 50, 99.5)
    mean: float
    std: float


@dataclass
class DatasetFingerprint:
    """What the training cases of a dataset look like; spacings in mm and shapes in canonical RAS order."""

    cases: int
    spacings: list[tuple[float, float, float]]    # per case, mm along R, A, S
    shapes: list[tuple[int, int, int]]            # per case, voxels along R, A, S
    median_spacing: tuple[float, float, float]    # mm along R, A, S
    channels: list[ChannelFingerprint]
    class_voxels: dict[str, int]                  # per class name, over all cases
    class_slice_fraction: dict[str, float]        # fraction of axial (canonical axis 2) slices showing each class

    def to_dict(self) -> dict:
        """JSON-safe (lists, floats, ints, strings)."""
        return {
            "cases": self.cases,
            "spacings": [list(s) for s in self.spacings],
            "shapes": [list(s) for s in self.shapes],
            "median_spacing": list(self.median_spacing),
            "channels": [{"name": c.name, "foreground_percentiles": list(c.foreground_percentiles),
                          "mean": c.mean, "std": c.std} for c in self.channels],
            "class_voxels": dict(self.class_voxels),
            "class_slice_fraction": dict(self.class_slice_fraction),
        }


def compute_fingerprint(description: DatasetDescription, class_names: Sequence[str], channel_names: Sequence[str],
                        *, max_voxels_per_case: int = 100_000, seed: int = 0) -> DatasetFingerprint:
    """Read every training case of ``description`` once and measure it.

    ``class_names`` (index = label value) and ``channel_names`` are the dataset's (or chosen by the
    caller for a folder that does not name them); a case with another number of channels, a label
    value without a name, or a label map off its image's grid raises :class:`DatasetError`, as does
    a dataset without any foreground voxel.
    """
    if max_voxels_per_case < 1:
        raise ValueError(f"max_voxels_per_case must be at least 1, got {max_voxels_per_case}")
    class_names, channel_names = tuple(class_names), tuple(channel_names)
    rng = np.random.default_rng(seed)
    spacings, shapes, samples = [], [], []
    voxels = np.zeros(len(class_names), dtype=np.int64)
    slices_showing = np.zeros(len(class_names), dtype=np.int64)
    total_slices = 0
    for case in description.training:
        image, meta = load_case_image(case, expected_channels=len(channel_names))
        labels = _case_labels(case.label, image.shape[:3], meta, class_names, description.ignore_label)
        to_canonical = Orientation.of(meta.affine, meta.affine_known, note=meta.geometry_note).to_canonical
        spacings.append(tuple(float(meta.spacing[a]) for a in to_canonical.axes))
        shapes.append(to_canonical.shape(image.shape[:3]))
        voxels += np.bincount(labels.ravel(), minlength=len(class_names))[:len(class_names)]
        # Canonical axis 2 (S) is file axis to_canonical.axes[2]; flips do not change what a slice shows.
        axial = np.moveaxis(labels, to_canonical.axes[2], 0)
        for section in axial:
            slices_showing += np.bincount(section.ravel(), minlength=len(class_names))[:len(class_names)] > 0
        total_slices += axial.shape[0]
        foreground = np.flatnonzero((labels > 0) & (labels < len(class_names)))   # ignored voxels are not
        if foreground.size > max_voxels_per_case:
            foreground = np.sort(rng.choice(foreground, max_voxels_per_case, replace=False))
        samples.append(image.reshape(-1, image.shape[3])[foreground])
    pooled = np.concatenate(samples) if samples else np.empty((0, len(channel_names)), np.float32)
    if not len(pooled):
        raise DatasetError(f"{description.root}: no training case has a foreground voxel (label > 0), so "
                           "there is nothing to measure")
    return DatasetFingerprint(
        cases=len(spacings),
        spacings=spacings,
        shapes=shapes,
        median_spacing=tuple(float(s) for s in np.median(np.asarray(spacings), axis=0)),
        channels=[_channel_fingerprint(name, pooled[:, c]) for c, name in enumerate(channel_names)],
        class_voxels={name: int(count) for name, count in zip(class_names, voxels)},
        class_slice_fraction={name: float(count) / total_slices for name, count in zip(class_names, slices_showing)},
    )


def plan_from_fingerprint(fingerprint: DatasetFingerprint, channel_names: Sequence[str],
                          base: Optional[PreprocessPlan] = None) -> PreprocessPlan:
    """The preprocessing plan the fingerprint implies (rules in the module docstring)."""
    channel_names = tuple(channel_names)
    if len(channel_names) != len(fingerprint.channels):
        raise ConfigError(f"{len(channel_names)} channel names for a fingerprint of {len(fingerprint.channels)} "
                          "channels")
    base = base or PreprocessPlan()
    spacing = fingerprint.median_spacing
    coarsest = int(np.argmax(spacing))
    if all(spacing[coarsest] >= ANISOTROPY_RATIO * spacing[a] for a in range(3) if a != coarsest):
        slicing = next(name for name, axis in SLICE_AXIS.items() if axis == coarsest)
    else:
        slicing = "axial"
    in_plane = [a for a in range(3) if a != SLICE_AXIS[slicing]]
    intensity = tuple("ct_window" if is_ct(name) else "zscore" for name in channel_names)
    window = base.window
    if "ct_window" in intensity:
        first_ct = fingerprint.channels[intensity.index("ct_window")]
        low, _, high = first_ct.foreground_percentiles
        if not low < high:
            raise DatasetError(f"the foreground of CT channel {first_ct.name!r} has a single intensity ({low}); "
                               "no window can be derived from it")
        window = (low, high)
    return PreprocessPlan(slicing=slicing, target_spacing=tuple(_round_mm(spacing[a]) for a in in_plane),
                          channel_names=channel_names, intensity=intensity, window=window,
                          percentiles=base.percentiles, context_slices=base.context_slices,
                          context_mm=base.context_mm)


def is_ct(channel_name: str) -> bool:
    """Whether a channel name says CT: "CT" as a word, any case ("CT_arterial" yes, "SPECT" no)."""
    return _CT_NAME.search(channel_name) is not None


def _case_labels(path: Path, image_shape: tuple[int, ...], image_meta: VolumeMeta,
                 class_names: tuple[str, ...], ignore_label: Optional[int] = None) -> np.ndarray:
    """The case's labels; ``ignore_label`` voxels (unverified) become ``len(class_names)``, counted as no class."""
    labels, meta = load_labels(path)
    ignored = None
    if ignore_label is not None:
        ignored = labels == ignore_label
        labels = np.where(ignored, 0, labels)
    if labels.shape != tuple(image_shape):
        raise DatasetError(f"{path}: label map has shape {labels.shape} but its image has {tuple(image_shape)}")
    if not np.allclose(meta.affine, image_meta.affine, atol=1e-3):
        raise DatasetError(f"{path}: label map and image have different affines (the labels do not lie on the "
                           "image's grid)")
    if labels.size and int(labels.max()) >= len(class_names):
        raise DatasetError(f"{path}: label value {int(labels.max())} but the dataset names {len(class_names)} "
                           f"classes (0..{len(class_names) - 1}: {', '.join(class_names)})")
    if ignored is not None:
        labels = labels.astype(smallest_label_dtype(len(class_names)))
        labels[ignored] = len(class_names)
    return labels


def _channel_fingerprint(name: str, values: np.ndarray) -> ChannelFingerprint:
    values = values[np.isfinite(values)].astype(np.float64)
    if not values.size:
        raise DatasetError(f"channel {name!r}: every sampled foreground voxel is NaN or infinite")
    percentiles = np.percentile(values, FOREGROUND_PERCENTILES)
    return ChannelFingerprint(name, tuple(float(p) for p in percentiles), float(values.mean()), float(values.std()))


def _round_mm(size: float) -> float:
    # Rounding must not turn a sub-micrometre spacing into 0, which no plan accepts.
    return round(size, 3) or size
