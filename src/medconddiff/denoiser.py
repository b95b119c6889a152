"""The conditional UNet denoiser and the adapter that feeds it backbone features.

The denoiser encodes the noisy mask x_t; at each backbone stage the adapter's projection of that
stage's features is added element-wise to the denoiser's activations (MedCondDiff's fusion), or,
as the paper's ablation, concatenated and mixed by a 1×1 convolution. Stage sizes come from the
backbone's ``feature_info``; the denoiser's first level runs at the backbone's first kept stride
(1/4), which is what keeps S denoiser passes cheap next to one backbone pass.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import DECODERS


def _groups(channels: int) -> int:
    return math.gcd(channels, 8)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps, (B,) → (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=timesteps.device) / half)
    angles = timesteps.float()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv ×2 with the timestep injected as a per-channel scale and shift."""

    def __init__(self, channels: int, embed_dim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(channels), channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.embed = nn.Linear(embed_dim, 2 * channels)
        self.norm2 = nn.GroupNorm(_groups(channels), channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.embed(embedding)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        return x + self.conv2(F.silu(h))


class FeatureAdapter(nn.Module):
    """Projects each backbone stage to the denoiser's width at that stage (1×1 conv + norm)."""

    def __init__(self, backbone_channels: Sequence[int], denoiser_channels: Sequence[int]):
        super().__init__()
        self.projections = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c_in, c_out, 1), nn.GroupNorm(_groups(c_out), c_out))
            for c_in, c_out in zip(backbone_channels, denoiser_channels))

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [project(f) for project, f in zip(self.projections, features)]


class Fusion(nn.Module):
    """Adds (paper) or concatenates-then-mixes (ablation) a projected feature into the denoiser."""

    def __init__(self, channels: int, mode: str):
        super().__init__()
        self.mode = mode
        self.mix = nn.Conv2d(2 * channels, channels, 1) if mode == "concat" else None

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        if self.mix is None:
            return x + condition
        return self.mix(torch.cat([x, condition], dim=1))


class ConditionalUNet(nn.Module):
    """Predicts x̂_0 logits (B, K, H, W) from x_t (B, C, H, W), t, and per-stage conditions."""

    def __init__(self, in_channels: int, out_channels: int, stage_channels: Sequence[int],
                 stage_reductions: Sequence[int], stem_channels: int = 16, embed_dim: int = 128,
                 fusion: str = "add", decoder: str = "resblocks"):
        super().__init__()
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, not {decoder!r}")
        if any(b != 2 * a for a, b in zip(stage_reductions, stage_reductions[1:])):
            raise ValueError(f"backbone stages must halve the resolution each time, got {stage_reductions}")
        first = stage_reductions[0]
        if first < 4 or first & (first - 1):
            raise ValueError(f"first backbone stride must be a power of two ≥ 4, got {first}")
        self.first_reduction = first
        self.embed = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim))
        self.embed_dim = embed_dim
        # Stem: one stride-2 conv at half resolution (kept as the fine skip), then down to the first stage.
        stem_downs = int(math.log2(first)) - 1
        self.stem = nn.Conv2d(in_channels, stem_channels, 3, stride=2, padding=1)
        downs: list[nn.Module] = []
        c = stem_channels
        for i in range(stem_downs):
            c_next = stage_channels[0] if i == stem_downs - 1 else stem_channels
            downs += [nn.GroupNorm(_groups(c), c), nn.SiLU(), nn.Conv2d(c, c_next, 3, stride=2, padding=1)]
            c = c_next
        self.stem_down = nn.Sequential(*downs)
        self.fusions = nn.ModuleList(Fusion(ch, fusion) for ch in stage_channels)
        self.encoders = nn.ModuleList(ResBlock(ch, embed_dim) for ch in stage_channels)
        self.downsamples = nn.ModuleList(
            nn.Conv2d(a, b, 3, stride=2, padding=1) for a, b in zip(stage_channels, stage_channels[1:]))
        self.middle = ResBlock(stage_channels[-1], embed_dim)
        # The light decoder mixes each skip in with a 1×1 convolution and no residual block: at the
        # default widths the decoder is about a third of a pass, and every sampling step pays it again
        # while the backbone runs once per slice. Without the decoder's timestep-modulated blocks,
        # fine-tunes from such a model decayed over the steps again (README): not the bundled choice.
        light = decoder == "light"
        mix_kernel = 1 if light else 3
        self.up_mix = nn.ModuleList(
            nn.Conv2d(b + a, a, mix_kernel, padding=mix_kernel // 2)
            for a, b in zip(stage_channels, stage_channels[1:]))
        self.decoders = nn.ModuleList(() if light else (ResBlock(ch, embed_dim) for ch in stage_channels[:-1]))
        self.fine_mix = nn.Conv2d(stage_channels[0] + stem_channels, stem_channels, mix_kernel,
                                  padding=mix_kernel // 2)
        self.head = nn.Sequential(nn.GroupNorm(_groups(stem_channels), stem_channels), nn.SiLU(),
                                  nn.Conv2d(stem_channels, out_channels, 1))

    def forward(self, x_t: torch.Tensor, timesteps: torch.Tensor, conditions: Sequence[torch.Tensor]
                ) -> torch.Tensor:
        embedding = self.embed(timestep_embedding(timesteps, self.embed_dim).to(x_t.dtype))
        fine = self.stem(x_t)
        h = self.stem_down(fine) if len(self.stem_down) else fine
        skips = []
        for i, (fusion, encoder, condition) in enumerate(zip(self.fusions, self.encoders, conditions)):
            h = encoder(fusion(h, condition), embedding)
            if i < len(self.downsamples):
                skips.append(h)
                h = self.downsamples[i](h)
        h = self.middle(h, embedding)
        for i in reversed(range(len(self.up_mix))):
            skip = skips[i]
            h = F.interpolate(h, size=skip.shape[-2:], mode="nearest")
            h = self.up_mix[i](torch.cat([h, skip], dim=1))
            if self.decoders:
                h = self.decoders[i](h, embedding)
        h = F.interpolate(h, size=fine.shape[-2:], mode="bilinear", align_corners=False)
        h = self.fine_mix(torch.cat([h, fine], dim=1))
        # A few class planes: on the CPU, bilinear upsampling is ~3× faster in the contiguous layout than
        # in channels-last (which suits the convolutions above); the values are the same either way.
        logits = self.head(h).contiguous()
        return F.interpolate(logits, size=x_t.shape[-2:], mode="bilinear", align_corners=False)
