"""Timing for the benchmark: interleaved wall-clock rounds, and where a run's time goes.

Timings are medians of ``repeats`` rounds after ``warmup`` untimed rounds, with ``time.perf_counter``
and ``torch.cuda.synchronize`` on CUDA; the quantities that are compared run interleaved within a
round, so that load from other processes (a shared machine) biases them less.

:class:`EngineProfile` splits one run into the engine's parts with ``torch.profiler``: the engine marks
each part with ``record_function`` (names in :mod:`medconddiff.profiling`).
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Optional, Sequence

from .profiling import ENGINE_PARTS

OTHER_PART = "other (events, writing results, Python)"


def synchronize(device: Any) -> None:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(functions: dict[str, Callable[[], Any]], device: Any, repeats: int, warmup: int
                     ) -> dict[str, list[float]]:
    """Wall times (s) of every function, ``repeats`` rounds after ``warmup`` untimed rounds.

    Each round runs all functions one after the other, so a burst of load from other processes
    hits the quantities that are compared (ratios are taken within a round) about equally.
    """
    for _ in range(warmup):
        for fn in functions.values():
            fn()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, fn in functions.items():
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


class EngineProfile:
    """Seconds spent in each engine part during a ``with`` block, from a ``torch.profiler`` trace.

    On CUDA a part's time is the larger of its host time and the GPU time of the kernels it
    launched: kernels run asynchronously, so the host returns before the work is done. ``slices``
    only records how many slices the profiled run had.
    """

    def __init__(self, device: Any, slices: Optional[int] = None):
        self.device = device
        self.slices = slices
        self.seconds: dict[str, float] = {name: 0.0 for name in ENGINE_PARTS.values()}
        self.wall_seconds = 0.0
        self._profiler: Optional[Any] = None
        self._start = 0.0

    def __enter__(self) -> "EngineProfile":
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU]
        if getattr(self.device, "type", str(self.device)) == "cuda":
            activities.append(ProfilerActivity.CUDA)
        self._profiler = profile(activities=activities)
        self._profiler.__enter__()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.wall_seconds = time.perf_counter() - self._start
        profiler, self._profiler = self._profiler, None
        profiler.__exit__(*exc)
        if exc[0] is not None:
            return
        for event in profiler.key_averages():
            name = ENGINE_PARTS.get(event.key)
            if name is not None:
                device_us = getattr(event, "device_time_total", 0.0) or 0.0
                self.seconds[name] += max(event.cpu_time_total, device_us) / 1e6

    def scaled_to(self, total_seconds: float) -> dict[str, float]:
        """Each part's share of the profiled run applied to a run of ``total_seconds`` (the profiled
        one, or a bigger run of the same kind), plus what no part accounts for under
        :data:`OTHER_PART`; the values add up to ``total_seconds``."""
        scale = total_seconds / self.wall_seconds if self.wall_seconds > 0 else 0.0
        parts = {name: seconds * scale for name, seconds in self.seconds.items()}
        parts[OTHER_PART] = max(0.0, total_seconds - sum(parts.values()))
        return parts
