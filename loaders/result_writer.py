"""The lifecycle shared by the writers of per-cell results into a store (``ObsmWriter``, ``ObsColumnWriter``).

A result writer stages its elements under hidden temporary names, is told which rows hold values (written by
it, or by an interrupted earlier job it resumes), and either publishes every element as one group
(``commit``: ``loaders.publish_journal``) or deletes the temporaries (``abort``). Used as a context manager it
commits on a clean exit; on an exception a fresh writer aborts, while a resumable one (``resume=True``) keeps its
temporaries so the same command run again continues where it stopped.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Sequence

import numpy as np

from loaders.errors import StoreFormatError
from loaders.publish_journal import Rename, publish_group


class ResultWriter:
    """Base of the writers that stage per-cell results in a local Zarr store and publish them together.

    Subclasses set up their temporary elements, then call ``ResultWriter.__init__`` and implement
    ``tmp_paths``, ``renames`` and ``description``.

    Args:
        store_path: the local AnnData-layout Zarr store.
        n_obs: rows (cells) of the store.
        resumable: keep the temporaries when a ``with`` block raises (a rerun resumes them).
    """

    obs_columns: Sequence[str] = ()
    """Obs columns that the publication appends to ``obs``'s ``column-order`` (none for obsm results)."""

    def __init__(self, store_path: str | Path, n_obs: int, *, resumable: bool = False) -> None:
        self.store_path = Path(store_path)
        self.n_obs = int(n_obs)
        self._resumable = resumable
        self._written = np.zeros(self.n_obs, dtype=bool)
        self._state = "open"

    @property
    def description(self) -> str:
        """What is written, for messages (e.g. ``"obsm/X_streamtotal"``)."""
        raise NotImplementedError

    def tmp_paths(self) -> list[Path]:
        """Directories of the temporary elements."""
        raise NotImplementedError

    @property
    def renames(self) -> list[Rename]:
        """How the temporary elements are published (for ``publish_journal.publish_group``)."""
        raise NotImplementedError

    def mark_written(self, start: int, stop: int) -> None:
        """Records rows ``[start, stop)`` as written by an earlier (interrupted) job."""
        self._written[start:stop] = True

    def _write_runs(self, array, ids: np.ndarray, values: np.ndarray) -> None:
        """Writes ``values[i]`` into row ``ids[i]`` of ``array`` (ids sorted), one slice per contiguous run."""
        breaks = np.flatnonzero(np.diff(ids) != 1) + 1
        for run_ids, run_values in zip(np.split(ids, breaks), np.split(values, breaks)):
            if len(run_ids):
                array[int(run_ids[0]): int(run_ids[-1]) + 1] = run_values
        self._written[ids] = True

    def check_complete(self) -> None:
        """Raises unless every row was written (by this writer or recorded with ``mark_written``).

        Raises:
            StoreFormatError: some rows were never written.
        """
        missing = np.flatnonzero(~self._written)
        if len(missing):
            raise StoreFormatError(
                f"refusing to publish {self.description} in {self.store_path}: {len(missing)} of {self.n_obs} rows "
                f"were never written (first: cell {int(missing[0])})"
            )

    def commit(self) -> None:
        """Publishes the temporary elements together (renames, obs ``column-order``, consolidated metadata).

        Raises:
            StoreFormatError: some rows were never written (the temporary elements are kept for inspection),
                or the writer was aborted.
        """
        if self._state == "aborted":
            raise StoreFormatError(f"{self.description} in {self.store_path} was aborted; nothing to publish")
        self.check_complete()
        publish_group(self.store_path, self.renames, obs_columns=self.obs_columns)
        self._state = "committed"

    def abort(self) -> None:
        """Deletes the temporary elements; the store's published results are left as they were."""
        if self._state == "open":
            for path in self.tmp_paths():
                shutil.rmtree(path, ignore_errors=True)
            self._state = "aborted"

    def __enter__(self) -> "ResultWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            if not self._resumable:
                self.abort()
        elif self._state == "open":
            self.commit()
