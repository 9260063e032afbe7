"""One resumable write-back of per-cell results into a store: every write-back command goes through it.

A write-back cuts the store's cells into fixed **write units** of ``unit_rows`` consecutive cells (unit ``u`` =
rows ``[u * unit_rows, (u + 1) * unit_rows)``). Each new element (an ``obsm`` matrix or an ``obs`` column) is a
hidden temporary array whose row chunks divide ``unit_rows``, so every zarr chunk belongs to exactly one unit
and is written exactly once, whole (never read-modified-written across units, where a crash could tear a
chunk that an earlier unit had completed). After a unit's rows are written, the unit is recorded in each
element's progress ledger (``write_ledger``); only when every unit is done are the elements published, all of
them as one group (``loaders.publish_journal``: a journal written atomically, then the renames, then the
consolidated metadata), so a job killed at any instant leaves either every previous result or every new one,
never a mix. The store's previous results stay in place until the journal is written; a journal left by a
killed job is rolled forward by the next open of the store (``ZarrSource``) or the next write-back.

Rerunning an interrupted write-back with the same fingerprint (the model file's hash, the method and its
options, the cells, the targets, ``unit_rows``) reopens the temporary elements, skips the units in their
ledgers and computes only the rest. A different fingerprint (other options, another model, another batch size)
starts over, so results of two configurations are never mixed.

Randomness is per unit (``cell_stream.block_generator(seed, unit)``), never carried from one unit to the next,
so a resumed result equals an uninterrupted one exactly.

Fault injection for tests: ``STREAMTOTAL_FAIL_AFTER_CHUNKS=K`` makes a write-back raise ``InjectedFailure``
right after its K-th unit of this process was written and recorded, as a job killed there would stop.
``STREAMTOTAL_FAIL_AFTER_RENAMES=K`` makes ``commit`` raise it right after the K-th rename of its publication
(K=0: everything staged, the journal not yet written).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from loaders.errors import StoreFormatError
from loaders.object_store import refuse_url
from loaders.obs_writer import ObsColumnWriter
from loaders.obsm_writer import ObsmWriter
from loaders.publish_journal import publish_group, recover
from loaders.store_layout import StoreLayoutConfig
from streamtotal.errors import ConfigError
from streamtotal.failure_injection import (FAIL_AFTER_CHUNKS_ENV, FAIL_AFTER_RENAMES_ENV, InjectedFailure,
                                           fail_after_units, rename_failure_hook)
from streamtotal.inference import write_ledger

# The hooks live in streamtotal/failure_injection.py; these names stay importable from here for the tests.
FAIL_ENV = FAIL_AFTER_CHUNKS_ENV
FAIL_RENAMES_ENV = FAIL_AFTER_RENAMES_ENV


@dataclass(frozen=True)
class ObsmTarget:
    """A matrix written into ``obsm/<key>``: ``[n_obs, n_columns]`` of ``dtype``, with ``attrs`` on the array."""

    key: str
    n_columns: int
    dtype: str = "float32"
    attrs: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ObsTarget:
    """A column written into ``obs/<name>``: ``spec`` is a dtype (numeric) or the categories (categorical)."""

    name: str
    spec: str | tuple[str, ...]


def aligned_chunk_rows(unit_rows: int, n_columns: int) -> int:
    """Rows per chunk of a ``[n, n_columns]`` result array that divide ``unit_rows``.

    The largest divisor of ``unit_rows`` not above the store layout's usual chunk for that width; when the only
    such divisors are tiny (an awkward ``unit_rows`` such as a prime), one chunk per unit.
    """
    target = StoreLayoutConfig().row_chunk(n_columns)
    if unit_rows <= target:
        return unit_rows
    best = max(d for d in range(1, target + 1) if unit_rows % d == 0)
    return best if best * 4 >= target else unit_rows


class WriteBack:
    """Resumable, chunk-aligned write-back of several per-cell results into one local Zarr store.

    Args:
        store: a local AnnData-layout Zarr store.
        n_obs: cells of the store.
        unit_rows: cells per write unit (typically the batch size: one forward pass per unit).
        description: what produces the values (method, options, model hash, cells...); hashed into the
            fingerprint together with the targets and ``unit_rows``.
        obsm: matrices to write.
        obs: columns to write.
        protected: obs columns that must not be overwritten (the training label and batch columns).

    Raises:
        ConfigError: nothing to write, or a bad ``unit_rows``.
        StoreFormatError: not a local AnnData Zarr store, or a bad target name.
    """

    def __init__(self, store: str | Path, n_obs: int, unit_rows: int, description: dict, *,
                 obsm: Sequence[ObsmTarget] = (), obs: Sequence[ObsTarget] = (),
                 protected: Sequence[str] = ()) -> None:
        if not obsm and not obs:
            raise ConfigError("a write-back needs at least one obsm or obs target")
        if isinstance(unit_rows, bool) or int(unit_rows) < 1:
            raise ConfigError(f"unit_rows (the batch size) must be >= 1; got {unit_rows!r}")
        # Staging, ledgers and the publication journal need renames and locks that object storage lacks.
        refuse_url(store, "results written back into a store (staged, resumable, published together)",
                   "run this on a local copy of the store (aws s3 sync), or export with --export-h5ad")
        self.store, self.n_obs, self.unit_rows = Path(store), int(n_obs), int(unit_rows)
        self.n_units = -(-self.n_obs // self.unit_rows)
        recover(self.store)  # a half-done earlier publication is completed before anything is staged or reused
        targets = {"obsm": [[t.key, t.n_columns, t.dtype] for t in obsm],
                   "obs": [[t.name, t.spec if isinstance(t.spec, str) else list(t.spec)] for t in obs]}
        self.fingerprint = write_ledger.fingerprint({**description, "targets": targets, "n_obs": self.n_obs,
                                                     "unit_rows": self.unit_rows})
        self._obsm = {t.key: ObsmWriter(self.store, t.key, self.n_obs, t.n_columns, t.dtype, resume=True,
                                        chunk_rows=aligned_chunk_rows(self.unit_rows, t.n_columns)) for t in obsm}
        self._obs = None
        if obs:
            self._obs = ObsColumnWriter(self.store, self.n_obs,
                                        {t.name: t.spec if isinstance(t.spec, str) else list(t.spec) for t in obs},
                                        protected=protected, resume=True,
                                        chunk_rows=aligned_chunk_rows(self.unit_rows, 1))
        self._dirs = [w.tmp_path for w in self._obsm.values()] + (self._obs.tmp_paths() if self._obs else [])
        self.done = self._resumable_units()
        for unit in self.done:
            start, stop = self.unit_range(unit)
            for writer in self._writers():
                writer.mark_written(start, stop)
        self.skipped = len(self.done)
        """Units found complete from an interrupted run (not recomputed)."""
        self.computed = 0
        """Units computed and written by this process."""
        for element in self._dirs:
            write_ledger.write_done(element, self.fingerprint, self.unit_rows, self.done)
        for t in obsm:
            if t.attrs:
                write_ledger.update_attrs(self._obsm[t.key].tmp_path, t.attrs)
        self._fail_after = fail_after_units()

    def _writers(self) -> list:
        return list(self._obsm.values()) + ([self._obs] if self._obs else [])

    def _resumable_units(self) -> set[int]:
        """Units every temporary element holds for this fingerprint; empty (start over) if any lacks them."""
        if not all(w.resumed for w in self._writers()):
            return set()
        ledgers = [write_ledger.read_done(d, self.fingerprint, self.unit_rows) for d in self._dirs]
        if any(ledger is None for ledger in ledgers):
            return set()
        # A unit recorded in one element but not another (killed between ledger updates) is recomputed.
        return set.intersection(*ledgers) & set(range(self.n_units))

    def unit_range(self, unit: int) -> tuple[int, int]:
        """Rows ``[start, stop)`` of a write unit."""
        start = int(unit) * self.unit_rows
        return start, min(start + self.unit_rows, self.n_obs)

    def pending_ids(self) -> np.ndarray:
        """Global ids of the cells of every unit not done yet, in store order."""
        pending = [np.arange(*self.unit_range(u), dtype=np.int64) for u in range(self.n_units) if u not in self.done]
        return np.concatenate(pending) if pending else np.zeros(0, dtype=np.int64)

    def write_unit(self, unit: int, obsm: dict[str, np.ndarray] | None = None,
                   obs: dict[str, np.ndarray] | None = None) -> None:
        """Writes every target's rows of one whole unit (values in row order), then records the unit.

        Raises:
            ValueError: values do not cover the unit, or a target is missing (an internal error).
            InjectedFailure: under ``STREAMTOTAL_FAIL_AFTER_CHUNKS``.
        """
        start, stop = self.unit_range(unit)
        rows = np.arange(start, stop, dtype=np.int64)
        obsm, obs = obsm or {}, obs or {}
        if set(obsm) != set(self._obsm) or (self._obs and set(obs) != set(self._obs.names)):
            raise ValueError(f"write_unit needs every target: obsm {sorted(self._obsm)}, obs "
                             f"{self._obs.names if self._obs else []}")
        for key, writer in self._obsm.items():
            if len(obsm[key]) != rows.size:
                raise ValueError(f"unit {unit} has {rows.size} rows; got {len(obsm[key])} for obsm/{key}")
            writer.write_rows(rows, obsm[key])
        if self._obs:
            self._obs.write_rows(rows, obs)
        self.done.add(int(unit))
        for element in self._dirs:
            write_ledger.write_done(element, self.fingerprint, self.unit_rows, self.done)
        self.computed += 1
        if self._fail_after is not None and self.computed >= self._fail_after:
            raise InjectedFailure(f"injected failure after {self.computed} write units ({FAIL_ENV})")

    def commit(self) -> None:
        """Publishes every element as one group (ledgers removed, renamed into place, metadata reconsolidated).

        Raises:
            StoreFormatError: some unit was never written (the temporary elements and ledgers are kept).
            InjectedFailure: under ``STREAMTOTAL_FAIL_AFTER_RENAMES``.
        """
        missing = sorted(set(range(self.n_units)) - self.done)
        if missing:
            raise StoreFormatError(f"refusing to publish into {self.store}: {len(missing)} of {self.n_units} write "
                                   f"units were never written (first: unit {missing[0]}); rerun the same command "
                                   "to finish them")
        for writer in self._writers():
            writer.check_complete()
        renames = [w.rename for w in self._obsm.values()] + (self._obs.renames if self._obs else [])
        # The ledgers are dropped inside the publication (not before it), so a job killed before the journal is
        # written still resumes with every unit done.
        publish_group(self.store, renames, obs_columns=self._obs.names if self._obs else (),
                      drop_attrs=(write_ledger.LEDGER_KEY,), after_rename=rename_failure_hook())

    def discard(self) -> None:
        """Deletes the temporary elements and their ledgers (the store's published results are untouched)."""
        for writer in self._writers():
            writer.abort()
