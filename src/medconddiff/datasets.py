"""Labelled scans → random training crops at the plan's spacing, through the inference preprocessor.

Every case is turned into canonical slices resampled to the plan's in-plane spacing by the same
:class:`~medconddiff.preprocess.ScanPreprocessor` that inference uses, so training and inference
see the same millimetres, orientation and intensities. Items are square crops of ``patch_size``
pixels, as nnU-Net cuts them: along an axis where the slice is no larger than the patch the whole
slice lies inside the crop at a random offset (the rest is air, so the network also learns fields
of view wider than the anatomy); where it is larger the crop is placed at random, holding a
foreground pixel (of the slice's rarest class) for a fraction of draws. Augmentation (torchvision
v2) moves image and mask together.

Slice ranges (``0:40,80:128``, ``10, 12, 20-24``: the syntax of :mod:`medconddiff.slice_lists`)
count canonical slices along the plan's direction.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from .config import PreprocessPlan
from .dataset_layout import DatasetError
from .losses import IGNORE_INDEX
from .nifti import VolumeMeta, load_labels
from .preprocess import PreparedScan, ScanPreprocessor
from .slice_lists import SliceSpec, parse_slice_spec, slice_indices

#: A parsed slice list, or half-open ``(start, stop)`` ranges (``stop`` None: to the last slice); None = all.
SliceRanges = Optional[Union[SliceSpec, Sequence[tuple[int, Optional[int]]]]]
#: Slices resampled at once while a case is prepared (bounds memory on big scans).
PREPARE_CHUNK = 16


@dataclass
class Case:
    """One labelled scan in file order: image ``(i, j, k)`` or ``(i, j, k, C)``, labels ``(i, j, k)``."""

    name: str
    image: np.ndarray
    labels: np.ndarray
    meta: VolumeMeta


def load_case(name: str, image: np.ndarray, meta: VolumeMeta, label_path: Path, num_classes: int,
              ignore_value: Optional[int] = None) -> Case:
    """Attach a label file to a loaded image, checking that it lies on the image's grid and fits the classes.

    Voxels holding ``ignore_value`` (a dataset's ``ignore`` label) become :data:`IGNORE_INDEX`.
    """
    labels, label_meta = load_labels(label_path)
    if ignore_value is not None:
        ignored = labels == ignore_value
        labels = np.where(ignored, 0, labels)
    if image.shape[:3] != labels.shape:
        raise DatasetError(f"{label_path.name} has shape {labels.shape} but the image of {name} has {image.shape[:3]}")
    if not np.allclose(meta.affine, label_meta.affine, atol=1e-3):
        raise DatasetError(f"{label_path.name} and the image of {name} have different affines "
                           "(the label does not lie on the image's grid)")
    if labels.max() >= num_classes:
        raise DatasetError(f"{label_path.name} has label {int(labels.max())} but the model has {num_classes} "
                           f"classes (0..{num_classes - 1})")
    labels = labels.astype(np.uint8)
    if ignore_value is not None:
        labels[ignored] = IGNORE_INDEX
    return Case(name, image, labels, meta)


def verified_slice_indices(slice_view: np.ndarray) -> np.ndarray:
    """Canonical slices (first axis of ``slice_view``) holding any voxel that is not ignored."""
    flat = slice_view.reshape(slice_view.shape[0], -1)
    return np.flatnonzero((flat != IGNORE_INDEX).any(axis=1))


def parse_ranges(text: Optional[str], what: str = "slices") -> Optional[SliceSpec]:
    """'0:40,80:128' → its :class:`SliceSpec` (checked against each case's slices later); None/'' → None
    (all slices). A malformed list raises :class:`~medconddiff.errors.SliceSpecError` naming ``what``."""
    if text is None or not text.strip():
        return None
    spec = parse_slice_spec(text, what)
    if not spec.ranges:
        return None
    return spec


def range_indices(ranges: SliceRanges, n_slices: int, case_name: str) -> np.ndarray:
    """Canonical slice indices of ``ranges`` (all slices when None), each in ``[0, n_slices)``."""
    if not ranges:
        return np.arange(n_slices)
    if isinstance(ranges, SliceSpec):
        return np.asarray(ranges.indices(n_slices, where=case_name), dtype=np.int64)
    return np.asarray(slice_indices(ranges, n_slices, where=case_name), dtype=np.int64)


@dataclass
class _PreparedCase:
    images: torch.Tensor          # (n, C_in, h, w) float32 on the model grid (unpadded)
    labels: torch.Tensor          # (n, h, w) uint8
    background: list[float]       # per input channel: what padding gets
    indices: np.ndarray           # canonical slice index of each entry


def prepare_case(scan: PreparedScan, labels: np.ndarray, indices: np.ndarray) -> _PreparedCase:
    images, masks = [], []
    for start in range(0, len(indices), PREPARE_CHUNK):
        chunk = indices[start:start + PREPARE_CHUNK]
        images.append(scan.geometry.crop(scan.forward(chunk)).contiguous())
        masks.append(scan.labels_forward(labels, chunk).to(torch.uint8))
    return _PreparedCase(torch.cat(images), torch.cat(masks), scan.pad_values, indices)


class TrainingSlices(Dataset):
    """Training crops of canonical slices: items are ``(image (C_in, P, P) float32, labels (P, P) int64)``."""

    def __init__(self, cases: Sequence[Case], plan: PreprocessPlan, patch_size: int,
                 slice_ranges: SliceRanges = None, augment: bool = False, foreground_fraction: float = 0.5, *,
                 slices_by_case: Optional[dict[str, Sequence[int]]] = None, centre_crops: bool = False,
                 held_out: SliceRanges = None):
        """``slice_ranges`` apply to every case; ``slices_by_case`` (case name → canonical slice
        indices) picks slices per case instead (fine-tuning on the slices a user corrected).
        ``centre_crops`` makes every crop the slice's centre (deterministic items, e.g. for
        calibration and tests) instead of random, foreground-seeking crops. ``held_out`` (validation
        slices) leave the slices of ``slice_ranges``: they are never trained on."""
        preprocessor = ScanPreprocessor(plan)
        self.cases: list[_PreparedCase] = []
        self.origin: list[tuple[str, int]] = []
        self._items: list[tuple[int, int]] = []
        for case in cases:
            scan = preprocessor.prepare(case.image, case.meta)
            if slices_by_case is not None:
                indices = np.asarray(sorted(slices_by_case.get(case.name, ())), dtype=np.int64)
                if len(indices) and not (0 <= indices.min() and indices.max() < scan.n_slices):
                    raise DatasetError(f"slices {indices.tolist()} are outside the {scan.n_slices} "
                                       f"{plan.slicing} slices of {case.name}")
                if not len(indices):
                    continue
            else:
                indices = range_indices(slice_ranges, scan.n_slices, case.name)
                if held_out:        # validation slices, never trained on
                    indices = np.setdiff1d(indices, range_indices(held_out, scan.n_slices, case.name))
                    if not len(indices):
                        continue
                if (case.labels == IGNORE_INDEX).any():
                    # A slice nobody verified teaches nothing: it is not sampled at all.
                    indices = np.intersect1d(indices, verified_slice_indices(scan.geometry.slice_view(case.labels)))
                    if not len(indices):
                        continue
            prepared = prepare_case(scan, case.labels, indices)
            self._items += [(len(self.cases), position) for position in range(len(indices))]
            self.origin += [(case.name, int(i)) for i in indices]
            self.cases.append(prepared)
        if not self._items:
            raise DatasetError("every training slice is a validation slice: leave some out of --val-slices"
                               if held_out else "the dataset has no slices")
        self.replay_items = 0            # trailing items added by add_replay
        self.replay_fraction = 0.0
        self.patch_size = int(patch_size)
        self.augment = augment
        self.foreground_fraction = float(foreground_fraction)
        self.centre_crops = centre_crops

    def __len__(self) -> int:
        return len(self._items)

    def slice_labels(self, index: int) -> torch.Tensor:
        """The whole model-grid label map of item ``index`` (h, w)."""
        case, position = self._items[index]
        return self.cases[case].labels[position]

    def classes_shown(self, num_classes: int) -> torch.Tensor:
        """(classes,) bool: which classes any slice (replayed ones included) shows."""
        return class_presence([self.slice_labels(i) for i in range(len(self))], num_classes).any(dim=0)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        case_index, position = self._items[index]
        case = self.cases[case_index]
        image, labels = case.images[position], case.labels[position]
        top, left = self._crop_origin(labels)
        image = _crop(image, top, left, self.patch_size, case.background)
        labels = _crop(labels[None], top, left, self.patch_size, [0])[0]
        if self.augment:
            image, labels = _augment(image, labels, case.background)
        return image, labels.long()

    def _crop_origin(self, labels: torch.Tensor) -> tuple[int, int]:
        """Top-left corner of a crop (nnU-Net's rule, per axis): a slice no larger than the patch lies
        whole inside it at a random offset (the rest is air); a larger slice is cut at random, so that
        the crop holds a foreground pixel (of the slice's rarest class) for a fraction of draws."""
        h, w = labels.shape
        size = self.patch_size
        if self.centre_crops:
            return h // 2 - size // 2, w // 2 - size // 2
        target = None
        present = [k for k in torch.unique(labels).tolist() if 0 < k != IGNORE_INDEX]
        if present and float(torch.rand(())) < self.foreground_fraction:
            counts = {k: int((labels == k).sum()) for k in present}
            chosen = min(counts, key=counts.get)
            candidates = torch.nonzero(labels == chosen)
            target = candidates[int(torch.randint(len(candidates), ()))].tolist()
        elif bool((labels == IGNORE_INDEX).any()):
            # A partly verified slice: a crop holding no verified pixel would teach nothing.
            candidates = torch.nonzero(labels != IGNORE_INDEX)
            if len(candidates):
                target = candidates[int(torch.randint(len(candidates), ()))].tolist()
        return tuple(self._axis_origin(n, None if target is None else target[axis])
                     for axis, n in enumerate((h, w)))  # type: ignore[return-value]

    def _axis_origin(self, n: int, target: Optional[int]) -> int:
        size = self.patch_size
        if n <= size:
            return -int(torch.randint(size - n + 1, ()))           # the whole slice, placed at random
        low, high = 0, n - size                                    # crops inside the slice
        if target is not None:                                     # ... that contain the target pixel
            low, high = max(low, target - size + 1), min(high, target)
        return int(torch.randint(low, high + 1, ()))

    def class_slice_weights(self, num_classes: int) -> torch.Tensor:
        """Sampling weight per slice: slices showing rare classes are drawn more often (as in the paper).

        A class present on a fraction f of slices gets weight 1/f; a slice takes the largest weight
        of the classes it shows (ignored pixels show no class). With replay slices
        (:meth:`add_replay`) the weights are computed within each group and the replay group gets
        ``replay_fraction`` of the total.
        """
        own = len(self) - self.replay_items
        weights = _class_weights([self.slice_labels(i) for i in range(own)], num_classes)
        if not self.replay_items:
            return weights
        replay = _class_weights([self.slice_labels(i) for i in range(own, len(self))], num_classes)
        return torch.cat([weights * (1 - self.replay_fraction), replay * self.replay_fraction])

    def add_replay(self, replay: "TrainingSlices", fraction: float) -> None:
        """Append ``replay``'s slices (e.g. what the start model was trained on) as a group drawn with
        probability ``fraction`` per item, whatever the two groups' sizes: fine-tuning keeps
        seeing the start model's classes and does not forget them."""
        if not 0 < fraction < 1:
            raise ValueError(f"replay fraction must be in (0, 1), got {fraction}")
        if self.replay_items:
            raise ValueError("replay slices were already added")
        offset = len(self.cases)
        self.cases += replay.cases
        self._items += [(offset + case, position) for case, position in replay._items]
        self.origin += replay.origin
        self.replay_items = len(replay._items)
        self.replay_fraction = float(fraction)


def class_presence(slice_labels: Sequence[torch.Tensor], num_classes: int) -> torch.Tensor:
    """(slices, classes) bool: which class each label map shows (ignored pixels show none)."""
    return torch.stack([torch.tensor([bool((labels == k).any()) for labels in slice_labels])
                        for k in range(num_classes)], dim=1)


def _class_weights(slice_labels: Sequence[torch.Tensor], num_classes: int) -> torch.Tensor:
    present = class_presence(slice_labels, num_classes)
    frequency = present.float().mean(0).clamp(min=1 / len(slice_labels))
    weights = (present.float() / frequency).max(dim=1).values
    return weights / weights.sum()


def _crop(array: torch.Tensor, top: int, left: int, size: int, fill: Sequence[float]) -> torch.Tensor:
    """(C, h, w) → (C, size, size) window at (top, left); outside the slice each channel gets ``fill``."""
    channels, h, w = array.shape
    out = array.new_empty((channels, size, size))
    for c in range(channels):
        out[c].fill_(fill[c] if len(fill) > 1 else fill[0])
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + size, h), min(left + size, w)
    if y1 > y0 and x1 > x0:
        out[:, y0 - top:y1 - top, x0 - left:x1 - left] = array[:, y0:y1, x0:x1]
    return out


def _augment(image: torch.Tensor, labels: torch.Tensor, background: Sequence[float]
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip, ±10° rotation, ±10 % scale, small shifts (mask nearest-neighbour), intensity jitter."""
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    transform = v2.Compose([
        v2.RandomHorizontalFlip(),
        v2.RandomAffine(degrees=10, scale=(0.9, 1.1), translate=(0.05, 0.05),
                        fill={tv_tensors.Image: list(background), "others": 0}),
    ])
    image, mask = transform(tv_tensors.Image(image), tv_tensors.Mask(labels[None]))
    gain = 1 + 0.1 * (2 * torch.rand(()) - 1)   # intensity jitter: ±10 % contrast, ±0.1 brightness
    bias = 0.1 * (2 * torch.rand(()) - 1)
    return image.as_subclass(torch.Tensor) * gain + bias, mask.as_subclass(torch.Tensor)[0]
