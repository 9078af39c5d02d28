"""glibc malloc tuning for training loops that allocate and free the same blocks every step."""

from __future__ import annotations

import ctypes
import ctypes.util

# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD = 32 << 20  # glibc's ceiling; blocks below it come from the heap
KEEP_FREED = 256 << 20  # freed heap memory kept for reuse before any is given back to the OS

_tuned = False


def tune_allocator() -> bool:
    """Makes glibc's malloc keep freed memory for reuse. A training step allocates and frees the
    same few megabyte-sized activations every time; by default glibc serves blocks of that size with
    fresh mmaps or hands them back to the OS when freed, so every step pays thousands of page faults
    to get them back (docs/performance.md). PyTorch's CPU tuning guide suggests jemalloc or tcmalloc
    via LD_PRELOAD for the same reason; this needs neither. Costs up to KEEP_FREED of idle memory per
    process. Process-wide and one-way, so only entry points call it; a no-op returning False where
    malloc is not glibc's."""
    global _tuned
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):
        return False  # not glibc (macOS, Windows, musl without mallopt)
    _tuned = all(
        mallopt(param, value) == 1
        for param, value in ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, KEEP_FREED),
                             (M_TOP_PAD, KEEP_FREED // 4)))
    return _tuned


def allocator_tuned() -> bool:
    """Whether tune_allocator() took effect in this process (step timings depend on it)."""
    return _tuned
