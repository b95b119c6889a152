"""Speed and memory of one or more checkpoints on this device: what ``medconddiff benchmark`` measures.

Everything goes through the same objects users run (``Segmenter.run`` / ``one_shot`` / the model's
``encode_condition`` and ``denoise``), so the numbers describe the real engine, whatever the model
family (pixel MedCondDiff or latent LSegDiff): only that three-method interface is used.

    report = run_benchmark(BenchmarkOptions(checkpoints=(None,)))   # a JSON-able dict
    print(format_report(report))

Timings are medians of ``repeats`` rounds after ``warmup`` untimed rounds, with ``time.perf_counter``
and ``torch.cuda.synchronize`` on CUDA; the quantities that are compared run interleaved within a
round and ratios are medians of per-round ratios, so that load from other processes (a shared
machine) biases them less. Peak memory is measured in a fresh subprocess so that the earlier
measurements do not inflate it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

SCHEMA = "medconddiff-benchmark/1"
DEFAULT_LABEL = "default"
GB = 1e9

#: name → (description, upper bound on CPU, upper bound on CUDA); None: no target on that device.
TARGETS = {
    "one_shot_ratio": ("fixed-step consensus time / one-shot time at the reference steps", 3.0, 3.0),
    "adaptive_ratio": ("adaptive consensus time / one-shot time (at most the reference steps)", 3.0, 3.0),
    "overhead_fraction": ("sampling time beyond 1 encode_condition + S denoise passes, as a fraction", 0.10, 0.10),
    "big_volume_peak_bytes": ("peak memory for the big volume (host RSS; CUDA: reserved)", 4 * GB, 1.5 * GB),
    "big_volume_seconds": ("big volume end to end (512²×300 at 0.7 mm: 60 s on 2 CPU cores, 3 s on a GPU)",
                           60.0, 3.0),
    "end_to_end_seconds": ("bundled 128³ sample, load + segment", 60.0, 60.0),
    "finetune_seconds": ("fine-tuning on 3 corrected slices (2 min on 2 CPU cores, 15 s on a GPU)", 120.0, 15.0),
}


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
    finetune_steps: int = 200                          # fine-tuning speed: steps on 3 slices (0 = skip)
    precision: str = "auto"                            # SamplingConfig.precision of every measurement

    @classmethod
    def quick(cls, **overrides: Any) -> "BenchmarkOptions":
        """Tiny everything: for tests and a first look, not for numbers."""
        values: dict[str, Any] = dict(steps_list=(1, 2), reference_steps=2, latency_batch=2, batch_sizes=(1, 2),
                                      volume_slices=4, repeats=1, warmup=1, big_volume_shape=(64, 64, 4),
                                      sample_slices=4, finetune_steps=2)
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
                raise ValueError(f"{name} must be at least 1, got {value}")
        if not self.steps_list or not self.batch_sizes or not self.checkpoints:
            raise ValueError("steps_list, batch_sizes and checkpoints must not be empty")
        if self.warmup < 0:
            raise ValueError(f"warmup must be 0 or more, got {self.warmup}")
        if len(self.big_volume_shape) != 3:
            raise ValueError(f"big_volume_shape needs three sizes, got {self.big_volume_shape}")
        if self.sample_slices is not None and self.sample_slices < 1:
            raise ValueError(f"sample_slices must be at least 1, got {self.sample_slices}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be at least 1, got {self.threads}")
        if self.finetune_steps < 0:
            raise ValueError(f"finetune_steps must be 0 or more, got {self.finetune_steps}")
        from .config import PRECISIONS

        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")


# --------------------------------------------------------------------------------------------- timing

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


# ------------------------------------------------------------------------------------------- models

@dataclass
class BenchModel:
    label: str
    segmenter: Any                 # medconddiff.segmenter.Segmenter
    spec: dict                     # how a subprocess rebuilds the same model: checkpoint / random
    source: str                    # a path, or what the random weights stand in for
    random_weights: bool
    load_seconds: Optional[float]  # time to load the checkpoint (None for a freshly built model)


def build_segmenter(spec: dict, device: str):
    """The Segmenter a spec names: ``{"checkpoint": path}`` or ``{"checkpoint": None, "random": True}``."""
    import torch

    from .config import ExperimentConfig
    from .families import build_model
    from .segmenter import Segmenter

    if spec.get("random"):
        # Speed does not depend on the weights: a seeded random default-config model, prepared as
        # Segmenter.from_checkpoint prepares a loaded one, times the same.
        torch.manual_seed(0)
        config = ExperimentConfig()
        return Segmenter(build_model(config.model, in_channels=config.plan.input_channels), config, device=device)
    return Segmenter.from_checkpoint(spec["checkpoint"], device=device)


def load_bench_model(checkpoint: Optional[str], device: str) -> BenchModel:
    """A checkpoint path or bundled model name (None = the default model, random weights if absent)."""
    from .checkpoint import default_checkpoint_path, resolve_checkpoint

    if checkpoint is None and not default_checkpoint_path().is_file():
        spec = {"checkpoint": None, "random": True}
        return BenchModel(f"{DEFAULT_LABEL} (random weights)", build_segmenter(spec, device), spec,
                          f"ModelConfig() with random weights ({default_checkpoint_path().name} not found)",
                          True, None)
    path = resolve_checkpoint(checkpoint)
    spec = {"checkpoint": str(path), "random": False}
    start = time.perf_counter()
    segmenter = build_segmenter(spec, device)
    seconds = time.perf_counter() - start
    label = DEFAULT_LABEL if checkpoint is None else Path(checkpoint).name
    return BenchModel(label, segmenter, spec, str(path), False, seconds)


def parameter_counts(model: Any) -> dict[str, int]:
    if hasattr(model, "parameter_counts"):
        return {k: int(v) for k, v in model.parameter_counts().items()}
    return {"total": int(sum(p.numel() for p in model.parameters()))}


# --------------------------------------------------------------------------------------------- data

def sample_volume():
    """The bundled sample scan and its meta (RAS, 1 mm: axial slices along its last axis)."""
    from .nifti import load_volume, sample_scan_path

    return load_volume(sample_scan_path())


def slab(volume: np.ndarray, count: int) -> np.ndarray:
    """``count`` consecutive axial slices (last axis of an RAS volume) from the middle (wrapping if too few)."""
    depth = volume.shape[2]
    start = max(0, depth // 2 - count // 2)
    indices = (start + np.arange(count)) % depth
    return np.ascontiguousarray(np.take(volume, indices, axis=2))


# ----------------------------------------------------------------------------------------- measures

def _sampling(steps: int, batch_size: int, **kwargs: Any):
    """SamplingConfig with its defaults (adaptive steps) unless told; fixed-step rows pass adaptive=False."""
    from .config import SamplingConfig

    return SamplingConfig(steps=steps, batch_size=batch_size, **kwargs)


def network_parts(segmenter: Any, image_slices: np.ndarray, meta: Any, precision: str = "auto"
                  ) -> dict[str, Callable[[], None]]:
    """One encode_condition pass and one denoise pass over a batch: what sampling cannot avoid."""
    import torch

    seg, model = segmenter, segmenter.model
    scan = seg.preprocessor.prepare(image_slices, meta)
    image = scan.forward(np.arange(scan.n_slices), seg.device)
    batch, height, width = image.shape[0], image.shape[-2], image.shape[-1]
    x_t = torch.randn(model.state_shape(batch, height, width), generator=torch.Generator().manual_seed(0))
    x_t = x_t.to(seg.device)
    t = torch.full((batch,), seg.schedule.num_train_timesteps // 2, device=seg.device, dtype=torch.long)
    with torch.inference_mode(), seg.autocast(precision):  # exactly as Segmenter.denoise_slices runs them
        condition = model.encode_condition(image)

    @torch.inference_mode()
    def encode() -> None:
        with seg.autocast(precision):
            model.encode_condition(image)

    @torch.inference_mode()
    def denoise() -> None:
        with seg.autocast(precision):
            model.denoise(x_t, t, condition)

    return {"encode_condition": encode, "denoise": denoise}


def measure_model(bench: BenchModel, volume: np.ndarray, meta: Any, options: BenchmarkOptions,
                  log: Callable[[str], None]) -> dict:
    """All in-process measurements of one model (the memory probe runs separately)."""
    seg = bench.segmenter
    device = seg.device
    ref = options.reference_steps
    batch_size = options.latency_batch
    batch = slab(volume, batch_size)
    steps_list = sorted(set(options.steps_list) | {ref})

    log(f"[{bench.label}] batch of {batch_size} slices: network parts, consensus sampling at "
        f"{', '.join(map(str, steps_list))} steps, one-shot, re-extracted features "
        f"({options.warmup} warm-up + {options.repeats} rounds)")
    precision = options.precision
    functions = network_parts(seg, batch, meta, precision)
    for steps in steps_list:
        sampling = _sampling(steps, batch_size, adaptive=False, precision=precision)
        functions[f"run_{steps}"] = lambda sampling=sampling: seg.segment(batch, sampling, meta=meta)
    functions["one_shot"] = lambda: seg.one_shot(batch, batch_size=batch_size, meta=meta, precision=precision)
    reextract = _sampling(ref, batch_size, reextract_features=True, adaptive=False, precision=precision)
    functions["reextract"] = lambda: seg.segment(batch, reextract, meta=meta)
    adaptive = _sampling(ref, batch_size, adaptive=True, precision=precision)
    steps_taken: list[float] = []
    functions["adaptive"] = lambda: steps_taken.append(float(seg.segment(batch, adaptive, meta=meta).steps_used.mean()))
    times = time_interleaved(functions, device, options.repeats, options.warmup)
    rounds = range(options.repeats)

    def parts_s(steps: int, i: int) -> float:
        return times["encode_condition"][i] + steps * times["denoise"][i]

    latency = []
    for steps in steps_list:
        run_s = times[f"run_{steps}"]
        latency.append({
            "steps": steps, "batch": batch_size, "seconds_per_batch": median(run_s),
            "ms_per_slice": 1e3 * median(run_s) / batch_size,
            "parts_seconds": median([parts_s(steps, i) for i in rounds]),
            # Ratios within a round, then the median: robust to load that comes and goes.
            "overhead_fraction": median([run_s[i] / parts_s(steps, i) - 1.0 for i in rounds])})
    reference = next(entry for entry in latency if entry["steps"] == ref)
    run_ref = times[f"run_{ref}"]

    throughput = []
    whole = slab(volume, options.volume_slices)
    log(f"[{bench.label}] whole volume of {options.volume_slices} slices at batch sizes "
        f"{', '.join(map(str, options.batch_sizes))}")
    volume_runs = {b: (lambda sampling=_sampling(ref, b, adaptive=False, precision=precision):
                       seg.segment(whole, sampling, meta=meta))
                   for b in options.batch_sizes}
    volume_times = time_interleaved(volume_runs, device, options.repeats, options.warmup)
    for b in options.batch_sizes:
        seconds = median(volume_times[b])
        throughput.append({"batch_size": b, "seconds": seconds, "slices_per_second": options.volume_slices / seconds})
    best = max(throughput, key=lambda entry: entry["slices_per_second"])

    log(f"[{bench.label}] end to end on the bundled sample")
    end_to_end = measure_end_to_end(seg, options)
    finetune = None
    if options.finetune_steps:
        log(f"[{bench.label}] fine-tuning {options.finetune_steps} steps on 3 slices of the bundled sample")
        finetune = measure_finetune(bench, options)

    return {
        "label": bench.label,
        "source": bench.source,
        "random_weights": bench.random_weights,
        "family": seg.config.model.family,
        "model_plane": list(seg.preprocessor.geometry(batch.shape, meta).model_shape),
        "backbone": seg.config.model.backbone,
        "num_classes": seg.num_classes,
        "checkpoint_load_seconds": bench.load_seconds,
        "parameters": parameter_counts(seg.model),
        "parts": {"batch": batch_size, "encode_condition_s": median(times["encode_condition"]),
                  "denoise_s": median(times["denoise"])},
        "latency": latency,
        "one_shot": {"batch": batch_size, "seconds_per_batch": median(times["one_shot"]),
                     "ms_per_slice": 1e3 * median(times["one_shot"]) / batch_size,
                     "ratio": median([run_ref[i] / times["one_shot"][i] for i in rounds])},
        "adaptive": {"batch": batch_size, "max_steps": ref, "mean_steps": float(np.mean(steps_taken)),
                     "ms_per_slice": 1e3 * median(times["adaptive"]) / batch_size,
                     "ratio": median([times["adaptive"][i] / times["one_shot"][i] for i in rounds])},
        "overhead_fraction": reference["overhead_fraction"],
        "feature_reuse": {"steps": ref, "batch": batch_size, "reextract_seconds": median(times["reextract"]),
                          "reuse_seconds": reference["seconds_per_batch"],
                          "speedup": median([times["reextract"][i] / run_ref[i] for i in rounds])},
        "throughput": {"steps": ref, "volume_slices": options.volume_slices, "by_batch_size": throughput,
                       "best_batch_size": best["batch_size"], "best_slices_per_second": best["slices_per_second"]},
        "end_to_end": end_to_end,
        "finetune": finetune,
    }


def measure_end_to_end(segmenter: Any, options: BenchmarkOptions) -> dict:
    """Load the bundled sample and segment it at the reference steps (one timed run, already warm)."""
    from .nifti import load_volume, sample_scan_path

    start = time.perf_counter()
    volume, meta = load_volume(sample_scan_path())
    loaded = time.perf_counter()
    depth = segmenter.preprocessor.geometry(volume.shape, meta).n_slices
    slices = None if options.sample_slices is None else range(min(options.sample_slices, depth))
    sampling = _sampling(options.reference_steps, _default_batch_size(), precision=options.precision)
    result = segmenter.segment(volume, sampling, slices, meta=meta)
    synchronize(segmenter.device)
    done = time.perf_counter()
    return {"shape": list(volume.shape), "slices": int(len(result.slice_indices)), "steps": options.reference_steps,
            "batch_size": _default_batch_size(), "load_seconds": loaded - start, "segment_seconds": done - loaded,
            "seconds": done - start}


#: The "corrections" of the fine-tuning measurement: three tumour slices of the bundled sample,
#: relabelled as one new class, as a user correcting a scan would paint them.
FINETUNE_SLICES = (40, 56, 88)


def measure_finetune(bench: BenchModel, options: BenchmarkOptions) -> dict:
    """Seconds to fine-tune the model (a new two-class list) on 3 slices, set-up included, as the widget does."""
    from .checkpoint import load_checkpoint
    from .finetune import LabelledScan, finetune
    from .nifti import load_labels, load_volume, sample_label_path, sample_scan_path

    start = time.perf_counter()
    volume, meta = load_volume(sample_scan_path())
    labels, _ = load_labels(sample_label_path())
    lesion = (labels == 2).astype(np.uint8)
    source = load_checkpoint(bench.spec["checkpoint"]) if bench.spec.get("checkpoint") else None
    if source is None:
        return {"skipped": "no checkpoint to fine-tune (random-weight model)"}
    run = finetune(source, [LabelledScan("sample", volume, meta, lesion, FINETUNE_SLICES)],
                   class_names=("background", "lesion"), steps=options.finetune_steps,
                   device=str(bench.segmenter.device), log=lambda message: None)
    prepared = time.perf_counter()
    losses = [event.losses["loss"] for event in run]
    synchronize(bench.segmenter.device)
    done = time.perf_counter()
    return {"steps": options.finetune_steps, "slices": list(FINETUNE_SLICES), "batch": run.config.train.train_batch_size,
            "patch": run.config.train.patch_size, "setup_seconds": prepared - start,
            "train_seconds": done - prepared, "seconds": done - start,
            "seconds_per_step": (done - prepared) / max(1, len(losses)),
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None}


def _default_batch_size() -> int:
    from .config import SamplingConfig

    return SamplingConfig().batch_size


# ------------------------------------------------------------------------------------- memory probe

def peak_rss_bytes() -> Optional[int]:
    """Peak resident set size of this process (None where the OS does not say)."""
    try:
        import resource
    except ImportError:  # Windows
        try:
            import psutil

            return int(psutil.Process().memory_info().peak_wset)
        except (ImportError, AttributeError):
            return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


def current_rss_bytes() -> Optional[int]:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


#: In-plane voxel size of the synthetic big volume: a real 512² CT field of view (358 mm).
BIG_VOLUME_SPACING = (0.7, 0.7, 1.0)


def big_volume_meta():
    """An LPS (DICOM/ITK convention) affine at BIG_VOLUME_SPACING: how real CTs are stored."""
    from .nifti import VolumeMeta

    return VolumeMeta(affine=np.diag([-BIG_VOLUME_SPACING[0], -BIG_VOLUME_SPACING[1], BIG_VOLUME_SPACING[2], 1.0]),
                      spacing=BIG_VOLUME_SPACING)


def _big_volume(shape: Sequence[int], path: Optional[str]):
    """The big volume: a NIfTI if given, else CT-like noise of ``shape`` in LPS at BIG_VOLUME_SPACING."""
    if path:
        from .nifti import load_volume

        return load_volume(path)
    # Drawn directly as float32 so no float64 temporary inflates the peak.
    volume = np.random.default_rng(0).standard_normal(tuple(shape), dtype=np.float32)
    volume *= 300.0
    return volume, big_volume_meta()


class _Profile:
    """Wall time spent inside a few engine functions (patched on their modules while active)."""

    PARTS = (("preprocess (orient, normalise, resample)", "medconddiff.preprocess", "PreparedScan", "forward"),
             ("encode_condition (backbone + adapter)", None, None, "encode_condition"),
             ("denoise (denoiser passes)", None, None, "denoise"),
             ("scheduler steps", "medconddiff.schedulers", "DDIMScheduler", "step"),
             ("quantise kept steps", "medconddiff.segmenter", None, "quantize"),
             ("fuse, resample to the scan, uncertainty", "medconddiff.segmenter", None, "fuse_slices"))

    def __init__(self, model: Any, device: Any):
        self.model, self.device = model, device
        self.seconds = {name: 0.0 for name, *_ in self.PARTS}
        self._undo: list[Callable[[], None]] = []

    def _wrap(self, name: str, owner: Any, attribute: str) -> None:
        original = getattr(owner, attribute)
        seconds = self.seconds
        device = self.device
        depth = [0]

        def timed(*args: Any, **kwargs: Any) -> Any:
            depth[0] += 1
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                depth[0] -= 1
                if depth[0] == 0:   # fuse_slices calls itself for ragged batches: count the outer call once
                    synchronize(device)
                    seconds[name] += time.perf_counter() - start

        setattr(owner, attribute, timed)
        self._undo.append(lambda: setattr(owner, attribute, original))

    def __enter__(self) -> "_Profile":
        import importlib

        for name, module, cls, attribute in self.PARTS:
            if module is None:
                self._wrap(name, self.model, attribute)
            else:
                owner = importlib.import_module(module)
                self._wrap(name, getattr(owner, cls) if cls else owner, attribute)
        return self

    def __exit__(self, *exc: Any) -> None:
        for undo in reversed(self._undo):
            undo()


def memory_probe(spec: dict, device: str, shape: Sequence[int], steps: int, threads: Optional[int],
                 adaptive: bool = True, path: Optional[str] = None, precision: str = "auto") -> dict:
    """Segment the big volume keeping the trajectory, with a time profile; run in a fresh process."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    segmenter = build_segmenter(spec, device)
    rss_model = current_rss_bytes()
    volume, meta = _big_volume(shape, path)
    cuda = segmenter.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(segmenter.device)
    sampling = _sampling(steps, _default_batch_size(), adaptive=adaptive, precision=precision)
    start = time.perf_counter()
    with _Profile(segmenter.model, segmenter.device) as profile:
        result = segmenter.segment(volume, sampling, meta=meta)
        synchronize(segmenter.device)
    seconds = time.perf_counter() - start
    geometry = result.geometry
    profile.seconds["other (events, writing results, Python)"] = max(0.0, seconds - sum(profile.seconds.values()))
    report = {"shape": list(volume.shape), "source": path or "synthetic CT-like noise, LPS",
              "spacing": list(meta.spacing), "model_plane": list(geometry.model_shape),
              "padded_plane": list(geometry.padded_shape), "steps": steps, "adaptive": adaptive,
              "mean_steps": float(result.steps_used.mean()),
              "batch_size": _default_batch_size(), "seconds": seconds,
              "slices_per_second": geometry.n_slices / seconds, "profile_seconds": profile.seconds,
              "peak_rss_bytes": peak_rss_bytes(), "rss_after_model_load_bytes": rss_model,
              "volume_bytes": int(volume.nbytes), "trajectory_bytes": int(result.trajectory.nbytes),
              "trajectory_shape": list(result.trajectory.shape),
              "outputs_bytes": int(result.labels.nbytes + result.uncertainty.nbytes),
              "cuda_max_allocated_bytes": None, "cuda_max_reserved_bytes": None}
    if cuda:
        report["cuda_max_allocated_bytes"] = int(torch.cuda.max_memory_allocated(segmenter.device))
        report["cuda_max_reserved_bytes"] = int(torch.cuda.max_memory_reserved(segmenter.device))
    if report["peak_rss_bytes"] is not None and rss_model is not None:
        # What the run adds on top of the process (Python, torch, timm, the model): ~1 GB of the peak
        # is the price of importing a CUDA build of torch at all.
        report["run_increment_bytes"] = report["peak_rss_bytes"] - rss_model
    else:
        report["run_increment_bytes"] = None
    report["peak_bytes"] = report["cuda_max_reserved_bytes"] if cuda else report["peak_rss_bytes"]
    report["peak_measure"] = "cuda_max_reserved" if cuda else "peak_rss"
    return report


def memory_probe_main(argv: Optional[Sequence[str]] = None) -> int:
    """Subprocess entry: one JSON argument in, one JSON line out."""
    request = json.loads((argv if argv is not None else sys.argv[1:])[0])
    report = memory_probe(request["spec"], request["device"], request["shape"], request["steps"],
                          request.get("threads"), request.get("adaptive", True), request.get("path"),
                          request.get("precision", "auto"))
    print(json.dumps(report))
    return 0


def run_memory_probe(spec: dict, device: str, shape: Sequence[int], steps: int, threads: Optional[int],
                     adaptive: bool = True, path: Optional[str] = None, precision: str = "auto") -> dict:
    request = json.dumps({"spec": spec, "device": device, "shape": list(shape), "steps": steps, "threads": threads,
                          "adaptive": adaptive, "path": path, "precision": precision})
    code = "import sys; from medconddiff.benchmark import memory_probe_main; sys.exit(memory_probe_main())"
    completed = subprocess.run([sys.executable, "-c", code, request], capture_output=True, text=True)
    if completed.returncode != 0:
        tail = (completed.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"memory probe failed (exit {completed.returncode}): {tail}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------- environment

def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: Any) -> dict:
    import torch

    from . import __version__

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    info = {
        "medconddiff": __version__, "torch": torch.__version__, "numpy": np.__version__,
        "python": platform.python_version(), "platform": platform.platform(),
        "device": str(device), "device_name": cpu_name(), "cpu_name": cpu_name(),
        "cpu_count": os.cpu_count(), "cpus_usable": usable,
        "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if getattr(device, "type", "") == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


# ------------------------------------------------------------------------------------------ targets

def evaluate_targets(model_report: dict, device_type: str = "cpu") -> dict:
    memory = model_report["memory"] or {}
    finetune = model_report.get("finetune") or {}
    values = {
        "one_shot_ratio": model_report["one_shot"]["ratio"],
        "adaptive_ratio": model_report["adaptive"]["ratio"],
        "overhead_fraction": model_report["overhead_fraction"],
        "big_volume_peak_bytes": memory.get("peak_bytes"),
        "big_volume_seconds": memory.get("seconds"),
        "end_to_end_seconds": model_report["end_to_end"]["seconds"],
        "finetune_seconds": finetune.get("seconds"),
    }
    targets = {}
    for name, (description, cpu_bound, cuda_bound) in TARGETS.items():
        value = values[name]
        threshold = cuda_bound if device_type == "cuda" else cpu_bound
        targets[name] = {"description": description, "value": value, "threshold": threshold,
                         "passed": None if value is None or threshold is None else bool(value <= threshold)}
    return targets


# -------------------------------------------------------------------------------------------- main

def run_benchmark(options: BenchmarkOptions, log: Callable[[str], None] = lambda message: None) -> dict:
    """Measure every checkpoint of ``options`` on one device; returns the JSON-able report."""
    import torch

    from .segmenter import resolve_device

    if options.threads:
        torch.set_num_threads(options.threads)
    device = resolve_device(options.device)
    env = environment(device)
    volume, meta = sample_volume()
    models = []
    labels_seen: dict[str, int] = {}
    for checkpoint in options.checkpoints:
        bench = load_bench_model(checkpoint, str(device))
        count = labels_seen.get(bench.label, 0)
        labels_seen[bench.label] = count + 1
        if count:  # the same file name twice: keep columns apart
            bench = dataclasses.replace(bench, label=f"{bench.label}#{count + 1}")
        report = measure_model(bench, volume, meta, options, log)
        report["memory"] = None
        if options.memory:
            log(f"[{bench.label}] peak memory, {'×'.join(map(str, options.big_volume_shape))} volume "
                f"in a fresh process")
            report["memory"] = run_memory_probe(bench.spec, str(device), options.big_volume_shape,
                                                options.reference_steps, torch.get_num_threads(),
                                                options.big_volume_adaptive, options.big_volume,
                                                options.precision)
        report["targets"] = evaluate_targets(report, device.type)
        models.append(report)
        del bench
        if device.type == "cuda":
            torch.cuda.empty_cache()
    env["load_average_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return {"schema": SCHEMA, "environment": env, "options": _options_dict(options), "models": models}


def _options_dict(options: BenchmarkOptions) -> dict:
    values = dataclasses.asdict(options)
    return {key: list(value) if isinstance(value, tuple) else value for key, value in values.items()}


# ------------------------------------------------------------------------------------------- table

def _fmt(value: Any, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def _verdict(target: dict) -> str:
    return "" if target["passed"] is None else (" PASS" if target["passed"] else " MISS")


def _gb(value: Optional[float]) -> Optional[float]:
    return None if value is None else value / GB


def table_rows(report: dict) -> list[tuple[str, list[str]]]:
    models = report["models"]
    options = report["options"]
    ref = options["reference_steps"]
    rows: list[tuple[str, list[str]]] = []

    def row(name: str, cell: Callable[[dict], str]) -> None:
        rows.append((name, [cell(m) for m in models]))

    row("model", lambda m: f"{m['family']} {m['backbone']} {m['model_plane'][0]}×{m['model_plane'][1]}")
    parts = sorted({k for m in models for k in m["parameters"] if k != "total"},
                   key=lambda k: ((["backbone", "adapter", "denoiser"] + [k]).index(k), k))
    for part in parts + ["total"]:
        row(f"parameters: {part} (M)", lambda m, part=part: _fmt(
            None if part not in m["parameters"] else m["parameters"][part] / 1e6, ".2f"))
    row(f"encode_condition, ms/slice (batch {options['latency_batch']})",
        lambda m: _fmt(1e3 * m["parts"]["encode_condition_s"] / m["parts"]["batch"], ".1f"))
    row("denoise pass, ms/slice", lambda m: _fmt(1e3 * m["parts"]["denoise_s"] / m["parts"]["batch"], ".2f"))
    for i, steps in enumerate(entry["steps"] for entry in models[0]["latency"]):
        row(f"consensus, {steps} fixed steps, ms/slice",
            lambda m, i=i: _fmt(m["latency"][i]["ms_per_slice"], ".1f"))
    row("one-shot forward, ms/slice", lambda m: _fmt(m["one_shot"]["ms_per_slice"], ".1f"))
    row(f"{ref}-step / one-shot (target ≤ 3×)",
        lambda m: _fmt(m["one_shot"]["ratio"], ".2f", "×") + _verdict(m["targets"]["one_shot_ratio"]))
    row(f"adaptive (≤ {ref} steps): mean steps, ms/slice",
        lambda m: f"{m['adaptive']['mean_steps']:.1f}, {m['adaptive']['ms_per_slice']:.1f}")
    row("adaptive / one-shot (target ≤ 3×)",
        lambda m: _fmt(m["adaptive"]["ratio"], ".2f", "×") + _verdict(m["targets"]["adaptive_ratio"]))
    row(f"overhead beyond 1 encode + {ref} denoise (target ≤ 10%)",
        lambda m: _fmt(100 * m["overhead_fraction"], "+.1f", "%") + _verdict(m["targets"]["overhead_fraction"]))
    row(f"feature reuse speed-up vs re-extracting ({ref} steps)",
        lambda m: _fmt(m["feature_reuse"]["speedup"], ".2f", "×"))
    for i, batch_size in enumerate(entry["batch_size"] for entry in models[0]["throughput"]["by_batch_size"]):
        row(f"volume of {options['volume_slices']} slices, batch {batch_size}, slices/s",
            lambda m, i=i: _fmt(m["throughput"]["by_batch_size"][i]["slices_per_second"], ".1f"))
    row("best batch size → slices/s",
        lambda m: f"{m['throughput']['best_batch_size']} → {m['throughput']['best_slices_per_second']:.1f}")
    shape = "×".join(map(str, (models[0]["memory"] or {}).get("shape", options["big_volume_shape"])))
    row(f"big volume {shape} → model plane",
        lambda m: "×".join(map(str, (m["memory"] or {}).get("model_plane", []))) or "n/a")
    row("  end to end, s",
        lambda m: _fmt((m["memory"] or {}).get("seconds"), ".1f") + _verdict(m["targets"]["big_volume_seconds"]))
    row("  slices/s, mean steps",
        lambda m: f"{_fmt((m['memory'] or {}).get('slices_per_second'), '.2f')}, "
                  f"{_fmt((m['memory'] or {}).get('mean_steps'), '.1f')}")
    for part in list((models[0]["memory"] or {}).get("profile_seconds", {})):
        row(f"    {part}, s", lambda m, part=part: _fmt((m["memory"] or {}).get("profile_seconds", {}).get(part), ".1f"))
    row("  peak memory",
        lambda m: _fmt(_gb((m["memory"] or {}).get("peak_bytes")), ".2f", " GB") + _verdict(
            m["targets"]["big_volume_peak_bytes"]))
    row("  process after model load (host RSS)",
        lambda m: _fmt(_gb((m["memory"] or {}).get("rss_after_model_load_bytes")), ".2f", " GB"))
    row("  added by the run (host RSS)",
        lambda m: _fmt(_gb((m["memory"] or {}).get("run_increment_bytes")), ".2f", " GB"))
    row("  of which trajectory kept", lambda m: _fmt(_gb((m["memory"] or {}).get("trajectory_bytes")), ".3f", " GB"))
    row("end to end bundled sample, s (target ≤ 60 s)",
        lambda m: _fmt(m["end_to_end"]["seconds"], ".1f") + f" ({m['end_to_end']['slices']} sl)"
        + _verdict(m["targets"]["end_to_end_seconds"]))
    row("fine-tune on 3 slices: steps, s (s/step)",
        lambda m: "n/a" if not (m.get("finetune") or {}).get("seconds") else
        f"{m['finetune']['steps']}, {m['finetune']['seconds']:.1f} ({m['finetune']['seconds_per_step']:.2f})"
        + _verdict(m["targets"]["finetune_seconds"]))
    row("checkpoint load, s", lambda m: _fmt(m["checkpoint_load_seconds"], ".2f"))
    return rows


def format_report(report: dict) -> str:
    env = report["environment"]
    lines = [
        f"medconddiff benchmark on {env['device']} ({env['device_name']}), torch {env['torch']}, "
        f"{env['torch_threads']} torch threads, {env['cpu_count']} CPUs ({env['cpus_usable']} usable), "
        f"load average {_fmt((env.get('load_average') or [None])[0], '.2f')} → "
        f"{_fmt((env.get('load_average_after') or [None])[0], '.2f')}, "
        f"precision {report['options'].get('precision', 'auto')}",
    ]
    for m in report["models"]:
        lines.append(f"  {m['label']}: {m['source']}")
    rows = table_rows(report)
    headers = [m["label"] for m in report["models"]]
    width0 = max(len(name) for name, _ in rows)
    widths = [max(len(h), *(len(cells[i]) for _, cells in rows)) for i, h in enumerate(headers)]
    lines.append("")
    lines.append("  ".join([" " * width0] + [h.rjust(w) for h, w in zip(headers, widths)]))
    for name, cells in rows:
        lines.append("  ".join([name.ljust(width0)] + [c.rjust(w) for c, w in zip(cells, widths)]))
    lines.append("")
    lines.append(f"medians of {report['options']['repeats']} interleaved rounds after {report['options']['warmup']} "
                 "warm-up (ratios: median of per-round ratios); end to end and memory are single runs")
    return "\n".join(lines)
