"""What the controller asks the user. The widget answers with dialogs (:mod:`._dialogs`); scripts and
tests get these defaults, which never lose an edit and never write a file nobody asked for."""

from __future__ import annotations

from pathlib import Path

from ._edits import KEEP

__all__ = ["Questions"]


class Questions:
    def edits(self, action: str, slices: list[int]) -> str:
        """``action`` would overwrite edited ``slices``: KEEP, NEW_LAYER or REPLACE (default: keep them)."""
        return KEEP

    def save_cancelled_finetune(self, done: int, total: int, path: Path) -> bool:
        """Fine-tuning was cancelled after ``done`` of ``total`` steps: save those weights to ``path``?
        Without an explicit yes nothing is saved."""
        return False
