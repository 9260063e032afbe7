"""A lock that serialises lazy re-opening of file handles within one process.

Sources open their files in the process that builds them and re-open them on first use in a forked DataLoader
worker (handles must not cross a fork). A worker reads with several threads (``StreamConfig.read_threads``), so
two threads can find the handles stale at once; without a lock both re-open, and the handles the first thread is
reading through are dropped (closed) under it. The lock is private to each process: one inherited through a fork
could have been held by a parent thread that does not exist in the child, and would never be released.
"""

from __future__ import annotations

import os
import threading

_locks: dict[int, threading.Lock] = {}


def reopen_lock() -> threading.Lock:
    """The calling process's re-open lock."""
    pid = os.getpid()
    lock = _locks.get(pid)
    if lock is None:
        lock = _locks.setdefault(pid, threading.Lock())  # atomic: two threads get the same lock
    return lock
