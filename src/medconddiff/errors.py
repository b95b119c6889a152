"""The project's user-error types: problems the user can fix, reported as one line.

Everything a user can get wrong (a file, a setting, a checkpoint, a dataset, a slice list) raises a
subclass of :class:`UserInputError`. The command line, the cohort loop and the napari plugin print
these as one line; any other exception is a bug and keeps its traceback. ``UserInputError`` derives
from ``ValueError`` so that code catching ``ValueError`` around a call keeps working.
"""

from __future__ import annotations

import errno
from typing import Optional


class UserInputError(ValueError):
    """An error the user can fix; its message names the file, flag or value and what is wrong."""


class ConfigError(UserInputError):
    """An invalid setting (a dataclass field, a command-line flag, a widget value)."""


class SliceSpecError(UserInputError):
    """A slice list or range that cannot be parsed or lies outside the scan."""


#: What the storage said, in words, for the errors of a full, read-only or failing disk (EDQUOT: not on Windows).
_STORAGE_PROBLEMS = {code: text for code, text in (
    (errno.ENOSPC, "the disk is full (no space left on device); free space and run again"),
    (getattr(errno, "EDQUOT", None), "the disk quota is used up; free space in your quota and run again"),
    (errno.EXDEV, "it would have to be moved across file systems; write it elsewhere"),
    (errno.EROFS, "the file system is read-only; write it elsewhere"),
    (errno.EIO, "the disk or network share reported an input/output error (a failing disk, or a share that went "
                "away?)"),
) if code is not None}
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


class StorageError(OSError):
    """A file could not be written for the storage's sake (a full disk or quota, a read-only or failing file
    system): one line naming the file by name, never by its folder (which may be named after the patient).
    An OSError with the original ``errno``, so code catching OSError around a write keeps working."""

    def __init__(self, code: int, name: str, action: str = "write"):
        super().__init__(code, f"cannot {action} {name}: {_STORAGE_PROBLEMS[code]}")

    def __str__(self) -> str:
        return str(self.strerror)


def storage_error(error: BaseException, name: str, action: str = "write") -> Optional[StorageError]:
    """``error`` as a :class:`StorageError` about the file ``name``, if the storage caused it; else None."""
    if isinstance(error, StorageError):
        return error
    code = _errno_of(error)
    return StorageError(code, name, action) if code in _STORAGE_PROBLEMS else None


def _errno_of(error: BaseException) -> Optional[int]:
    """An OSError's errno, or the one a writer in Rust (safetensors: a checkpoint) puts in its message, as
    "(os error 28)"."""
    import re

    if isinstance(error, OSError):
        return error.errno
    found = re.search(r"\(os error (\d+)\)", str(error))
    return int(found[1]) if found else None


def is_disk_full(error: BaseException) -> bool:
    """No space is left (on the disk or in the quota): every later write there would fail too."""
    return _errno_of(error) in _DISK_FULL


def user_error_types() -> tuple[type[BaseException], ...]:
    """What the CLI, the cohort loop and the plugin report as one line: the project's own user errors, the
    file-system errors that name a path the user gave, and a full, read-only or failing disk."""
    return (UserInputError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
            PermissionError, StorageError)
