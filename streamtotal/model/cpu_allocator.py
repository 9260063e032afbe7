"""Keep freed memory in the process so CPU training does not page-fault on every step.

A totalVI step allocates and frees dozens of 1-4 MB tensors. glibc serves blocks of that size with fresh
``mmap``s (its mmap threshold adapts, but heap trimming undoes it), and every first touch of a fresh page is a
page fault - costly inside a VM. On the 2-core benchmark machine this made a step 1.2-2x slower for both
streamtotal and scvi-tools. Raising the mmap and trim thresholds keeps those blocks in the heap for reuse.

The reader threads (zarr chunk decoding, minibatch assembly) allocate tens of MB per I/O group. Each thread
gets its own glibc arena by default, and those arenas hand freed memory back to the kernel, so every group
page-faulted ~20 MB afresh (~350 faults a training step). One arena for the whole process keeps that memory
for reuse too, which makes CPU training steps measurably faster (benchmarks/train_throughput.py). The arena's
lock is no bottleneck here: the threads make few, large allocations.

Process-wide: call it once, early (before reader threads start), in a CPU training process. A no-op where
glibc is not the allocator.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def retain_freed_memory(mmap_threshold: int = 32 * 1024 * 1024, trim_threshold: int = 1 << 30,
                        arena_max: int = 1) -> bool:
    """Sets glibc's mmap threshold (blocks below it come from the heap), trim threshold (free heap kept) and
    arena limit (threads started afterwards share the main arena).

    Args:
        mmap_threshold: bytes; glibc caps it at 32 MiB on 64-bit systems.
        trim_threshold: bytes of free heap top kept instead of returned to the OS.
        arena_max: most malloc arenas; threads that already have one keep it.

    Returns:
        True when all options were set; False when glibc's ``mallopt`` is unavailable or refused them.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return (bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))
            and bool(mallopt(_M_ARENA_MAX, arena_max)))
