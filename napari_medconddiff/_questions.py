"""What the controller asks the user. The widget answers with dialogs (:mod:`._dialogs`); scripts and
tests get these defaults, which never lose an edit and never write a file nobody asked for."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ._edits import KEEP

__all__ = ["Questions", "REMOVE_SLICE", "REMOVE_CASE", "REMOVE_OTHER"]

#: Answers to :meth:`Questions.remove_from_set` ("" is the fourth: nothing is removed). REMOVE_OTHER: the
#: user wants to choose another of the set's cases (:meth:`Questions.case_to_remove`).
REMOVE_SLICE, REMOVE_CASE, REMOVE_OTHER = "slice", "case", "other"


class Questions:
    def edits(self, action: str, slices: list[int]) -> str:
        """``action`` would overwrite edited ``slices``: KEEP, NEW_LAYER or REPLACE (default: keep them)."""
        return KEEP

    def save_cancelled_finetune(self, done: int, total: int, path: Path) -> bool:
        """Fine-tuning was cancelled after ``done`` of ``total`` steps: save those weights to ``path``?
        Without an explicit yes nothing is saved."""
        return False

    def save_finetuned_elsewhere(self, problem: str, path: Path) -> Optional[tuple[Path, bool]]:
        """The fine-tuned model could not be saved to ``path`` (``problem``): another file to save it to, and
        whether the user agreed to replace that file if it exists; None lets the trained weights go (the
        default: nothing is written where nobody asked)."""
        return None

    def remove_from_set(self, scan_name: str, slice_index: Optional[int], folder: Path) -> str:
        """Take ``scan_name`` out of the training set in ``folder``: REMOVE_SLICE (only the slice under the
        slider, ``slice_index``; None where it cannot be told), REMOVE_CASE (the whole scan) or "" (nothing,
        the default: a set loses nothing without an explicit answer). REMOVE_OTHER: choose another case."""
        return ""

    def classes_to_leave_out(self, saved_name: str, class_names: tuple[str, ...], outlines: tuple[int, ...]
                             ) -> Optional[tuple[int, ...]]:
        """The saved labels ``saved_name`` are a planning structure set of several structures, or hold a body
        outline (``outlines``: indices into ``class_names``, a planning system's External, which covers every
        slice): which classes to leave out of the consensus (their voxels become background; the saved layer
        is not changed). The default leaves out the outlines; None cancels the Continue."""
        return outlines

    def case_to_remove(self, case_lines: tuple[str, ...], folder: Path) -> Optional[int]:
        """Which of the set's cases (one line each: name, verified slices, classes) to delete from the set
        in ``folder``; None (the default) deletes nothing."""
        return None
