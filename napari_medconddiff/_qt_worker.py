"""The widget's runner: the controller's tasks as napari thread workers, and a clean exit while one runs.

A function worker cannot be stopped mid-call (the engine probe spends seconds importing torch and
timm). If the interpreter shuts down meanwhile, the worker's signal object is deleted under it and
Qt aborts the whole process ("wrapped C/C++ object of type WorkerBaseSignals has been deleted"). So
at exit the plugin asks its workers to quit and waits for them (napari waits only for the workers of
windows still open).
"""

from __future__ import annotations

import atexit
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Optional

__all__ = ["QtWorkers", "wait_for_workers"]

# Longest wait at exit: a cold import of torch and timm on a slow disk, with margin.
EXIT_WAIT_MS = 120_000
# Every worker the plugin started and has not seen finish (its finished signal may never be delivered
# once the event loop has stopped: a worker that already finished only costs a no-op quit).
_in_flight: set = set()


@dataclass
class QtWorkers:
    """The widget's running workers, kept apart from the widget so cleanup needs no widget."""

    items: set = field(default_factory=set)

    def run(self, function: Callable, *args: Any, **callbacks: Optional[Callable]) -> Any:
        """The controller's runner: a napari thread worker whose signals call back on the GUI thread."""
        from napari.qt.threading import create_worker

        worker = create_worker(function, *args, _ignore_errors=True)
        for name, callback in callbacks.items():
            if callback is not None and hasattr(worker, name):   # function workers have no yielded/aborted
                getattr(worker, name).connect(callback)
        worker.finished.connect(partial(self.items.discard, worker))
        worker.finished.connect(partial(_in_flight.discard, worker))
        self.items.add(worker)
        _in_flight.add(worker)
        return worker

    def stop_all(self) -> None:
        for worker in list(self.items):
            for name in ("yielded", "returned", "errored", "aborted", "finished"):
                try:
                    getattr(worker, name).disconnect()
                except (TypeError, RuntimeError, AttributeError):  # no such signal / nothing connected / gone
                    pass
            try:
                worker.quit()
                # Disconnecting removed this too: the exit guard must still let go of a worker that ends
                # (its arguments may hold a scan's copy).
                worker.finished.connect(partial(_in_flight.discard, worker))
            except RuntimeError:   # already deleted by Qt: it has finished
                _in_flight.discard(worker)
        self.items.clear()


@atexit.register
def wait_for_workers(timeout_ms: int = EXIT_WAIT_MS) -> bool:
    """Ask the plugin's workers to quit and wait for the thread pool; True when every thread ended."""
    if not _in_flight:
        return True
    for worker in list(_in_flight):
        try:
            worker.quit()
        except RuntimeError:      # deleted by Qt: it has finished
            pass
    _in_flight.clear()
    from qtpy.QtCore import QThreadPool

    return bool(QThreadPool.globalInstance().waitForDone(timeout_ms))
