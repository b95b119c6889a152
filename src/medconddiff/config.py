"""One source of configuration: typed dataclasses.

They are saved into every checkpoint (as JSON), read back by the `Segmenter`, and turned into
command-line flags by :func:`add_dataclass_arguments`, so a flag, a default and a checkpoint field
can never disagree.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Tuple, TypeVar

from .class_match import one_class_each
from .errors import ConfigError

#: denoiser decoders: 'resblocks' (a 3×3 mix and a residual block per level) or 'light' (a 1×1 mix)
DECODERS = ("resblocks", "light")

T = TypeVar("T")

#: Largest downsampling of every supported network: slices are padded to a multiple of it.
NETWORK_STRIDE = 32
#: The longest noise schedule accepted: the default is 1000; a hand-edited checkpoint's 1e9 would take minutes
#: and gigabytes to tabulate before anything was said.
MAX_TRAIN_TIMESTEPS = 100_000
#: The widest layer accepted (denoiser, stem, time embedding, latent channels): 8× the default's widest. A model
#: this wide at every stage holds about 1 GB of weights; an edited checkpoint's 100000 asked for 40 GB.
MAX_WIDTH = 1024
#: Seeds are drawn by numpy and torch generators, which take 32-bit (numpy) / 64-bit (torch) seeds; a train
#: seed is also multiplied into per-step seeds (see medconddiff.train).
MAX_SEED = 2 ** 32


def _help(text: str, choices: tuple | None = None, **kwargs: Any) -> Any:
    return field(metadata={"help": text, "choices": choices}, **kwargs)


def _refuse_non_finite(config: Any) -> None:
    """Every float field of a config dataclass (and every float of a tuple field) must be a finite number:
    an 'inf' or 'nan' from a flag or an edited checkpoint passes every comparison meant to bound it
    (``lr > 0``, ``low < high``), then trains NaN weights or preprocesses nothing."""
    hints = _resolved_hints(type(config))
    for f in dataclasses.fields(config):
        hint, value = hints[f.name], getattr(config, f.name)
        floats = (value,) if hint is float else value if float in typing.get_args(hint) else ()
        for item in floats:
            if isinstance(item, (int, float)) and not isinstance(item, bool) and not math.isfinite(item):
                raise ConfigError(f"{f.name} must be a finite number, got {_shown(value)}")


def _shown(value: Any) -> str:
    return " ".join(str(v) for v in value) if isinstance(value, tuple) else str(value)


SLICINGS = ("axial", "coronal", "sagittal")
#: The class name nnU-Net v2 reserves for unverified voxels (medconddiff.training_set writes it).
IGNORE_CLASS = "ignore"
INTENSITY_SCHEMES = ("ct_window", "percentile", "zscore")


@dataclass
class PreprocessPlan:
    """How a scan becomes model input, recorded in every checkpoint and replayed at inference.

    A scan is reoriented to the closest canonical (RAS) orientation, cut into 2-D slices across
    ``slicing``, and every slice is resampled in-plane to ``target_spacing`` (mm, keeping its
    aspect ratio and field of view); the network then runs on the whole resampled slice. Results are
    resampled back to the scan's own grid and reoriented to its voxel order (see
    :mod:`medconddiff.preprocess`). Intensities: ``ct_window`` maps a fixed HU window to [-1, 1];
    ``percentile`` maps each scan's own percentiles to [-1, 1]; ``zscore`` clips each scan to its
    percentiles, then subtracts the mean and divides by the standard deviation of the voxels above
    the low percentile (the body, not the air around it).
    """

    slicing: str = _help("slicing direction, named anatomically", choices=SLICINGS, default="axial")
    target_spacing: Tuple[float, float] = _help(
        "in-plane voxel size (mm) slices are resampled to: rows then columns of a canonical slice",
        default=(1.0, 1.0))
    channel_names: Tuple[str, ...] = _help("input channels (modality or sequence name of each)",
                                           default=("CT",))
    intensity: Tuple[str, ...] = _help(
        "intensity scheme per channel (one value for all): ct_window, percentile or zscore",
        default=("ct_window",))
    window: Tuple[float, float] = _help("intensity window (low high) of 'ct_window' channels, e.g. HU",
                                        default=(-200.0, 250.0))
    percentiles: Tuple[float, float] = _help("per-scan percentiles (low high) of 'percentile'/'zscore'",
                                             default=(0.5, 99.5))
    context_slices: int = _help("2.5-D input: neighbouring slices on each side fed as extra channels",
                                default=0)
    context_mm: float = _help("distance (mm) between context slices along the slicing direction",
                              default=2.0)

    def __post_init__(self) -> None:
        _refuse_non_finite(self)
        if self.slicing not in SLICINGS:
            raise ConfigError(f"slicing must be one of {SLICINGS}, not {self.slicing!r}")
        if len(self.target_spacing) != 2 or not all(math.isfinite(s) and s > 0 for s in self.target_spacing):
            raise ConfigError(f"target_spacing must be two positive sizes in mm, got {self.target_spacing}")
        if not self.channel_names or any(not str(name).strip() for name in self.channel_names):
            raise ConfigError("channel_names needs one non-empty name per input channel")
        if len(self.intensity) not in (1, len(self.channel_names)):
            raise ConfigError(f"intensity needs one scheme, or one per channel ({len(self.channel_names)}), "
                              f"got {len(self.intensity)}")
        bad = [scheme for scheme in self.intensity if scheme not in INTENSITY_SCHEMES]
        if bad:
            raise ConfigError(f"intensity scheme must be one of {INTENSITY_SCHEMES}, not {bad[0]!r}")
        if not self.window[0] < self.window[1]:
            raise ConfigError(f"window low must be below high, got {tuple(self.window)}")
        low, high = self.percentiles
        if not 0 <= low < high <= 100:
            raise ConfigError(f"percentiles must satisfy 0 <= low < high <= 100, got {tuple(self.percentiles)}")
        if self.context_slices < 0:
            raise ConfigError(f"context_slices must be 0 or more, got {self.context_slices}")
        if self.context_slices and not (math.isfinite(self.context_mm) and self.context_mm > 0):
            raise ConfigError(f"context_mm must be a positive distance, got {self.context_mm}")

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    @property
    def input_channels(self) -> int:
        """Channels the backbone sees: every scan channel at every context offset."""
        return self.num_channels * (2 * self.context_slices + 1)

    def scheme_of(self, channel: int) -> str:
        return self.intensity[0] if len(self.intensity) == 1 else self.intensity[channel]


@dataclass
class ModelConfig:
    """Architecture. Stage channels and strides come from the backbone's feature_info, not from here."""

    family: str = _help("'pixel' (MedCondDiff) or 'latent' (LSegDiff)", choices=("pixel", "latent"),
                        default="pixel")
    class_names: Tuple[str, ...] = _help("class names, background first",
                                         default=("background", "liver", "tumour"))
    backbone: str = _help("timm model name used with features_only", default="pvt_v2_b1")
    backbone_weights: Optional[str] = _help(
        "local weights file for the backbone (safetensors or a plain state dict); never downloaded",
        default=None)
    fusion: str = _help("how backbone features enter the denoiser: 'add' (paper) or 'concat' (ablation)",
                        choices=("add", "concat"), default="add")
    denoiser_channels: Tuple[int, ...] = _help(
        "denoiser width at each backbone stage (one number per stage, or one number for all)",
        default=(32, 48, 96, 128))
    denoiser_decoder: str = _help(
        "denoiser decoder: 'resblocks' (a 3x3 mix and a residual block per level) or 'light' (a 1x1 mix per "
        "level, no decoder blocks: cheaper sampling steps; with --denoiser-channels 16 24 48 96 a step costs "
        "about a third of the default's, see the README)",
        choices=DECODERS, default="resblocks")
    stem_channels: int = _help("width of the full-resolution mask stem of the denoiser", default=16)
    time_embed_dim: int = _help("timestep embedding width", default=128)
    latent_channels: int = _help("LSegDiff: channels of the mask latent", default=4)
    latent_downsample: int = _help("LSegDiff: spatial reduction of the mask latent (power of 2)", default=4)

    def __post_init__(self) -> None:
        if self.family not in ("pixel", "latent"):
            raise ConfigError(f"family must be 'pixel' or 'latent', not {self.family!r}")
        if self.fusion not in ("add", "concat"):
            raise ConfigError(f"fusion must be 'add' or 'concat', not {self.fusion!r}")
        if self.denoiser_decoder not in DECODERS:
            raise ConfigError(f"denoiser_decoder must be one of {', '.join(DECODERS)}, not {self.denoiser_decoder!r}")
        if len(self.class_names) < 2:
            raise ConfigError("need at least two classes (background and one structure)")
        reserved = [name for name in self.class_names if str(name).strip().casefold() == IGNORE_CLASS]
        if reserved:
            raise ConfigError(f"{reserved[0]!r} cannot be a class: nnU-Net v2 reserves it for voxels nobody checked "
                              "(a training set's label files mark them so); to learn a training set, give its folder "
                              "instead of its files")
        if any(c < 1 for c in self.denoiser_channels) or self.stem_channels < 1 or self.time_embed_dim < 2:
            raise ConfigError("denoiser_channels, stem_channels and time_embed_dim must be positive")
        if self.latent_channels < 1:
            raise ConfigError(f"latent_channels must be at least 1, got {self.latent_channels}")
        widths = {"denoiser_channels": max(self.denoiser_channels, default=0), "stem_channels": self.stem_channels,
                  "time_embed_dim": self.time_embed_dim, "latent_channels": self.latent_channels}
        wide = [name for name, width in widths.items() if width > MAX_WIDTH]
        if wide:
            raise ConfigError(f"{wide[0]} must be at most {MAX_WIDTH}, got {_shown(getattr(self, wide[0]))}")
        d = self.latent_downsample
        if d < 1 or d & (d - 1) or d > NETWORK_STRIDE:
            raise ConfigError(f"latent_downsample must be a power of two up to {NETWORK_STRIDE}, got {d}")
        if not one_class_each(self.class_names):
            raise ConfigError(f"class names must name different classes (case and tumour/tumor spelling aside), "
                              f"got {list(self.class_names)}")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclass
class DiffusionConfig:
    """The forward (noising) process the network was trained with."""

    num_train_timesteps: int = _help("length of the training noise schedule", default=1000)
    schedule: str = _help("beta schedule: 'linear' or 'cosine'", choices=("linear", "cosine"), default="cosine")
    beta_start: float = _help("first beta of the linear schedule", default=1e-4)
    beta_end: float = _help("last beta of the linear schedule", default=0.02)

    def __post_init__(self) -> None:
        if self.schedule not in ("linear", "cosine"):
            raise ConfigError(f"schedule must be 'linear' or 'cosine', not {self.schedule!r}")
        _refuse_non_finite(self)
        if not 2 <= self.num_train_timesteps <= MAX_TRAIN_TIMESTEPS:
            raise ConfigError(f"num_train_timesteps must be 2 to {MAX_TRAIN_TIMESTEPS}, got {self.num_train_timesteps}")
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ConfigError(f"linear betas need 0 < beta_start < beta_end < 1, got {self.beta_start}, "
                              f"{self.beta_end}")


CONSENSUS_METHODS = ("mean", "vote_gated", "uncertainty_weighted", "last", "late_mean")
#: Not a fusion of the steps: the labels of the one deterministic forward pass (x_T = 0 at the last
#: timestep, the "one-shot"), for a model whose steps never beat it on labelled slices. The steps still
#: run and give the trajectory and the uncertainty; the run keeps that pass to fuse from.
ONE_SHOT = "one_shot"
#: What ``SamplingConfig.consensus`` accepts: a fusion, the one-shot forward, or "auto" (the model's own
#: choice, recorded in its checkpoint by :mod:`medconddiff.consensus_choice`; "mean" for a model without one).
CONSENSUS_CHOICES = ("auto",) + CONSENSUS_METHODS + (ONE_SHOT,)
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class SamplingConfig:
    """How a segmentation is sampled; chosen per run, written to the sidecar."""

    steps: int = _help("number of denoising steps", default=10)
    scheduler: str = _help("'ddim' (deterministic with eta=0) or 'ddpm'", choices=("ddim", "ddpm"), default="ddim")
    eta: float = _help("DDIM noise scale (0 = deterministic, 1 = DDPM-like)", default=0.0)
    consensus: str = _help("how the x̂0 of all steps are fused: 'auto' is the model's own choice (recorded in its "
                           "checkpoint when it was fine-tuned or checked; otherwise mean); 'one_shot' takes the "
                           "labels of one deterministic forward pass (x_T = 0) and keeps the steps for the "
                           "trajectory and the uncertainty",
                           choices=CONSENSUS_CHOICES, default="auto")
    skip_first: int = _help("leave the first (noisiest) k steps out of the consensus", default=0)
    seed: int = _help("random seed of the initial noise", default=0)
    num_seeds: int = _help("independent runs (seed, seed+1, ...) pooled into one consensus", default=1)
    batch_size: int = _help("slices denoised together (at most; see max_batch_pixels)", default=16)
    max_batch_pixels: int = _help(
        "bound on slices x resampled pixels per batch: big slices run in smaller batches (memory, and on "
        "CPU faster: batches of about 16 × 128² pixels use the caches best)", default=262_144)
    reextract_features: bool = _help(
        "re-run the backbone at every step like the reference code (slower; for benchmarks)", default=False)
    adaptive: bool = _help("stop a slice's diffusion once its x̂0 labels have converged (steps is then the "
                           "most a slice takes)", default=True)
    convergence_change: float = _help(
        "adaptive: a step has converged when fewer than this fraction of the slice's foreground pixels "
        "change label", default=0.02)
    convergence_patience: int = _help("adaptive: converged steps in a row before a slice stops", default=2)
    step_cap: int = _help(
        "adaptive: the most steps any slice takes; 0 = the model's own cap, measured as the step after which its "
        "later steps added nothing on labelled slices (recorded in its checkpoint; none recorded: steps)", default=0)
    precision: str = _help(
        "network arithmetic: 'auto' (bf16 on CUDA, fp32 on CPU), 'fp32', or 'bf16' (on a CPU with AVX-512 BF16 "
        "or AMX about 1.5x faster; slower on CPUs without them)", choices=PRECISIONS, default="auto")

    def __post_init__(self) -> None:
        _refuse_non_finite(self)
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if self.steps < 1:
            raise ConfigError(f"steps must be at least 1, got {self.steps}")
        if self.scheduler not in ("ddim", "ddpm"):
            raise ConfigError(f"scheduler must be 'ddim' or 'ddpm', not {self.scheduler!r}")
        if self.consensus not in CONSENSUS_CHOICES:
            raise ConfigError(f"consensus must be one of {CONSENSUS_CHOICES}, not {self.consensus!r}")
        if not 0 <= self.skip_first < self.steps:
            raise ConfigError(f"skip_first must be in [0, steps), got {self.skip_first} with {self.steps} steps")
        if self.num_seeds < 1 or self.batch_size < 1 or self.max_batch_pixels < 1:
            raise ConfigError("num_seeds, batch_size and max_batch_pixels must be at least 1")
        if not (math.isfinite(self.eta) and self.eta >= 0):
            raise ConfigError(f"eta must be 0 or more, got {self.eta}")
        if self.scheduler == "ddpm" and self.eta != 0:
            raise ConfigError("eta applies to the DDIM scheduler only; drop it or use --scheduler ddim")
        if not 0 <= self.convergence_change < 1 or self.convergence_patience < 1:
            raise ConfigError("convergence_change must be in [0, 1) and convergence_patience at least 1")
        if self.step_cap < 0:
            raise ConfigError(f"step_cap must be 0 (the model's own) or a number of steps, got {self.step_cap}")
        if not 0 <= self.seed <= MAX_SEED - self.num_seeds:
            raise ConfigError(f"seed must be 0 or more, and seed + num_seeds at most {MAX_SEED} (2**32), got "
                              f"{self.seed} and {self.num_seeds}")


@dataclass
class TrainConfig:
    """Optimisation. Saved into the checkpoint so a run can be resumed and reproduced."""

    epochs: int = _help("passes over the (weighted) slice sampler", default=40)
    iterations_per_epoch: int = _help("optimizer steps per epoch (0 = one pass over the slices)", default=0)
    train_batch_size: int = _help("slices per optimizer step (per process)", default=8)
    lr: float = _help("AdamW learning rate", default=1e-3)
    weight_decay: float = _help("AdamW weight decay", default=1e-4)
    warmup_steps: int = _help("linear learning-rate warm-up steps (then cosine decay)", default=50)
    ema_decay: float = _help("EMA decay of the weights that are saved (0 disables EMA)", default=0.995)
    dice_weight: float = _help("weight of the soft Dice term of the hybrid loss", default=1.0)
    ce_weight: float = _help("weight of the cross-entropy term of the hybrid loss", default=1.0)
    class_weighted_sampling: bool = _help("sample slices with rare classes more often", default=True)
    augment: bool = _help("flips, small rotations/scales and intensity jitter", default=True)
    train_seed: int = _help("seed of weights, sampling and augmentation", default=0)
    amp: bool = _help("mixed precision on CUDA", default=True)
    num_workers: int = _help("data loader worker processes", default=0)
    val_every: int = _help("validate every N epochs (0 = never)", default=5)
    val_steps: int = _help("denoising steps used for validation Dice", default=5)
    patch_size: int = _help("side (pixels at the plan's spacing) of the square training crops; a multiple "
                            f"of {NETWORK_STRIDE}", default=128)
    foreground_crop_fraction: float = _help(
        "fraction of training crops centred on a foreground voxel (the rest are placed at random)", default=0.5)
    ignore_fill: str = _help(
        "sparse labels: what unverified ('ignore') pixels are in the mask that is noised (they add no loss): "
        "'prediction' (the model's own guess from the image) or 'background'",
        choices=("prediction", "background"), default="prediction")
    xt_dropout: float = _help(
        "fraction of training items whose noised mask x_t is replaced by pure noise, so the denoiser must "
        "read the image instead of copying x_t (fine-tunes use 0.8: it stops later steps from drifting)",
        default=0.0)

    def __post_init__(self) -> None:
        _refuse_non_finite(self)
        if self.epochs < 1 or self.train_batch_size < 1 or self.iterations_per_epoch < 0:
            raise ConfigError("epochs and train_batch_size must be at least 1, iterations_per_epoch 0 or more")
        if not (0 < self.lr <= 1 and self.weight_decay >= 0 and self.warmup_steps >= 0):
            raise ConfigError(f"lr must be in (0, 1] (got {self.lr}), weight_decay and warmup_steps 0 or more")
        if self.dice_weight < 0 or self.ce_weight < 0 or self.dice_weight + self.ce_weight == 0:
            raise ConfigError(f"dice_weight and ce_weight must be 0 or more and not both 0 (nothing would be learned), "
                              f"got {self.dice_weight} and {self.ce_weight}")
        if not 0 <= self.train_seed < MAX_SEED:
            raise ConfigError(f"train_seed must be 0 to {MAX_SEED - 1} (2**32 - 1), got {self.train_seed}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.patch_size < NETWORK_STRIDE or self.patch_size % NETWORK_STRIDE:
            raise ConfigError(f"patch_size must be a positive multiple of {NETWORK_STRIDE}, got {self.patch_size}")
        if not 0 <= self.foreground_crop_fraction <= 1:
            raise ConfigError(f"foreground_crop_fraction must be in [0, 1], got {self.foreground_crop_fraction}")
        if self.val_every < 0 or self.val_steps < 1 or self.num_workers < 0:
            raise ConfigError("val_every and num_workers must be 0 or more, val_steps at least 1")
        if self.ignore_fill not in ("prediction", "background"):
            raise ConfigError(f"ignore_fill must be 'prediction' or 'background', not {self.ignore_fill!r}")
        if not 0 <= self.xt_dropout < 1:
            raise ConfigError(f"xt_dropout must be in [0, 1), got {self.xt_dropout}")


@dataclass
class ExperimentConfig:
    """Everything a checkpoint needs to be rebuilt and its inference replayed."""

    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    plan: PreprocessPlan = field(default_factory=PreprocessPlan)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ExperimentConfig":
        return cls(
            model=dataclass_from_dict(ModelConfig, data.get("model", {})),
            diffusion=dataclass_from_dict(DiffusionConfig, data.get("diffusion", {})),
            plan=dataclass_from_dict(PreprocessPlan, data.get("plan", {})),
            train=dataclass_from_dict(TrainConfig, data.get("train", {})),
        )

    def check_training(self) -> None:
        """Refuse training settings this model cannot run (the checks that need several sections), before
        any data is read: validation samples with ``val_steps`` of the model's timesteps."""
        total = self.diffusion.num_train_timesteps
        if self.train.val_every and self.train.val_steps > total:
            raise ConfigError(f"--val-steps {self.train.val_steps} cannot exceed the {total} timesteps the model is "
                              "trained with (--num-train-timesteps)")

    def check_sampling(self, sampling: "SamplingConfig") -> None:
        """Refuse sampling settings this model cannot run (the checks that need both configs)."""
        total = self.diffusion.num_train_timesteps
        if sampling.steps > total:
            raise ConfigError(f"steps ({sampling.steps}) cannot exceed the {total} timesteps the model was "
                              "trained with")


@functools.lru_cache(maxsize=None)
def _resolved_hints(cls: type) -> dict:
    return typing.get_type_hints(cls)


def dataclass_from_dict(cls: type[T], data: dict) -> T:
    """Build ``cls`` from a (JSON) dict; unknown keys are an error, lists become tuples.

    Every value is checked against its field's type (a hand-edited or damaged checkpoint must not reach
    the model as a float step count): ints must be whole numbers (1000.0 is taken as 1000, 1000.5 is
    refused), floats any number, tuples lists of the right length and item type, ``Optional`` also None;
    a bool is never taken as a number. A mismatch is a ConfigError naming the field and the type it needs."""
    hints = _resolved_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
    values = {}
    for key, value in data.items():
        try:
            values[key] = _typed_value(hints[key], value)
        except _WrongType as wrong:
            raise ConfigError(f"{cls.__name__}.{key} must be {wrong}, got {value!r}") from None
    return cls(**values)


class _WrongType(Exception):
    """A value that is not of a field's type; its message is the type in words ("an integer")."""


def _typed_value(hint: Any, value: Any) -> Any:
    """``value`` as a value of type ``hint`` (lists become tuples, whole floats ints), or _WrongType."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:                              # Optional[X]
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) != 1:
            return value                                     # no such field today: left to __post_init__
        try:
            return _typed_value(inner[0], value)
        except _WrongType as wrong:
            raise _WrongType(f"{wrong} or null") from None
    if origin is tuple:
        return _typed_tuple(args, value)
    if hint is bool:
        if not isinstance(value, bool):
            raise _WrongType("true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
            raise _WrongType("an integer")
        return int(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _WrongType("a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise _WrongType("a string")
        return value
    return value


def _typed_tuple(args: tuple, value: Any) -> tuple:
    if not isinstance(value, (list, tuple)):
        raise _WrongType(_tuple_words(args))
    item_types = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
    if len(item_types) != len(value):
        raise _WrongType(_tuple_words(args))
    try:
        return tuple(_typed_value(item_type, item) for item_type, item in zip(item_types, value))
    except _WrongType:
        raise _WrongType(_tuple_words(args)) from None


def _tuple_words(args: tuple) -> str:
    """"a list of 2 numbers", "a list of strings": the JSON a tuple field needs."""
    item_words = {int: "integers", float: "numbers", str: "strings", bool: "true/false values"}
    if len(args) == 2 and args[1] is Ellipsis:
        return f"a list of {item_words.get(args[0], 'values')}"
    if len(set(args)) == 1:
        return f"a list of {len(args)} {item_words.get(args[0], 'values')}"
    return f"a list of {len(args)} values"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, *, title: str | None = None,
                            exclude: tuple[str, ...] = ()) -> None:
    """Add one flag per field of ``cls``; defaults stay None so unset flags keep the base config."""
    group = parser.add_argument_group(title or cls.__name__)
    hints = _resolved_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        hint = hints[f.name]
        origin = typing.get_origin(hint)
        args = typing.get_args(hint)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore
        help_text = f"{f.metadata.get('help', '')} (default: {default})"
        kwargs: dict[str, Any] = {"dest": f.name, "default": None, "help": help_text}
        if f.metadata.get("choices"):
            kwargs["choices"] = f.metadata["choices"]
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin is tuple:
            item_type = args[0]
            kwargs["type"] = item_type
            kwargs["nargs"] = "+" if (len(args) == 2 and args[1] is Ellipsis) else len(args)
            kwargs["metavar"] = item_type.__name__.upper()
        elif origin is typing.Union:  # Optional[X]
            kwargs["type"] = next(a for a in args if a is not type(None))
        else:
            kwargs["type"] = hint
        group.add_argument(_flag(f.name), **kwargs)


def override_from_args(config: T, args: argparse.Namespace) -> T:
    """Return a copy of ``config`` with every field whose flag was given replaced."""
    changes = {}
    for f in dataclasses.fields(config):  # type: ignore[arg-type]
        value = getattr(args, f.name, None)
        if value is not None:
            changes[f.name] = tuple(value) if isinstance(value, list) else value
    return dataclasses.replace(config, **changes)  # type: ignore[type-var]
