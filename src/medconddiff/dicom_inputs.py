"""How the command line tells DICOM from NIfTI inputs and picks the DICOM series to read.

Decisions (the commands' help repeats them):

* **A file** is DICOM when :func:`medconddiff.dicom_series.is_dicom_path` says so (``.dcm`` /
  ``.dicom``, or DICOM's ``DICM`` marker); anything else goes to the NIfTI reader.
* **A folder** holding ``.nii``/``.nii.gz`` files at its top level is a NIfTI cohort, one scan per
  file, as before. A folder without them that holds DICOM anywhere below it is a DICOM folder: one
  or several series (a PACS export, or a folder of patients' folders). A folder with both is
  refused: nothing says which one the user meant, and a cohort run must not quietly skip either.
* **Several series**: one must be chosen with ``--series N|UID``, or all segmented with
  ``--all-series``; the refusal lists every series, one line each (number, description, modality,
  images, size, UID). With ``--all-series``, a series whose every image is a localizer (scout) is
  skipped with a note; localizer images inside a series are left out by the reader, with a note.
* **One image in a folder** (a series of one slice) is refused: it is not a volume, usually a scout,
  a dose screen or a key image. Given as a file, one image is segmented as a 2-D image, like a 2-D
  NIfTI.
* **Names** of outputs come from the series number and description, reduced to letters, digits,
  ``.``, ``_`` and ``-``: ``series3_CT_abdomen_1a2b3c4d``, with a hash of the UID, so that two
  patients' series 3 written beside their folders do not collide; with ``--all-series`` two series
  with the same name get it. Never the folder's or a file's name: exports name both after the
  patient. No patient attribute is ever read for a name or a message.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

from .errors import ConfigError, UserInputError
from .nifti import NIFTI_SUFFIXES

if TYPE_CHECKING:   # pydicom is imported only when a DICOM input is read
    from .dicom_series import SeriesList

__all__ = ["DicomPick", "folder_kind", "is_dicom_input", "is_dicom_seg_name", "media_folder", "pick_series",
           "read_pick", "series_file_name", "series_case_name", "file_safe", "top_level_nifti"]

DICOM_SEG_SUFFIXES = (".dcm", ".dicom")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class DicomPick:
    """One DICOM series to read: ``read_dicom_series(path, series)``; ``name`` is file-safe.
    ``listed`` is the folder's listing the pick was made from: its headers are not read again."""

    path: Path
    series: Optional[str]
    name: str
    label: str
    listed: Optional[SeriesList] = field(default=None, repr=False, compare=False)
    #: The series folder when one of its files was given and reads the series (outputs go beside it).
    folder: Optional[Path] = None


def is_dicom_seg_name(path: Path) -> bool:
    """An output name that asks for a DICOM SEG rather than NIfTI."""
    return Path(path).name.lower().endswith(DICOM_SEG_SUFFIXES)


def top_level_nifti(folder: Path) -> list[Path]:
    """The NIfTI files directly in ``folder`` (a cohort's scans), hidden files left out."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(NIFTI_SUFFIXES)
                  and not p.name.startswith("."))


def folder_kind(folder: Path) -> str:
    """``"nifti"`` (a cohort of NIfTI files) or ``"dicom"`` (one or several series); see the module doc."""
    from .dicom_series import is_dicom_path

    nifti = top_level_nifti(folder)
    has_dicom = is_dicom_path(folder)
    if nifti and has_dicom:
        raise UserInputError(f"{folder} holds both NIfTI files (e.g. {nifti[0].name}) and DICOM files: name the "
                             "NIfTI files themselves to segment them, or move them out to read the DICOM series")
    if nifti:
        return "nifti"
    if has_dicom:
        return "dicom"
    raise UserInputError(f"{folder}: no NIfTI (.nii/.nii.gz) files and no DICOM files in this folder")


def is_dicom_input(path: Path) -> bool:
    """Whether a scan path given on the command line is read as DICOM."""
    from .dicom_series import is_dicom_path

    path = Path(path)
    if path.is_dir():
        return folder_kind(path) == "dicom"
    return is_dicom_path(path)


def media_folder(path: Path) -> Path:
    """``path``, or the folder of a CD or USB export whose DICOMDIR (its index) ``path`` is: what the
    user means by opening it."""
    from .dicom_folder import is_media_directory

    return path.parent if path.is_file() and is_media_directory(path) else path


def file_safe(text: str, limit: int = 64) -> str:
    return _UNSAFE.sub("_", text).strip("._-")[:limit].rstrip("._-")


def series_file_name(number: Optional[int], description: str, part: str = "") -> str:
    """``series3_CT_abdomen`` for series 3 'CT abdomen'; ``series5_Dixon_echo_2`` for one part of a split
    series (a listed :class:`~medconddiff.dicom_folder.SeriesInfo`'s or a read
    :class:`~medconddiff.dicom_series.DicomSource`'s number, description and part)."""
    return _joined(_series_pieces(number, description, part, 48, 24))


def _listed_file_name(info) -> str:
    """:func:`series_file_name` of a listed :class:`~medconddiff.dicom_folder.SeriesInfo`."""
    return series_file_name(info.number, info.description, info.part)


def _pick_name(info) -> str:
    """A DICOM input's output name: :func:`series_file_name` of a listed series and a hash of its UID."""
    return _joined([_listed_file_name(info), _uid_tag(info.uid)])


def series_case_name(source) -> str:
    """A training-set case name for a scan read from DICOM (a :class:`~medconddiff.dicom_series.DicomSource`):
    ``series2_CT_venous_1a2b3c4d``, the series by number, description and part, and a hash of its UID,
    so that two patients' "series 2 'CT venous'" are two cases while the same series added again merges
    into its own. No patient attribute, no folder name."""
    pieces = _series_pieces(source.series_number, source.series_description, source.part, 24, 12)
    return _joined([*pieces, _uid_tag(f"{source.series_uid}#{source.part}")])


def _series_pieces(number, description: str, part: str, description_limit: int, part_limit: int) -> list[str]:
    """``series<N>``, the description and the part, each made file-safe (an empty one is left out later)."""
    return [f"series{'' if number is None else number}", file_safe(description, description_limit),
            file_safe(part, part_limit)]


def _joined(pieces) -> str:
    return "_".join(piece for piece in pieces if piece)


def _uid_tag(uid: str) -> str:
    return hashlib.sha1(uid.encode()).hexdigest()[:8]


def pick_series(path: Path, series: Optional[str], all_series: bool,
                note: Callable[[str, str], None]) -> list[DicomPick]:
    """The series of ``path`` to segment. A single file is itself; a folder gives one series (the only
    one, or ``series``) or, with ``all_series``, each series that is not only localizer images, and so
    does a file that holds several (an enhanced multi-frame file of several echoes or phases).
    ``note(text, where)`` is told what was skipped while looking."""
    from .dicom_folder import chosen_series_index, series_listing
    from .dicom_series import DicomError, list_series

    path = Path(path)
    if all_series and series is not None:
        raise ConfigError("give --series N|UID or --all-series, not both")
    infos = list_series(path)
    if path.is_file():
        scanned = infos.scanned
        if series is None and scanned is not None and scanned.file_alone is not None:
            # One file of a series read with the files beside it: named as the series, written beside its folder.
            return [DicomPick(path, None, _pick_name(infos[0]), infos[0].name, infos, path.parent)]
        if series is None and not all_series and len(infos) <= 1:
            # Neither the file's name nor its folder's: exports name both after the patient.
            return [DicomPick(path, None, _pick_name(infos[0]), infos[0].name, infos)]
    else:
        for text in infos.notes:
            note(text, str(path))

    if all_series:
        picks, taken = [], {}
        for info in infos:
            if info.localizers and info.localizers == info.instances:
                note("skipped: every image is a localizer (scout)", info.name)
                continue
            taken.setdefault(_listed_file_name(info), []).append(info)
        for name, group in taken.items():
            for info in group:
                unique = name if len(group) == 1 else f"{name}_{_uid_tag(info.uid)}"
                picks.append(DicomPick(path, info.uid, unique or _uid_tag(info.uid), info.name, infos))
        if not picks:
            raise DicomError(f"{path}: no series to segment (only localizers):\n{series_listing(infos)}")
        return picks
    if series is None:
        if len(infos) > 1:
            raise DicomError(f"{path} holds {len(infos)} DICOM series: choose one with --series N|UID, or "
                             f"segment each with --all-series\n{series_listing(infos)}")
        return [DicomPick(path, None, _pick_name(infos[0]), infos[0].name, infos)]
    match = infos[chosen_series_index(path, infos, series)]
    return [DicomPick(path, match.uid, _pick_name(match), match.name, infos)]


def read_pick(pick: DicomPick):
    """Read a picked series as a :class:`~medconddiff.dicom_series.DicomScan`; a folder's one-image
    series is refused (see the module doc)."""
    from .dicom_series import DicomError, read_dicom_series

    scan = read_dicom_series(pick.path, pick.series, listed=pick.listed)
    if pick.path.is_dir() and len(scan.source.sop_instance_uids) == 1:
        raise DicomError(f"{pick.label} in {pick.path} has one image: not a volume (a scout, dose screen or key "
                         "image?); to segment it as a 2-D image, give its .dcm file")
    return scan
