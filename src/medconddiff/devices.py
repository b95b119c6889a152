"""Which torch device a run uses: ``auto`` picks CUDA when present, else the CPU."""

from __future__ import annotations

import os

import torch

from .errors import ConfigError


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' → CUDA when present, else CPU. Anything this machine cannot run ('gpu', 'mps', a CUDA
    device that is not there) is a one-line ConfigError, from the Python API as from the command line."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ConfigError(f"device {device!r} is not a device: use auto, cpu, cuda or cuda:N ({error})") from None
    if parsed.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {device}: this tool runs on cpu or cuda (auto, cpu, cuda or cuda:N)")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device}: no CUDA device is available here; use cpu or auto")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ConfigError(f"device {device}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                              f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    return parsed


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
