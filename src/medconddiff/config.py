"""One source of configuration: typed dataclasses.

They are saved into every checkpoint (as JSON), read back by the `Segmenter`, and turned into
command-line flags by :func:`add_dataclass_arguments`, so a flag, a default and a checkpoint field
can never disagree.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Tuple, TypeVar

T = TypeVar("T")


def _help(text: str, choices: tuple | None = None, **kwargs: Any) -> Any:
    return field(metadata={"help": text, "choices": choices}, **kwargs)


@dataclass
class PreprocessConfig:
    """How a scan is turned into network input; recorded in the checkpoint, replayed at inference."""

    intensity: str = _help("'ct_window' (clip to a HU window) or 'percentile' (MRI, unknown units)",
                           choices=("ct_window", "percentile"), default="ct_window")
    window: Tuple[float, float] = _help("HU window (low high) used by 'ct_window'", default=(-200.0, 250.0))
    percentiles: Tuple[float, float] = _help("percentile clip (low high) used by 'percentile'",
                                             default=(0.5, 99.5))
    slice_axis: int = _help("array axis of the volume that is sliced (2 = last NIfTI axis, usually axial)",
                            default=2)

    def __post_init__(self) -> None:
        if self.intensity not in ("ct_window", "percentile"):
            raise ValueError(f"intensity must be 'ct_window' or 'percentile', not {self.intensity!r}")
        if self.window[0] >= self.window[1]:
            raise ValueError(f"window low must be below high, got {self.window}")


@dataclass
class ModelConfig:
    """Architecture. Stage channels and strides come from the backbone's feature_info, not from here."""

    family: str = _help("'pixel' (MedCondDiff) or 'latent' (LSegDiff)", choices=("pixel", "latent"),
                        default="pixel")
    class_names: Tuple[str, ...] = _help("class names, background first",
                                         default=("background", "liver", "tumour"))
    image_size: int = _help("slices are resized to this square size (multiple of 32)", default=128)
    backbone: str = _help("timm model name used with features_only", default="pvt_v2_b1")
    backbone_weights: Optional[str] = _help(
        "local weights file for the backbone (safetensors or a plain state dict); never downloaded",
        default=None)
    fusion: str = _help("how backbone features enter the denoiser: 'add' (paper) or 'concat' (ablation)",
                        choices=("add", "concat"), default="add")
    denoiser_channels: Tuple[int, ...] = _help(
        "denoiser width at each backbone stage (one number per stage, or one number for all)",
        default=(32, 48, 96, 128))
    stem_channels: int = _help("width of the full-resolution mask stem of the denoiser", default=16)
    time_embed_dim: int = _help("timestep embedding width", default=128)
    latent_channels: int = _help("LSegDiff: channels of the mask latent", default=4)
    latent_downsample: int = _help("LSegDiff: spatial reduction of the mask latent (power of 2)", default=4)

    def __post_init__(self) -> None:
        if self.family not in ("pixel", "latent"):
            raise ValueError(f"family must be 'pixel' or 'latent', not {self.family!r}")
        if self.fusion not in ("add", "concat"):
            raise ValueError(f"fusion must be 'add' or 'concat', not {self.fusion!r}")
        if len(self.class_names) < 2:
            raise ValueError("need at least two classes (background and one structure)")
        if self.image_size % 32:
            raise ValueError(f"image_size must be a multiple of 32, got {self.image_size}")

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
            raise ValueError(f"schedule must be 'linear' or 'cosine', not {self.schedule!r}")


CONSENSUS_METHODS = ("mean", "vote_gated", "uncertainty_weighted", "last")


@dataclass
class SamplingConfig:
    """How a segmentation is sampled; chosen per run, written to the sidecar."""

    steps: int = _help("number of denoising steps", default=10)
    scheduler: str = _help("'ddim' (deterministic with eta=0) or 'ddpm'", choices=("ddim", "ddpm"), default="ddim")
    eta: float = _help("DDIM noise scale (0 = deterministic, 1 = DDPM-like)", default=0.0)
    consensus: str = _help("how the x̂0 of all steps are fused", choices=CONSENSUS_METHODS, default="mean")
    skip_first: int = _help("leave the first (noisiest) k steps out of the consensus", default=0)
    seed: int = _help("random seed of the initial noise", default=0)
    num_seeds: int = _help("independent runs (seed, seed+1, ...) pooled into one consensus", default=1)
    batch_size: int = _help("slices denoised together", default=16)
    reextract_features: bool = _help(
        "re-run the backbone at every step like the reference code (slower; for benchmarks)", default=False)

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if self.scheduler not in ("ddim", "ddpm"):
            raise ValueError(f"scheduler must be 'ddim' or 'ddpm', not {self.scheduler!r}")
        if self.consensus not in CONSENSUS_METHODS:
            raise ValueError(f"consensus must be one of {CONSENSUS_METHODS}, not {self.consensus!r}")
        if not 0 <= self.skip_first < self.steps:
            raise ValueError(f"skip_first must be in [0, steps), got {self.skip_first} with {self.steps} steps")
        if self.num_seeds < 1 or self.batch_size < 1:
            raise ValueError("num_seeds and batch_size must be at least 1")


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


@dataclass
class ExperimentConfig:
    """Everything a checkpoint needs to be rebuilt and its inference replayed."""

    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ExperimentConfig":
        return cls(
            model=dataclass_from_dict(ModelConfig, data.get("model", {})),
            diffusion=dataclass_from_dict(DiffusionConfig, data.get("diffusion", {})),
            preprocess=dataclass_from_dict(PreprocessConfig, data.get("preprocess", {})),
            train=dataclass_from_dict(TrainConfig, data.get("train", {})),
        )


def _resolved_hints(cls: type) -> dict:
    return typing.get_type_hints(cls)


def dataclass_from_dict(cls: type[T], data: dict) -> T:
    """Build ``cls`` from a (JSON) dict; unknown keys are an error, lists become tuples."""
    hints = _resolved_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
    values = {}
    for key, value in data.items():
        if isinstance(value, list) and typing.get_origin(hints[key]) is tuple:
            value = tuple(value)
        values[key] = value
    return cls(**values)


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
