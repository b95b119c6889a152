"""Atomic file writes: a temp file beside the target, renamed over it only once it is complete.

A crash, a full disk or a cancelled run therefore never leaves a partial output, and an existing
file is only ever replaced when the caller said so. :class:`StagedFiles` does the same for several
files that belong together (a training set's images, labels and ``dataset.json``).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from .errors import storage_error

JOURNAL_NAME = "commit.json"   # StagedFiles' record of a commit's moves, inside its folder


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], *, overwrite: bool = False,
                 suffix: str = "") -> Path:
    """Run ``write(tmp)`` on a temp file in ``path``'s folder, then rename it to ``path``.

    ``suffix`` ends the temp name (nibabel picks gzip or not from it). Raises FileExistsError for an
    existing ``path`` unless ``overwrite``; the temp file is removed on any failure. The temp file is on
    the disk (fsync) before the rename, and the rename is made durable (the folder fsynced), so a power cut
    leaves the previous file or the new one, never an empty one under the new name. A full, read-only or
    failing disk raises :class:`~medconddiff.errors.StorageError`, naming ``path`` by its name.
    """
    path = Path(path)
    check_target(path, overwrite)
    folder = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=folder)
    except OSError as error:
        raise_naming(error, path)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        _fsync_file(tmp)
        os.chmod(tmp, _default_file_mode())
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        raise_naming(error, path)
    try:
        fsync_folder(folder)
    except OSError as error:
        raise_naming(error, path)
    return path


def raise_naming(error: BaseException, path: Path) -> None:
    """Raise ``error``, as a one-line StorageError naming ``path`` by name where the storage caused it (a
    writer's own error holds the temp file's name, or none)."""
    storage = storage_error(error, path.name)
    if storage is None or storage is error:
        raise error
    raise storage from error


def fsync_folder(folder: str | os.PathLike) -> None:
    """Make the renames into ``folder`` durable. Best effort where the file system cannot sync a folder
    (EINVAL, ENOTSUP) or the platform cannot open one (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


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
            handle.write(text)            # atomic_write fsyncs it

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


def check_target(path: str | os.PathLike, overwrite: bool, what: str = "", *, creates_folders: bool = False) -> None:
    """Refuse a target that cannot or must not be written (a folder, an existing file, a missing folder;
    with ``creates_folders``, a missing folder is made at write time, so only a file in the way of one is
    refused).

    Callers with long work ahead call it first, so nothing is computed for an output that will be refused.
    """
    path = Path(path)
    # By name, its folder only as "its folder": napari shows these lines, and folders are named after patients.
    name = f"{what} {path.name}".strip()
    if path.is_dir():
        raise IsADirectoryError(f"{name} is a directory; give a file name")
    if path.is_symlink() and not path.exists() and not overwrite:
        # exists() follows the link: replacing it would replace the user's link to a file elsewhere.
        raise FileExistsError(f"{name} already exists (a link to a file that is not there now); pass --overwrite "
                              "(overwrite=True) to replace it")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{name} already exists; pass --overwrite (overwrite=True) to replace it")
    folder = path.parent if str(path.parent) else Path(".")
    if creates_folders:
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if not folder.is_dir():
            raise NotADirectoryError(f"{name}: a folder on its way is a file, so no folder can be made there")
    elif not folder.is_dir():
        raise FileNotFoundError(f"{name}: its folder does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"{name}: cannot write into its folder (permission denied)")


def _default_file_mode() -> int:
    """rw for everyone minus the umask, as open() would give (mkstemp makes files 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


class StagedFiles:
    """Files written into a staging ``folder`` first, then moved over their targets together.

        with StagedFiles(root / ".staging") as staging:
            save(staging.file(target_a)); save(staging.file(target_b))
            staging.commit()            # in the order given; a failed move undoes the ones made

    A run that stops before :meth:`commit` changes no target. :meth:`commit` first writes a journal
    of its moves into the folder, once every staged file is complete on disk; a process killed while
    moving (a target moved aside, its replacement not yet in place) is finished by
    :func:`finish_interrupted_commit`, which entering the folder again runs before emptying it, so the
    files of an interrupted commit are never thrown away. Targets must be on the folder's file system
    (moves are renames). :meth:`remove` stages a deletion: the target is moved into the folder at commit
    (undone with the rest if a later move fails) and deleted with it on exit.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.moves: list[tuple[Optional[Path], Path]] = []

    def __enter__(self) -> "StagedFiles":
        finish_interrupted_commit(self.folder)
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def file(self, target: str | os.PathLike) -> Path:
        """Where to write the file that is to replace ``target``."""
        target = Path(target)
        staged = self.folder / f"{len(self.moves)}-{target.name}"
        self.moves.append((staged, target))
        return staged

    def remove(self, target: str | os.PathLike) -> None:
        """Delete ``target`` at :meth:`commit`, in its turn among the moves (a missing target is no error)."""
        self.moves.append((None, Path(target)))

    def commit(self) -> None:
        """Move every staged file over its target (and out of the way, a removed one); if one move fails,
        put back what was moved and raise."""
        for staged, _ in self.moves:
            if staged is not None:
                _fsync_file(staged)
        journal = self.folder / JOURNAL_NAME
        write_json_atomic(journal, {"moves": [
            {"staged": None if staged is None else staged.name,
             "target": os.path.relpath(target, self.folder.parent)} for staged, target in self.moves]})
        done: list[tuple[Optional[Path], Path]] = []
        try:
            for index, (staged, target) in enumerate(self.moves):
                backup = None
                if target.exists():
                    backup = _backup_path(self.folder, index, target)
                    os.replace(target, backup)
                done.append((backup, target))
                if staged is not None:
                    os.replace(staged, target)
        except BaseException:
            for backup, target in reversed(done):
                if backup is None:
                    target.unlink(missing_ok=True)
                else:
                    os.replace(backup, target)
            journal.unlink(missing_ok=True)
            raise
        journal.unlink()



def finish_interrupted_commit(folder: str | os.PathLike) -> list[Path]:
    """Finish the moves of a :class:`StagedFiles` commit whose process was killed part-way.

    Its journal is written only once every staged file is complete, so the commit is carried forward
    (not undone): each move not yet made is made, a target still in place is set aside first; then the
    folder (the replaced versions with it) is removed, as the commit would have. Returns the targets
    moved here (empty when there was nothing to finish).
    """
    folder = Path(folder)
    journal = folder / JOURNAL_NAME
    if not journal.is_file():
        return []
    try:
        moves = json.loads(journal.read_text(encoding="utf-8"))["moves"]
    except (OSError, ValueError, KeyError, TypeError):
        # A journal cut short was written before the first move (write_json_atomic renames it into
        # place whole), so no target was touched: nothing to finish.
        return []
    finished = []
    for index, move in enumerate(moves):
        target = folder.parent / move["target"]
        staged = None if move["staged"] is None else folder / move["staged"]
        backup = _backup_path(folder, index, target)
        if staged is not None and not staged.exists():
            continue                                    # this move was made before the stop
        if target.exists() and not backup.exists():
            os.replace(target, backup)
            finished.append(target)
        if staged is not None:
            os.replace(staged, target)
            finished.append(target)
    shutil.rmtree(folder, ignore_errors=True)
    return sorted(set(finished))


def _backup_path(folder: Path, index: int, target: Path) -> Path:
    return folder / f"{index}-previous-{target.name}"


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())
