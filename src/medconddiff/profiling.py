"""Names of the engine's parts, marked with ``torch.profiler.record_function`` where they run.

The benchmark's time profile (:mod:`medconddiff.benchmark_timing`) reads them back from a
``torch.profiler`` trace; outside a profiler a mark costs a few microseconds, once per batch and step.
"""

from __future__ import annotations

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
