"""Adaptive steps: a slice stops denoising once its x̂0 labels stop changing, or at the step cap.

The first seed decides, per slice, when its labels have converged (``convergence_patience`` steps
in a row with fewer than ``convergence_change`` of its foreground pixels changing label) or reached
``step_cap`` steps (a model's measured cap: content whose labels keep changing, such as noise, is
uncertain rather than unconverged, and further steps of that model add nothing), and records that
step count; further seeds take the same number of steps per slice, so seeds stay
comparable. A slice's stop never depends on the other slices of its batch.
"""

from __future__ import annotations

import torch

from .config import SamplingConfig
from .fusion import argmax_labels
from .sampling import KeepFn


def converged(previous: torch.Tensor, labels: torch.Tensor, tolerance: float) -> torch.Tensor:
    """(B,) bool: fewer than ``tolerance`` of each slice's foreground pixels changed label."""
    changed = (previous != labels).flatten(1).sum(1)
    foreground = ((previous > 0) | (labels > 0)).flatten(1).sum(1).clamp(min=1)
    return (changed == 0) | (changed < tolerance * foreground)


def keep_sampling(sampling: SamplingConfig, seed_index: int, steps_used: torch.Tensor, h: int, w: int) -> KeepFn:
    """The ``keep`` of :func:`medconddiff.sampling.sample_progressive` for one seed of a batch.

    ``steps_used`` (B,) is written by the first seed (when each slice stopped) and read by the
    others; ``h, w`` crop the padded probabilities to the model grid before labels are compared.
    """
    if seed_index > 0:
        return lambda step: step.index + 1 < steps_used[step.active]
    state: dict[str, torch.Tensor] = {}

    def keep(step) -> torch.Tensor:
        labels = torch.from_numpy(argmax_labels(step.probabilities[..., :h, :w].contiguous().cpu()))
        streak = state.get("streak", torch.zeros(len(step.active), dtype=torch.long))
        if "labels" in state:
            streak = torch.where(converged(state["labels"], labels, sampling.convergence_change), streak + 1, 0)
        go_on = streak < sampling.convergence_patience
        if 0 < sampling.step_cap <= step.index + 1:
            go_on = torch.zeros_like(go_on)
        steps_used[step.active[~go_on]] = step.index + 1
        state["labels"], state["streak"] = labels[go_on], streak[go_on]
        return go_on

    return keep
