"""The engine's parts, marked with :func:`engine_part` where they run.

A mark is a ``torch.profiler.record_function`` (what a ``torch.profiler`` trace reads back: the
benchmark's CUDA profile, and anyone's own traces) and, while a :class:`HostPartTimer` is active, the
part's host wall time is added up: the benchmark's CPU split of a whole measured run. Outside both a
mark costs a few microseconds, once per batch and step.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from typing import Iterator, Optional

PREPROCESS = "medconddiff.preprocess"
ENCODE_CONDITION = "medconddiff.encode_condition"
DENOISE = "medconddiff.denoise"
SCHEDULER_STEP = "medconddiff.scheduler_step"
QUANTIZE = "medconddiff.quantize"
FUSE = "medconddiff.fuse"

#: mark → what the benchmark report calls that part of a run
ENGINE_PARTS = {
    PREPROCESS: "preprocess (orient, normalise, resample)",
    ENCODE_CONDITION: "encode_condition (backbone + adapter)",
    DENOISE: "denoise (denoiser passes)",
    SCHEDULER_STEP: "scheduler steps",
    QUANTIZE: "quantise kept steps",
    FUSE: "fuse, resample to the scan, uncertainty",
}

#: The timer that marks add to (None: none active). One at a time, process-wide: the benchmark's.
_active_times: Optional[defaultdict] = None


@contextlib.contextmanager
def engine_part(name: str) -> Iterator[None]:
    """Mark a part of the engine (one of :data:`ENGINE_PARTS`) for profilers and the host timer."""
    from torch.profiler import record_function   # here: importing this module must not import torch

    times = _active_times
    start = time.perf_counter()
    try:
        with record_function(name):
            yield
    finally:
        if times is not None:
            times[name] += time.perf_counter() - start


class HostPartTimer:
    """Host wall seconds of each engine part over a ``with`` block, and the block's own.

    Exact for the CPU, where a part's work is done when its mark ends; on CUDA kernels run on after
    the host returns, so a part's host time says little (the benchmark traces CUDA runs with
    ``torch.profiler`` instead). Parts are never nested, so their times add up to at most the wall time.
    """

    def __init__(self) -> None:
        self.times: defaultdict = defaultdict(float)
        self.wall_seconds = 0.0
        self._start = 0.0

    def __enter__(self) -> "HostPartTimer":
        global _active_times
        if _active_times is not None:
            raise RuntimeError("a HostPartTimer is already active")
        _active_times = self.times
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc_info: object) -> None:
        global _active_times
        self.wall_seconds = time.perf_counter() - self._start
        _active_times = None

    def seconds(self) -> dict[str, float]:
        """Seconds by :data:`ENGINE_PARTS` description (every part, 0 where it did not run)."""
        return {label: self.times.get(mark, 0.0) for mark, label in ENGINE_PARTS.items()}
