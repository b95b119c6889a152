"""Checkpoints: safetensors weights with the ExperimentConfig (JSON) in the file's metadata.

safetensors holds tensors and strings only, so loading one can never run code. Anything else (a
pickle, another project's safetensors) is refused with a message that says what was expected.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from .atomic import atomic_write
from .config import ExperimentConfig
from .errors import ConfigError, UserInputError

if TYPE_CHECKING:  # torch is imported by safetensors when a file is actually read or written
    import torch
    from torch import nn

FORMAT_NAME = "medconddiff-checkpoint"
#: 2: the config carries a preprocessing plan (orientation, slicing, spacing, intensity per channel).
FORMAT_VERSION = "2"
#: medconddiff 0.1 checkpoints: no plan (raw voxel axis 2 squeezed to a fixed square).
LEGACY_FORMAT_VERSION = "1"
DEFAULT_CHECKPOINT_NAME = "medconddiff_liver_default.safetensors"


class CheckpointError(UserInputError):
    """A file that is not a usable medconddiff checkpoint."""


@dataclass
class Checkpoint:
    config: ExperimentConfig
    state_dict: dict[str, "torch.Tensor"]
    path: Optional[Path] = None
    sha256: str = ""
    extra: dict = field(default_factory=dict)  # training state, metrics, provenance (JSON-safe)


#: Models that ship inside the package, by the name the CLI (--checkpoint NAME, --init NAME) and the
#: widget use; "default" is the default model's alias.
BUNDLED_CHECKPOINTS = {
    "default": DEFAULT_CHECKPOINT_NAME,
    "medconddiff-liver": DEFAULT_CHECKPOINT_NAME,
    "lsegdiff-liver": "lsegdiff_liver.safetensors",
}


def default_checkpoint_path() -> Path:
    return bundled_checkpoint_path("medconddiff-liver")


def bundled_checkpoint_path(name: str) -> Path:
    return Path(__file__).parent / "models" / BUNDLED_CHECKPOINTS[name]


def resolve_checkpoint(path_or_name: str | Path | None) -> Path:
    """None → the default model; a bundled model's name → its file; anything else is a path."""
    if path_or_name is None:
        return default_checkpoint_path()
    if str(path_or_name) in BUNDLED_CHECKPOINTS:
        return bundled_checkpoint_path(str(path_or_name))
    return Path(path_or_name)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(path: str | Path, model: "nn.Module", config: ExperimentConfig, *, extra: dict | None = None,
                    half: bool = False, overwrite: bool = True, tensors: dict[str, torch.Tensor] | None = None
                    ) -> Path:
    """Write weights (optionally fp16) + config atomically; ``tensors`` adds e.g. optimizer state."""
    from safetensors.torch import save_file

    path = Path(path)
    state = {}
    for key, value in model.state_dict().items():
        value = value.detach().cpu()
        # A model trained channels-last holds strided 4-D weights; safetensors stores packed ones only.
        state[key] = (value.half() if half and value.is_floating_point() else value).contiguous()
    for key, value in (tensors or {}).items():
        state[key] = value.detach().cpu().contiguous()
    _refuse_saving_nonfinite(path, state, half)
    metadata = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
                "config": json.dumps(config.to_dict()), "extra": json.dumps(extra or {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=metadata), overwrite=overwrite)
    return path


def load_checkpoint(path: str | Path | None = None, *, allow_legacy: bool = False) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint` (None or a bundled name: a shipped model).

    A medconddiff 0.1 checkpoint (format 1, no preprocessing plan) is refused for inference: its
    results depended on how a scan was stored. ``allow_legacy`` reads it anyway, with a plan that
    describes how it was trained (axial slices at 1 mm), for use as a fine-tuning start only.
    """
    from safetensors import SafetensorError, safe_open

    path = resolve_checkpoint(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    with open(path, "rb") as handle:
        head = handle.read(8)
    if head[:2] == b"\x80\x04" or head[:2] == b"\x80\x02" or head[:4] == b"PK\x03\x04":
        raise CheckpointError(f"{path} is a pickle/torch.save file; medconddiff only loads .safetensors "
                              "checkpoints written by `medconddiff train` (pickles can run arbitrary code)")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as reader:
            metadata = reader.metadata() or {}
            if metadata.get("format") != FORMAT_NAME:
                raise CheckpointError(f"{path} is a safetensors file but not a medconddiff checkpoint "
                                      "(no medconddiff config in its metadata)")
            version = metadata.get("format_version")
            if version == LEGACY_FORMAT_VERSION and not allow_legacy:
                raise CheckpointError(
                    f"{path} is a medconddiff 0.1 checkpoint (format 1) without a preprocessing plan (its results "
                    "depended on how a scan was stored); fine-tune it into a planned one with `medconddiff train DATA "
                    f"--init {path} -o RUN` (or `medconddiff finetune`), which reads its weights")
            if version not in (FORMAT_VERSION, LEGACY_FORMAT_VERSION):
                raise CheckpointError(f"{path} has checkpoint format {version!r}; "
                                      f"this version reads format {FORMAT_VERSION}")
            state = {key: reader.get_tensor(key) for key in reader.keys()}
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{path} is not a readable safetensors checkpoint: {error}") from None
    _refuse_nonfinite_tensors(path, state)
    try:
        raw = json.loads(metadata["config"])
        extra = json.loads(metadata.get("extra", "{}"))
        if not isinstance(raw, dict) or not isinstance(extra, dict):
            raise ValueError("its config and its record must be JSON objects")
        if version == LEGACY_FORMAT_VERSION:
            raw = _upgrade_legacy_config(raw)
            extra["upgraded_from_format"] = LEGACY_FORMAT_VERSION
        config = ExperimentConfig.from_dict(raw)
    except ConfigError as error:        # a field of the wrong type or value: an edited or damaged config
        raise CheckpointError(f"{path}: its config is invalid ({error}); use the checkpoint as training wrote "
                              "it, or another one") from None
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        raise CheckpointError(f"{path}: its config does not match this version of medconddiff: {error}") from None
    return Checkpoint(config=config, state_dict=state, path=path, sha256=file_sha256(path), extra=extra)


def _refuse_nonfinite_tensors(path: Path, state: dict[str, "torch.Tensor"]) -> None:
    """A tensor holding NaN or infinity (a run that diverged, a damaged file) would segment every scan as
    background without an error: refuse the checkpoint, naming the first such tensor."""
    found = _nonfinite_tensor(state)
    if found is not None:
        raise CheckpointError(f"{path}: {found}; the checkpoint is damaged or its training diverged: use another "
                              "checkpoint")


def _refuse_saving_nonfinite(path: Path, state: dict[str, "torch.Tensor"], half: bool) -> None:
    """Weights holding NaN or infinity (a diverged run; a weight beyond fp16's range in a half export) must not
    replace a file: load_checkpoint would refuse it, and a user's earlier model would be gone."""
    found = _nonfinite_tensor(state)
    if found is not None:
        beyond = " (beyond fp16's range: export without half precision)" if half else ""
        raise CheckpointError(f"{path.name} not saved: {found}{beyond}; the training diverged or its weights are "
                              "damaged")


def _nonfinite_tensor(state: dict[str, "torch.Tensor"]) -> Optional[str]:
    """``tensor 'KEY' holds N NaN or infinite value(s) of M`` for the first such floating tensor, or None."""
    import torch

    for key, tensor in state.items():
        if tensor.is_floating_point():
            finite = torch.isfinite(tensor)
            if not bool(finite.all()):
                return f"tensor {key!r} holds {int((~finite).sum())} NaN or infinite value(s) of {tensor.numel()}"
    return None


def with_extra(source: str | Path | None, target: str | Path, updates: dict, *, overwrite: bool = False) -> Path:
    """Copy the checkpoint ``source`` to ``target`` with ``updates`` merged into its ``extra`` record:
    the tensors (dtypes included) and the config are kept bit for bit; written atomically."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    checkpoint = load_checkpoint(source)          # refuses anything that is not a current checkpoint
    with safe_open(str(checkpoint.path), framework="pt", device="cpu") as reader:
        metadata = dict(reader.metadata())
        state = {key: reader.get_tensor(key) for key in reader.keys()}
    metadata["extra"] = json.dumps({**checkpoint.extra, **updates})
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, lambda tmp: save_file(state, str(tmp), metadata=metadata), overwrite=overwrite)
    return target


def _upgrade_legacy_config(raw: dict) -> dict:
    """A format-1 config as a planned one: what its training effectively was (axial, 1 mm, one channel)."""
    raw = dict(raw)
    model = dict(raw.get("model", {}))
    model.pop("image_size", None)
    old = dict(raw.pop("preprocess", {}))
    raw["model"] = model
    raw["plan"] = {"slicing": "axial", "target_spacing": [1.0, 1.0], "channel_names": ["CT"],
                   "intensity": [old.get("intensity", "ct_window")],
                   "window": old.get("window", [-200.0, 250.0]), "percentiles": old.get("percentiles", [0.5, 99.5])}
    return raw


def model_state(checkpoint: Checkpoint, prefix: str = "") -> dict[str, torch.Tensor]:
    """Weights of the network (skipping auxiliary tensors such as optimizer state), as float32."""
    state = {}
    for key, value in checkpoint.state_dict.items():
        if key.startswith("aux."):
            continue
        state[prefix + key] = value.float() if value.is_floating_point() else value
    return state


def check_tensor_shapes(checkpoint: Checkpoint) -> None:
    """Refuse a checkpoint whose config describes other tensors than the file holds (an edited or damaged
    config), before a model is built from it: the config's network is built on torch's "meta" device (shapes,
    no memory, no random initialisation) and compared tensor by tensor. A CheckpointError names the first
    tensor whose shape differs; missing or unexpected tensors are :func:`load_model_weights`' to report."""
    import dataclasses

    import torch

    from .families import build_model

    where = checkpoint.path.name if checkpoint.path else "the checkpoint"
    config = checkpoint.config
    with torch.device("meta"), _random_init_skipped():
        model = build_model(dataclasses.replace(config.model, backbone_weights=None),
                            in_channels=config.plan.input_channels)
    for key, expected in model.state_dict().items():
        held = checkpoint.state_dict.get(key)
        if held is not None and tuple(held.shape) != tuple(expected.shape):
            raise CheckpointError(f"{where} does not fit the model its config describes: tensor {key!r} is "
                                  f"{tuple(held.shape)} in the file, {tuple(expected.shape)} by its config; use the "
                                  "checkpoint as training wrote it, or another one")


#: Random initialisers: on the meta device they only cost time (a third of a second for the bundled model,
#: whose shapes take a tenth to build), so :func:`check_tensor_shapes` skips them.
_RANDOM_INIT = frozenset(("normal_", "uniform_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_",
                          "xavier_uniform_", "xavier_normal_", "orthogonal_", "erfinv_"))


def _random_init_skipped():
    """A torch function mode in which the :data:`_RANDOM_INIT` initialisers leave their tensor as it is."""
    from torch.overrides import TorchFunctionMode

    class SkipRandomInit(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if getattr(func, "__name__", "") in _RANDOM_INIT:
                return args[0] if args else kwargs.get("tensor")
            return func(*args, **kwargs)

    return SkipRandomInit()


def load_model_weights(model: "nn.Module", checkpoint: Checkpoint) -> None:
    where = checkpoint.path or "checkpoint"
    try:
        missing, unexpected = model.load_state_dict(model_state(checkpoint), strict=False)
    except RuntimeError as error:  # torch reports shape mismatches this way
        first = str(error).split("\n")[1].strip() if "\n" in str(error) else str(error)
        raise CheckpointError(f"{where} does not fit the model its config describes ({first})") from None
    if missing or unexpected:
        raise CheckpointError(f"{where} does not fit the model its config describes "
                              f"(missing {len(missing)} tensors, e.g. {missing[:2]}; unexpected {unexpected[:2]})")
