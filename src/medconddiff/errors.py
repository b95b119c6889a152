"""The project's user-error types: problems the user can fix, reported as one line.

Everything a user can get wrong (a file, a setting, a checkpoint, a dataset, a slice list) raises a
subclass of :class:`UserInputError`. The command line, the cohort loop and the napari plugin print
these as one line; any other exception is a bug and keeps its traceback. ``UserInputError`` derives
from ``ValueError`` so that code catching ``ValueError`` around a call keeps working.
"""

from __future__ import annotations


class UserInputError(ValueError):
    """An error the user can fix; its message names the file, flag or value and what is wrong."""


class ConfigError(UserInputError):
    """An invalid setting (a dataclass field, a command-line flag, a widget value)."""


class SliceSpecError(UserInputError):
    """A slice list or range that cannot be parsed or lies outside the scan."""


def user_error_types() -> tuple[type[BaseException], ...]:
    """What the CLI, the cohort loop and the plugin report as one line: the project's own user errors and
    the file-system errors that name a path the user gave."""
    return (UserInputError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
            PermissionError)
