"""Peak memory and a time profile of one big volume, measured in a fresh process.

A subprocess starts clean, so the earlier in-process measurements do not inflate its peak; it loads
the model, segments the big volume (synthetic CT-like noise of a real CT's size, or a given NIfTI)
keeping the trajectory, and prints one JSON line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Optional, Sequence

import numpy as np

from .benchmark_measures import build_segmenter, default_batch_size, sampling_config
from .benchmark_timing import OTHER_PART, EngineProfile, synchronize
from .profiling import HostPartTimer


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
    sampling = sampling_config(steps, default_batch_size(), adaptive=adaptive, precision=precision)
    start = time.perf_counter()
    with HostPartTimer() as host_parts:
        result = segmenter.segment(volume, sampling, meta=meta)
        synchronize(segmenter.device)
    seconds = time.perf_counter() - start
    geometry = result.geometry
    report = {"shape": list(volume.shape), "source": path or "synthetic CT-like noise, LPS",
              "spacing": list(meta.spacing), "model_plane": list(geometry.model_shape),
              "padded_plane": list(geometry.padded_shape), "steps": steps, "adaptive": adaptive,
              "mean_steps": float(result.steps_used.mean()),
              "batch_size": default_batch_size(), "seconds": seconds,
              "slices_per_second": geometry.n_slices / seconds,
              "peak_rss_bytes": peak_rss_bytes(), "rss_after_model_load_bytes": rss_model,
              "volume_bytes": int(volume.nbytes), "trajectory_bytes": int(result.trajectory.nbytes),
              "trajectory_shape": list(result.trajectory.shape),
              "outputs_bytes": int(result.labels.nbytes + result.uncertainty.nbytes),
              "cuda_max_allocated_bytes": None, "cuda_max_reserved_bytes": None}
    if cuda:
        report["cuda_max_allocated_bytes"] = int(torch.cuda.max_memory_allocated(segmenter.device))
        report["cuda_max_reserved_bytes"] = int(torch.cuda.max_memory_reserved(segmenter.device))
    del result
    if cuda:
        # Kernels run on after the host returns, so host timers say little here, and torch.profiler
        # records every operator: over the thousands of network calls of a big volume its trace would
        # take gigabytes and minutes to read back, distorting the very peak and time measured above. So
        # a profiled sample of the run's batches (after the peak was read) gives each part's share.
        sample = profile_sample(segmenter, volume, meta, sampling)
        report["profile_seconds"] = sample.scaled_to(seconds)
        report["profile_sample_slices"] = sample.slices
    else:
        # The measured run's own split. (A profiled sample of 2 slices, scaled up to the run, multiplied
        # its fixed costs, set-up and provenance, by the run's length: "other" came out 2-3 times too big.)
        report["profile_seconds"] = {**host_parts.seconds(),
                                     OTHER_PART: max(0.0, seconds - sum(host_parts.seconds().values()))}
        report["profile_sample_slices"] = None
    if report["peak_rss_bytes"] is not None and rss_model is not None:
        # What the run adds on top of the process (Python, torch, timm, the model): ~1 GB of the peak
        # is the price of importing a CUDA build of torch at all.
        report["run_increment_bytes"] = report["peak_rss_bytes"] - rss_model
    else:
        report["run_increment_bytes"] = None
    report["peak_bytes"] = report["cuda_max_reserved_bytes"] if cuda else report["peak_rss_bytes"]
    report["peak_measure"] = "cuda_max_reserved" if cuda else "peak_rss"
    return report


def profile_sample(segmenter, volume: np.ndarray, meta, sampling, batch_count: int = 2) -> EngineProfile:
    """Segment ``batch_count`` batches of slices from the middle of ``volume`` under an
    :class:`EngineProfile` (the middle: the first slices of a scan are often air and stop early)."""
    from .segmenter import batches

    geometry = segmenter.preprocessor.geometry(volume.shape, meta)
    every = np.arange(geometry.n_slices)
    sizes = [part.stop - part.start for part in batches(every, sampling, geometry)][:batch_count]
    count = sum(sizes)
    first = (geometry.n_slices - count) // 2
    with EngineProfile(segmenter.device, slices=count) as profile:
        segmenter.segment(volume, sampling, slices=range(first, first + count), meta=meta)
        synchronize(segmenter.device)
    return profile


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
    code = "import sys; from medconddiff.benchmark_memory import memory_probe_main; sys.exit(memory_probe_main())"
    completed = subprocess.run([sys.executable, "-c", code, request], capture_output=True, text=True)
    if completed.returncode != 0:
        tail = (completed.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"memory probe failed (exit {completed.returncode}): {tail}")
    return json.loads(completed.stdout.strip().splitlines()[-1])
