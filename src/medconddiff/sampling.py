"""The reverse process as a generator: one yield per denoising step.

``sample_progressive`` is the only sampling loop (like improved-diffusion's
``p_sample_loop_progressive``); ``sample`` drains it. Progress reporting, live display and
cancellation come from the caller iterating (or stopping iterating), not from callbacks in here.
Items of a batch may stop early (adaptive steps): ``keep`` looks at each step and says which
items go on; the others leave the batch, so their remaining steps cost nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

from .profiling import SCHEDULER_STEP, engine_part
from .schedulers import StepGenerator, _SchedulerBase

#: ``denoise(x_t, timesteps, active) -> (x0_state, class_probabilities)`` for the items ``active``
#: (positions in the original batch) still sampled; x0_state feeds the scheduler, the
#: probabilities (B, K, H, W) are what a user sees for that step.
DenoiseFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]


@dataclass
class SamplingStep:
    index: int
    timestep: int
    num_steps: int
    sample: torch.Tensor          # x_{t'} after this step, for the active items
    probabilities: torch.Tensor   # class probabilities of this step's x̂_0, (B_active, K, H, W)
    active: torch.Tensor          # positions in the original batch of the items this step ran for

#: ``keep(step) -> bool mask over step.active`` (None: keep all): which items take further steps.
KeepFn = Callable[[SamplingStep], Optional[torch.Tensor]]


def initial_noise(shape: tuple[int, ...], seed: int, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Generator]:
    """x_T and the generator that continues the same random stream (CPU, so devices agree)."""
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    return noise.to(device=device, dtype=dtype), generator


def sample_progressive(denoise: DenoiseFn, scheduler: _SchedulerBase, x_t: torch.Tensor,
                       generator: StepGenerator = None, keep: Optional[KeepFn] = None) -> Iterator[SamplingStep]:
    """Run the scheduler's timesteps from ``x_t`` (B, ...; usually pure noise), yielding after every step.

    ``generator`` draws the step noise (DDPM, DDIM with eta > 0): one torch.Generator for the whole
    batch, or a sequence of B generators, item b's noise from the b-th alone (then an item's
    trajectory does not depend on the batch it is sampled in, nor on which items stopped early).
    ``keep`` (optional) is asked after every step which of the active items go on.
    """
    timesteps = scheduler.timesteps
    active = torch.arange(x_t.shape[0])
    for index, timestep in enumerate(timesteps.tolist()):
        t_batch = torch.full((x_t.shape[0],), timestep, device=x_t.device, dtype=torch.long)
        x0_state, probabilities = denoise(x_t, t_batch, active)
        with engine_part(SCHEDULER_STEP):
            x_t = scheduler.step(x0_state, timestep, x_t, generator=generator).prev_sample
        step = SamplingStep(index, timestep, len(timesteps), x_t, probabilities, active)
        yield step
        mask = keep(step) if keep is not None else None
        if mask is not None and not bool(mask.all()):
            if not bool(mask.any()):
                return
            active = active[mask.cpu()]
            x_t = x_t[mask.to(x_t.device)]
            if generator is not None and not isinstance(generator, torch.Generator):
                generator = [g for g, kept in zip(generator, mask.tolist()) if kept]


def sample(denoise: DenoiseFn, scheduler: _SchedulerBase, x_t: torch.Tensor,
           generator: StepGenerator = None) -> torch.Tensor:
    """Drain :func:`sample_progressive`; returns the per-step probabilities stacked as (S, B, K, H, W)."""
    return torch.stack([step.probabilities for step in sample_progressive(denoise, scheduler, x_t, generator)])
