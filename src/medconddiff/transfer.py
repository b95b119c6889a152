"""Start a model from another checkpoint's weights (fine-tuning), across class lists and channels.

Everything that does not depend on the class list or the input channels is copied: backbone, adapter
and denoiser body. When the class list differs in any way (other names, order or number), the
class-dependent layers (each family names them:
:meth:`~medconddiff.model_interface.DiffusionSegmentationModel.class_dependent_prefixes`: the mask stem
and output head, or LSegDiff's whole mask VAE) start fresh and are learned from the new labels. Keeping
a class's entries by name was tried and measured worse: a lung lesion added to the liver model was
claimed by the kept "liver" class (lesion Dice 0 on the rest of the scan after 200 steps). A backbone
whose input channels differ gets its first convolution adapted: the mean filter over the old channels,
given to every new channel and scaled so a uniform image gives the same response (what timm does for
grey ↔ RGB).
"""

from __future__ import annotations

from collections import Counter
from typing import Callable

import torch

from .checkpoint import Checkpoint, CheckpointError, model_state
from .class_match import class_index, same_classes
from .model_interface import DiffusionSegmentationModel


def transfer_weights(model: DiffusionSegmentationModel, checkpoint: Checkpoint,
                     log: Callable[[str], None] = print) -> list[str]:
    """Load ``checkpoint`` into ``model`` as far as shapes allow; returns the keys left re-initialised.

    Raises CheckpointError when the architectures differ beyond class-dependent layers and the first
    convolution (another backbone, other widths): fine-tuning needs the same network body.
    """
    source = model_state(checkpoint)
    target = model.state_dict()
    new_class_list = not same_classes(checkpoint.config.model.class_names, model.config.class_names)
    class_prefixes = model.class_dependent_prefixes()
    loaded: dict[str, torch.Tensor] = {}
    reinitialised: list[str] = []
    adapted: list[str] = []
    for key, value in target.items():
        if key not in source:
            raise CheckpointError(f"{checkpoint.path}: has no tensor {key}; it is another architecture "
                                  "(fine-tuning needs the same backbone and denoiser widths)")
        old = source[key]
        if new_class_list and key.startswith(class_prefixes):
            reinitialised.append(key)
        elif old.shape == value.shape:
            loaded[key] = old
        elif key.startswith("backbone.") and old.dim() == 4 and old.shape[0] == value.shape[0] \
                and old.shape[2:] == value.shape[2:]:
            loaded[key] = adapt_input_channels(old, value.shape[1])
            adapted.append(key)
        else:
            raise CheckpointError(f"{checkpoint.path}: tensor {key} has shape {tuple(old.shape)}, the model needs "
                                  f"{tuple(value.shape)}; it is another architecture")
    unexpected = sorted(set(source) - set(target))
    if unexpected:
        raise CheckpointError(f"{checkpoint.path}: holds tensors this model does not have (e.g. {unexpected[:2]}); "
                              "it is another model family or architecture")
    model.load_state_dict(loaded, strict=False)
    name = checkpoint.path.name if checkpoint.path else "the checkpoint"
    log(f"initialised from {name}: {len(loaded)} of {len(target)} tensors copied")
    for key in adapted:
        log(f"  adapted to {model.state_dict()[key].shape[1]} input channels: {key}")
    if reinitialised:
        layers = sorted({k.rsplit(".", 1)[0] for k in reinitialised})
        log(f"  re-initialised for the new class list {list(model.config.class_names)}: {_summary(layers)}")
    return reinitialised


def _summary(layers: list[str]) -> str:
    """Layer names grouped by their first part when there are many (e.g. a whole VAE)."""
    if len(layers) <= 4:
        return ", ".join(layers)
    groups = Counter(layer.split(".", 1)[0] for layer in layers)
    return ", ".join(f"{name} ({count} layers)" if count > 1 else name for name, count in groups.items())


def adapt_input_channels(weight: torch.Tensor, channels: int) -> torch.Tensor:
    """(O, C_old, kh, kw) filters → (O, channels, kh, kw): the channel mean, rescaled by C_old/channels."""
    mean = weight.float().mean(dim=1, keepdim=True)
    return (mean * (weight.shape[1] / channels)).repeat(1, channels, 1, 1).to(weight.dtype)


def carry_known_classes(model: DiffusionSegmentationModel, checkpoint: Checkpoint,
                        log: Callable[[str], None] = print) -> list[str]:
    """Copy the start checkpoint's class-dependent entries of every class it shares by name with
    ``model`` (background by position) into the re-initialised layers; returns the keys changed.

    Only tensors whose class axis is plain (one axis sized by the class count: the pixel model's mask
    stem and output head) are carried; LSegDiff's mask VAE mixes classes into pixel patches and stays
    fresh. Without replayed slices of the old classes this was measured worse (see the module
    docstring); it is meant for fine-tuning with replay, where the old classes keep being taught.
    """
    old_names = tuple(checkpoint.config.model.class_names)
    new_names = tuple(model.config.class_names)
    pairs = [(0, 0)] + [(class_index(old_names, name), new) for new, name in enumerate(new_names)
                        if new > 0 and class_index(old_names, name) is not None]
    source = model_state(checkpoint)
    target = model.state_dict()
    changed = {}
    for key, value in target.items():
        old = source.get(key)
        if old is None or not key.startswith(model.class_dependent_prefixes()) or old.shape == value.shape:
            continue
        axes = [a for a in range(value.dim()) if old.shape[a] != value.shape[a]] if old.dim() == value.dim() else []
        if len(axes) != 1 or (old.shape[axes[0]], value.shape[axes[0]]) != (len(old_names), len(new_names)):
            continue
        carried = value.clone()
        for old_index, new_index in pairs:
            carried.select(axes[0], new_index).copy_(old.select(axes[0], old_index))
        changed[key] = carried
    model.load_state_dict(changed, strict=False)
    if changed:
        kept = ", ".join(new_names[new] for _, new in pairs)
        log(f"  carried the start model's entries of {kept} into {len(changed)} class-dependent tensor(s)")
    return sorted(changed)
