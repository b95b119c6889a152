"""How the plugin tells the user something: napari notifications (Qt-free; napari shows them).

A user's mistake (a project :func:`~medconddiff.errors.user_error_types` error: a wrong file, setting,
checkpoint or slice list) is one line. Anything else is a bug: it goes to napari's error notification
with the exception, so its details button shows the traceback.
"""

from __future__ import annotations

from medconddiff.errors import user_error_types

__all__ = ["notify", "report_error", "is_user_error"]


def notify(kind: str, message: str) -> None:
    from napari.utils import notifications

    {"error": notifications.show_error, "warning": notifications.show_warning,
     "info": notifications.show_info}[kind](message)


def is_user_error(error: BaseException) -> bool:
    return isinstance(error, user_error_types())


def report_error(error: BaseException) -> None:
    """A one-line notification for a user error; napari's error notification, traceback included, otherwise."""
    if is_user_error(error):
        notify("error", f"MedCondDiff: {error}")
        return
    from napari.utils.notifications import notification_manager

    notification_manager.receive_error(type(error), error, error.__traceback__)
