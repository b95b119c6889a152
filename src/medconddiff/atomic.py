"""Atomic file writes: a temp file beside the target, renamed over it only once it is complete.

A crash, a full disk or a cancelled run therefore never leaves a partial output, and an existing
file is only ever replaced when the caller said so.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], *, overwrite: bool = False,
                 suffix: str = "") -> Path:
    """Run ``write(tmp)`` on a temp file in ``path``'s folder, then rename it to ``path``.

    ``suffix`` ends the temp name (nibabel picks gzip or not from it). Raises FileExistsError for an
    existing ``path`` unless ``overwrite``; the temp file is removed on any failure.
    """
    path = Path(path)
    check_target(path, overwrite)
    folder = path.parent if str(path.parent) else Path(".")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=folder)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, _default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def check_target(path: str | os.PathLike, overwrite: bool, what: str = "") -> None:
    """Refuse a target that cannot or must not be written (a folder, an existing file, a missing folder).

    Callers with long work ahead call it first, so nothing is computed for an output that will be refused.
    """
    path = Path(path)
    name = f"{what} {path}".strip()
    if path.is_dir():
        raise IsADirectoryError(f"{name} is a directory; give a file name")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{name} already exists; pass --overwrite (overwrite=True) to replace it")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise FileNotFoundError(f"{name}: output folder {folder} does not exist")


def _default_file_mode() -> int:
    """rw for everyone minus the umask, as open() would give (mkstemp makes files 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask
