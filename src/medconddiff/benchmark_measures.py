"""What the benchmark measures: the models under test and the in-process measurements of one model.

Everything goes through the same objects users run (``Segmenter.run`` / ``one_shot`` / the model's
``encode_condition`` and ``denoise``), so the numbers describe the real engine, whatever the model
family (pixel MedCondDiff or latent LSegDiff): only that three-method interface is used. Ratios are
medians of per-round ratios (see :mod:`medconddiff.benchmark_timing`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import numpy as np

from .benchmark_timing import median, synchronize, time_interleaved
from .outputs import recorded_name

if TYPE_CHECKING:
    from .benchmark import BenchmarkOptions

DEFAULT_LABEL = "default"


@dataclass
class BenchModel:
    label: str
    segmenter: Any                 # medconddiff.segmenter.Segmenter
    spec: dict                     # how a subprocess rebuilds the same model: checkpoint / random
    source: str                    # the checkpoint's file name, or what the random weights stand in for
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
    # By file name, as records name files: a fine-tuned checkpoint may lie in a patient's folder.
    return BenchModel(label, segmenter, spec, recorded_name(path), False, seconds)


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


def sampling_config(steps: int, batch_size: int, **kwargs: Any):
    """SamplingConfig with its defaults (adaptive steps) unless told; fixed-step rows pass adaptive=False."""
    from .config import SamplingConfig

    return SamplingConfig(steps=steps, batch_size=batch_size, **kwargs)


def network_parts(segmenter: Any, image_slices: np.ndarray, meta: Any, precision: str = "auto"
                  ) -> dict[str, Callable[[], None]]:
    """One encode_condition pass and one denoise pass over a batch: what sampling cannot avoid."""
    import torch

    seg, model = segmenter, segmenter.model
    scan = seg.preprocessor.prepare(image_slices, meta)
    # In the memory format a run gives the network (channels-last on the CPU), so the parts cost what they
    # cost inside a run.
    image = scan.forward(np.arange(scan.n_slices), seg.device).contiguous(memory_format=seg.memory_format)
    batch, height, width = image.shape[0], image.shape[-2], image.shape[-1]
    x_t = torch.randn(model.state_shape(batch, height, width), generator=torch.Generator().manual_seed(0))
    x_t = x_t.to(seg.device).contiguous(memory_format=seg.memory_format)
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
                  log: Callable[[str], None], held_out: Optional["HeldOutScan"] = None) -> dict:
    """All in-process measurements of one model (the memory probe runs separately); ``held_out`` is
    the labelled scan of the per-step / consensus / one-shot check (:func:`held_out_scan`; None: none)."""
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
        sampling = sampling_config(steps, batch_size, adaptive=False, precision=precision)
        functions[f"run_{steps}"] = lambda sampling=sampling: seg.segment(batch, sampling, meta=meta)
    in_run: list[dict] = []
    if getattr(device, "type", str(device)) == "cpu":
        # On the CPU a part's host time is its time: the reference run also says, from inside, how much
        # of it its network passes took (parts timed apart move by several points between rounds).
        plain_run = functions[f"run_{ref}"]
        functions[f"run_{ref}"] = lambda: in_run.append(parts_of_run(plain_run))
    functions["one_shot"] = lambda: seg.one_shot(batch, batch_size=batch_size, meta=meta, precision=precision)
    reextract = sampling_config(ref, batch_size, reextract_features=True, adaptive=False, precision=precision)
    functions["reextract"] = lambda: seg.segment(batch, reextract, meta=meta)
    adaptive = sampling_config(ref, batch_size, adaptive=True, precision=precision)
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
    overhead_in_run = None
    overhead = reference["overhead_fraction"]
    if in_run:
        timed = in_run[-options.repeats:]   # the warm-up rounds' runs are not timed
        overhead_in_run = {
            "steps": ref, "batch": batch_size,
            "fraction": median([run["wall_s"] / run["network_s"] - 1.0 for run in timed]),
            "fraction_parts_apart": reference["overhead_fraction"],
            "network_seconds": median([run["network_s"] for run in timed]),
            "wall_seconds": median([run["wall_s"] for run in timed]),
            "parts_seconds": {name: median([run["parts"][name] for run in timed]) for name in timed[0]["parts"]}}
        overhead = overhead_in_run["fraction"]

    throughput = []
    whole = slab(volume, options.volume_slices)
    log(f"[{bench.label}] whole volume of {options.volume_slices} slices at batch sizes "
        f"{', '.join(map(str, options.batch_sizes))}")
    volume_runs = {b: (lambda sampling=sampling_config(ref, b, adaptive=False, precision=precision):
                       seg.segment(whole, sampling, meta=meta))
                   for b in options.batch_sizes}
    volume_times = time_interleaved(volume_runs, device, options.repeats, options.warmup)
    for b in options.batch_sizes:
        seconds = median(volume_times[b])
        throughput.append({"batch_size": b, "seconds": seconds, "slices_per_second": options.volume_slices / seconds})
    best = max(throughput, key=lambda entry: entry["slices_per_second"])

    log(f"[{bench.label}] end to end on the bundled sample")
    end_to_end = measure_end_to_end(seg, options)
    finetune = set_finetune = None
    if options.finetune_steps:
        log(f"[{bench.label}] fine-tuning {options.finetune_steps} steps on 3 slices of the bundled sample")
        finetune = measure_finetune(bench, options)
        log(f"[{bench.label}] fine-tuning {set_finetune_steps(options)} steps on a training set of "
            f"{SET_CASES} cases × {len(FINETUNE_SLICES)} slices")
        set_finetune = measure_set_finetune(bench, options)
    diffusion = None
    if held_out is not None:
        log(f"[{bench.label}] per-step, consensus and one-shot Dice on {held_out.name} {held_out.slab_text}")
        diffusion = measure_diffusion_check(seg, held_out, options)

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
        # The target's value: measured inside the run where host timers can (the CPU), else parts apart.
        "overhead_fraction": overhead,
        "overhead_in_run": overhead_in_run,
        "feature_reuse": {"steps": ref, "batch": batch_size, "reextract_seconds": median(times["reextract"]),
                          "reuse_seconds": reference["seconds_per_batch"],
                          "speedup": median([times["reextract"][i] / run_ref[i] for i in rounds])},
        "throughput": {"steps": ref, "volume_slices": options.volume_slices, "by_batch_size": throughput,
                       "best_batch_size": best["batch_size"], "best_slices_per_second": best["slices_per_second"]},
        "end_to_end": end_to_end,
        "finetune": finetune,
        "set_finetune": set_finetune,
        "diffusion_check": diffusion,
    }


def parts_of_run(run: Callable[[], Any]) -> dict:
    """Run once under a host part timer: its wall seconds, its network passes' (backbone + adapter and
    denoiser) and every engine part's. CPU only (on CUDA the host returns before kernels finish)."""
    from .profiling import DENOISE, ENCODE_CONDITION, HostPartTimer

    with HostPartTimer() as timer:
        run()
    network = timer.times.get(ENCODE_CONDITION, 0.0) + timer.times.get(DENOISE, 0.0)
    return {"wall_s": timer.wall_seconds, "network_s": network, "parts": timer.seconds()}


def measure_end_to_end(segmenter: Any, options: BenchmarkOptions) -> dict:
    """Load the bundled sample and segment it at the reference steps (one timed run, already warm)."""
    from .nifti import load_volume, sample_scan_path

    start = time.perf_counter()
    volume, meta = load_volume(sample_scan_path())
    loaded = time.perf_counter()
    depth = segmenter.preprocessor.geometry(volume.shape, meta).n_slices
    slices = None if options.sample_slices is None else range(min(options.sample_slices, depth))
    sampling = sampling_config(options.reference_steps, default_batch_size(), precision=options.precision)
    result = segmenter.segment(volume, sampling, slices, meta=meta)
    synchronize(segmenter.device)
    done = time.perf_counter()
    return {"shape": list(volume.shape), "slices": int(len(result.slice_indices)), "steps": options.reference_steps,
            "batch_size": default_batch_size(), "load_seconds": loaded - start, "segment_seconds": done - loaded,
            "seconds": done - start}


#: The "corrections" of the fine-tuning measurement: three tumour slices of the bundled sample,
#: relabelled as one new class, as a user correcting a scan would paint them.
FINETUNE_SLICES = (40, 56, 88)


#: Cases of the training-set measurement (issue 17: a set of 5 cases × 3 slices fine-tunes in ≤ 2 min).
SET_CASES = 5


def _sample_lesion():
    """The bundled sample and its tumour relabelled as a new class ``lesion`` (a user's corrections)."""
    from .nifti import load_labels, load_volume, sample_label_path, sample_scan_path

    volume, meta = load_volume(sample_scan_path())
    labels, _ = load_labels(sample_label_path())
    return volume, meta, (labels == 2).astype(np.uint8)


def measure_finetune(bench: BenchModel, options: BenchmarkOptions) -> dict:
    """Seconds to fine-tune the model (a new two-class list) on 3 slices, set-up included, as the widget does."""
    from .finetune import LabelledScan

    start = time.perf_counter()
    volume, meta, lesion = _sample_lesion()
    run = _finetune_run(bench, options, scans=[LabelledScan("sample", volume, meta, lesion, FINETUNE_SLICES)],
                        class_names=("background", "lesion"))
    if run is None:
        return {"skipped": "no checkpoint to fine-tune (random-weight model)"}
    return _time_training(run, bench, options, start, slices=list(FINETUNE_SLICES))


def set_finetune_steps(options: BenchmarkOptions) -> int:
    """Steps of the set fine-tune: as many as a user's fine-tune on such a set trains by default, relative
    to one scan (:func:`~medconddiff.finetune_steps.default_finetune_steps`: 3× the 3-slice run's)."""
    from .finetune_steps import ONE_SCAN_FINETUNE_STEPS, default_finetune_steps

    return options.finetune_steps * default_finetune_steps(SET_CASES) // ONE_SCAN_FINETUNE_STEPS


def measure_set_finetune(bench: BenchModel, options: BenchmarkOptions) -> dict:
    """Seconds to fine-tune on a training set of :data:`SET_CASES` cases × 3 verified slices, set-up
    (reading the set) included. The one shipped scan stands in for every case, each with 3 other slices,
    so the time per step can be compared with :func:`measure_finetune`'s: the set's size must not grow it.
    It trains :func:`set_finetune_steps` steps."""
    import tempfile

    from .training_set import TrainingSet

    if not bench.spec.get("checkpoint"):
        return {"skipped": "no checkpoint to fine-tune (random-weight model)"}
    volume, meta, lesion = _sample_lesion()
    with tempfile.TemporaryDirectory(prefix="medconddiff-bench-set-") as folder:
        training_set = TrainingSet.create(Path(folder) / "set", ("background", "lesion"), ("CT",))
        cases = {}
        for case in range(SET_CASES):
            slices = [s + 4 * case for s in FINETUNE_SLICES]
            training_set.add_scan(f"case{case}", volume, meta, lesion, ("background", "lesion"), verified_slices=slices)
            cases[f"case{case}"] = slices
        steps = set_finetune_steps(options)
        start = time.perf_counter()
        run = _finetune_run(bench, options, steps=steps, scans=[], training_set=TrainingSet.open(training_set.root))
        return {**_time_training(run, bench, options, start, slices=[]), "cases": cases}


def _finetune_run(bench: BenchModel, options: BenchmarkOptions, steps: Optional[int] = None, **kwargs: Any):
    from .checkpoint import load_checkpoint
    from .finetune import finetune

    if not bench.spec.get("checkpoint"):
        return None
    return finetune(load_checkpoint(bench.spec["checkpoint"]), steps=steps or options.finetune_steps,
                    device=str(bench.segmenter.device), log=lambda message: None, **kwargs)


def _time_training(run: Any, bench: BenchModel, options: BenchmarkOptions, start: float, slices: list) -> dict:
    prepared = time.perf_counter()
    losses = [event.losses["loss"] for event in run]
    synchronize(bench.segmenter.device)
    done = time.perf_counter()
    return {"steps": run.total_steps, "slices": slices, "batch": run.config.train.train_batch_size,
            "patch": run.config.train.patch_size, "setup_seconds": prepared - start,
            "train_seconds": done - prepared, "seconds": done - start,
            "seconds_per_step": (done - prepared) / max(1, len(losses)),
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None}


@dataclass(frozen=True)
class HeldOutScan:
    """The labelled scan the per-step / consensus / one-shot check scores, on canonical slices
    ``slices`` [a, b): the bundled sample (its held-out slab) unless the user names another scan."""

    name: str                      # the file name, for the table (never a patient identifier)
    image: np.ndarray              # file voxel order, as loaded
    meta: Any                      # medconddiff.nifti.VolumeMeta of the image
    labels: np.ndarray             # (i, j, k), the image's voxel order
    slices: tuple[int, int]
    bundled: bool                  # the bundled sample: only models with its classes are scored

    @property
    def slab_text(self) -> str:
        return f"{self.slices[0]}:{self.slices[1]}"


def held_out_scan(options: BenchmarkOptions, volume: np.ndarray, meta: Any) -> Optional[HeldOutScan]:
    """The scan of the held-out check (None when it is skipped). A named scan is read and its labels
    checked against it before anything is measured, so a wrong pair fails in seconds, not after the
    timings; ``volume``/``meta`` are the bundled sample as :func:`sample_volume` loaded it."""
    from .errors import UserInputError
    from .geometry import labels_on_image_grid
    from .nifti import load_labels, load_volume, sample_label_path

    if not options.heldout_slices:
        return None
    slices = (int(options.heldout_slices[0]), int(options.heldout_slices[1]))
    if options.heldout_scan is None:
        labels, _ = load_labels(sample_label_path())
        return HeldOutScan("sample", volume, meta, labels, slices, bundled=True)
    image_path, label_path = options.heldout_scan
    image, image_meta = load_volume(image_path)
    labels, label_meta = load_labels(label_path)
    # As evaluate reads them: labels of the image's grid in another voxel order are scored where they lie.
    labels, _ = labels_on_image_grid(labels, None if label_meta is None else label_meta.affine, image_meta.affine,
                                     image.shape)
    if tuple(labels.shape) != tuple(image.shape[:3]):
        raise UserInputError(f"held-out labels {Path(label_path).name} have shape {tuple(labels.shape)}, "
                             f"the image {Path(image_path).name} {tuple(image.shape[:3])}")
    return HeldOutScan(Path(image_path).name, image, image_meta, labels, slices, bundled=False)


def measure_diffusion_check(segmenter: Any, held_out: HeldOutScan, options: BenchmarkOptions) -> dict:
    """Per-step, consensus and one-shot mean Dice on ``held_out``'s slab (default sampling at the
    reference steps), with :func:`~medconddiff.evaluation.diffusion_check`'s drift and margin.

    Skipped, with the reason in the report, where the scan cannot score the model: the bundled sample
    for a model whose classes are not the sample's (a fine-tune to other classes: its own held-out scan
    is not shipped; name it with ``heldout_scan``), or labels or slices the model cannot take."""
    from .config import SamplingConfig
    from .errors import UserInputError
    from .evaluation import evaluate_volume, json_safe

    if held_out.bundled and tuple(segmenter.class_names) != SAMPLE_CLASSES:
        return {"skipped": f"classes {list(segmenter.class_names)} are not the sample's {list(SAMPLE_CLASSES)}"}
    first, stop = held_out.slices
    sampling = SamplingConfig(steps=options.reference_steps, precision=options.precision)   # else the defaults
    try:
        report = evaluate_volume(segmenter, held_out.image, held_out.labels, held_out.meta, sampling,
                                 slices=range(first, stop))
    except UserInputError as error:   # e.g. a label value beyond this model's classes, a slab past the scan
        return {"skipped": str(error), "scan": held_out.name}
    # NaN (a class set absent from the slab) becomes None, as everywhere in the JSON report.
    return json_safe({"scan": held_out.name, "slices": [first, stop],
                      "consensus": report["consensus"]["mean_foreground"]["dice"],
                      "one_shot": report["one_shot"]["mean_foreground"]["dice"],
                      "step_mean_dice": report["step_mean_dice"], "steps_used_mean": report["steps_used_mean"],
                      **report["diffusion_check"]})


#: The bundled sample's classes (what its held-out check can score).
SAMPLE_CLASSES = ("background", "liver", "tumour")


def default_batch_size() -> int:
    from .config import SamplingConfig

    return SamplingConfig().batch_size
