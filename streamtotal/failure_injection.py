"""Failure injection for the tests of interruptions: every hook in one place, each driven by an environment
variable that is unset in normal use (then every function here returns None and nothing is injected).

- ``STREAMTOTAL_FAIL_AT_STEP=N``: training crashes right after optimiser step N, as a node failure would — only
  in the first attempt of a torchrun job (``TORCHELASTIC_RESTART_COUNT`` 0 or unset), so a restarted attempt
  runs normally and must resume exactly.
- ``STREAMTOTAL_FAIL_AFTER_CHUNKS=K``: a write-back (``embed``, ``denoise``, ...) dies after K units are written,
  so a rerun must resume from its progress ledger.
- ``STREAMTOTAL_FAIL_AFTER_RENAMES=K``: the publication of a command's outputs dies right after its K-th rename
  (K = 0: after staging, before the journal), so the next open of the store must roll it forward.
"""

from __future__ import annotations

import os
from typing import Callable

FAIL_AT_STEP_ENV = "STREAMTOTAL_FAIL_AT_STEP"
FAIL_AFTER_CHUNKS_ENV = "STREAMTOTAL_FAIL_AFTER_CHUNKS"
FAIL_AFTER_RENAMES_ENV = "STREAMTOTAL_FAIL_AFTER_RENAMES"


class InjectedFailure(RuntimeError):
    """Raised by every hook of this module (never in normal use)."""


def _int_env(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


def fail_at_step() -> int | None:
    """The step after which training crashes (``STREAMTOTAL_FAIL_AT_STEP``), in a job's first attempt only."""
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        return None
    return _int_env(FAIL_AT_STEP_ENV)


def fail_after_units() -> int | None:
    """How many write-back units are written before a write-back dies (``STREAMTOTAL_FAIL_AFTER_CHUNKS``)."""
    return _int_env(FAIL_AFTER_CHUNKS_ENV)


def rename_failure_hook() -> Callable[[int], None] | None:
    """A ``publish_group`` ``after_rename`` hook that dies after the K-th rename (``STREAMTOTAL_FAIL_AFTER_RENAMES``),
    or None when the variable is unset."""
    fail_after = _int_env(FAIL_AFTER_RENAMES_ENV)
    if fail_after is None:
        return None

    def hook(renames_done: int) -> None:
        if renames_done == fail_after:
            raise InjectedFailure(f"injected failure after {renames_done} renames of a publication "
                                  f"({FAIL_AFTER_RENAMES_ENV})")

    return hook
