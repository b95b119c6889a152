"""How the controller runs slow work: an injected *runner* turns a function into a task.

The widget's runner makes napari ``thread_worker``s (:mod:`napari_medconddiff._qt_worker`); tests and
scripts use :class:`SyncRunner`, which runs each task at once on the calling thread. Either way the
callbacks run on the caller's thread, so the controller never needs a lock.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Optional, Protocol

__all__ = ["Task", "Runner", "SyncRunner"]


class Task(Protocol):
    def start(self) -> None: ...

    def quit(self) -> None: ...


class Runner(Protocol):
    """``runner(function, *args, yielded=, returned=, errored=, aborted=, finished=)`` → a task, not started.

    Callbacks run on the caller's (GUI) thread; a generator function's values go to ``yielded``;
    ``quit()`` stops a generator at its next yield (then ``aborted``, not ``returned``);
    ``finished`` always comes last.
    """

    def __call__(self, function: Callable, *args: Any, **callbacks: Optional[Callable]) -> Task: ...


class SyncRunner:
    """Runs each task on the calling thread when it is started (tests, scripts). Exceptions raised by
    the task become ``errored``; exceptions raised by callbacks propagate."""

    def __call__(self, function: Callable, *args: Any, **callbacks: Optional[Callable]) -> "_SyncTask":
        return _SyncTask(function, args, callbacks)


class _SyncTask:
    def __init__(self, function: Callable, args: tuple, callbacks: dict):
        self.function, self.args, self.callbacks = function, args, callbacks
        self.quit_requested = False

    def quit(self) -> None:
        self.quit_requested = True

    def _call(self, name: str, *args: Any) -> None:
        callback = self.callbacks.get(name)
        if callback is not None:
            callback(*args)

    def start(self) -> None:
        try:
            self._run()
        finally:
            self._call("finished")

    def _run(self) -> None:
        # Let go of the arguments once the function has them, as a finished worker does: the scan's copy
        # a run was given must not outlive the run.
        args, self.args = self.args, ()
        try:
            value = self.function(*args)
        except Exception as error:  # noqa: BLE001 (the task's failure is reported, as a worker would)
            self._call("errored", error)
            return
        finally:
            del args
        if inspect.isgenerator(value):
            generator = value
            while True:
                if self.quit_requested:       # napari's worker checks before each next value
                    generator.close()
                    self._call("aborted")
                    return
                try:
                    event = next(generator)
                except StopIteration as stop:
                    value = stop.value
                    break
                except Exception as error:  # noqa: BLE001
                    self._call("errored", error)
                    return
                self._call("yielded", event)
        self._call("returned", value)
