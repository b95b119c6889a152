"""A scan and its labels named on the command line (``evaluate --image/--label``, ``finetune IMAGE
LABELS``): the scan is NIfTI or DICOM (a series folder or a .dcm file, told apart as ``segment``
does; a folder of several series needs ``--series``); its labels are a NIfTI on the scan's voxels, or
for a DICOM scan a DICOM SEG that references the series (read onto its voxels by the images it
references) or an RT structure set drawn on it (its closed contours filled on the series' voxels).
No image is read until a loader is called (a DICOM input's headers are, to choose its series); no
patient attribute names anything.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Sequence

from ..errors import ConfigError, UserInputError


class LabelledInput(NamedTuple):
    path: Path                         # the scan as given
    name: str                          # file-safe: the scan file's name, or the DICOM file's or folder's
    label: str                         # what the scan is called in a record: the file's stem, or the series
                                       # by number and description (no patient attribute)
    description: str                   # for messages: the path, or the series and its folder
    load_image: Callable[[], tuple]    # () -> (array in file order, VolumeMeta)
    load_labels: Callable[[], tuple]   # () -> (labels in file order, VolumeMeta; None for a DICOM SEG)
    is_dicom: bool
    label_is_seg: bool = False         # the labels are DICOM: a SEG or an RT structure set
    # () -> the DicomSource of the series, once load_image has read it (None for NIfTI)
    dicom_source: Callable[[], Any] = lambda: None

    def label_class_names(self, label_path: Path, labels) -> Optional[tuple[str, ...]]:
        """The class names a DICOM SEG (its segment labels) or RT structure set (its ROI names) gives its
        labels, read as ``labels``; None for NIfTI labels, which name nothing."""
        if not (self.is_dicom and self.label_is_seg):
            return None
        from ..dicom_rtstruct import is_rtstruct, rtstruct_class_names
        from ..dicom_seg import segment_class_names

        if is_rtstruct(label_path):
            return rtstruct_class_names(label_path)
        return segment_class_names(label_path, labels)

    def load_on_one_grid(self, label_path: Path, channel_files: Sequence[Path] = (), several_channels: bool = False):
        """``(image, meta, labels)``, the labels checked to lie on the image's voxels (shape, and affine where
        the labels have one). ``several_channels`` (or ``channel_files``) reads a NIfTI scan as channels
        (a 4-D file, or one file per channel); a DICOM series is one channel and takes no channel file."""
        import numpy as np

        from ..nifti import load_channels

        if self.is_dicom and channel_files:
            raise ConfigError("--channel-file adds NIfTI channel files; a DICOM series is one channel")
        if self.is_dicom or not (several_channels or channel_files):
            image, meta = self.load_image()
        else:
            image, meta = load_channels([self.path, *channel_files])
        from ..geometry import labels_on_image_grid

        labels, label_meta = self.load_labels()
        # A DICOM SEG has no affine of its own: it was read onto the series' voxels by the images it references.
        # Labels drawn over another tool's copy of the scan (dcm2niix flips a series' rows) lie on its grid in
        # another voxel order: moved onto the scan's voxels, as evaluate reads them.
        labels, placed = labels_on_image_grid(labels, None if label_meta is None else label_meta.affine,
                                              meta.affine, image.shape)
        if labels.shape != image.shape[:3]:
            raise UserInputError(f"{label_path} has shape {labels.shape}, the scan {image.shape[:3]}")
        if placed == "affine differs":
            raise UserInputError(f"{label_path} does not lie on the scan's grid (another affine)")
        if placed == "reordered":
            print(f"medconddiff: note: {label_path.name} stores the scan's grid in another voxel order; read onto "
                  "the scan's voxels", file=sys.stderr)
        return image, meta, labels


def kept_labels(items: Optional[Sequence[str]], labels, class_names: Sequence[str], known: Sequence[str],
                where: str) -> tuple[Any, tuple[str, ...]]:
    """``(labels, class_names)`` with only the ``--keep-classes`` ``items`` kept (all when None); notes to stderr
    name what was left out, and warn where that is a class of ``known`` (the set's or the start model's),
    whose voxels are then learned as background."""
    from ..class_match import body_outline_classes, class_index, keep_classes

    if not items:
        outlines = [class_names[index] for index in body_outline_classes(class_names)]
        if outlines:
            print(f"{where}: note: {', '.join(map(repr, outlines))} looks like a body outline, which covers every "
                  "slice: it is learned as a class and makes every slice it is drawn on 'labelled'; to learn only "
                  "the target, name it with --keep-classes (e.g. --keep-classes GTV=lesion)", file=sys.stderr)
        return labels, tuple(class_names)
    kept = keep_classes(class_names, items, labels)
    if kept.left_out:
        shown = ", ".join(map(repr, kept.left_out[:8])) + (f" and {len(kept.left_out) - 8} more"
                                                            if len(kept.left_out) > 8 else "")
        print(f"{where}: note: left out (counted as background): {shown}", file=sys.stderr)
    forgotten = [name for name in kept.left_out if class_index(known, name) is not None]
    if forgotten:
        print(f"{where}: warning: {', '.join(map(repr, forgotten))} {'is a class' if len(forgotten) == 1 else 'are classes'}"
              " the model already learns: left out, its voxels are learned as background; keep it with "
              "--keep-classes", file=sys.stderr)
    return kept.apply(labels), kept.class_names


def labelled_input(image: Path, label: Path, series: Optional[str] = None,
                   series_flag: str = "--series", label_flag: str = "--label",
                   image_flag: str = "--image") -> LabelledInput:
    """Loaders for ``image`` and its ``label`` (see the module doc); notes about skipped files go to
    stderr, once each. ``*_flag`` name the arguments in error messages."""
    from ..dicom_inputs import is_dicom_input, is_dicom_seg_name, pick_series, read_pick
    from ..dicom_series import is_dicom_path
    from ..nifti import load_labels, load_volume

    image, label = Path(image), Path(label)
    label_is_seg = (label.is_file() and is_dicom_path(label)) or is_dicom_seg_name(label)
    if not is_dicom_input(image):
        if series is not None:
            raise ConfigError(f"{series_flag} chooses a DICOM series; {image} is not DICOM")
        if label_is_seg:
            raise ConfigError(f"{label_flag} {label} is DICOM: a DICOM SEG is read onto the series it references, "
                              f"so {image_flag} must be that DICOM series")
        return LabelledInput(image, image.name, image.name.split(".")[0], str(image), lambda: load_volume(image),
                             lambda: load_labels(label), False)

    shown: set[str] = set()

    def note(text: str, where: str) -> None:
        if text not in shown:   # the folder's notes come again with the series read from it
            shown.add(text)
            print(f"{where}: note: {text}", file=sys.stderr)

    pick = pick_series(image, series, False, note)[0]
    read: dict[str, Any] = {}

    def load_dicom():
        scan = read_pick(pick)
        read["source"], read["scan"] = scan.source, scan
        for text in scan.source.notes:
            note(text, pick.label)
        return scan.volume, scan.meta

    def load_seg():
        from ..dicom_rtstruct import is_rtstruct, read_rtstruct
        from ..dicom_seg import read_dicom_seg

        if is_rtstruct(label):
            # Contours are filled on the series' voxels: its geometry comes from the scan read first.
            structures = read_rtstruct(label, read["scan"] if "scan" in read else read_pick(pick))
            for text in structures.notes:
                note(text, pick.label)
            return structures.labels, None
        return read_dicom_seg(label, pick.path, series=pick.series), None

    return LabelledInput(image, pick.name, pick.label, f"{pick.label} in {image}", load_dicom,
                         load_seg if label_is_seg else (lambda: load_labels(label)), True, label_is_seg,
                         lambda: read.get("source"))
