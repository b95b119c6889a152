"""What a dataset folder holds: its cases, their image and label files, class and channel names.

Three layouts are recognised (:func:`describe_dataset` picks one):

``decathlon``
    Medical Segmentation Decathlon v1: ``dataset.json`` lists ``"training"`` pairs
    (``{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}``) and ``"test"`` images;
    ``"modality"`` names the channels (``{"0": "FLAIR", "1": "T1w", ...}``) and ``"labels"`` the
    classes, id → name (``{"0": "background", "1": "tumour"}``). A multi-channel case is one 4-D
    NIfTI ``(X, Y, Z, C)``.
``nnunet_v2``
    nnU-Net v2 raw data: ``dataset.json`` with ``"channel_names"`` (``{"0": "CT"}``), ``"labels"``
    name → id (``{"background": 0, "liver": 1}``), ``"numTraining"`` and ``"file_ending"``; one
    file per channel, ``imagesTr/CASE_0000.nii.gz``, ``CASE_0001...``, labels
    ``labelsTr/CASE.nii.gz``, unlabelled ``imagesTs/CASE_0000...``.
``pairs``
    No ``dataset.json``: ``imagesTr/`` + ``labelsTr/`` (a ``_0000``-style channel suffix is
    stripped and the files of one case grouped), or ``*_image.nii.gz`` beside ``*_label.nii.gz``.
    Such a folder names neither classes nor channels.

Anything that cannot be trained on raises :class:`DatasetError`, whose one-line message names the
file and the problem. Cases are sorted by name. Nothing but ``dataset.json`` is read here, except by
:func:`load_case_image`.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Optional

import numpy as np

from .nifti import NIFTI_SUFFIXES, VolumeMeta, load_channels
from .errors import UserInputError

_DECATHLON_KEYS = ("training", "modality", "labels")
_NNUNET_KEYS = ("channel_names", "labels", "file_ending")
_CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


class DatasetError(UserInputError):
    """A dataset folder or case that cannot be trained on; the message says which file and why."""


@dataclass(frozen=True)
class CaseFiles:
    """The files of one case: one image file per channel (or one, possibly 4-D, file) and a label."""

    name: str
    images: tuple[Path, ...]
    label: Optional[Path]   # None for unlabelled (test) cases


@dataclass
class DatasetDescription:
    """A dataset folder as read from its layout; no image has been opened to build it."""

    root: Path
    layout: str                                # "decathlon", "nnunet_v2" or "pairs"
    name: str
    class_names: Optional[tuple[str, ...]]     # index = label value, background first; None if not given
    channel_names: Optional[tuple[str, ...]]   # one per input channel; None if not given
    training: list[CaseFiles]
    test: list[CaseFiles]
    file_ending: str                           # ".nii.gz" or ".nii"
    ignore_label: Optional[int] = None         # nnU-Net v2 "ignore": the value of unverified voxels


def read_manifest(manifest: Path, error: type[DatasetError] = DatasetError) -> dict:
    """A dataset's ``dataset.json`` as a dict; ``error`` (one line naming the file) if it is none."""
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as problem:
        raise error(f"{manifest}: not a readable JSON file ({problem})") from None
    if not isinstance(data, dict):
        raise error(f"{manifest}: expected a JSON object, got {type(data).__name__}")
    return data


def label_file_classes(label_file: str | Path) -> Optional[tuple[tuple[str, ...], Optional[int]]]:
    """``(class names by value, ignore value or None)`` of a label file in a dataset folder
    (``ROOT/labelsTr/CASE.nii.gz`` or ``labelsTs``, with ``ROOT/dataset.json`` in nnU-Net v2 or Decathlon
    form); None when the file lies in none, or its dataset.json does not say (a problem is the
    dataset's to report when it is used, not the viewer's)."""
    folder = Path(label_file).parent
    manifest = folder.parent / "dataset.json"
    if folder.name not in ("labelsTr", "labelsTs") or not manifest.is_file():
        return None
    try:
        data = read_manifest(manifest)
        if "channel_names" in data:
            return _nnunet_class_names(manifest, data.get("labels"))
        return _indexed_names(manifest, data.get("labels"), "labels"), None
    except DatasetError:
        return None


def describe_dataset(root: str | Path) -> DatasetDescription:
    """Read a dataset folder's layout (see the module docstring); raises :class:`DatasetError`."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder not found: {root}")
    manifest = root / "dataset.json"
    if not manifest.is_file():
        return _describe_pairs(root)
    data = read_manifest(manifest)
    if "channel_names" in data:
        return _describe_nnunet(root, manifest, data)
    if "training" in data or "modality" in data:
        return _describe_decathlon(root, manifest, data)
    raise DatasetError(f"{manifest}: neither a Decathlon dataset.json (keys {', '.join(_DECATHLON_KEYS)}) nor "
                       f"an nnU-Net v2 one (keys {', '.join(_NNUNET_KEYS)}); it has {sorted(data) or 'no keys'}")


def load_case_image(case: CaseFiles, expected_channels: Optional[int] = None) -> tuple[np.ndarray, VolumeMeta]:
    """The channels of ``case`` as float32 ``(i, j, k, C)``, file voxel order, channels last.

    See :func:`medconddiff.nifti.load_channels` (``meta`` is that of the first file). With
    ``expected_channels`` (the number of channels the dataset names), a scan with another number of
    channels raises :class:`DatasetError`: a Decathlon 4-D file must have ``len(modality)`` volumes.
    """
    image, meta = load_channels(case.images)
    if expected_channels is not None and image.shape[3] != expected_channels:
        files = ", ".join(str(p) for p in case.images)
        raise DatasetError(f"{files}: case {case.name} has {image.shape[3]} channel(s) (4th axis) but the "
                           f"dataset names {expected_channels}")
    return image, meta


# ------------------------------------------------------------------------------------- layouts


def _describe_decathlon(root: Path, manifest: Path, data: dict) -> DatasetDescription:
    _require_keys(manifest, data, _DECATHLON_KEYS, "Decathlon")
    channel_names = _indexed_names(manifest, data["modality"], "modality")
    class_names = _indexed_names(manifest, data["labels"], "labels")
    _check_class_names(manifest, class_names)
    training, test = [], []
    for entry in _entries(manifest, data["training"], "training"):
        if not isinstance(entry, dict) or not {"image", "label"} <= set(entry):
            raise DatasetError(f"{manifest}: every 'training' entry needs 'image' and 'label', got {entry!r}")
        image = _listed_file(root, manifest, entry["image"])
        training.append(CaseFiles(_stem(image), (image,), _listed_file(root, manifest, entry["label"])))
    for entry in _entries(manifest, data.get("test", []), "test"):
        # Some Decathlon exports list test cases as {"image": ...} rather than as plain paths.
        image = _listed_file(root, manifest, entry.get("image") if isinstance(entry, dict) else entry)
        test.append(CaseFiles(_stem(image), (image,), None))
    training, test = _sorted_unique(manifest, training), _sorted_unique(manifest, test)
    _check_count(manifest, data, training)
    return DatasetDescription(root, "decathlon", str(data.get("name") or root.name), class_names, channel_names,
                              training, test, _ending(training[0].images[0]))


def _describe_nnunet(root: Path, manifest: Path, data: dict) -> DatasetDescription:
    _require_keys(manifest, data, _NNUNET_KEYS, "nnU-Net v2")
    channel_names = _indexed_names(manifest, data["channel_names"], "channel_names")
    class_names, ignore_label = _nnunet_class_names(manifest, data["labels"])
    ending = data["file_ending"]
    if ending not in NIFTI_SUFFIXES:
        raise DatasetError(f"{manifest}: file_ending {ending!r} is not supported (only {', '.join(NIFTI_SUFFIXES)})")
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    for folder in (images_dir, labels_dir):
        if not folder.is_dir():
            raise DatasetError(f"{folder}: folder missing (nnU-Net v2 keeps training data in imagesTr/ and labelsTr/)")
    labels = {_stem(path): path for path in _nifti_files(labels_dir, ending)}
    images = _channel_files(images_dir, ending, len(channel_names))
    orphans = sorted(set(labels) - set(images))
    if orphans:
        raise DatasetError(f"{images_dir / (orphans[0] + '_0000' + ending)}: image file missing for case "
                           f"{orphans[0]} (its label is {labels[orphans[0]].name})")
    training = []
    for name, files in sorted(images.items()):
        if name not in labels:
            raise DatasetError(f"{labels_dir / (name + ending)}: label file missing for case {name}")
        training.append(CaseFiles(name, files, labels[name]))
    _check_count(manifest, data, training)
    test_dir = root / "imagesTs"
    test = []
    if test_dir.is_dir():
        test = [CaseFiles(name, files, None)
                for name, files in sorted(_channel_files(test_dir, ending, len(channel_names)).items())]
    return DatasetDescription(root, "nnunet_v2", str(data.get("name") or root.name), class_names, channel_names,
                              training, test, ending, ignore_label)


def _describe_pairs(root: Path) -> DatasetDescription:
    if (root / "imagesTr").is_dir():
        training, test = _folder_cases(root)
    else:
        training, test = _image_label_cases(root), []
    if not training:
        raise DatasetError(f"no training cases in {root} (expected dataset.json, imagesTr/ + labelsTr/, or "
                           "*_image.nii.gz with *_label.nii.gz)")
    return DatasetDescription(root, "pairs", root.name, None, None, training, test, _ending(training[0].images[0]))


def _folder_cases(root: Path) -> tuple[list[CaseFiles], list[CaseFiles]]:
    """Training and test cases of ``imagesTr/`` + ``labelsTr/`` (+ ``imagesTs/``) without dataset.json."""
    images_dir, labels_dir, test_dir = root / "imagesTr", root / "labelsTr", root / "imagesTs"
    if not labels_dir.is_dir():
        raise DatasetError(f"{labels_dir}: folder missing (imagesTr/ needs labelsTr/ beside it)")
    labels = {_stem(path): path for path in _nifti_files(labels_dir, None)}
    images = _channel_files(images_dir, None, None, plain=set(labels))
    orphans = sorted(set(labels) - set(images))
    if orphans:
        raise DatasetError(f"{labels[orphans[0]]}: label without an image in {images_dir}")
    training = []
    for name, files in sorted(images.items()):
        if name not in labels:
            raise DatasetError(f"{labels_dir / (name + _ending(files[0]))}: label file missing for case {name}")
        training.append(CaseFiles(name, files, labels[name]))
    test = []
    if test_dir.is_dir():
        # Unlabelled files have no label name to tell a channel suffix from a case number: they are
        # read the way the training images were.
        suffixed = any(_stem(case.images[0]) != case.name for case in training)
        plain = set() if suffixed else {_stem(path) for path in _nifti_files(test_dir, None)}
        grouped = _channel_files(test_dir, None, None, plain)
        test = [CaseFiles(name, files, None) for name, files in sorted(grouped.items())]
    _check_same_channel_count(training + test)
    return training, test


def _image_label_cases(root: Path) -> list[CaseFiles]:
    """``NAME_image.nii.gz`` + ``NAME_label.nii.gz`` pairs directly in ``root``."""
    cases = []
    for path in _nifti_files(root, None):
        stem = _stem(path)
        name = stem[:-6]  # without "_image" or "_label"
        if stem.endswith("_label"):
            if not any((root / f"{name}_image{suffix}").is_file() for suffix in NIFTI_SUFFIXES):
                raise DatasetError(f"{path}: label without an image ({name}_image{_ending(path)})")
        elif stem.endswith("_image"):
            label = next((candidate for candidate in (root / f"{name}_label{suffix}" for suffix in NIFTI_SUFFIXES)
                          if candidate.is_file()), None)
            if label is None:
                raise DatasetError(f"{root / (name + '_label' + _ending(path))}: label file missing for {path.name}")
            cases.append(CaseFiles(name, (path,), label))
    return sorted(cases, key=lambda case: case.name)


# ------------------------------------------------------------------------------------- helpers


def _require_keys(manifest: Path, data: dict, keys: Iterable[str], layout: str) -> None:
    missing = [key for key in keys if key not in data]
    if missing:
        raise DatasetError(f"{manifest}: {layout} dataset.json lacks {', '.join(repr(k) for k in missing)}")


def _entries(manifest: Path, value: object, key: str) -> list:
    if not isinstance(value, list):
        raise DatasetError(f"{manifest}: {key!r} must be a list, got {type(value).__name__}")
    return value


def _indexed_names(manifest: Path, mapping: object, key: str) -> tuple[str, ...]:
    """``{"0": "a", "1": "b"}`` → ``("a", "b")``; the ids must be 0..N-1 without gaps."""
    if not isinstance(mapping, dict) or not mapping:
        raise DatasetError(f"{manifest}: {key!r} must be a non-empty object of id → name")
    try:
        by_id = {int(str(index)): str(name) for index, name in mapping.items()}
    except ValueError:
        raise DatasetError(f"{manifest}: {key!r} ids must be whole numbers, got {sorted(mapping)}") from None
    return _contiguous(manifest, by_id, key)


def _nnunet_class_names(manifest: Path, labels: object) -> tuple[tuple[str, ...], Optional[int]]:
    """nnU-Net v2 ``{"background": 0, "liver": 1, "ignore": 2}`` → ``(("background", "liver"), 2)``.

    ``ignore`` (sparse labels: voxels nobody verified) must be the highest value, as nnU-Net v2 requires.
    """
    if not isinstance(labels, dict) or not labels:
        raise DatasetError(f"{manifest}: 'labels' must be a non-empty object of name → id")
    ignore = labels.get("ignore")
    if "ignore" in labels and (isinstance(ignore, bool) or not isinstance(ignore, int)):
        raise DatasetError(f"{manifest}: the 'ignore' label must have one whole-number id, got {ignore!r}")
    by_id = {}
    for name, value in labels.items():
        if name == "ignore":
            continue
        if isinstance(value, (list, tuple)):
            raise DatasetError(f"{manifest}: label {name!r} is a region {value}; region-based labels are not "
                               "supported")
        if isinstance(value, bool) or not isinstance(value, int):
            raise DatasetError(f"{manifest}: label {name!r} must have a whole-number id, got {value!r}")
        if value in by_id:
            raise DatasetError(f"{manifest}: labels {by_id[value]!r} and {name!r} share id {value}")
        by_id[value] = str(name)
    if ignore is not None and ignore in by_id:
        raise DatasetError(f"{manifest}: the 'ignore' label's id {ignore} is also class {by_id[ignore]!r}; "
                           "ignore needs a value of its own, above every class")
    names = _contiguous(manifest, by_id, "labels")
    _check_class_names(manifest, names)
    if ignore is not None and ignore < len(names):
        raise DatasetError(f"{manifest}: the 'ignore' label ({ignore}) must be the highest value (above "
                           f"{len(names) - 1})")
    return names, ignore


def _contiguous(manifest: Path, by_id: Mapping[int, str], key: str) -> tuple[str, ...]:
    missing = sorted(set(range(max(by_id) + 1)) - set(by_id))
    if missing or min(by_id) < 0:
        raise DatasetError(f"{manifest}: {key!r} ids must be 0..N-1 without gaps; got {sorted(by_id)}"
                           + (f", missing {missing}" if missing else ""))
    return tuple(by_id[index] for index in range(len(by_id)))


def _check_class_names(manifest: Path, names: tuple[str, ...]) -> None:
    if len(names) < 2:
        raise DatasetError(f"{manifest}: 'labels' names only {list(names)}; need background and at least one class")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise DatasetError(f"{manifest}: class names must be unique, {repeated} repeat")


def _listed_file(root: Path, manifest: Path, relative: object) -> Path:
    if not isinstance(relative, str):
        raise DatasetError(f"{manifest}: file entries must be paths, got {relative!r}")
    path = root / relative
    if not path.is_file():
        raise DatasetError(f"{path}: file listed in {manifest.name} does not exist")
    if not path.name.endswith(NIFTI_SUFFIXES):
        raise DatasetError(f"{path}: not a .nii or .nii.gz file")
    return path


def _nifti_files(folder: Path, ending: Optional[str]) -> list[Path]:
    """NIfTI files of ``folder`` (with ``ending`` only, if given), sorted by name.

    Names starting with '.' are skipped: archives made on macOS carry '._x.nii.gz' resource forks.
    """
    endings = (ending,) if ending else NIFTI_SUFFIXES
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.name.endswith(endings))


def _channel_files(folder: Path, ending: Optional[str], channels: Optional[int],
                   plain: frozenset[str] | set[str] = frozenset()) -> dict[str, tuple[Path, ...]]:
    """Group ``CASE_0000``, ``CASE_0001``... files by case, in channel order.

    With ``channels`` (nnU-Net v2) every file must carry a channel suffix and every case exactly
    channels 0..channels-1. Without it, a file without the suffix, or whose whole name is in
    ``plain`` (a label's name: ``case_0001.nii.gz`` beside ``labelsTr/case_0001.nii.gz`` is case
    ``case_0001``, not channel 1 of ``case``), is a one-channel case of its own, and a case's
    channel files must run 0..N-1.
    """
    grouped: dict[str, dict[int, Path]] = {}
    for path in _nifti_files(folder, ending):
        match = None if _stem(path) in plain else _CHANNEL_SUFFIX.match(_stem(path))
        if match is None and channels is not None:
            raise DatasetError(f"{path}: not named CASE_XXXX{ending} (nnU-Net v2 needs a 4-digit channel suffix)")
        case, channel = (match["case"], int(match["channel"])) if match else (_stem(path), -1)
        files = grouped.setdefault(case, {})
        if files and (channel == -1 or -1 in files):
            raise DatasetError(f"{path}: case {case} has files both with and without a channel suffix")
        files[channel] = path
    cases = {}
    for case, files in grouped.items():
        if -1 in files:
            cases[case] = (files[-1],)
            continue
        expected = range(channels if channels is not None else max(files) + 1)
        missing = [index for index in expected if index not in files]
        if missing:
            name = f"{case}_{missing[0]:04d}{_ending(next(iter(files.values())))}"
            raise DatasetError(f"{folder / name}: channel file missing for case {case} "
                               f"(channels {missing} of {len(expected)})")
        extra = sorted(set(files) - set(expected))
        if extra:
            raise DatasetError(f"{files[extra[0]]}: channel {extra[0]} but dataset.json names {len(expected)} "
                               f"channel(s)")
        cases[case] = tuple(files[index] for index in expected)
    return cases


def _check_same_channel_count(cases: list[CaseFiles]) -> None:
    counts = {len(case.images) for case in cases}
    if len(counts) > 1:
        first = cases[0]
        other = next(case for case in cases if len(case.images) != len(first.images))
        raise DatasetError(f"{other.images[0]}: case {other.name} has {len(other.images)} channel file(s) but "
                           f"case {first.name} has {len(first.images)}")


def _sorted_unique(manifest: Path, cases: list[CaseFiles]) -> list[CaseFiles]:
    cases = sorted(cases, key=lambda case: case.name)
    for before, after in zip(cases, cases[1:]):
        if before.name == after.name:
            raise DatasetError(f"{manifest}: case {after.name} is listed twice")
    return cases


def _check_count(manifest: Path, data: dict, training: list[CaseFiles]) -> None:
    if not training:
        raise DatasetError(f"{manifest}: no training cases")
    declared = data.get("numTraining")
    if declared is not None and declared != len(training):
        if "medconddiff" in data:
            # A training set this package keeps (medconddiff.training_set): its count is rewritten at every
            # change, so a case deleted by hand must not lock the set against the command that would mend it.
            warnings.warn(f"{manifest.name}: numTraining is {declared} but the folder holds {len(training)} "
                          "case(s) (one removed by hand?); the files are taken, and the next change to the set "
                          "writes their count", stacklevel=3)
            return
        raise DatasetError(f"{manifest}: numTraining is {declared} but {len(training)} training cases were found")


def _stem(path: Path) -> str:
    return path.name[: -len(_ending(path))]


def _ending(path: Path) -> str:
    return next(suffix for suffix in NIFTI_SUFFIXES if path.name.endswith(suffix))
