"""Keep glibc from handing large freed blocks back to the kernel between network passes.

A forward pass allocates and frees activation buffers of tens of MB each time. With glibc's
defaults, freed blocks above its (dynamic) mmap threshold are unmapped and heap tops above its
trim threshold are returned to the kernel, so the next pass page-faults every page in again:
on 2 cores, extracting EfficientNet-Lite0 features spent as much time in the kernel as in the
network (25–27 images/s, system 5.7–6.5 s against user 6.2 s for 200 pictures). Keeping freed
memory for reuse (:func:`tune_allocator`) cut three batch-16 forward passes' page faults from
456 K to 13 K and ran the same extraction at 49–50 images/s (system 0.5 s). It costs resident
memory: up to :data:`TRIM_THRESHOLD` of freed heap stays with the process.

The environment variables ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` (or
``GLIBC_TUNABLES``) do the same from outside; when any is set, it is left to them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

# Keep up to 2 GiB of freed heap top (the largest value mallopt's int takes). 1 GiB was not
# enough at 320 px: a batch-32 Lite0 pass frees more than that at its end, so the heap was
# trimmed and the next pass faulted ~250 K pages back in (1.0 s a batch, against 0.72 s).
TRIM_THRESHOLD = 2**31 - 1
TOP_PAD = 256 << 20  # grow the heap in steps of 256 MiB
MMAP_THRESHOLD = 1 << 30  # blocks below 1 GiB come from (and return to) the heap
ENVIRONMENT = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")

_tuned: bool | None = None


def tune_allocator() -> bool:
    """Set glibc's trim threshold, top pad and mmap threshold (once per process); True when
    they are in force. Does nothing off glibc, or when the environment already sets them."""
    global _tuned
    if _tuned is not None:
        return _tuned
    _tuned = False
    if any(name in os.environ for name in ENVIRONMENT) or "GLIBC_TUNABLES" in os.environ:
        return _tuned
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows)
        return _tuned
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settings = (
        (M_TRIM_THRESHOLD, TRIM_THRESHOLD),
        (M_TOP_PAD, TOP_PAD),
        (M_MMAP_THRESHOLD, MMAP_THRESHOLD),
    )
    _tuned = all(mallopt(option, value) == 1 for option, value in settings)
    return _tuned
