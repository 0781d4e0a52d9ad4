"""Numeric precision (``precision: fp32|bf16|fp16``), shared by training and scoring."""

from __future__ import annotations

import contextlib

import torch


def autocast(precision: str, device: str | torch.device):
    """Autocast to bf16 or fp16 on ``device``; a no-op for ``fp32``.

    Matrix products run in the low precision; every other op follows PyTorch's autocast rules.
    """
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in fp32 if it is in a 16-bit float type, else unchanged (fp64 stays fp64)."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
