"""Small Qt controls the dock's sections share."""

from __future__ import annotations

from qtpy.QtWidgets import QSpinBox

__all__ = ["spin_box"]


def spin_box(low: int, high: int, value: int, tip: str) -> QSpinBox:
    """An integer field with its range, value and the tooltip every control of the dock has."""
    spin = QSpinBox()
    spin.setRange(low, high)
    spin.setValue(value)
    spin.setToolTip(tip)
    return spin
