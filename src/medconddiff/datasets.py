"""Labelled volumes → a dataset of 2-D training slices.

Accepts the Medical Segmentation Decathlon / nnU-Net raw layout (``dataset.json``, ``imagesTr/``,
``labelsTr/``) and plain folders of ``*_image.nii.gz`` / ``*_label.nii.gz`` pairs. Slices are
preprocessed exactly as at inference (:mod:`medconddiff.preprocess`) and kept in memory at model
resolution; augmentation uses torchvision's v2 transforms, which move image and mask together.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .config import PreprocessConfig
from .nifti import VolumeMeta, load_labels, load_volume
from .preprocess import check_volume, intensity_range, normalise_intensity, resize_labels, to_model_input


class DatasetError(ValueError):
    """A dataset folder or case that cannot be trained on; the message says which file and why."""


@dataclass
class Case:
    name: str
    image: np.ndarray       # float32, NIfTI voxel order
    labels: np.ndarray      # uint8, same shape
    meta: VolumeMeta


def _strip(name: str) -> str:
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def discover_pairs(root: str | Path) -> list[tuple[Path, Path]]:
    """(image, label) paths of a dataset folder, in a stable order."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder not found: {root}")
    manifest = root / "dataset.json"
    if manifest.is_file():
        try:
            entries = json.loads(manifest.read_text())["training"]
            pairs = [(root / e["image"], root / e["label"]) for e in entries]
        except (ValueError, KeyError, TypeError) as error:
            raise DatasetError(f"{manifest}: not a Decathlon dataset.json ({error})") from None
        missing = [str(p) for pair in pairs for p in pair if not p.is_file()]
        if missing:
            raise DatasetError(f"{manifest} lists {len(missing)} files that do not exist, e.g. {missing[0]}")
    elif (root / "imagesTr").is_dir() and (root / "labelsTr").is_dir():
        labels = {_strip(p.name): p for p in (root / "labelsTr").glob("*.nii*")}
        pairs = []
        for image in sorted((root / "imagesTr").glob("*.nii*")):
            case = _strip(image.name)
            case = case[:-5] if case.endswith("_0000") else case  # nnU-Net channel suffix
            if case not in labels:
                raise DatasetError(f"no label in {root / 'labelsTr'} for image {image.name}")
            pairs.append((image, labels[case]))
    else:
        pairs = []
        for image in sorted(root.glob("*_image.nii*")):
            label = image.with_name(image.name.replace("_image.", "_label."))
            if not label.is_file():
                raise DatasetError(f"no label file {label.name} for {image.name}")
            pairs.append((image, label))
    if not pairs:
        raise DatasetError(f"no training cases in {root} (expected dataset.json, imagesTr/+labelsTr/, "
                           "or *_image.nii.gz with *_label.nii.gz)")
    return sorted(pairs)


def load_case(image_path: Path, label_path: Path, num_classes: int) -> Case:
    image, meta = load_volume(image_path)
    labels, label_meta = load_labels(label_path)
    if image.shape != labels.shape:
        raise DatasetError(f"{label_path.name} has shape {labels.shape} but {image_path.name} has {image.shape}")
    if not np.allclose(meta.affine, label_meta.affine, atol=1e-3):
        raise DatasetError(f"{label_path.name} and {image_path.name} have different affines "
                           "(the label does not lie on the image's grid)")
    if labels.max() >= num_classes:
        raise DatasetError(f"{label_path.name} has label {int(labels.max())} but the model has {num_classes} "
                           f"classes (0..{num_classes - 1}); set --class-names to match")
    return Case(_strip(Path(image_path).name), check_volume(image), labels.astype(np.uint8), meta)


SliceRanges = Optional[Sequence[tuple[int, int]]]


def parse_ranges(text: Optional[str]) -> SliceRanges:
    """'0:40,80:128' → [(0, 40), (80, 128)]; None/'' → None (all slices)."""
    if not text:
        return None
    ranges = []
    for part in text.split(","):
        try:
            start, stop = (int(x) for x in part.split(":"))
        except ValueError:
            raise DatasetError(f"slice ranges must look like START:STOP[,START:STOP], got {text!r}") from None
        if not 0 <= start < stop:
            raise DatasetError(f"empty or negative slice range {part!r}")
        ranges.append((start, stop))
    return ranges


class SliceDataset(Dataset):
    """All (or a range of) slices of some cases: ``(image (1,S,S) in [-1,1], labels (S,S) int64)``."""

    def __init__(self, cases: Sequence[Case], preprocess: PreprocessConfig, image_size: int,
                 slice_ranges: SliceRanges = None, augment: bool = False):
        images, labels, origin = [], [], []
        axis = preprocess.slice_axis
        for case in cases:
            n = case.image.shape[axis]
            low, high = intensity_range(case.image, preprocess)
            for start, stop in slice_ranges or [(0, n)]:
                if stop > n:
                    raise DatasetError(f"slice range {start}:{stop} exceeds the {n} slices of {case.name}")
                volume = np.moveaxis(case.image, axis, 0)[start:stop]
                mask = np.moveaxis(case.labels, axis, 0)[start:stop]
                images.append(to_model_input(normalise_intensity(volume, low, high), image_size))
                labels.append(resize_labels(torch.from_numpy(mask.astype(np.int64)), image_size))
                origin += [(case.name, i) for i in range(start, stop)]
        if not origin:
            raise DatasetError("the dataset has no slices")
        self.images = torch.cat(images)
        self.labels = torch.cat(labels)
        self.origin = origin
        self.augment = augment
        self._transform = _augmentation() if augment else None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, labels = self.images[index], self.labels[index]
        if self._transform is None:
            return image, labels
        from torchvision import tv_tensors

        image, mask = self._transform(tv_tensors.Image(image), tv_tensors.Mask(labels[None]))
        gain = 1 + 0.1 * (2 * torch.rand(()) - 1)   # intensity jitter: ±10 % contrast, ±0.1 brightness
        bias = 0.1 * (2 * torch.rand(()) - 1)
        return (image.as_subclass(torch.Tensor) * gain + bias), mask.as_subclass(torch.Tensor)[0].long()

    def class_slice_weights(self, num_classes: int) -> torch.Tensor:
        """Sampling weight per slice: slices showing rare classes are drawn more often (as in the paper).

        A class present on a fraction f of slices gets weight 1/f; a slice takes the largest weight
        of the classes it shows.
        """
        present = torch.stack([(self.labels == k).flatten(1).any(1) for k in range(num_classes)], dim=1)
        frequency = present.float().mean(0).clamp(min=1 / len(self))
        weights = (present.float() / frequency).max(dim=1).values
        return weights / weights.sum()


def _augmentation():
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    # v2 resamples masks with nearest neighbour; the border fills with air (-1) and background (0).
    return v2.Compose([
        v2.RandomHorizontalFlip(),
        v2.RandomAffine(degrees=10, scale=(0.9, 1.1), translate=(0.05, 0.05),
                        fill={tv_tensors.Image: -1.0, "others": 0}),
    ])
