"""Runs a read's independent parts (one per array: RNA data, RNA indices, protein) on two threads.

Decoding a chunk (blosc, numpy copies) releases the GIL, so while the calling thread decodes one array's chunks a
helper thread decodes another's. This matters most for inline reads (the training thread reading its own next
I/O group while torch's threads sit idle), where it shortens the wait for the next group by about a quarter.
The helper runs at its caller's priority:
a reader thread lowered to nice 19 (thread_priority.py) gets a lowered helper, the training thread a normal one.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence, TypeVar

from loaders.thread_priority import current_thread_lowered, lower_current_thread_priority

T = TypeVar("T")

_pools: dict[bool, tuple[int, ThreadPoolExecutor]] = {}
_lock = threading.Lock()


def _helper(lowered: bool) -> ThreadPoolExecutor:
    """The helper pool for callers at this priority, created on first use in this process (a pool inherited
    through fork has no threads behind it, so a child makes its own)."""
    with _lock:
        pid, pool = _pools.get(lowered, (None, None))
        if pool is None or pid != os.getpid():
            pool = ThreadPoolExecutor(
                1, thread_name_prefix="streamtotal-decode" + ("-low" if lowered else ""),
                initializer=lower_current_thread_priority if lowered else None,
            )
            _pools[lowered] = (os.getpid(), pool)
        return pool


def run_split(jobs: Sequence[Callable[[], T]]) -> list[T]:
    """``[job() for job in jobs]``, with the first job on a helper thread while the caller runs the others.

    Put the largest job first. An exception from any job is raised after the helper's job has finished, so no
    read is left running behind the caller.
    """
    if len(jobs) < 2:
        return [job() for job in jobs]
    first = _helper(current_thread_lowered()).submit(jobs[0])
    try:
        rest = [job() for job in jobs[1:]]
    finally:
        done = first.exception()  # waits; the helper's own error is raised below, the caller's one first
    if done is not None:
        raise done
    return [first.result(), *rest]
