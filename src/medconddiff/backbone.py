"""The image encoder: any timm ``features_only`` model, shapes read from its ``feature_info``.

The default is PVT-v2-b1 (the paper's backbone). Weights are never downloaded: a local weights file
can be given, otherwise the backbone starts from random weights (and a trained checkpoint carries its
own trained backbone weights anyway).
"""

from __future__ import annotations

import warnings

from pathlib import Path
from typing import Optional

import torch
from torch import nn
from .errors import ConfigError, UserInputError

MIN_REDUCTION = 4  # the denoiser works at 1/4 resolution and below; finer stages are not used


class WeightsFileError(UserInputError):
    """A backbone weights file that is missing or does not fit the backbone."""



def import_timm():
    """``import timm``, without the FutureWarning its import raises on current torch (timm's HRNet
    declares a ``torch.jit.interface``): printed at the top of every run, it tells a user nothing they
    can act on. Any other warning passes."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.interface` is deprecated", category=FutureWarning)
        import timm
    return timm


class FeatureBackbone(nn.Module):
    """Multi-scale features of a 1-channel slice; ``channels``/``reductions`` describe each stage."""

    def __init__(self, model_name: str = "pvt_v2_b1", in_chans: int = 1, weights: Optional[str] = None):
        super().__init__()
        timm = import_timm()  # imported here so `import medconddiff` stays light

        try:
            self.body = timm.create_model(model_name, pretrained=False, features_only=True, in_chans=in_chans)
            reductions = self.body.feature_info.reduction()
            if min(reductions) < MIN_REDUCTION:
                out_indices = tuple(i for i, r in enumerate(reductions) if r >= MIN_REDUCTION)
                self.body = timm.create_model(model_name, pretrained=False, features_only=True,
                                              in_chans=in_chans, out_indices=out_indices)
        except RuntimeError as error:  # timm raises RuntimeError for unknown names
            raise ConfigError(f"backbone {model_name!r} is not a timm features_only model: {error}") from None
        self.channels: tuple[int, ...] = tuple(self.body.feature_info.channels())
        self.reductions: tuple[int, ...] = tuple(self.body.feature_info.reduction())
        if weights:
            load_backbone_weights(self.body, weights)

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        return list(self.body(image))


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file or a plain (pickle-free) torch state dict."""
    path = Path(path)
    if not path.is_file():
        raise WeightsFileError(f"backbone weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # weights_only refuses pickled code: say so plainly
        raise WeightsFileError(f"{path} is not a plain tensor state dict ({error.__class__.__name__}); "
                               "save it with torch.save(model.state_dict()) or as .safetensors") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsFileError(f"{path} does not hold a state dict")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _adapt_input_channels(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    # ImageNet RGB filters → grey: the sum keeps the response to a grey image unchanged.
    if weight.dim() == 4 and weight.shape[1] == 3 and in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    return weight


def load_backbone_weights(body: nn.Module, path: str | Path) -> tuple[int, int]:
    """Load matching tensors by name, or else by order and shape (checkpoints of other packagings).

    Returns (tensors loaded, tensors of the backbone). Fails if fewer than 90% of them fit.
    """
    source = read_state_dict(path)
    target = body.state_dict()
    in_chans = getattr(body, "in_chans", 1)
    first_conv = next((k for k, v in target.items() if v.dim() == 4), None)
    in_chans = target[first_conv].shape[1] if first_conv else in_chans
    loaded: dict[str, torch.Tensor] = {}
    for key, value in source.items():
        name = key.removeprefix("module.").removeprefix("model.")
        if name in target:
            value = _adapt_input_channels(value, in_chans)
            if value.shape == target[name].shape:
                loaded[name] = value
    if len(loaded) < 0.9 * len(target):
        # Same architecture, other key names: pair the tensors in order where every shape agrees.
        src = [(k, _adapt_input_channels(v, in_chans)) for k, v in source.items()
               if not k.endswith("num_batches_tracked")]
        dst = [k for k in target if not k.endswith("num_batches_tracked")]
        pairs = list(zip(dst, src))
        if all(target[d].shape == v.shape for d, (_, v) in pairs) and len(pairs) >= 0.9 * len(dst):
            loaded = {d: v for d, (_, v) in pairs}
    fitted = len([k for k in target if not k.endswith("num_batches_tracked")])
    if len(loaded) < 0.9 * fitted:
        raise WeightsFileError(f"{path}: only {len(loaded)} of {fitted} backbone tensors fit; "
                               "is it a checkpoint of the same timm model?")
    body.load_state_dict(loaded, strict=False)
    return len(loaded), fitted
