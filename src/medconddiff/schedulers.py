"""Noise schedules and model-free samplers (DDPM, DDIM).

A scheduler knows nothing about networks: ``step()`` takes the network's x̂_0 for the current
sample and returns both the previous (less noisy) sample and that x̂_0, like diffusers'
``DDIMScheduler.step``. Our networks predict x̂_0 directly (as MedCondDiff does), so x̂_0 is the
model output, clipped to the state range, and ε̂ is derived from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch

from .config import DiffusionConfig

#: Where a step's noise comes from: one generator for the whole batch, or one per batch item
#: (``len == batch``), so that an item's trajectory does not depend on the batch it is sampled in.
StepGenerator = Union[torch.Generator, Sequence[torch.Generator], None]

#: The largest beta of either schedule: beta = 1 would zero ᾱ (a singular last step), beta > 1 negate it.
MAX_BETA = 0.999


def make_betas(config: DiffusionConfig) -> torch.Tensor:
    """Betas of the training schedule, float64, length ``num_train_timesteps``, each in (0, 0.999]."""
    steps = config.num_train_timesteps
    if config.schedule == "linear":
        # Scaled so that the schedule's end points match DDPM's 1000-step schedule for any length.
        # With 20 steps or fewer the scaled betas reach 1 or more (ᾱ zero, negative, then NaN in
        # the samplers' square roots), so they are capped like the cosine schedule's; a schedule
        # long enough not to need the cap is unchanged.
        scale = 1000.0 / steps
        betas = torch.linspace(scale * config.beta_start, scale * config.beta_end, steps, dtype=torch.float64)
        return betas.clamp_(max=MAX_BETA)
    # Nichol & Dhariwal cosine schedule; beta capped to avoid a singular last step.
    # Vectorised (numpy, float64 as the per-step loop it replaces): a long schedule is tabulated at once.
    s = 0.008
    alpha_bar = np.cos((np.arange(steps + 1, dtype=np.float64) / steps + s) / (1 + s) * math.pi / 2) ** 2
    betas = np.minimum(1 - alpha_bar[1:] / alpha_bar[:-1], MAX_BETA)
    return torch.from_numpy(betas)


class NoiseSchedule:
    """The forward process q(x_t | x_0) of training, shared by the samplers and the trainer."""

    def __init__(self, config: DiffusionConfig):
        self.config = config
        self.betas = make_betas(config)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)

    @property
    def num_train_timesteps(self) -> int:
        return self.config.num_train_timesteps

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Sample x_t = sqrt(ᾱ_t) x_0 + sqrt(1-ᾱ_t) ε for a batch of timesteps."""
        alpha_bar = self.alphas_cumprod.to(x0.device)[timesteps].to(x0.dtype)
        shape = (-1,) + (1,) * (x0.dim() - 1)
        return alpha_bar.sqrt().view(shape) * x0 + (1 - alpha_bar).sqrt().view(shape) * noise


@dataclass
class SchedulerStep:
    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


class _SchedulerBase:
    """Timestep bookkeeping shared by DDPM and DDIM (evenly spaced sub-sequence of the training steps)."""

    def __init__(self, schedule: NoiseSchedule, clip_range: Optional[float] = 1.0):
        self.schedule = schedule
        self.clip_range = clip_range
        self.timesteps = torch.arange(schedule.num_train_timesteps - 1, -1, -1)

    def set_timesteps(self, num_inference_steps: int) -> None:
        total = self.schedule.num_train_timesteps
        if not 1 <= num_inference_steps <= total:
            raise ValueError(f"num_inference_steps must be in [1, {total}], got {num_inference_steps}")
        # Always start at the last (pure-noise) timestep and end at 0, spread evenly in between.
        spaced = torch.linspace(total - 1, 0, num_inference_steps, dtype=torch.float64).round().long()
        self.timesteps = torch.unique_consecutive(spaced)

    def previous_timestep(self, timestep: int) -> int:
        # A dict built once per timesteps tensor: a step asks this up to three times, and a tensor
        # search each time cost more than the step's own arithmetic on small batches.
        if getattr(self, "_previous_for", None) is not self.timesteps:
            values = self.timesteps.tolist()
            self._previous = {}
            for i, value in enumerate(values):  # first occurrence wins, as the tensor search did
                self._previous.setdefault(value, values[i + 1] if i + 1 < len(values) else -1)
            self._previous_for = self.timesteps
        try:
            return self._previous[int(timestep)]
        except KeyError:
            raise ValueError(f"timestep {timestep} is not in this scheduler's timesteps") from None

    def _alpha_bars(self, timestep: int) -> tuple[float, float]:
        ab = self.schedule.alphas_cumprod
        prev = self.previous_timestep(timestep)
        return float(ab[int(timestep)]), (float(ab[prev]) if prev >= 0 else 1.0)

    def _clip(self, x0: torch.Tensor) -> torch.Tensor:
        return x0 if self.clip_range is None else x0.clamp(-self.clip_range, self.clip_range)

    @staticmethod
    def _check_generator(sample: torch.Tensor, generator: StepGenerator) -> None:
        """Reject a sequence of generators that is not one per item of ``sample`` (B, ...)."""
        if generator is None or isinstance(generator, torch.Generator):
            return
        if len(generator) != sample.shape[0]:
            raise ValueError(f"a sequence of generators needs one generator per batch item: the sample "
                             f"has {sample.shape[0]} items, got {len(generator)} generators")

    @staticmethod
    def _noise_like(sample: torch.Tensor, generator: StepGenerator) -> torch.Tensor:
        """Standard normal noise shaped like ``sample`` (B, ...), on its device and in its dtype.

        ``generator`` is None (torch's default generator), one generator drawing the whole batch, or
        a sequence of B generators: item b is then drawn from ``generator[b]`` alone, shaped
        ``sample.shape[1:]``, so it is the same noise whichever batch the item is in.
        """
        # Drawn on the generator's device, then moved, so a seed gives the same noise on CPU and CUDA.
        if generator is None or isinstance(generator, torch.Generator):
            device = generator.device if generator is not None else sample.device
            noise = torch.randn(sample.shape, generator=generator, device=device, dtype=torch.float32)
            return noise.to(sample.device, sample.dtype)
        _SchedulerBase._check_generator(sample, generator)
        noise = torch.stack([torch.randn(sample.shape[1:], generator=g, device=g.device, dtype=torch.float32)
                             .to(sample.device) for g in generator])
        return noise.to(sample.dtype)


class DDPMScheduler(_SchedulerBase):
    """Ancestral sampling from the posterior q(x_{t'} | x_t, x̂_0), t' the previous kept timestep."""

    def posterior(self, pred_x0: torch.Tensor, timestep: int, sample: torch.Tensor
                  ) -> tuple[torch.Tensor, float]:
        """Mean and variance of q(x_{t'} | x_t, x_0) over the (possibly respaced) step t → t'."""
        alpha_bar_t, alpha_bar_prev = self._alpha_bars(timestep)
        beta = 1 - alpha_bar_t / alpha_bar_prev
        coef_x0 = math.sqrt(alpha_bar_prev) * beta / (1 - alpha_bar_t)
        coef_xt = math.sqrt(1 - beta) * (1 - alpha_bar_prev) / (1 - alpha_bar_t)
        variance = beta * (1 - alpha_bar_prev) / (1 - alpha_bar_t)
        # In place on fresh tensors (fewer allocations, same arithmetic, same bits).
        return (pred_x0 * coef_x0).add_(sample * coef_xt), variance

    def step(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor,
             generator: StepGenerator = None) -> SchedulerStep:
        """One step t → t' for a batch ``sample`` (B, ...); ``generator``: see :meth:`_noise_like`."""
        self._check_generator(sample, generator)
        pred_x0 = self._clip(model_output)
        mean, variance = self.posterior(pred_x0, timestep, sample)
        if self.previous_timestep(timestep) < 0:
            return SchedulerStep(pred_x0, pred_x0)
        return SchedulerStep(mean.add_(self._noise_like(sample, generator).mul_(math.sqrt(variance))), pred_x0)


class DDIMScheduler(_SchedulerBase):
    """Song et al. DDIM; eta=0 is deterministic, eta=1 equals DDPM's posterior on the same steps."""

    def __init__(self, schedule: NoiseSchedule, eta: float = 0.0, clip_range: Optional[float] = 1.0):
        super().__init__(schedule, clip_range)
        self.eta = eta

    def sigma(self, timestep: int) -> float:
        alpha_bar_t, alpha_bar_prev = self._alpha_bars(timestep)
        return self.eta * math.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev))

    def step(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor,
             generator: StepGenerator = None) -> SchedulerStep:
        """One step t → t' for a batch ``sample`` (B, ...); ``generator``: see :meth:`_noise_like`."""
        # Checked even where no noise is drawn (eta=0, the last step), so a mismatch shows at once.
        self._check_generator(sample, generator)
        pred_x0 = self._clip(model_output)
        alpha_bar_t, alpha_bar_prev = self._alpha_bars(timestep)
        if self.previous_timestep(timestep) < 0:
            return SchedulerStep(pred_x0, pred_x0)
        # ε̂ = (x_t - √ᾱ_t x̂0) / √(1-ᾱ_t), then x_{t'} = √ᾱ_{t'} x̂0 + √(1-ᾱ_{t'}-σ²) ε̂ (+ σ z).
        # Written in place on fresh tensors: the same operations in the same order (bit-identical
        # to the out-of-place formula) with two allocations instead of six; this runs every step.
        pred_eps = (pred_x0 * math.sqrt(alpha_bar_t)).neg_().add_(sample)
        pred_eps.div_(math.sqrt(1 - alpha_bar_t))
        sigma = self.sigma(timestep)
        direction = pred_eps.mul_(math.sqrt(max(1 - alpha_bar_prev - sigma ** 2, 0.0)))
        prev = (pred_x0 * math.sqrt(alpha_bar_prev)).add_(direction)
        if sigma > 0:
            prev = prev.add_(self._noise_like(sample, generator).mul_(sigma))
        return SchedulerStep(prev, pred_x0)


def make_scheduler(name: str, schedule: NoiseSchedule, steps: int, eta: float = 0.0,
                   clip_range: Optional[float] = 1.0) -> _SchedulerBase:
    scheduler: _SchedulerBase
    if name == "ddim":
        scheduler = DDIMScheduler(schedule, eta=eta, clip_range=clip_range)
    elif name == "ddpm":
        scheduler = DDPMScheduler(schedule, clip_range=clip_range)
    else:
        raise ValueError(f"unknown scheduler {name!r} (use 'ddim' or 'ddpm')")
    scheduler.set_timesteps(steps)
    return scheduler
