"""Helpers shared by the benchmark scripts (run as ``python benchmarks/NAME.py``, so importable as ``_common``)."""

from __future__ import annotations


def peak_rss_mib() -> float:
    """This process's peak resident memory in MiB.

    VmHWM, not ``ru_maxrss``: Linux carries ``ru_maxrss`` across exec, so a child process would report its
    parent's peak (e.g. the data generation) instead of its own.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")
