"""Atomic file writes: a temp file beside the target, renamed over it only once it is complete.

A crash, a full disk or a cancelled run therefore never leaves a partial output, and an existing
file is only ever replaced when the caller said so.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np


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


def write_json_atomic(path: str | os.PathLike, obj: Any, *, overwrite: bool = False) -> Path:
    """Write ``obj`` as indented JSON (numpy scalars/arrays and Paths converted), atomically.

    Same rules as :func:`atomic_write`: ``FileExistsError`` unless ``overwrite``; no partial file
    on failure. Returns the written path.
    """
    path = Path(path)
    # Serialise first so an unserialisable object fails before anything touches the disk.
    text = json.dumps(obj, indent=2, default=_json_default, allow_nan=False) + "\n"

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())

    atomic_write(path, write, overwrite=overwrite, suffix=".json")
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


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
