"""Which configuration a training run gets: from a start checkpoint, the dataset's own facts, and flags.

One rule set for ``medconddiff train``, ``medconddiff finetune``, the Python API and the napari
fine-tuner:

* **Architecture and geometry** (model family, backbone, widths; slicing, target spacing, 2.5-D
  context) come from the start checkpoint when there is one (``--init``), else from the defaults
  and the dataset's fingerprint plan. A flag that contradicts the start checkpoint is an error:
  fine-tuning needs the network and the millimetres it was trained with.
* **Classes and channels** are facts of the data (dataset.json, or the user's class names). A
  flag that contradicts them is an error. A class list that differs from the start checkpoint's is
  fine: only class-dependent layers are re-initialised (:mod:`medconddiff.transfer`).
* **Intensity** follows each channel's modality: the start checkpoint's scheme is kept when the
  channels are the same kind (CT stays CT), the dataset plan's scheme is used otherwise (a CT
  model fine-tuned on MRI gets per-scan z-scores, not a HU window). A CT window on a channel the
  dataset calls something else is an error.
* **Optimisation** (TrainConfig) is always this run's: defaults plus flags.
"""

from __future__ import annotations

import dataclasses
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
                    log: Callable[[str], None] = print) -> ExperimentConfig:
    """The ExperimentConfig of a new training run.

    ``flags`` holds, per section ("model", "diffusion", "plan", "train"), only the fields the user
    set. ``class_names``/``channel_names`` are what the data says (None: it does not say).
    ``dataset_plan`` is the plan the dataset's fingerprint implies (None: no fingerprint).
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
    return ExperimentConfig(model=model, diffusion=diffusion, plan=plan, train=train)


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
