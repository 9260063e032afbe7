"""Run the data layer's background threads at the lowest CPU priority, so they never delay training compute.

On a small machine (the 2-core benchmark box) torch's OpenMP threads use every core, and each parallel region
ends in a barrier: when a reader thread takes a core from one OpenMP thread, the whole region waits for it to be
scheduled again. Linux gives each thread its own nice value (``setpriority(PRIO_PROCESS, tid)`` affects only
that thread, unlike POSIX), so the reader threads are set to nice 19: the scheduler then runs them on cycles
the trainer leaves idle (its serial stretches between parallel kernels, or while it waits for data) rather than
in the middle of a parallel region. A reader is never starved: when the trainer waits for a batch, its threads
block and the reader runs. Lowering one's own priority needs no privilege; it cannot be raised back without
one, so a lowered thread stays low (zarr's worker threads then serve every later local chunk read of the
process at nice 19, which only matters when the machine is oversubscribed). Linux only: elsewhere a thread id
is not something ``setpriority`` accepts, and this is a no-op.
"""

from __future__ import annotations

import os
import sys
import threading

_LOWEST = 19
_local = threading.local()


def lower_current_thread_priority() -> bool:
    """Sets the calling thread's nice value to 19 (tried once per thread).

    Returns:
        True when the thread runs at the lowered priority; False where it could not be lowered.
    """
    done = getattr(_local, "lowered", None)
    if done is None:
        done = False
        if sys.platform.startswith("linux") and hasattr(os, "setpriority"):
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), _LOWEST)
                done = True
            except OSError:
                pass
        _local.lowered = done
    return done


def current_thread_lowered() -> bool:
    """Whether ``lower_current_thread_priority`` lowered the calling thread."""
    return bool(getattr(_local, "lowered", False))
