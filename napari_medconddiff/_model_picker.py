"""The dock's model rows: the Model menu (bundled models, models fine-tuned here, a checkpoint file),
the file field with its browse button, and the line that says what the chosen model is."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from qtpy.QtCore import Qt
from qtpy.QtWidgets import QComboBox, QFileDialog, QFormLayout, QHBoxLayout, QLabel, QLineEdit, QToolButton, QWidget

from medconddiff.errors import ConfigError, UserInputError

__all__ = ["ModelPicker", "DEFAULT_MODEL", "LATENT_MODEL", "CHECKPOINT_FILE", "BUNDLED"]

DEFAULT_MODEL = "Bundled default model"
LATENT_MODEL = "Bundled LSegDiff model (latent)"
CHECKPOINT_FILE = "Checkpoint file…"
#: The checkpoint each model menu entry stands for (a bundled model's name); None: the file field.
BUNDLED = {DEFAULT_MODEL: "default", LATENT_MODEL: "lsegdiff-liver"}
WARNING_STYLE = "color: #e07050;"


def _bundled_exists(name: str) -> bool:
    from medconddiff.checkpoint import bundled_checkpoint_path  # no torch: a path check only

    return bundled_checkpoint_path(name).is_file()


class ModelPicker:
    """Builds the model rows into a form; ``changed`` callbacks run when the choice or the file changes."""

    def __init__(self, form: QFormLayout, parent: QWidget, on_change: Any):
        self._parent = parent
        self.model_combo = QComboBox()
        self.model_combo.addItem(DEFAULT_MODEL, BUNDLED[DEFAULT_MODEL])
        if _bundled_exists("lsegdiff-liver"):
            self.model_combo.addItem(LATENT_MODEL, BUNDLED[LATENT_MODEL])
        self.model_combo.addItem(CHECKPOINT_FILE, None)
        self.model_combo.setToolTip("The model: a bundled liver model, a fine-tuned model made here, or any "
                                    ".safetensors checkpoint written by `medconddiff train`")
        form.addRow("Model", self.model_combo)
        self.checkpoint_edit = QLineEdit()
        self.checkpoint_edit.setPlaceholderText("path/to/model.safetensors")
        self.checkpoint_edit.setToolTip("Path of a .safetensors checkpoint")
        self.checkpoint_browse = QToolButton()
        self.checkpoint_browse.setText("…")
        self.checkpoint_browse.setToolTip("Choose a checkpoint file")
        self.checkpoint_browse.clicked.connect(self._browse)
        row = QHBoxLayout()
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.checkpoint_edit)
        row.addWidget(self.checkpoint_browse)
        self.checkpoint_row = QWidget()
        self.checkpoint_row.setLayout(row)
        form.addRow(self.checkpoint_row)     # spans the form: no empty label when it is hidden
        self.model_status = QLabel("Checking for the bundled model…")
        self.model_status.setWordWrap(True)
        form.addRow(self.model_status)
        self.model_combo.currentIndexChanged.connect(self._on_choice)
        self.model_combo.currentIndexChanged.connect(on_change)
        self.checkpoint_edit.textChanged.connect(on_change)
        self._on_choice()                    # the file row shows only for "Checkpoint file…"

    def _on_choice(self, *_: Any) -> None:
        self.checkpoint_row.setVisible(self.model_combo.currentText() == CHECKPOINT_FILE)

    def _browse(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self._parent, "Choose a MedCondDiff checkpoint",
                                              self.checkpoint_edit.text(),
                                              "safetensors checkpoint (*.safetensors);;All files (*)")
        if path:
            self.checkpoint_edit.setText(path)

    def checkpoint(self, engine: Any) -> str:
        """The chosen model: a bundled model's name or a checkpoint path; a user error for a bad file choice."""
        data = self.model_combo.currentData()
        if data == BUNDLED[DEFAULT_MODEL]:
            if engine is not None and not engine.default_checkpoint_exists:
                raise ConfigError("the bundled default model is not installed yet; choose 'Checkpoint file…' "
                                  "and pick a .safetensors checkpoint")
            return data
        if data is not None:
            return data
        text = self.checkpoint_edit.text().strip()
        if not text:
            raise ConfigError("choose a checkpoint file (Model: 'Checkpoint file…')")
        path = Path(text).expanduser()
        if not path.is_file():
            raise UserInputError(f"checkpoint not found: {path.name}")
        return str(path)

    def show_status(self, engine: Any, extra: Optional[str]) -> None:
        """What the chosen model is (and ``extra``: what else the user must do for it)."""
        text, warn = self.model_combo.currentText(), False
        if text == CHECKPOINT_FILE:
            message = "A .safetensors checkpoint written by `medconddiff train` or fine-tuned here."
        elif text == LATENT_MODEL:
            message = "Bundled LSegDiff liver model: diffusion in a mask-VAE latent, morphological clean-up."
        elif text != DEFAULT_MODEL:
            # The file's name: a model fine-tuned next to a scan sits in a folder that may be named after the patient.
            message = f"Fine-tuned model: {Path(self.model_combo.currentData()).name}"
        elif engine is None:
            message = "Checking for the bundled model…"
        elif engine.default_checkpoint_exists:
            message = f"Bundled liver model: {Path(engine.default_checkpoint).name}"
        else:
            message, warn = ("The bundled default model is not installed yet "
                             f"({engine.default_checkpoint}). Choose 'Checkpoint file…'."), True
        self.model_status.setText(message + (" " + extra if extra else ""))
        self.model_status.setStyleSheet(WARNING_STYLE if warn else "")

    def show_engine_error(self, message: str) -> None:
        self.model_status.setText(f"The segmentation engine could not be loaded: {message}")
        self.model_status.setStyleSheet(WARNING_STYLE)

    def add_model(self, name: str, path: str) -> None:
        """A model fine-tuned here joins the menu under its name, and is chosen."""
        index = self.model_combo.findData(path)
        if index < 0:
            index = self.model_combo.findText(CHECKPOINT_FILE)
            self.model_combo.insertItem(index, name, path)
            self.model_combo.setItemData(index, f"Fine-tuned here: {Path(path).name}", Qt.ItemDataRole.ToolTipRole)
        self.model_combo.setCurrentIndex(index)
