"""The questions the plugin asks with dialogs. Closing a dialog (Escape) is the answer that loses
nothing: edits are kept, no file is written or replaced."""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from qtpy.QtWidgets import (QCheckBox, QDialog, QDialogButtonBox, QFileDialog, QInputDialog, QLabel, QMessageBox,
                            QVBoxLayout, QWidget)

from medconddiff.slice_lists import slice_list_text

from ._edits import KEEP, NEW_LAYER, REPLACE
from ._export import checkpoint_target
from ._qt_lifetime import alive
from ._questions import REMOVE_CASE, REMOVE_OTHER, REMOVE_SLICE, Questions

if TYPE_CHECKING:
    from ._widget import SegmentWidget

__all__ = ["ask_edit_choice", "ask_save_cancelled_finetune", "ask_save_finetuned_elsewhere", "ask_remove_from_set",
           "ask_case_to_remove", "ask_classes_to_leave_out", "confirm_replace", "confirmed_checkpoint_target",
           "DialogQuestions"]


def ask_edit_choice(parent: QWidget, action: str, slices: list[int]) -> str:
    """Ask what to do with edited slices a result would overwrite: KEEP, NEW_LAYER or REPLACE."""
    box = QMessageBox(parent)
    box.setIcon(QMessageBox.Icon.Question)
    box.setWindowTitle("Edited slices")
    box.setText(f"{action} would overwrite slice(s) {slice_list_text(slices)}, which you edited or marked as "
                "checked.")
    box.setInformativeText("Keep my edits: update only the slices you did not edit or check.\n"
                           "New layer: put the result in a new consensus layer; your edited layer stays as it is.\n"
                           "Replace: overwrite these edits (Edit ▸ Undo in the layer brings them back). "
                           "Strokes you paint from now on are kept.")
    keep = box.addButton("Keep my edits", QMessageBox.ButtonRole.AcceptRole)
    new = box.addButton("New layer", QMessageBox.ButtonRole.ActionRole)
    box.addButton("Replace", QMessageBox.ButtonRole.DestructiveRole)
    box.setDefaultButton(keep)
    box.setEscapeButton(keep)    # closing the question never loses an edit
    box.exec()
    clicked = box.clickedButton()
    return KEEP if clicked is keep else NEW_LAYER if clicked is new else REPLACE


def ask_save_cancelled_finetune(parent: QWidget, done: int, total: int, path: Path) -> bool:
    """Save the weights of a cancelled fine-tuning? Only an explicit Save says yes."""
    answer = QMessageBox.question(
        parent, "Fine-tuning cancelled",
        f"Fine-tuning stopped after {done} of {total} steps. Save the weights of step {done} to\n{path}?",
        QMessageBox.StandardButton.Save | QMessageBox.StandardButton.Discard, QMessageBox.StandardButton.Discard)
    return answer == QMessageBox.StandardButton.Save


def ask_save_finetuned_elsewhere(parent: QWidget, problem: str, path: Path) -> Optional[tuple[Path, bool]]:
    """The fine-tuned model could not be saved: another file for it (and whether replacing it was agreed), or
    None when the user lets the weights go (Discard, the default after a second question)."""
    while True:
        answer = QMessageBox.warning(
            parent, "Fine-tuned model not saved",
            f"The fine-tuned model could not be saved:\n{problem}\n\nIts weights are still in memory. "
            "Save them to another file?",
            QMessageBox.StandardButton.Save | QMessageBox.StandardButton.Discard, QMessageBox.StandardButton.Save)
        if answer == QMessageBox.StandardButton.Save:
            chosen, _ = QFileDialog.getSaveFileName(parent, "Save the fine-tuned model as", str(path),
                                                    "safetensors checkpoint (*.safetensors)")
            if chosen:
                try:
                    target = confirmed_checkpoint_target(parent, chosen)
                except ValueError as error:
                    problem, path = str(error), Path(chosen)
                    continue
                if target is None:
                    continue
                return target, target.exists()
        sure = QMessageBox.question(parent, "Discard the fine-tuned model?",
                                    "The fine-tuned weights will be lost. Discard them?",
                                    QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
                                    QMessageBox.StandardButton.No)
        if sure == QMessageBox.StandardButton.Yes:
            return None


def confirmed_checkpoint_target(parent: QWidget, chosen: str) -> Optional[Path]:
    """The checkpoint file for the name a save dialog returned (``.safetensors`` added; ValueError inside the
    installed package); None when the name with the suffix added is an existing file the user would not
    replace (the save dialog asked about the name it returned, not about that one)."""
    target = checkpoint_target(chosen)
    if target != Path(chosen) and target.exists() and not confirm_replace(parent, [target]):
        return None
    return target


def ask_remove_from_set(parent: QWidget, scan_name: str, slice_index: Optional[int], folder: Path) -> str:
    """What to take out of the training set: REMOVE_SLICE, REMOVE_CASE or "" (Cancel, the default)."""
    box = QMessageBox(parent)
    box.setIcon(QMessageBox.Icon.Warning)
    box.setWindowTitle("Remove from the training set")
    box.setText(f"Take '{scan_name}' out of the training set {folder}?")
    box.setInformativeText(("Slice only: slice " + str(slice_index) + " is no longer verified in the set (its voxels "
                            "become 'ignore'); its other slices stay.\n" if slice_index is not None else "") +
                           "Whole scan: the set's copy of this scan and all its verified slices are deleted.\n"
                           "Your layers here are not changed.")
    only = box.addButton(f"Slice {slice_index} only", QMessageBox.ButtonRole.ActionRole) \
        if slice_index is not None else None
    whole = box.addButton("Whole scan", QMessageBox.ButtonRole.DestructiveRole)
    other = box.addButton("Another case…", QMessageBox.ButtonRole.ActionRole)
    other.setToolTip("Choose one of the set's cases from a list (a scan that is not open here)")
    cancel = box.addButton(QMessageBox.StandardButton.Cancel)
    box.setDefaultButton(cancel)
    box.setEscapeButton(cancel)      # closing the question removes nothing
    box.exec()
    clicked = box.clickedButton()
    answers = {whole: REMOVE_CASE, other: REMOVE_OTHER} | ({only: REMOVE_SLICE} if only is not None else {})
    return answers.get(clicked, "")


def ask_case_to_remove(parent: QWidget, case_lines: tuple[str, ...], folder: Path) -> Optional[int]:
    """Which case to delete from the set (its position in ``case_lines``), then a confirmation whose
    default is Cancel; None: nothing is deleted."""
    if not case_lines:
        return None
    line, ok = QInputDialog.getItem(
        parent, "Remove a case from the training set",
        f"The training set {folder} holds these cases. Choose the one to take out\n"
        "(its copy of the scan and all its verified slices are deleted; your layers are not changed):",
        list(case_lines), 0, False)
    if not ok or line not in case_lines:
        return None
    index = case_lines.index(line)
    box = QMessageBox(parent)
    box.setIcon(QMessageBox.Icon.Warning)
    box.setWindowTitle("Remove from the training set")
    box.setText(f"Delete this case from the training set {folder}?\n{line}")
    box.setInformativeText("Its copy of the scan and its verified slices are deleted; the other cases stay.")
    remove = box.addButton("Remove case", QMessageBox.ButtonRole.DestructiveRole)
    cancel = box.addButton(QMessageBox.StandardButton.Cancel)
    box.setDefaultButton(cancel)
    box.setEscapeButton(cancel)
    box.exec()
    return index if box.clickedButton() is remove else None


def ask_classes_to_leave_out(parent: QWidget, saved_name: str, class_names: tuple[str, ...],
                             outlines: tuple[int, ...]) -> Optional[tuple[int, ...]]:
    """Which classes of the saved labels to leave out: a box per class, the body outlines unticked;
    Cancel (and Escape) loads nothing."""
    dialog = QDialog(parent)
    dialog.setWindowTitle("Continue from saved labels")
    layout = QVBoxLayout(dialog)
    outline_names = ", ".join(f"'{class_names[i]}'" for i in outlines)
    why = (f"'{saved_name}' holds {outline_names}, which looks like a body outline: it covers every slice, so "
           "taking it would count every slice as corrected and teach the outline as a class." if outlines else
           f"'{saved_name}' holds {len(class_names) - 1} structures of a plan. Each one you take becomes a class "
           "of the consensus, and every slice it is drawn on counts as corrected.")
    text = QLabel(why + "\n\nTake these classes into the consensus (the others become background there; "
                  f"'{saved_name}' itself is not changed):")
    text.setWordWrap(True)
    layout.addWidget(text)
    boxes = {}
    for index, name in enumerate(class_names[1:], start=1):
        boxes[index] = QCheckBox(name)
        boxes[index].setChecked(index not in outlines)
        layout.addWidget(boxes[index])
    buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
    buttons.accepted.connect(dialog.accept)
    buttons.rejected.connect(dialog.reject)
    layout.addWidget(buttons)
    if dialog.exec() != QDialog.DialogCode.Accepted:
        return None
    return tuple(index for index, box in boxes.items() if not box.isChecked())


def confirm_replace(parent: QWidget, paths: list[Path]) -> bool:
    """Ask before replacing files a save dialog did not ask about; No is the default."""
    names = "\n".join(str(path) for path in paths)
    title = "Replace file?" if len(paths) == 1 else "Replace files?"
    text = f"{names} exists and will be replaced." if len(paths) == 1 else \
        f"These files exist and will be replaced:\n{names}"
    answer = QMessageBox.question(parent, title, text,
                                  QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
                                  QMessageBox.StandardButton.No)
    return answer == QMessageBox.StandardButton.Yes


class DialogQuestions(Questions):
    """The controller's questions, asked with dialogs over the widget (looked up here at each call, so a
    test can answer them)."""

    def __init__(self, widget: "SegmentWidget"):
        self._widget = weakref.ref(widget)

    def edits(self, action: str, slices: list[int]) -> str:
        widget = self._widget()
        return ask_edit_choice(widget, action, slices) if widget is not None and alive(widget) else KEEP

    def save_cancelled_finetune(self, done: int, total: int, path: Path) -> bool:
        widget = self._widget()
        if widget is None or not alive(widget):
            return False
        return ask_save_cancelled_finetune(widget, done, total, path)

    def save_finetuned_elsewhere(self, problem: str, path: Path) -> Optional[tuple[Path, bool]]:
        widget = self._widget()
        if widget is None or not alive(widget):
            return None
        return ask_save_finetuned_elsewhere(widget, problem, path)

    def remove_from_set(self, scan_name: str, slice_index: Optional[int], folder: Path) -> str:
        widget = self._widget()
        if widget is None or not alive(widget):
            return ""
        return ask_remove_from_set(widget, scan_name, slice_index, folder)

    def classes_to_leave_out(self, saved_name: str, class_names: tuple[str, ...], outlines: tuple[int, ...]
                             ) -> Optional[tuple[int, ...]]:
        widget = self._widget()
        if widget is None or not alive(widget):
            return None
        return ask_classes_to_leave_out(widget, saved_name, class_names, outlines)

    def case_to_remove(self, case_lines: tuple[str, ...], folder: Path) -> Optional[int]:
        widget = self._widget()
        if widget is None or not alive(widget):
            return None
        return ask_case_to_remove(widget, case_lines, folder)
