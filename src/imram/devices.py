"""Where computation runs: the one place that chooses a device."""

from __future__ import annotations

import os

import torch


def default_device() -> torch.device:
    """CUDA when present, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a ``torch.device``; None: :func:`default_device`."""
    return default_device() if device is None else torch.device(device)


def local_device() -> torch.device:
    """This rank's device: its GPU under ``torchrun`` when CUDA is present, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")
