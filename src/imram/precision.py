"""Numeric precision (``precision: fp32|bf16|fp16|auto``), shared by training and scoring."""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch

# CPU flags of bf16 matrix hardware. avx512_bf16 alone is not enough: it only converts and dots
# pairs, and on such a CPU (AMD EPYC, torch 2.13) bf16 autocast is a gamble by shape: a training
# step measured 1.5-2x fp32 at d=1024 but 10x slower at the CPU presets' d=256 with 1280-d
# regions (docs/benchmarks.md), so ``auto`` keeps fp32 there; set bf16 after measuring.
BF16_MATRIX_FLAGS = frozenset({"amx_bf16"})


@functools.cache
def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The feature flags of the first CPU listed in ``cpuinfo`` (empty where it is absent)."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def fast_bf16(device: str | torch.device, flags: frozenset[str] | None = None) -> bool:
    """Whether bf16 matrix products beat fp32 on ``device``: a CUDA device that supports bf16,
    or a CPU with bf16 matrix units (:data:`BF16_MATRIX_FLAGS`; ``flags``: the CPU's, read
    from ``/proc/cpuinfo`` by default)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    return bool(BF16_MATRIX_FLAGS & (cpu_flags() if flags is None else flags))


def resolve_precision(precision: str, device: str | torch.device) -> str:
    """``auto`` → ``bf16`` where :func:`fast_bf16`, else ``fp32``; other values unchanged."""
    if precision != "auto":
        return precision
    return "bf16" if fast_bf16(device) else "fp32"


def autocast(precision: str, device: str | torch.device):
    """Autocast to bf16 or fp16 on ``device``; a no-op for ``fp32`` (``auto``: as resolved by
    :func:`resolve_precision`).

    Matrix products run in the low precision; every other op follows PyTorch's autocast rules.
    """
    precision = resolve_precision(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in fp32 if it is in a 16-bit float type, else unchanged (fp64 stays fp64)."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
