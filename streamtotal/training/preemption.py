"""Graceful stops: SIGTERM (schedulers, spot reclaim, torchrun's agent) and SIGUSR1 (SLURM's warning before the
time limit) make the trainer checkpoint at the next step boundary and exit, so the requeued job loses nothing.

The handler only sets a flag; the training loop polls it between steps (a signal handler must not write a
checkpoint mid-step). Under DDP the ranks may see the signal at different steps, so the loop agrees on the flag
with an all-reduce before acting (see ``Trainer``).
"""

from __future__ import annotations

import signal
import threading

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionFlag:
    """Set when a stop signal arrives; ``install()`` registers the handlers (main thread only)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        """True once a stop signal was received."""
        return self.signum is not None

    def install(self) -> "PreemptionFlag":
        """Registers the handlers; a no-op outside the main thread (where Python cannot install them)."""
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        """Restores the handlers that were there before ``install``."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        self.signum = signum


class Preempted(SystemExit):
    """Raised after the checkpoint of a graceful stop; exits with 128 + the signal number, as a killed process."""

    def __init__(self, signum: int, step: int) -> None:
        super().__init__(128 + signum)
        self.signum, self.step = signum, step
