"""A training set that grows scan by scan: an nnU-Net v2 dataset folder holding sparse labels.

    training_set = TrainingSet.create("~/my_set", ("background", "lesion"), ("CT",))
    training_set.add_scan("lung1", image, meta, labels, ("background", "lesion"),
                          verified_slices=[40, 52], slicing="axial")
    training_set.summary().text()    # '1 case, 2 verified slices; labelled voxels: background 1,234, lesion 56'

On disk it is what nnU-Net v2 reads (and its ``verify_dataset_integrity`` accepts):
``imagesTr/CASE_0000.nii.gz`` (one file per channel), ``labelsTr/CASE.nii.gz`` on the image's own
voxel grid and affine, and ``dataset.json`` with ``channel_names``, ``labels`` (name → value,
background 0, ``"ignore"`` the highest value), ``numTraining`` and ``file_ending``. Every voxel nobody
verified holds the ignore value, so a few corrected slices (or strokes) are valid training data.

Rules of :meth:`TrainingSet.add_scan`:

* Adding a case again merges: voxels verified now take the new labels, voxels verified before keep
  theirs, nothing is duplicated. The image must be the one stored (same grid, same voxels).
* A scan the set holds already is the same case whatever name it comes under (a DICOM series named
  differently by an older release, a renamed layer, a file added from napari and from the command
  line, its NIfTI and its DICOM series in another voxel order): its voxels' digest in canonical order,
  kept per case in ``dataset.json``, and its voxel spacing find the case, and the add merges there,
  moved into that case's voxel order. A patient counted twice would weigh double in training and
  could sit on both sides of a split by case.
* Classes merge by name: a new class gets the next value, the ignore value moves above it, and every
  label file is rewritten to match.
* Everything is checked before anything is written; new files are written into a staging folder
  first and moved into place together, ``dataset.json`` last. A failed add leaves the set as it was.
* Case ids come from the name the caller gives (a file stem), reduced to letters, digits, ``-`` and
  ``_``; nothing is read from image headers, whose text fields are cleared in what is written.
* Only the user removes: :meth:`TrainingSet.remove_case` (a scan added by mistake),
  :meth:`TrainingSet.unverify_slices` (slices checked by mistake: their voxels become unverified again)
  and :meth:`TrainingSet.merge_cases` (one scan held under two names by a set an earlier release built)
  are the only ways anything leaves a set (``medconddiff remove-from-set``, ``medconddiff merge-cases``);
  they write as an add does, all or nothing, dataset.json last.
* One add (or removal) at a time: an add holds a lock file in the set's folder (two napari windows, or napari and a
  script, adding to one set) and starts from what is on disk then, so an add made by another program
  since this one opened the set is kept, never overwritten.

Verified slices are canonical slices along a slicing direction (:mod:`medconddiff.preprocess`: the
scan viewed in RAS, cut across the plan's axis), the indices the napari widget and ``--slices`` use.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
from filelock import FileLock, Timeout

from .atomic import JOURNAL_NAME, StagedFiles, finish_interrupted_commit
from .class_match import class_index, class_key, merge_class_lists, one_class_each
from .dataset_layout import DatasetError, _indexed_names, _nnunet_class_names, describe_dataset, read_manifest
from .datasets import Case
from .label_values import whole_label_values
from .losses import IGNORE_INDEX
from .nifti import VolumeMeta, load_channels, load_labels, read_meta, save_volume, write_json_atomic
from .slice_lists import slice_list_text

IGNORE_NAME = "ignore"
FILE_ENDING = ".nii.gz"
#: Where an add writes its files before moving them into place (removed afterwards).
STAGING_FOLDER = ".medconddiff-staging"
#: The lock an add holds (a file in the set's folder; the operating system releases it if the program dies).
LOCK_FILE = ".medconddiff.lock"
#: Seconds an add waits for another program's add to finish.
LOCK_WAIT_SECONDS = 30.0
#: dataset.json key with what nnU-Net does not know: per case, the slicing its verified slices count along.
MANIFEST_KEY = "medconddiff"
#: Key under MANIFEST_KEY: per case, :func:`image_digest` of its image (finds a scan added under another name).
DIGEST_KEY = "image_sha256"
#: dataset.json keys a set writes; any other (the name and description a user gave it, a licence) is kept.
_OWN_KEYS = ("channel_names", "labels", "numTraining", "file_ending", MANIFEST_KEY)
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
_MAX_CASE_ID = 64


class TrainingSetError(DatasetError):
    """A training-set folder, or a scan added to it, that cannot be used; the message names the file."""


def case_id_from_name(name: str) -> str:
    """A case id from a file stem or layer name: NIfTI suffix and an nnU-Net ``_0000`` channel suffix
    dropped, anything but letters, digits, ``-`` and ``_`` replaced by ``_``."""
    text = os.path.basename(str(name).strip())
    for suffix in (".nii.gz", ".nii"):
        if text.lower().endswith(suffix):
            text = text[: -len(suffix)]
    text = re.sub(r"_0000$", "", text)
    text = _UNSAFE.sub("_", text).strip("_-")[:_MAX_CASE_ID]
    if not text:
        raise TrainingSetError(f"{name!r} gives no usable case id (letters, digits, '-' or '_')")
    return text


@dataclass(frozen=True)
class TrainingSetSummary:
    """What a set holds: cases, verified slices (along each case's slicing) and labelled voxels per class."""

    cases: int
    verified_slices: int
    labelled_voxels: dict[str, int]              # class name → verified voxels with that label
    slices_by_case: dict[str, int] = field(default_factory=dict)
    #: groups of cases holding one scan (added under several names before the set kept digests)
    same_scan: tuple[tuple[str, ...], ...] = ()
    #: case → the foreground classes its verified voxels show
    classes_by_case: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def mixed_labelling(self) -> tuple[tuple[tuple[str, ...], tuple[str, ...]], ...]:
        """Cases grouped by the foreground classes their verified voxels show, when two groups share no
        class ((classes, cases) per group; cases showing background only label nothing to mix); () otherwise."""
        groups: dict[tuple[str, ...], list[str]] = {}
        for case, classes in sorted(self.classes_by_case.items()):
            if classes:
                groups.setdefault(classes, []).append(case)
        keys = list(groups)
        if not any(not set(a) & set(b) for i, a in enumerate(keys) for b in keys[i + 1:]):
            return ()
        return tuple((classes, tuple(cases)) for classes, cases in groups.items())

    def case_lines(self) -> list[str]:
        """One line per case: its name, verified slices and the classes they show."""
        return [self.case_line(case) for case in self.slices_by_case]

    def case_line(self, case: str) -> str:
        count = self.slices_by_case.get(case, 0)
        return (f"{case}: {count} verified slice{'s' if count != 1 else ''}"
                f" ({', '.join(self.classes_by_case.get(case, ())) or 'background only'})")

    def text(self) -> str:
        voxels = ", ".join(f"{name} {count:,}" for name, count in self.labelled_voxels.items())
        text = (f"{self.cases} case{'s' if self.cases != 1 else ''}, {self.verified_slices} verified "
                f"slice{'s' if self.verified_slices != 1 else ''}; labelled voxels: {voxels or 'none'}")
        for group in self.same_scan:
            text += (f"; cases {' and '.join(group)} hold the same scan (added under {len(group)} names by an "
                     "earlier release): slices verified in both count twice in training (`medconddiff "
                     "merge-cases` merges them)")
        mixed = self.mixed_labelling
        if mixed:
            groups = "; ".join(f"{', '.join(classes)}: {_few(cases)}" for classes, cases in mixed)
            text += (f"; its cases label different classes ({groups}): in the one such mix measured (a liver case "
                     "added to lung-lesion cases) the lesion lost about half its Dice (README); a set of scans "
                     "labelled for the same classes is safer")
        return text


@dataclass(frozen=True)
class AddResult:
    """What :meth:`TrainingSet.add_scan` did."""

    case: str
    new_case: bool
    verified_slices: int          # verified slices of the case after the add (along its slicing)
    added_classes: tuple[str, ...]
    rewritten_labels: int         # label files of other cases rewritten for a moved ignore value
    requested: str = ""           # the case id asked for, where the set held the scan under another one

    def description(self) -> str:
        """What happened, for a status line: 'added as a new case 'x'' / 'merged into its case 'x''."""
        if self.new_case and self.requested and self.requested != self.case:
            return f"added as a new case '{self.case}' ('{self.requested}' holds another scan)"
        if self.new_case:
            return f"added as a new case '{self.case}'"
        if self.requested and self.requested != self.case:
            return f"merged into case '{self.case}', which holds the same scan (not a new case '{self.requested}')"
        return f"merged into its case '{self.case}'"


@dataclass(frozen=True)
class MergeResult:
    """What :meth:`TrainingSet.merge_cases` did."""

    case: str                     # the case kept
    removed: str                  # the case merged into it and removed
    copied_voxels: int            # verified voxels of the removed case that the kept one had not verified
    disagreeing_voxels: int       # voxels verified in both with different labels
    preferred: Optional[str]      # whose labels those voxels took (None: there were none)
    verified_slices: int          # verified slices of the kept case after the merge

    def description(self) -> str:
        settled = (f"; {self.disagreeing_voxels:,} voxel(s) verified in both with different labels took "
                   f"{self.preferred}'s" if self.disagreeing_voxels else "")
        return (f"case '{self.removed}' merged into '{self.case}' ({self.copied_voxels:,} verified voxel(s) "
                f"copied{settled}; {self.verified_slices} verified slice(s)) and removed")


class TrainingSet:
    """An nnU-Net v2 dataset folder with an ``ignore`` label; see the module docstring."""

    def __init__(self, root: Path, class_names: Sequence[str], channel_names: Sequence[str],
                 slicing_by_case: dict[str, str], stored_ignore: Optional[int], cases: Sequence[str],
                 digests: Optional[dict[str, str]] = None, kept: Optional[dict] = None,
                 written_here: bool = True):
        self.root = Path(root)
        self.class_names = tuple(class_names)
        self.channel_names = tuple(channel_names)
        self._slicing = dict(slicing_by_case)
        self._stored_ignore = stored_ignore
        self._cases = sorted(cases)
        #: case → digest of its image (:func:`image_digest`); sets written before digests lack some.
        self._digests = dict(digests or {})
        #: dataset.json's other keys (its name and description, a licence, a reference): written back as read.
        self._kept = dict(kept) if kept is not None else {
            "name": self.root.name, "description": "sparse labels added scan by scan (medconddiff training set)"}
        #: Whether dataset.json was written here (it has our record): another's dataset is only read until the
        #: user adds to it or takes from it, never rewritten for a cache.
        self._written_here = written_here

    # ----------------------------------------------------------------------------------- opening
    @property
    def manifest(self) -> Path:
        return self.root / "dataset.json"

    @property
    def ignore_value(self) -> int:
        """The label value of unverified voxels: one above the last class."""
        return len(self.class_names)

    @property
    def cases(self) -> list[str]:
        return list(self._cases)

    @classmethod
    def create(cls, folder: str | os.PathLike, class_names: Sequence[str],
               channel_names: Sequence[str] = ("CT",)) -> "TrainingSet":
        """A new, empty set in ``folder`` (created; an existing folder must be empty)."""
        root = Path(folder).expanduser()
        class_names, channel_names = tuple(str(n) for n in class_names), tuple(str(n) for n in channel_names)
        if root.exists() and not root.is_dir():
            raise TrainingSetError(f"{root} is a file; choose a folder for the training set")
        if root.exists() and any(root.iterdir()):
            what = "already a training set; open it" if (root / "dataset.json").is_file() else \
                "not an empty folder; choose a new or empty one"
            raise TrainingSetError(f"{root}: {what}")
        _check_names(root / "dataset.json", class_names, channel_names)
        training_set = cls(root, class_names, channel_names, {}, len(class_names), [])
        try:
            (root / "imagesTr").mkdir(parents=True, exist_ok=True)
            (root / "labelsTr").mkdir(exist_ok=True)
            write_json_atomic(training_set.manifest, training_set._manifest_data())
        except OSError as error:
            raise TrainingSetError(f"{root}: cannot create a training set here ({error.strerror or error})") from None
        return training_set

    @classmethod
    def open(cls, folder: str | os.PathLike) -> "TrainingSet":
        """An existing set; its dataset.json and file names are checked against each other, and every
        case's label against its image's grid (headers only). An add that a killed program left half
        moved into place is finished first (see :class:`~medconddiff.atomic.StagedFiles`)."""
        root = Path(folder).expanduser()
        finish_interrupted_add(root)
        return cls._read(root)

    @classmethod
    def _read(cls, root: Path) -> "TrainingSet":
        manifest = root / "dataset.json"
        if not root.is_dir():
            raise TrainingSetError(f"{root}: training-set folder not found")
        if not manifest.is_file():
            raise TrainingSetError(f"{root}: not a training set (no dataset.json)")
        data = read_manifest(manifest, TrainingSetError)
        if "channel_names" not in data or "labels" not in data:
            raise TrainingSetError(f"{manifest}: not an nnU-Net v2 dataset.json (needs 'channel_names' and "
                                   "'labels')")
        channel_names = _indexed_names(manifest, data["channel_names"], "channel_names")
        class_names, ignore = _nnunet_class_names(manifest, data["labels"])
        if data.get("file_ending", FILE_ENDING) != FILE_ENDING:
            raise TrainingSetError(f"{manifest}: file_ending is {data['file_ending']!r}; a training set uses "
                                   f"{FILE_ENDING}")
        if data.get("numTraining", 0) == 0 and not _has_files(root):
            cases: list[str] = []
        else:
            description = describe_dataset(root)
            cases = [case.name for case in description.training]
            for case in description.training:
                _check_case_headers(case.images, case.label, len(channel_names))
        extra = data.get(MANIFEST_KEY, {})
        extra = extra if isinstance(extra, dict) else {}
        slicing = _per_case(manifest, extra, "slicing", cases, drop_unknown=True)   # a case deleted by hand
        # Digests are a cache of what the files hold: one of a case removed by hand is dropped, not an error.
        digests = _per_case(manifest, extra, DIGEST_KEY, cases, drop_unknown=True)
        kept = {key: value for key, value in data.items() if key not in _OWN_KEYS}
        return cls(root, class_names, channel_names, slicing, ignore, cases, digests, kept,
                   written_here=MANIFEST_KEY in data)

    @classmethod
    def open_or_create(cls, folder: str | os.PathLike, class_names: Sequence[str],
                       channel_names: Sequence[str] = ("CT",)) -> "TrainingSet":
        """The set in ``folder``, created (with these names) when the folder is new or empty."""
        root = Path(folder).expanduser()
        if (root / "dataset.json").is_file() or (root.is_dir() and any(root.iterdir())):
            return cls.open(root)
        return cls.create(root, class_names, channel_names)

    # ------------------------------------------------------------------------------------ adding
    def add_scan(self, case_id: str, image: np.ndarray, meta: Optional[VolumeMeta], labels: np.ndarray,
                 class_names: Sequence[str], *, verified_slices: Optional[Sequence[int]] = None,
                 slicing: str = "axial", verified_mask: Optional[np.ndarray] = None,
                 channel_names: Optional[Sequence[str]] = None) -> AddResult:
        """Add (or merge) one scan's verified labels; see the module docstring for the rules.

        ``image`` is in file order, ``(i, j, k)`` or ``(i, j, k, C)`` channels last, with its ``meta``
        (None: 1 mm voxels in voxel order); ``labels`` ``(i, j, k)`` hold values indexing
        ``class_names`` (background first). What was verified is either ``verified_slices``
        (canonical slice indices along ``slicing``) or ``verified_mask`` (a boolean voxel mask in
        file order, e.g. brush strokes); at least one voxel must be verified.
        """
        with self._locked():
            self._reload()
            return self._add_scan(case_id, image, meta, labels, class_names, verified_slices, slicing,
                                  verified_mask, channel_names)

    def _locked(self) -> contextlib.AbstractContextManager[None]:
        return _set_lock(self.root)

    def _reload(self) -> None:
        """Take what is on disk now: another program may have added to the set since it was opened
        (called holding the lock, so an add a killed program left half done is finished here)."""
        _finish_interrupted_add(self.root)
        current = TrainingSet._read(self.root)
        self.class_names, self.channel_names = current.class_names, current.channel_names
        self._slicing, self._stored_ignore, self._cases = current._slicing, current._stored_ignore, current._cases
        self._digests, self._kept = current._digests, current._kept
        self._written_here = current._written_here

    def _add_scan(self, case_id, image, meta, labels, class_names, verified_slices, slicing, verified_mask,
                  channel_names) -> AddResult:
        requested = case_id_from_name(case_id)
        image = np.asarray(image)
        image = image[..., None] if image.ndim == 3 else image
        meta = _clean_meta(meta if meta is not None else VolumeMeta.identity(known=False))
        labels = self._check_scan(requested, image, labels, class_names, channel_names)
        if meta.spatial_shape is not None and tuple(meta.spatial_shape) != image.shape[:3]:
            raise TrainingSetError(f"{self.root} (case {requested}): the scan {image.shape[:3]} is not the volume "
                                   f"its geometry describes {tuple(meta.spatial_shape)}")
        digest = image_digest(image, meta)
        digests = self._case_digests()   # once for an older set's cases: recorded by this add
        # The case holding this scan, whatever it is called; else the name asked for, or, where another scan has
        # it (two patients' ct.nii.gz), the next free one: napari names a case after the file alone.
        name = self._holder(digests, digest, image.shape[:3], meta) or _free_case_name(requested, self._cases)
        verified = self._verified_mask(name, image.shape[:3], meta, verified_slices, slicing, verified_mask)
        if digests.get(name) == digest and self._on_grid_of(name, image.shape[:3], meta):
            # This scan, which the set may store in another voxel order (its NIfTI, its DICOM series).
            image, labels, verified, meta = self._in_stored_order(name, meta, image, labels, verified)
        digests[name] = digest
        previous_names = self.class_names
        merged_names, value_of = _merge_class_names(self.class_names, class_names, self.manifest)
        ignore = len(merged_names)
        dtype = _label_dtype(ignore)
        new_case = name not in self._cases
        if new_case:
            label_map = np.full(image.shape[:3], ignore, dtype=dtype)
        else:
            label_map = self._stored_labels(name, ignore, image, meta)[0]
        label_map[verified] = value_of[labels[verified].astype(np.int64)]
        # Label files holding the old ignore value (now a class's) are rewritten, one at a time.
        moved = self._stored_ignore is not None and ignore != self._stored_ignore
        others = [case for case in self._cases if case != name] if moved else []

        with StagedFiles(self.root / STAGING_FOLDER) as staging:
            if new_case:
                for channel in range(image.shape[3]):
                    save_volume(staging.file(self._image_path(name, channel)), image[..., channel], meta,
                                dtype=_image_dtype(image[..., channel]))
            save_volume(staging.file(self._label_path(name)), label_map, meta, dtype=dtype)
            for case in others:
                case_labels, case_meta = self._stored_labels(case, ignore)
                save_volume(staging.file(self._label_path(case)), case_labels, case_meta, dtype=dtype)
            cases = sorted(set(self._cases) | {name})
            slicing_by_case = {**self._slicing, name: slicing} if verified_slices is not None else dict(self._slicing)
            manifest = _manifest(self._kept, merged_names, self.channel_names, len(cases), slicing_by_case, digests)
            write_json_atomic(staging.file(self.manifest), manifest)
            staging.commit()
        self.class_names, self._stored_ignore, self._cases, self._slicing = merged_names, ignore, cases, slicing_by_case
        self._digests = digests
        added = tuple(n for n in merged_names if n not in previous_names)
        return AddResult(name, new_case, self._verified_slice_count(name, label_map, meta), added, len(others),
                         requested)

    def case_holding(self, image: np.ndarray, meta: Optional[VolumeMeta]) -> Optional[str]:
        """The case whose image is ``image`` (file order, ``(i, j, k)`` or channels last, with its
        ``meta``; in any voxel order), whatever name it was added under; None if the set does not hold it."""
        image = np.asarray(image)
        image = image[..., None] if image.ndim == 3 else image
        meta = meta or VolumeMeta.identity(known=False)
        return self._holder(self._case_digests(record=True), image_digest(image, meta), image.shape[:3], meta)

    def _holder(self, digests: dict[str, str], digest: str, shape: Sequence[int], meta: VolumeMeta
                ) -> Optional[str]:
        """The first case (by name) holding these voxels on this grid."""
        return next((case for case in sorted(digests) if digests[case] == digest and
                     self._on_grid_of(case, shape, meta)), None)

    def _on_grid_of(self, case: str, shape: Sequence[int], meta: VolumeMeta) -> bool:
        """Whether a scan of ``shape`` and ``meta`` has ``case``'s voxel spacing in canonical order (the
        same voxels said to be another size are another scan)."""
        stored_meta = self._stored_meta(case)
        return _same_spacing((shape, meta), (stored_meta.spatial_shape, stored_meta))

    def _in_stored_order(self, case: str, meta: VolumeMeta, *arrays: np.ndarray) -> tuple:
        """``arrays`` (file order of ``meta``, extra axes last) in the voxel order of ``case``'s files, and
        their meta: the same scan stored as a NIfTI and read from its DICOM series differ in voxel order."""
        stored_meta = self._stored_meta(case)
        shape = tuple(stored_meta.spatial_shape)
        given, stored = _geometry(arrays[0].shape[:3], meta, "axial"), _geometry(shape, stored_meta, "axial")
        moved = []
        for array in arrays:
            out = np.empty(shape + array.shape[3:], dtype=array.dtype)
            stored.slice_view(out)[...] = given.slice_view(array)
            moved.append(out)
        return (*moved, _clean_meta(stored_meta))

    def _stored_meta(self, case: str) -> VolumeMeta:
        """The grid of ``case``'s files, from its label file's header (no voxel read)."""
        return read_meta(self._label_path(case))

    def _case_digests(self, record: bool = False) -> dict[str, str]:
        """Every case's image digest: the recorded ones, and those of cases added before digests were
        kept, read from their files once: an add records them with its own write, ``record`` at once."""
        digests = dict(self._digests)
        missing = [case for case in self._cases if case not in digests]
        for case in missing:
            stored, stored_meta = load_channels([self._image_path(case, c) for c in range(len(self.channel_names))])
            digests[case] = image_digest(stored, stored_meta)
        if missing and record:
            self._record_digests({case: digests[case] for case in missing})
        return digests

    def _record_digests(self, found: dict[str, str]) -> None:
        """Write digests read from an older set's files into its dataset.json, so that they are read once;
        a set that cannot be written to (read-only, or busy with another program's add) keeps working
        without them. Another tool's dataset (an nnU-Net dataset.json without our record) is not rewritten
        for them: they are kept in memory only."""
        if not self._written_here:
            self._digests.update(found)
            return
        try:
            with self._locked():
                self._reload()
                self._digests.update({case: digest for case, digest in found.items() if case in self._cases})
                write_json_atomic(self.manifest, self._manifest_data(), overwrite=True)
        except (OSError, TrainingSetError):
            self._digests.update(found)

    # ------------------------------------------------------------------ removing (the user's own act)
    def remove_case(self, case: str) -> None:
        """Delete ``case``: its image and label files and its entries in dataset.json (a scan added by
        mistake). The set's class list stays as it is."""
        with self._locked():
            self._reload()
            self._require(case)
            self._commit(removed=case)

    def unverify_slices(self, case: str, slices: Sequence[int], slicing: Optional[str] = None) -> int:
        """Make canonical ``slices`` of ``case`` (along ``slicing``, default the one it was added with)
        unverified again: their voxels take the ignore label, so training no longer learns them. Each
        slice must hold a verified voxel; a case left with none is refused (remove the case instead).
        Returns the verified slices the case keeps."""
        with self._locked():
            self._reload()
            self._require(case)
            slicing = slicing or self._slicing.get(case, "axial")
            labels, meta = self._read_labels(case)
            labels = labels.astype(_label_dtype(self._stored_ignore))
            geometry = _geometry(labels.shape, meta, slicing)
            indices = sorted({int(i) for i in slices})
            outside = [i for i in indices if not 0 <= i < geometry.n_slices]
            if outside:
                raise TrainingSetError(f"{self.root} (case {case}): slices {outside} are outside its "
                                       f"{geometry.n_slices} {slicing} slices")
            verified = _verified_slices(labels != self._stored_ignore, meta, slicing)
            unchecked = sorted(set(indices) - set(verified))
            if unchecked or not indices:
                raise TrainingSetError(f"{self.root} (case {case}): slice(s) {unchecked or indices} hold no verified "
                                       f"voxel ({slicing}); its verified slices are {_listed(verified)}")
            if len(indices) == len(verified):
                raise TrainingSetError(f"{self.root} (case {case}): that is every verified slice of the case; "
                                       "remove the case instead")
            geometry.slice_view(labels)[indices] = self._stored_ignore
            self._commit(rewritten={case: (labels, meta)})
            return len(verified) - len(indices)

    def merge_cases(self, case: str, other: str, prefer: Optional[str] = None) -> MergeResult:
        """Merge case ``other`` into ``case`` and remove it: for a set in which one scan was added under two
        names (a set an earlier release built; :meth:`summary` names such cases). Both must hold the same
        voxels on the same grid, in any voxel order. Voxels verified in ``other`` alone are copied; voxels
        verified in both with different labels need ``prefer`` (``case`` or ``other``: whose labels win),
        else nothing is written and the error says how many there are."""
        with self._locked():
            self._reload()
            self._require(case)
            self._require(other)
            if case == other:
                raise TrainingSetError(f"{self.root}: a case cannot be merged into itself ({case})")
            if prefer not in (None, case, other):
                raise TrainingSetError(f"{self.root}: prefer names one of the two cases ({case}, {other}), "
                                       f"not {prefer!r}")
            digests = self._case_digests()
            other_labels, other_meta = self._read_labels(other)
            if digests[case] != digests[other] or not self._on_grid_of(case, other_labels.shape, other_meta):
                raise TrainingSetError(f"{self.root}: cases {case} and {other} hold different scans (voxels or "
                                       "spacing differ); only one scan held under two names can be merged")
            labels, meta = self._read_labels(case)
            labels = labels.astype(_label_dtype(self._stored_ignore))
            moved, _ = self._in_stored_order(case, other_meta, other_labels)
            known, known_other = labels != self._stored_ignore, moved != self._stored_ignore
            disagree = known & known_other & (labels != moved)
            disagreeing = int(np.count_nonzero(disagree))
            if disagreeing and prefer is None:
                where = _verified_slices(disagree, meta, self._slicing.get(case, "axial"))
                raise TrainingSetError(f"{self.root}: cases {case} and {other} disagree on {disagreeing:,} voxel(s) "
                                       f"verified in both (slices {_listed(where)} of {case}); say whose labels win "
                                       "(`merge-cases --prefer CASE`); nothing was changed")
            take = known_other & ~known
            copied = int(np.count_nonzero(take))
            if prefer == other:
                take |= disagree
            labels[take] = moved[take]
            slicing = {} if case in self._slicing or other not in self._slicing else {case: self._slicing[other]}
            self._digests.update({c: digests[c] for c in (case, other)})   # an older set's, read above
            self._commit(rewritten={case: (labels, meta)}, removed=other, slicing=slicing)
            return MergeResult(case, other, copied, disagreeing, prefer if disagreeing else None,
                               self._verified_slice_count(case, labels, meta))

    def _require(self, case: str) -> None:
        if case not in self._cases:
            raise TrainingSetError(f"{self.root}: no case {case!r} (cases: {', '.join(self._cases) or 'none'})")

    def _commit(self, rewritten: Optional[dict] = None, removed: Optional[str] = None,
                slicing: Optional[dict[str, str]] = None) -> None:
        """Write ``rewritten`` label maps (case → (labels, meta)), delete case ``removed``'s files and write
        dataset.json to match, all or nothing (dataset.json last)."""
        cases = [c for c in self._cases if c != removed]
        slicing_by_case = {c: v for c, v in {**self._slicing, **(slicing or {})}.items() if c != removed}
        digests = {c: v for c, v in self._digests.items() if c != removed}
        with StagedFiles(self.root / STAGING_FOLDER) as staging:
            for case, (labels, meta) in (rewritten or {}).items():
                save_volume(staging.file(self._label_path(case)), labels, meta, dtype=_label_dtype(self._stored_ignore))
            if removed is not None:
                for channel in range(len(self.channel_names)):
                    staging.remove(self._image_path(removed, channel))
                staging.remove(self._label_path(removed))
            manifest = _manifest(self._kept, self.class_names, self.channel_names, len(cases), slicing_by_case,
                                 digests)
            write_json_atomic(staging.file(self.manifest), manifest)
            staging.commit()
        self._cases, self._slicing, self._digests = cases, slicing_by_case, digests

    # ----------------------------------------------------------------------------------- reading
    def load_case(self, case: str, class_names: Optional[Sequence[str]] = None) -> Case:
        """A stored case for training: its image, and labels with each class renumbered to its index in
        ``class_names`` (default: the set's) and unverified voxels :data:`IGNORE_INDEX`."""
        if case not in self._cases:
            raise TrainingSetError(f"{self.manifest}: no case {case!r} (cases: {', '.join(self._cases) or 'none'})")
        target = tuple(class_names) if class_names is not None else self.class_names
        missing = [n for n in self.class_names[1:] if class_index(target, n) is None]
        if missing:
            raise TrainingSetError(f"{self.manifest}: classes {missing} of the set are not in the class list "
                                   f"{list(target)}")
        image, meta = load_channels([self._image_path(case, c) for c in range(len(self.channel_names))])
        labels, _ = self._read_labels(case, image.shape[:3], meta)
        lut = np.full(max(self.ignore_value, self._stored_ignore or 0) + 1, IGNORE_INDEX, dtype=np.uint8)
        for value, name in enumerate(self.class_names):
            lut[value] = 0 if value == 0 else class_index(target, name)
        return Case(case, image, lut[labels], meta)

    def labelled_cases(self, class_names: Optional[Sequence[str]] = None) -> list[Case]:
        return [self.load_case(case, class_names) for case in self._cases]

    def verified_slices(self, case: str, slicing: Optional[str] = None) -> list[int]:
        """Canonical slices of ``case`` along ``slicing`` (default: the one it was added with) that
        hold a verified voxel."""
        labels, meta = self._read_labels(case)
        return _verified_slices(labels != self._stored_ignore, meta, slicing or self._slicing.get(case, "axial"))

    def summary(self) -> TrainingSetSummary:
        """Cases, verified slices and labelled voxels per class, and cases holding one scan (reads every
        label file, and the images of cases added before the set kept digests)."""
        voxels = np.zeros(len(self.class_names), dtype=np.int64)
        slices = {}
        labelled_for: dict[str, tuple[str, ...]] = {}
        grids: dict[str, tuple] = {}
        for case in self._cases:
            labels, meta = self._read_labels(case)
            grids[case] = (labels.shape, meta)
            known = labels != self._stored_ignore
            counts = np.bincount(labels[known].ravel(), minlength=len(self.class_names))[:len(self.class_names)]
            voxels += counts
            labelled_for[case] = tuple(n for n, c in zip(self.class_names[1:], counts[1:]) if c)
            slices[case] = len(_verified_slices(known, meta, self._slicing.get(case, "axial")))
        # The same voxels said to be another size are another scan, as adding and merge-cases judge it.
        digests = self._case_digests(record=True)
        groups: list[list[str]] = []
        for case in sorted(digests):
            group = next((group for group in groups if digests[group[0]] == digests[case]
                          and _same_spacing(grids[group[0]], grids[case])), None)
            if group is None:
                groups.append([case])
            else:
                group.append(case)
        same_scan = tuple(tuple(group) for group in groups if len(group) > 1)
        return TrainingSetSummary(len(self._cases), sum(slices.values()),
                                  {n: int(v) for n, v in zip(self.class_names, voxels)}, slices, same_scan,
                                  labelled_for)

    # --------------------------------------------------------------------------------- internals
    def _image_path(self, case: str, channel: int) -> Path:
        return self.root / "imagesTr" / f"{case}_{channel:04d}{FILE_ENDING}"

    def _label_path(self, case: str) -> Path:
        return self.root / "labelsTr" / f"{case}{FILE_ENDING}"

    def _manifest_data(self) -> dict:
        return _manifest(self._kept, self.class_names, self.channel_names, len(self._cases), self._slicing,
                         self._digests)

    def _check_scan(self, name: str, image: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
                    channel_names: Optional[Sequence[str]]) -> np.ndarray:
        """The checks of an add; returns ``labels`` as integers (whole-valued floats cast)."""
        where = f"{self.root} (case {name})"
        if image.ndim != 4 or min(image.shape) == 0:
            raise TrainingSetError(f"{where}: expected a 3-D scan (channels last if several), got shape {image.shape}")
        if image.shape[3] != len(self.channel_names):
            raise TrainingSetError(f"{self.manifest}: the set holds {len(self.channel_names)} channel(s) "
                                   f"({', '.join(self.channel_names)}) but case {name} has {image.shape[3]}")
        if channel_names is not None and tuple(channel_names) != self.channel_names:
            raise TrainingSetError(f"{self.manifest}: the set's channels are {list(self.channel_names)}, case "
                                   f"{name}'s are {list(channel_names)}; use a set of that kind of scan")
        if image.dtype.kind not in "fiub" or not np.isfinite(image).all():
            raise TrainingSetError(f"{where}: the scan must hold finite numbers")
        labels = whole_label_values(labels, where, TrainingSetError)
        if labels.shape != image.shape[:3]:
            raise TrainingSetError(f"{where}: labels {labels.shape} are not on the scan's grid {image.shape[:3]}")
        if labels.size and labels.max() >= len(class_names):
            raise TrainingSetError(f"{where}: labels must be whole numbers 0..{len(class_names) - 1} (one per "
                                   f"class name: {', '.join(class_names)})")
        return labels

    def _verified_mask(self, name: str, shape: tuple[int, ...], meta: VolumeMeta,
                       slices: Optional[Sequence[int]], slicing: str, mask: Optional[np.ndarray]) -> np.ndarray:
        if (slices is None) == (mask is None):
            raise ValueError("give either verified_slices or verified_mask")
        if mask is not None:
            verified = np.asarray(mask, dtype=bool)
            if verified.shape != tuple(shape):
                raise TrainingSetError(f"{self.root} (case {name}): verified mask {verified.shape} is not on the "
                                       f"scan's grid {tuple(shape)}")
        else:
            geometry = _geometry(shape, meta, slicing)
            indices = sorted({int(i) for i in slices})
            outside = [i for i in indices if not 0 <= i < geometry.n_slices]
            if outside:
                raise TrainingSetError(f"{self.root} (case {name}): slices {outside} are outside its "
                                       f"{geometry.n_slices} {slicing} slices")
            verified = np.zeros(shape, dtype=bool)
            geometry.slice_view(verified)[indices] = True
        if not verified.any():
            raise TrainingSetError(f"{self.root} (case {name}): nothing is verified; mark edited or checked slices")
        return verified

    def _read_labels(self, case: str, shape: Optional[tuple[int, ...]] = None,
                     image_meta: Optional[VolumeMeta] = None) -> tuple[np.ndarray, VolumeMeta]:
        path = self._label_path(case)
        labels, meta = load_labels(path)
        if shape is not None and labels.shape != tuple(shape):
            raise TrainingSetError(f"{path}: label map {labels.shape} is not on its image's grid {tuple(shape)}")
        if image_meta is not None and not np.allclose(meta.affine, image_meta.affine, atol=1e-3):
            raise TrainingSetError(f"{path}: label map and image have different affines (another grid)")
        present = np.flatnonzero(np.bincount(labels.ravel())) if labels.size else np.zeros(0, np.int64)
        stray = [int(v) for v in present if v >= len(self.class_names) and v != self._stored_ignore]
        if stray:
            raise TrainingSetError(f"{path}: label value {stray[0]} is neither a class of {self.manifest.name} "
                                   f"(0..{len(self.class_names) - 1}) nor its ignore value")
        return labels, meta

    def _stored_labels(self, case: str, ignore: int, image: Optional[np.ndarray] = None,
                       meta: Optional[VolumeMeta] = None) -> tuple[np.ndarray, VolumeMeta]:
        """A stored label map with its ignore value moved to ``ignore``, and the label file's meta. With
        ``image`` (a merge), the stored image must be that image."""
        if image is not None:
            stored, stored_meta = load_channels([self._image_path(case, c) for c in range(image.shape[3])])
            if stored.shape != image.shape or not np.allclose(stored_meta.affine, meta.affine, atol=1e-3) or \
                    not np.allclose(stored, image, rtol=1e-5, atol=1e-3):
                raise TrainingSetError(f"{self._image_path(case, 0)}: case {case} holds another image (grid or "
                                       "voxels differ); add this scan under another name")
        labels, label_meta = self._read_labels(case, image.shape[:3] if image is not None else None, meta)
        labels = labels.astype(_label_dtype(ignore))
        if self._stored_ignore is not None and ignore != self._stored_ignore:
            labels[labels == self._stored_ignore] = ignore
        return labels, label_meta

    def _verified_slice_count(self, case: str, label_map: np.ndarray, meta: VolumeMeta) -> int:
        return len(_verified_slices(label_map != self._stored_ignore, meta, self._slicing.get(case, "axial")))


@contextlib.contextmanager
def _set_lock(root: Path) -> Iterator[None]:
    lock = FileLock(str(root / LOCK_FILE), timeout=LOCK_WAIT_SECONDS)
    try:
        lock.acquire()
    except Timeout:
        raise TrainingSetError(f"{root}: another program has been adding to this training set for "
                               f"{LOCK_WAIT_SECONDS:g} s; try again when it has finished") from None
    except OSError as error:    # a read-only set (a CD, a shared folder): it can be trained from, not changed
        raise TrainingSetError(f"{root}: this training set cannot be changed here ({error.strerror or error}); "
                               "copy it to a folder you can write to") from None
    try:
        yield
    finally:
        lock.release()


def finish_interrupted_add(root: Path) -> None:
    """Finish an add that a killed program left half moved into place in the set at ``root``, if there is one
    (nothing is locked or written otherwise): before a set's cases are read, by this module or as an nnU-Net
    dataset by ``train``."""
    if (root / STAGING_FOLDER / JOURNAL_NAME).is_file():
        with _set_lock(root):
            _finish_interrupted_add(root)


def _finish_interrupted_add(root: Path) -> None:
    """Carry an add (or removal) that a killed program stopped while moving its files into place
    through to its end, so its label file is not left in the staging folder, where the next add would
    clear it. Caller holds the set's lock."""
    try:
        finished = finish_interrupted_commit(root / STAGING_FOLDER)
    except OSError as error:
        raise TrainingSetError(f"{root}: an earlier add was stopped while moving its files into place and "
                               f"could not be finished here ({error.strerror or error}); open the set where "
                               "it can be written") from None
    if finished:
        warnings.warn(f"{root.name}: finished an add that was stopped while moving its files into place "
                      f"({len(finished)} file(s))", stacklevel=3)


def _merge_class_names(current: tuple[str, ...], incoming: Sequence[str], manifest: Path
                       ) -> tuple[tuple[str, ...], np.ndarray]:
    """(the merged class list, look-up table incoming label value → merged value): by class
    (:func:`~medconddiff.class_match.class_key`: a SEG's ``Liver`` is the set's ``liver``, a planning
    system's ``Tumor`` its ``tumour``), spelled as the set spells it; new classes last."""
    incoming = tuple(str(n) for n in incoming)
    if len(incoming) < 1:
        raise TrainingSetError(f"{manifest}: the scan's class names are empty (background first)")
    if not one_class_each(incoming[1:]) or _names_ignore(incoming[1:]):
        raise TrainingSetError(f"{manifest}: the scan's class names {list(incoming)} repeat a name or use "
                               f"{IGNORE_NAME!r}, which the set keeps for unverified voxels")
    merged = merge_class_lists(current, incoming)
    values = [0] + [class_index(merged, name) for name in incoming[1:]]   # background is background
    return merged, np.asarray(values, dtype=np.int64)


def _manifest(kept: dict, class_names: Sequence[str], channel_names: Sequence[str], count: int,
              slicing_by_case: dict[str, str], digests: dict[str, str]) -> dict:
    labels = {name: value for value, name in enumerate(class_names)}
    labels[IGNORE_NAME] = len(class_names)
    return {**kept,
            "channel_names": {str(i): name for i, name in enumerate(channel_names)}, "labels": labels,
            "numTraining": count, "file_ending": FILE_ENDING,
            MANIFEST_KEY: {"slicing": dict(sorted(slicing_by_case.items())),
                           DIGEST_KEY: dict(sorted(digests.items()))}}


def _per_case(manifest: Path, extra: dict, key: str, cases: Sequence[str], drop_unknown: bool = False
              ) -> dict[str, str]:
    """The ``medconddiff.<key>`` mapping case → text of dataset.json; every case named must have files
    (or, ``drop_unknown``, the others are left out)."""
    values = extra.get(key, {})
    if not isinstance(values, dict) or any(not isinstance(v, str) for v in values.values()):
        raise TrainingSetError(f"{manifest}: '{MANIFEST_KEY}.{key}' must map case names to text")
    if drop_unknown:
        return {case: value for case, value in values.items() if case in cases}
    unknown = sorted(set(values) - set(cases))
    if unknown:
        raise TrainingSetError(f"{manifest}: '{MANIFEST_KEY}.{key}' names cases without files: {unknown}")
    return dict(values)


def image_digest(image: np.ndarray, meta: VolumeMeta) -> str:
    """sha256 of a scan ``(i, j, k, C)`` (file order of ``meta``) as a set stores it, read in canonical
    order (RAS, axial slices first): the canonical shape, then each channel's voxels in their stored type
    (:func:`_image_dtype`, little-endian). The scan handed to :meth:`TrainingSet.add_scan`, read back
    from the set, or stored in another voxel order (a NIfTI and its DICOM series) gives the same digest."""
    canonical = _geometry(image.shape[:3], meta, "axial").slice_view(image)
    digest = hashlib.sha256(repr(tuple(int(n) for n in canonical.shape)).encode())
    for channel in range(image.shape[3]):
        voxels = canonical[..., channel]
        stored = np.ascontiguousarray(voxels, dtype=_image_dtype(voxels).newbyteorder("<"))
        digest.update(memoryview(stored).cast("B"))
    return digest.hexdigest()


def _free_case_name(requested: str, cases: Sequence[str]) -> str:
    """``requested``, or ``requested_2``, ``_3``… where a case has that name. Compared without case: on the file
    systems of macOS and Windows ``CT.nii.gz`` and ``ct.nii.gz`` are one file, so two such cases would share it."""
    taken = {case.lower() for case in cases}
    name, number = requested, 1
    while name.lower() in taken:
        number += 1
        name = f"{requested}_{number}"
    return name


def _names_ignore(class_names: Sequence[str]) -> bool:
    """Whether a class list calls a class what the set keeps for unverified voxels."""
    return any(class_key(name) == class_key(IGNORE_NAME) for name in class_names)


def _check_names(manifest: Path, class_names: tuple[str, ...], channel_names: tuple[str, ...]) -> None:
    if len(class_names) < 2 or not one_class_each(class_names) or _names_ignore(class_names):
        raise TrainingSetError(f"{manifest}: class names {list(class_names)} must be unique, at least two "
                               f"(background first) and must not include {IGNORE_NAME!r}")
    if not channel_names or any(not n.strip() for n in channel_names):
        raise TrainingSetError(f"{manifest}: give one non-empty name per channel")


def _has_files(root: Path) -> bool:
    return any(any(p.name.endswith(FILE_ENDING) for p in (root / sub).iterdir())
               for sub in ("imagesTr", "labelsTr") if (root / sub).is_dir())


def _check_case_headers(images: Sequence[Path], label: Optional[Path], channels: int) -> None:
    """Label on its image's grid, channel files alike: from the headers, no voxel read."""
    if len(images) != channels:
        raise TrainingSetError(f"{images[0]}: {len(images)} channel file(s) but dataset.json names {channels}")
    # Affines in millimetres (read_meta): a label saved in mm over an image whose header counts metres lies on
    # its grid, and a 1e-3 tolerance means a micrometre, not a millimetre of a file in metres.
    first = read_meta(images[0])
    for path in (*images[1:], label):
        other = read_meta(path)
        if other.spatial_shape != first.spatial_shape or not np.allclose(other.affine, first.affine, atol=1e-3):
            raise TrainingSetError(f"{path}: shape {other.spatial_shape} / affine differ from {images[0].name}'s "
                                   f"{first.spatial_shape} (not on the image's grid)")


def _clean_meta(meta: VolumeMeta) -> VolumeMeta:
    """The meta with no free-text header field (they may name the patient) and no source path."""
    return dataclasses.replace(meta.without_header_text(), source=None)


def _same_spacing(grid: tuple, other: tuple) -> bool:
    """Whether two (shape, meta) grids have one voxel spacing in canonical order (the same voxels said to be
    another size are another scan)."""
    spacings = [_geometry(shape, meta, "axial").canonical_spacing for shape, meta in (grid, other)]
    return bool(np.allclose(*spacings, rtol=1e-4, atol=1e-3))


def _geometry(shape: Sequence[int], meta: VolumeMeta, slicing: str):
    from .config import PreprocessPlan
    from .preprocess import ScanPreprocessor

    return ScanPreprocessor(PreprocessPlan(slicing=slicing)).geometry(tuple(shape), meta)


def _verified_slices(known: np.ndarray, meta: VolumeMeta, slicing: str) -> list[int]:
    view = _geometry(known.shape, meta, slicing).slice_view(known)
    return np.flatnonzero(view.reshape(view.shape[0], -1).any(axis=1)).tolist()


def _few(names: Sequence[str], limit: int = 3) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _listed(slices: Sequence[int]) -> str:
    return slice_list_text(slices) if len(slices) else "none"


def _image_dtype(channel: np.ndarray) -> np.dtype:
    """int16 for whole numbers that fit (CT in HU: a quarter of float32's size), else float32."""
    info = np.iinfo(np.int16)
    if channel.dtype.kind in "iub" or (channel.size and np.array_equal(channel, np.round(channel))):
        if channel.min() >= info.min and channel.max() <= info.max:
            return np.dtype(np.int16)
    return np.dtype(np.float32)


def _label_dtype(ignore: int) -> np.dtype:
    return np.dtype(np.uint8) if ignore <= 255 else np.dtype(np.uint16)
