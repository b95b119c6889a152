"""Qt object lifetimes the widget must respect: a C++ widget deleted under its Python wrapper, napari
events that must not keep the widget alive, and the main window closing (its layer removals are not
the user's doing)."""

from __future__ import annotations

import weakref
from typing import Any

from qtpy.QtCore import QEvent, QObject
from qtpy.QtWidgets import QWidget

__all__ = ["alive", "connect_weakly", "CloseWatcher"]


def alive(widget: QWidget) -> bool:
    try:
        widget.objectName()
    except RuntimeError:  # the C++ widget is gone, only its Python wrapper is left
        return False
    return True


def connect_weakly(emitter: Any, widget: QWidget, method: str) -> None:
    """Connect a napari event to ``widget.method`` without keeping the widget (or its viewer) alive."""
    ref = weakref.ref(widget)

    def forward(event: Any) -> None:
        target = ref()
        if target is None or not alive(target):
            emitter.disconnect(forward)
            return
        getattr(target, method)(event)

    emitter.connect(forward)


class CloseWatcher(QObject):
    """Notes when napari's main window closes: the layers it removes then are not the user's doing."""

    def __init__(self, parent: QObject):
        super().__init__(parent)
        self.closing = False

    def eventFilter(self, obj: QObject, event: QEvent) -> bool:  # noqa: N802 (Qt API)
        if event.type() == QEvent.Type.Close:
            self.closing = True
        return False
