"""Which torch device a run uses: ``auto`` picks CUDA when present, else the CPU."""

from __future__ import annotations

import os

import torch

from .errors import ConfigError


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' → CUDA when present, else CPU; an explicit 'cuda' without a GPU is a clear error."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("CUDA was requested but no CUDA device is available; use --device cpu or auto")
    return torch.device(device)


def available_devices() -> list[str]:
    devices = ["auto", "cpu"]
    devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return devices


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity where the OS says, else all of them)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS and Windows have no affinity call
        return max(1, os.cpu_count() or 1)
