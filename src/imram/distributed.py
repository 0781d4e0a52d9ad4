"""Process-group set-up for ``torchrun`` (gloo on CPU, NCCL on GPU)."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist


def init_from_env() -> tuple[int, int]:
    """Join the group ``torchrun`` describes in the environment; (rank, world size).

    Without ``torchrun`` (no ``WORLD_SIZE`` above 1) this is a single process: (0, 1).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


@contextlib.contextmanager
def process_group() -> Iterator[tuple[int, int]]:
    """``(rank, world size)`` inside the group ``torchrun`` describes (:func:`init_from_env`),
    left when the block ends. After a normal end the ranks first meet at a barrier: a rank that
    tears gloo down while a peer is still connected can abort at exit ("terminate called
    without an active exception"). After an error the group is only destroyed, since the other
    ranks may be inside another collective."""
    rank, world_size = init_from_env()
    try:
        yield rank, world_size
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, or (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def split_sizes(n: int, world_size: int) -> list[int]:
    """How many of ``n`` consecutive items each rank takes: contiguous, the first ``n % world``
    ranks one more (as ``torch.tensor_split``)."""
    return [n // world_size + (1 if r < n % world_size else 0) for r in range(world_size)]


def gather_rows(local: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Concatenate every rank's ``local`` rows (rank ``r`` holds ``sizes[r]``) on every rank,
    with autograd: the backward pass sums each rank's gradient for this rank's rows and hands
    it back here. Rows are padded to the largest share for the collective."""
    from torch.distributed.nn.functional import all_gather

    width = max(sizes)
    padded = local
    if local.shape[0] < width:
        padding = local.new_zeros((width - local.shape[0], *local.shape[1:]))
        padded = torch.cat([local, padding])
    with warnings.catch_warnings():  # its successor is private API; this one still works
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*all_gather")
        parts = all_gather(padded)
    return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)])


def sum_gradients(parameters: list[torch.nn.Parameter]) -> None:
    """Sum the gradients of ``parameters`` over all ranks in one flat all-reduce (a parameter
    without a gradient on some rank counts as zeros there)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for p in parameters:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p)
        offset += n


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` is set on any rank (True on every rank then); the flag itself alone."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def barrier() -> None:
    """Wait for every rank (nothing without a process group)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_object(value: Any, src: int = 0) -> Any:
    """``value`` from rank ``src`` on every rank (identity without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


_SHARDED = False


@contextlib.contextmanager
def sharded_batch() -> Iterator[None]:
    """Mark the code inside as working on this rank's share of a global batch (training under
    ``torchrun``): state that must see the whole batch, such as MEMBER's memory queue, gathers
    it with :func:`gather_uneven`."""
    global _SHARDED
    _SHARDED = True
    try:
        yield
    finally:
        _SHARDED = False


def batch_is_sharded() -> bool:
    """Whether the calling code runs inside :func:`sharded_batch` with several ranks."""
    return _SHARDED and world()[1] > 1


def gather_uneven(local: torch.Tensor) -> torch.Tensor:
    """Every rank's ``local`` rows (any count per rank) concatenated in rank order, without
    autograd (for state such as memory queues)."""
    count = torch.tensor([local.shape[0]], device=local.device)
    counts = [torch.zeros_like(count) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, count)
    with torch.no_grad():
        return gather_rows(local, [int(c.item()) for c in counts])
