"""Reusable scratch buffers for the inference path of the scorer.

Each scoring block allocates a few pair-sized tensors (tens of MB); on CPU, fresh allocations
of that size come from the kernel as new zeroed pages, which costs about 5% of a block's time
(`imram bench scoring`). The buffers here are kept per thread and reused by every block, so
concurrent callers (a threaded server) never share one. Nothing returned to a caller may alias
them.
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor

_local = threading.local()


def scratch(slot: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """An uninitialised ``shape`` tensor with ``like``'s dtype and device, backed by this
    thread's buffer ``slot`` (grown when too small), or a fresh one off the CPU, where the
    caching allocator already reuses memory."""
    if like.device.type != "cpu":
        return like.new_empty(shape)
    buffers: dict[tuple[str, torch.dtype], Tensor] = _local.__dict__.setdefault("buffers", {})
    numel = 1
    for size in shape:
        numel *= size
    key = (slot, like.dtype)
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = buffers[key] = like.new_empty(numel)
    return buffer[:numel].view(shape)


def gather(source: Tensor, rows: Tensor, slot: str | None = None) -> Tensor:
    """``source``'s items ``rows`` (repeats allowed) by ``index_select``, whose backward sums
    repeated rows in a fixed order; written into this thread's buffer ``slot`` when given and
    autograd does not record (the caller then owns the result only until that slot's next use)."""
    if slot is None or (torch.is_grad_enabled() and source.requires_grad):
        return source.index_select(0, rows)
    out = scratch(slot, (rows.shape[0], *source.shape[1:]), source)
    return torch.index_select(source, 0, rows, out=out)


def release() -> None:
    """Free this thread's buffers (e.g. after scoring a gallery, before training resumes)."""
    _local.__dict__.pop("buffers", None)
