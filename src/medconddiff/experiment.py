"""Which configuration a training run gets: from a start checkpoint, the dataset's own facts, and flags.

One rule set for ``medconddiff train``, ``medconddiff finetune``, the Python API and the napari
fine-tuner:

* **Architecture and geometry** (model family, backbone, widths; slicing, target spacing, 2.5-D
  context) come from the start checkpoint when there is one (``--init``), else from the defaults
  and the dataset's fingerprint plan. A flag that contradicts the start checkpoint is an error:
  fine-tuning needs the network and the millimetres it was trained with.
* **Classes and channels** are facts of the data (dataset.json, or the user's class names). A
  flag that contradicts them is an error. A class list that differs from the start checkpoint's is
  fine: only class-dependent layers are re-initialised (:mod:`medconddiff.transfer`). Channels are
  matched by name: data naming the start checkpoint's channels in another order is read in the
  checkpoint's order (:func:`channel_order`); naming some of them at other places is an error.
* **Intensity** follows each channel's modality: the start checkpoint's scheme is kept when the
  channels are the same kind (CT stays CT), the dataset plan's scheme is used otherwise (a CT
  model fine-tuned on MRI gets per-scan z-scores, not a HU window). A CT window on a channel the
  dataset calls something else is an error.
* **Optimisation** (TrainConfig) is always this run's: defaults plus flags.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Optional, Sequence

from .checkpoint import Checkpoint
from .class_match import same_classes, spelled_as
from .config import DiffusionConfig, ExperimentConfig, ModelConfig, PreprocessPlan, TrainConfig
from .fingerprint import is_ct
from .errors import UserInputError

#: Plan fields fixed by a start checkpoint (its network saw these millimetres and this input).
GEOMETRY_FIELDS = ("slicing", "target_spacing", "context_slices", "context_mm")
INTENSITY_FIELDS = ("intensity", "window", "percentiles")


class ConfigConflict(UserInputError):
    """A flag contradicts the dataset or the start checkpoint; the message names both values."""


#: Channel names that say a position, not a scan: 'channel_0' (``medconddiff plan``), 'MRI 2', 'image 1' (the
#: napari fine-tuner's scan kinds). They are never matched by name.
_POSITIONAL_NAME = re.compile(r"(channel|image|mri|ct)[ _-]*\d+", re.IGNORECASE)


def _name_key(name: str) -> Optional[str]:
    """How a channel name is matched (case aside), or None for a positional name."""
    name = str(name).strip()
    return None if _POSITIONAL_NAME.fullmatch(name) else name.casefold()


def channel_order(model_channels: Sequence[str], data_channels: Optional[Sequence[str]], *,
                  data_label: str = "the data", model_label: str = "the model") -> Optional[tuple[int, ...]]:
    """Where each of the model's channels lies among the data's, when the data names the same channels in
    another order (a dataset.json's T1, FLAIR for a FLAIR, T1 model): ``image[..., order]`` puts them in the
    model's order. None: the data's channels are taken as they come (the same names in the same order; names
    the model does not have, such as a CT model's channel given an MRI's; positional or repeated names).

    Data that names some of the model's channels at other places without being a reordering of them (T1, T2
    for FLAIR, T1) is a :class:`ConfigConflict`: its T1 would feed the model's FLAIR filters."""
    model = [_name_key(name) for name in model_channels]
    data = [_name_key(name) for name in (data_channels or ())]
    if not data or data == model or None in model or None in data \
            or len(set(model)) != len(model) or len(set(data)) != len(data):
        return None
    if sorted(model) == sorted(data):
        return tuple(data.index(key) for key in model)
    moved = [key for index, key in enumerate(data) if key in model and model.index(key) != index]
    if moved:
        raise ConfigConflict(f"{data_label} names the channels {_show(data_channels)} and {model_label} takes "
                             f"{_show(model_channels)}: not the same channels in another order; give the model's "
                             "channels (in any order), or channels it does not name at all")
    return None


def _same_kind(old: Sequence[str], new: Sequence[str]) -> bool:
    return len(old) == len(new) and all(is_ct(a) == is_ct(b) for a, b in zip(old, new))


def _apply(config: Any, changes: dict[str, Any], *, locked: Sequence[str] = (), source: str = "") -> Any:
    """``config`` with ``changes``; a locked field that would change is a ConfigConflict."""
    for name, value in changes.items():
        current = getattr(config, name)
        value = tuple(value) if isinstance(value, list) else value
        if name in locked and value != current:
            raise ConfigConflict(f"--{name.replace('_', '-')} {_show(value)} contradicts {source}, which has "
                                 f"{_show(current)}; drop the flag")
    return dataclasses.replace(config, **{k: tuple(v) if isinstance(v, list) else v for k, v in changes.items()})


def _show(value: Any) -> str:
    return " ".join(str(v) for v in value) if isinstance(value, (tuple, list)) else str(value)


def training_config(*, flags: dict[str, dict[str, Any]], start: Optional[Checkpoint] = None,
                    class_names: Optional[Sequence[str]] = None, channel_names: Optional[Sequence[str]] = None,
                    dataset_plan: Optional[PreprocessPlan] = None, dataset_label: str = "the dataset",
                    log: Callable[[str], None] = print, reorder_channels: bool = False) -> ExperimentConfig:
    """The ExperimentConfig of a new training run.

    ``flags`` holds, per section ("model", "diffusion", "plan", "train"), only the fields the user
    set. ``class_names``/``channel_names`` are what the data says (None: it does not say).
    ``dataset_plan`` is the plan the dataset's fingerprint implies (None: no fingerprint).
    Data that names the start checkpoint's channels in another order keeps the checkpoint's order
    when ``reorder_channels`` (the caller puts the data's channels in it: :func:`channel_order`), and
    is refused otherwise: fed as it comes, each channel would reach another channel's filters.
    """
    model_flags, plan_flags = dict(flags.get("model", {})), dict(flags.get("plan", {}))
    data_classes = tuple(class_names) if class_names else None
    data_channels = tuple(channel_names) if channel_names else None
    if data_classes and "class_names" in model_flags and tuple(model_flags["class_names"]) != data_classes:
        raise ConfigConflict(f"--class-names {_show(model_flags['class_names'])} contradicts {dataset_label}, "
                             f"which names the labels {_show(data_classes)}; drop the flag")
    if data_channels and "channel_names" in plan_flags and tuple(plan_flags["channel_names"]) != data_channels:
        raise ConfigConflict(f"--channel-names {_show(plan_flags['channel_names'])} contradicts {dataset_label}, "
                             f"which names the channels {_show(data_channels)}; drop the flag")
    classes = data_classes or (tuple(model_flags["class_names"]) if "class_names" in model_flags else None)
    channels = data_channels or (tuple(plan_flags["channel_names"]) if "channel_names" in plan_flags else None)
    architecture_flags = {k: v for k, v in model_flags.items() if k != "class_names"}

    if start is not None:
        source = f"the start checkpoint {start.path.name if start.path else ''}".rstrip()
        base = start.config
        model = _apply(base.model, architecture_flags, locked=[f.name for f in dataclasses.fields(ModelConfig)],
                       source=source)
        # The start checkpoint holds the trained backbone: its pretrained source file is not needed.
        # A class the start model knows keeps its name there ('Liver' from a SEG is the model's 'liver').
        classes = spelled_as(classes, base.model.class_names) if classes else classes
        model = dataclasses.replace(model, class_names=classes or base.model.class_names, backbone_weights=None)
        diffusion = _apply(base.diffusion, flags.get("diffusion", {}),
                           locked=[f.name for f in dataclasses.fields(DiffusionConfig)], source=source)
        plan = _apply(base.plan, {k: v for k, v in plan_flags.items() if k in GEOMETRY_FIELDS},
                      locked=GEOMETRY_FIELDS, source=source)
        order = channel_order(base.plan.channel_names, channels, data_label=dataset_label, model_label=source)
        if order is not None:
            if not reorder_channels:
                raise ConfigConflict(f"{dataset_label} names the channels {_show(channels)}, those of {source} "
                                     f"({_show(base.plan.channel_names)}) in another order, which this run cannot "
                                     "put in the model's order; give them in the model's order")
            log(f"channels {_show(channels)} of {dataset_label} are read in the order of {source}: "
                f"{_show(base.plan.channel_names)}")
            channels = base.plan.channel_names
        if channels and channels != base.plan.channel_names:
            if _same_kind(base.plan.channel_names, channels):
                plan = dataclasses.replace(plan, channel_names=channels)
            else:
                new = dataset_plan or PreprocessPlan(channel_names=channels,
                                                     intensity=tuple("ct_window" if is_ct(c) else "zscore"
                                                                     for c in channels))
                plan = dataclasses.replace(plan, channel_names=channels, intensity=new.intensity, window=new.window,
                                           percentiles=new.percentiles)
                log(f"channels {_show(channels)} differ in kind from the start checkpoint's "
                    f"{_show(base.plan.channel_names)}: intensity scheme {_show(plan.intensity)} from the data")
        if not same_classes(model.class_names, base.model.class_names):
            log(f"classes {list(model.class_names)} differ from the start checkpoint's "
                f"{list(base.model.class_names)}: class-dependent layers will be re-initialised")
    else:
        model = _apply(ModelConfig(), architecture_flags)
        _check_backbone_name(model.backbone)
        if classes:
            model = dataclasses.replace(model, class_names=classes)
        diffusion = _apply(DiffusionConfig(), flags.get("diffusion", {}))
        plan = dataset_plan or PreprocessPlan()
        if channels and not dataset_plan:
            plan = dataclasses.replace(plan, channel_names=channels, intensity=tuple(
                "ct_window" if is_ct(c) else "zscore" for c in channels))
        plan = _apply(plan, {k: v for k, v in plan_flags.items() if k in GEOMETRY_FIELDS})
    plan = _apply(plan, {k: v for k, v in plan_flags.items() if k in INTENSITY_FIELDS})
    for channel, name in enumerate(plan.channel_names):
        if plan.scheme_of(channel) == "ct_window" and not is_ct(name):
            raise ConfigConflict(f"a CT window on channel {channel} ({name!r}) contradicts {dataset_label}, which "
                                 "does not call it CT; use --intensity zscore or percentile")
    train = _apply(TrainConfig(), flags.get("train", {}))
    config = ExperimentConfig(model=model, diffusion=diffusion, plan=plan, train=train)
    config.check_training()
    return config


def _check_backbone_name(name: str) -> None:
    """An unknown --backbone is refused now, not once the data is loaded and the model built. Here and not in
    ModelConfig: timm (and torch) must not be imported wherever a config is made (napari imports them only in
    its workers)."""
    from .backbone import import_timm
    from .errors import ConfigError

    if not import_timm().is_model(name):
        raise ConfigError(f"--backbone {name!r} is not a timm model (e.g. pvt_v2_b1, efficientnet_lite0; "
                          "`python -c \"import timm; print(timm.list_models())\"` lists them)")


def given_flags(args: Any, sections: dict[str, type]) -> dict[str, dict[str, Any]]:
    """Per section, the dataclass fields whose flags were given on the command line (not None)."""
    given: dict[str, dict[str, Any]] = {}
    for section, cls in sections.items():
        values = {}
        for f in dataclasses.fields(cls):
            value = getattr(args, f.name, None)
            if value is not None:
                values[f.name] = tuple(value) if isinstance(value, list) else value
        given[section] = values
    return given
