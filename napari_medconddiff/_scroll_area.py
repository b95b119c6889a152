"""The dock's scroll area: vertical only, as wide as its content asks."""

from __future__ import annotations

from qtpy.QtCore import QEvent, QObject, QSize, Qt
from qtpy.QtWidgets import QScrollArea

__all__ = ["VerticalScrollArea"]


class VerticalScrollArea(QScrollArea):
    """Scrolls vertically only, and asks for the width its content needs: a short dock scrolls
    instead of clipping the status line or the fine-tune section, and nothing is cut on the right."""

    def __init__(self) -> None:
        super().__init__()
        self.setWidgetResizable(True)
        self.setFrameShape(QScrollArea.Shape.NoFrame)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)

    def eventFilter(self, obj: QObject, event: QEvent) -> bool:  # noqa: N802 (Qt API)
        # The content's needs change once napari's style is applied: ask the dock for room again.
        if obj is self.widget() and event.type() == QEvent.Type.LayoutRequest:
            self.updateGeometry()
        return super().eventFilter(obj, event)

    def _width(self, content: int) -> int:
        return content + self.verticalScrollBar().sizeHint().width() + 2 * self.frameWidth()

    def minimumSizeHint(self) -> QSize:  # noqa: N802 (Qt API)
        hint = super().minimumSizeHint()
        return QSize(self._width(self.widget().minimumSizeHint().width()), hint.height()) if self.widget() else hint

    def sizeHint(self) -> QSize:  # noqa: N802 (Qt API)
        hint = super().sizeHint()
        return QSize(self._width(self.widget().sizeHint().width()), hint.height()) if self.widget() else hint
