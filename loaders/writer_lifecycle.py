"""The lifecycle shared by the writers that stage a whole store and put it in place at the end
(``ZarrStoreWriter``, ``SomaExperimentWriter``).

A writer is ``open`` while it takes blocks, then ``closed`` (its output is in place) or ``aborted`` (its
temporaries are gone and the target is as it was). ``close`` runs the writer's own finishing steps and, if any of
them fails, aborts before re-raising, so nothing half-written stays behind; a closed writer releases the lock on its
temporary directory and removes the temporaries that killed earlier writes of the same target left
(``stale_temporaries``). Used as a context manager it closes on a clean exit and aborts on an exception.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loaders.stale_temporaries import release_writer_lock, remove_stale_temporaries


class StagedWriter:
    """Base of the writers that build a store under a temporary name and publish it at ``close``.

    Subclasses set ``self._lock`` (from ``hold_writer_lock``, or None) once they hold a temporary directory, and
    implement ``_finish`` (write the last parts and move the store into place), ``_discard`` (delete the
    temporaries) and ``description``. Their public ``close`` calls ``_close`` and returns what it returns.
    """

    _state: str = "open"
    _lock: int | None = None

    @property
    def description(self) -> str:
        """The writer's class and target, for messages (e.g. ``"ZarrStoreWriter for out.zarr"``)."""
        raise NotImplementedError

    def _finish(self, **kwargs: Any) -> Path | None:
        """Writes what is left and moves the output into place.

        Returns:
            The local target whose stale temporaries to remove, or None (object storage, an append in place).
        """
        raise NotImplementedError

    def _discard(self) -> None:
        """Deletes the temporaries (called at most once per ``abort``, never after a successful close)."""
        raise NotImplementedError

    def _close(self, **kwargs: Any) -> None:
        """Runs ``_finish(**kwargs)``; aborts and re-raises if it fails, else marks the writer closed.

        Raises:
            RuntimeError: the writer is already closed or aborted.
        """
        self._check_open()
        try:
            target = self._finish(**kwargs)
        except BaseException:
            self.abort()
            raise
        self._state = "closed"
        release_writer_lock(self._lock)
        self._lock = None
        if target is not None:
            remove_stale_temporaries(target)  # of killed earlier writes of this target

    def abort(self) -> None:
        """Deletes the temporaries; the target is left as it was. Nothing after a successful ``close``."""
        if self._state == "closed":
            return
        self._discard()
        release_writer_lock(self._lock)
        self._lock = None
        self._state = "aborted"

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif self._state == "open":
            self.close()

    def close(self) -> Any:
        """Finishes the output and puts it in place (subclasses document what they take and return)."""
        raise NotImplementedError

    def _check_open(self) -> None:
        if self._state != "open":
            raise RuntimeError(f"{self.description} is {self._state}")
