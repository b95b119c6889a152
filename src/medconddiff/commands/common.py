"""What the subcommands share: slice flags, device checks and how a failure is reported.

Every command module may import this one; it imports no command module and not
:mod:`medconddiff.cli` (which loads the commands), so importing any command alone cannot cycle.
Light on purpose: ``medconddiff --help`` imports it.
"""

from __future__ import annotations

import traceback
from typing import Optional

from ..errors import ConfigError, UserInputError, storage_error, user_error_types
from ..slice_lists import SLICE_SYNTAX, parse_slices

__all__ = ["SLICES_HELP", "check_device", "failure_report", "is_out_of_memory", "scan_slices",
           "user_error_types", "UserInputError"]

#: The words every slice flag's help uses (the syntax comes from medconddiff.slice_lists).
SLICES_HELP = (f"canonical slices along the model's slicing direction (axial: counted from inferior, whatever "
               f"the file's voxel order), written as {SLICE_SYNTAX}")


def scan_slices(text: Optional[str], n_slices: int, flag: str = "--slices",
                where: str = "the scan") -> Optional[list[int]]:
    """The slice indices a flag names, checked against the scan's ``n_slices``; None = all slices."""
    return parse_slices(text, n_slices, what=flag, where=where)


def labelled_or_named_slices(text: str, geometry, labels, labels_path, where: str, purpose: str) -> list[int]:
    """The canonical slices a ``--slices`` of ``finetune`` / ``add-to-set`` names along ``geometry``'s
    slicing: a slice list, or ``labelled`` (every slice of ``labels``, file order, with a non-zero
    label). Neither may come out empty; ``purpose`` says what the slices are for in that message."""
    if text.strip().lower() == "labelled":
        view = geometry.slice_view(labels)
        slices = [i for i in range(geometry.n_slices) if view[i].any()]
        if not slices:
            raise UserInputError(f"{labels_path} has no labelled slice")
        return slices
    slices = scan_slices(text, geometry.n_slices, where=where)
    if not slices:
        raise ConfigError(f"--slices is empty: name the slices {purpose}, or 'labelled'")
    return slices


def check_device(device: str) -> None:
    """Refuse a --device this machine cannot run before any file is read (a clear line, not a torch trace)."""
    if device == "auto":
        return
    from ..devices import resolve_device

    try:
        resolve_device(device)
    except ConfigError as error:
        raise ConfigError(f"--{error}") from None


def is_out_of_memory(error: BaseException) -> bool:
    """Host or GPU memory ran out (torch's OutOfMemoryError is a RuntimeError, matched by name to keep
    this module free of torch)."""
    return isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError"


def failure_report(error: BaseException, prefix: str) -> tuple[str, int]:
    """What to print for ``error`` and the exit status it implies.

    A user error (:func:`medconddiff.errors.user_error_types`), a full, read-only or failing disk among
    them, is one line, status 2. Running out of memory is one line saying so, status 1: a traceback would
    only point at whichever allocation happened to fail. Anything else is a bug: the full traceback, then
    one line saying so, status 1.
    """
    if isinstance(error, user_error_types()):
        return f"{prefix}: {error}", 2
    # A full, read-only or failing disk met outside atomic_write (a folder made, a marker written, a scan read).
    storage = storage_error(error, _file_name(error), "read or write")
    if storage is not None:
        return f"{prefix}: {storage}", 2
    if is_out_of_memory(error):
        detail = str(error).splitlines()[0] if str(error) else ""
        return (f"{prefix}: out of memory ({type(error).__name__}{': ' + detail if detail else ''}); "
                "free memory, use fewer slices, a smaller batch (--batch-size) or another device"), 1
    trace = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    return (f"{trace}{prefix}: internal error ({type(error).__name__}: {error}); this is a bug in medconddiff, "
            "not in your input; please report it with the traceback above"), 1


def _file_name(error: BaseException) -> str:
    """The file an OSError names, by name (its folder may be named after the patient)."""
    import os

    filename = getattr(error, "filename", None)
    return os.path.basename(os.fsdecode(filename).rstrip("/\\")) if filename else "a file"


def add_keep_classes_argument(parser) -> None:
    parser.add_argument("--keep-classes", nargs="+", metavar="CLASS[=NEW_NAME]",
                        help="learn only these classes of the labels (a segment label, an ROI name or a label "
                        "value; =NEW_NAME calls it otherwise, e.g. GTV=lesion); the others count as background. "
                        "For a planning system's structure set: its External covers every slice")


def add_class_map_argument(parser) -> None:
    parser.add_argument("--class-map", nargs="+", metavar="REFERENCE=MODEL_CLASS",
                        help="score a reference class as one of the model's: a class name the reference gives (a "
                        "SEG segment, an RT structure, a dataset.json label) or a label value, then the model's class "
                        "name, e.g. GTV=tumour 5=liver. Without it, classes are matched by the names both sides give "
                        "(case and spelling aside); a reference class the model lacks then counts as background")
