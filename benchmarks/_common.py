"""Helpers shared by the benchmark scripts (run as ``python benchmarks/NAME.py``, so importable as ``_common``)."""

from __future__ import annotations

import json

RESULT_PREFIX = "RESULT "
"""A measurement child process prints its result as one line: this prefix, then JSON."""


def child_result(stdout: str) -> dict | None:
    """The JSON of the last ``RESULT`` line a measurement child printed, or None when it printed none."""
    lines = [line for line in stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    return json.loads(lines[-1][len(RESULT_PREFIX):]) if lines else None


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
