"""Speed and memory of one or more checkpoints on this device: what ``medconddiff benchmark`` measures.

Everything goes through the same objects users run (``Segmenter.run`` / ``one_shot`` / the model's
``encode_condition`` and ``denoise``), so the numbers describe the real engine, whatever the model
family (pixel MedCondDiff or latent LSegDiff): only that three-method interface is used.

    report = run_benchmark(BenchmarkOptions(checkpoints=(None,)))   # a JSON-able dict
    print(format_report(report))

This module holds the options and runs the whole benchmark; its parts are timing
(:mod:`~medconddiff.benchmark_timing`: interleaved rounds, medians, the engine's time profile),
what is measured (:mod:`~medconddiff.benchmark_measures`), peak memory in a fresh process
(:mod:`~medconddiff.benchmark_memory`) and targets and the table (:mod:`~medconddiff.benchmark_report`).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

from .benchmark_measures import (DEFAULT_LABEL, FINETUNE_SLICES, BenchModel, HeldOutScan, build_segmenter,
                                 held_out_scan, load_bench_model, measure_end_to_end, measure_finetune,
                                 measure_model, network_parts, parameter_counts, sample_volume, slab)
from .benchmark_memory import (BIG_VOLUME_SPACING, big_volume_meta, current_rss_bytes, memory_probe,
                               memory_probe_main, peak_rss_bytes, run_memory_probe)
from .benchmark_report import GB, TARGETS, cpu_name, environment, evaluate_targets, format_report, table_rows
from .benchmark_timing import EngineProfile, median, synchronize, time_interleaved
from .errors import ConfigError
from .outputs import recorded_name

# The benchmark's parts live in benchmark_timing, benchmark_measures, benchmark_memory and
# benchmark_report; these names stay importable from here, where callers have always found them.
__all__ = ["SCHEMA", "BenchmarkOptions", "run_benchmark", "TARGETS", "GB", "DEFAULT_LABEL", "FINETUNE_SLICES",
           "BIG_VOLUME_SPACING", "BenchModel", "HeldOutScan", "held_out_scan", "EngineProfile", "build_segmenter",
           "load_bench_model", "measure_model", "measure_end_to_end", "measure_finetune", "network_parts",
           "parameter_counts", "sample_volume", "slab", "big_volume_meta", "current_rss_bytes", "peak_rss_bytes",
           "memory_probe", "memory_probe_main", "run_memory_probe", "cpu_name", "environment", "evaluate_targets",
           "format_report", "table_rows", "median", "synchronize", "time_interleaved"]

SCHEMA = "medconddiff-benchmark/1"


@dataclass
class BenchmarkOptions:
    """What to measure; the defaults are the full benchmark, :meth:`quick` a seconds-long smoke run."""

    checkpoints: tuple[Optional[str], ...] = (None,)   # None = bundled default (random weights if absent)
    device: str = "auto"
    steps_list: tuple[int, ...] = (1, 5, 10, 20)
    reference_steps: int = 10                          # the steps the targets are stated at
    latency_batch: int = 16                            # slices per Segmenter.run batch (SamplingConfig default)
    batch_sizes: tuple[int, ...] = (1, 4, 8, 16, 32)   # tried for whole-volume throughput
    volume_slices: int = 32                            # slices of the throughput volume
    repeats: int = 3
    warmup: int = 1
    big_volume_shape: tuple[int, int, int] = (512, 512, 300)
    memory: bool = True                                # run the big-volume memory probe
    sample_slices: Optional[int] = None                # end-to-end on the first N sample slices (None = all)
    threads: Optional[int] = None                      # torch.set_num_threads (None = leave torch's default)
    big_volume: Optional[str] = None                   # a NIfTI to use as the big volume (default: synthetic)
    big_volume_adaptive: bool = True                   # sample the big volume with adaptive steps
    real_size: tuple[str, ...] = ()                    # further real-size NIfTIs, each end to end (memory on)
    finetune_steps: int = 200                          # fine-tuning speed: steps on 3 slices (0 = skip)
    heldout_slices: Optional[tuple[int, int]] = (48, 72)  # the held-out slab [a, b) (None = skip)
    heldout_scan: Optional[tuple[str, str]] = None     # (image, labels) NIfTIs scored there instead of the sample
    precision: str = "auto"                            # SamplingConfig.precision of every measurement

    @classmethod
    def quick(cls, **overrides: Any) -> "BenchmarkOptions":
        """Tiny everything: for tests and a first look, not for numbers."""
        values: dict[str, Any] = dict(steps_list=(1, 2), reference_steps=2, latency_batch=2, batch_sizes=(1, 2),
                                      volume_slices=4, repeats=1, warmup=1, big_volume_shape=(64, 64, 4),
                                      sample_slices=4, finetune_steps=2, heldout_slices=(48, 50))
        values.update(overrides)
        return cls(**values)

    def __post_init__(self) -> None:
        positive = {"reference_steps": self.reference_steps, "latency_batch": self.latency_batch,
                    "volume_slices": self.volume_slices, "repeats": self.repeats}
        positive.update({f"steps_list[{i}]": s for i, s in enumerate(self.steps_list)})
        positive.update({f"batch_sizes[{i}]": b for i, b in enumerate(self.batch_sizes)})
        positive.update({f"big_volume_shape[{i}]": n for i, n in enumerate(self.big_volume_shape)})
        for name, value in positive.items():
            if int(value) < 1:
                raise ConfigError(f"{name} must be at least 1, got {value}")
        if not self.steps_list or not self.batch_sizes or not self.checkpoints:
            raise ConfigError("steps_list, batch_sizes and checkpoints must not be empty")
        if self.warmup < 0:
            raise ConfigError(f"warmup must be 0 or more, got {self.warmup}")
        if len(self.big_volume_shape) != 3:
            raise ConfigError(f"big_volume_shape needs three sizes, got {self.big_volume_shape}")
        if self.sample_slices is not None and self.sample_slices < 1:
            raise ConfigError(f"sample_slices must be at least 1, got {self.sample_slices}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be at least 1, got {self.threads}")
        if self.heldout_slices is not None and not 0 <= self.heldout_slices[0] < self.heldout_slices[1]:
            raise ConfigError(f"heldout_slices must be a slab [a, b) with 0 ≤ a < b, got {self.heldout_slices}")
        missing = [path for path in self.real_size if not os.path.isfile(path)]
        if missing:
            raise ConfigError(f"real-size scan(s) not found: {', '.join(missing)}")
        if self.heldout_scan is not None:
            if len(self.heldout_scan) != 2:
                raise ConfigError(f"heldout_scan is an image and its labels, got {self.heldout_scan}")
            if self.heldout_slices is None:
                raise ConfigError("a held-out scan needs the slab to score (heldout_slices)")
            missing = [path for path in self.heldout_scan if not os.path.isfile(path)]
            if missing:
                raise ConfigError(f"held-out scan file(s) not found: {', '.join(missing)}")
        if self.finetune_steps < 0:
            raise ConfigError(f"finetune_steps must be 0 or more, got {self.finetune_steps}")
        from .config import PRECISIONS

        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")


def run_benchmark(options: BenchmarkOptions, log: Callable[[str], None] = lambda message: None) -> dict:
    """Measure every checkpoint of ``options`` on one device; returns the JSON-able report."""
    import torch

    from .devices import resolve_device

    if options.threads:
        torch.set_num_threads(options.threads)
    device = resolve_device(options.device)
    env = environment(device)
    volume, meta = sample_volume()
    held_out = held_out_scan(options, volume, meta)
    models = []
    labels_seen: dict[str, int] = {}
    for checkpoint in options.checkpoints:
        bench = load_bench_model(checkpoint, str(device))
        count = labels_seen.get(bench.label, 0)
        labels_seen[bench.label] = count + 1
        if count:  # the same file name twice: keep columns apart
            bench = dataclasses.replace(bench, label=f"{bench.label}#{count + 1}")
        report = measure_model(bench, volume, meta, options, log, held_out)
        report["memory"] = None
        if options.memory:
            log(f"[{bench.label}] peak memory, {'×'.join(map(str, options.big_volume_shape))} volume "
                f"in a fresh process")
            report["memory"] = _probe_memory(bench, str(device), options, options.big_volume)
        report["real_size"] = []
        for path in options.real_size if options.memory else ():
            log(f"[{bench.label}] real-size scan {os.path.basename(path)} in a fresh process")
            report["real_size"].append(_probe_memory(bench, str(device), options, path))
        report["targets"] = evaluate_targets(report, device.type, other_workload(options))
        models.append(report)
        del bench
        if device.type == "cuda":
            torch.cuda.empty_cache()
    env["load_average_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return {"schema": SCHEMA, "environment": env, "options": _options_dict(options), "models": models}


def _probe_memory(bench: BenchModel, device: str, options: BenchmarkOptions, path: Optional[str]) -> dict:
    """:func:`run_memory_probe` of ``bench`` on the big volume or the NIfTI ``path``, which the report
    names by file name (the probe reports the path it read: scans lie in folders named after patients)."""
    import torch

    report = run_memory_probe(bench.spec, device, options.big_volume_shape, options.reference_steps,
                              torch.get_num_threads(), options.big_volume_adaptive, path, options.precision)
    if path:
        report["source"] = recorded_name(path)
    return report


def other_workload(options: BenchmarkOptions) -> dict[str, str]:
    """The time targets whose run differs from the workload they are stated for (the full benchmark's
    defaults), with how: those are measured and shown, but get no PASS/MISS."""
    full = BenchmarkOptions()
    differs: dict[str, str] = {}
    if options.reference_steps != full.reference_steps:
        for name in ("one_shot_ratio", "adaptive_ratio"):
            differs[name] = f"{options.reference_steps} reference steps, not {full.reference_steps}"
    if options.big_volume is None and tuple(options.big_volume_shape) != full.big_volume_shape:
        for name in ("big_volume_seconds", "big_volume_peak_bytes"):
            differs[name] = (f"a {'×'.join(map(str, options.big_volume_shape))} big volume, not "
                             f"{'×'.join(map(str, full.big_volume_shape))}")
    if options.sample_slices is not None:
        differs["end_to_end_seconds"] = f"{options.sample_slices} sample slices, not all"
    if options.finetune_steps != full.finetune_steps:
        for name in ("finetune_seconds", "set_finetune_seconds"):
            differs[name] = f"{options.finetune_steps} fine-tuning steps, not {full.finetune_steps}"
    return differs


#: Options that name files: recorded by file name, as every record names files
#: (:func:`medconddiff.outputs.recorded_name`): a checkpoint or a scan may lie in a patient's folder.
FILE_OPTIONS = ("checkpoints", "big_volume", "real_size", "heldout_scan")


def _options_dict(options: BenchmarkOptions) -> dict:
    values = dataclasses.asdict(options)
    for key in FILE_OPTIONS:
        value = values[key]
        values[key] = tuple(map(recorded_name, value)) if isinstance(value, (tuple, list)) else recorded_name(value)
    return {key: list(value) if isinstance(value, tuple) else value for key, value in values.items()}
