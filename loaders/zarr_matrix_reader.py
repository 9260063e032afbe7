"""Reads rows of one zarr matrix (CSR group, dense array or dataframe) for a ``ZarrSource``.

Remote (and other non-direct) arrays go through zarr's async API: ``requests`` hands back one coroutine per
underlying array so that a Source gathers every array of every modality in one event-loop round trip, and their
latencies overlap. Local zarr v2 arrays are decoded by ``LocalChunkReader`` without the event loop
(``direct_reads``, one call per array, which the source spreads over its thread and one helper): on a busy machine
the event loop's hand-offs cost more than they overlap.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine

import numpy as np
import scipy.sparse as sp
import zarr

from loaders.anndata_layout import MatrixElement
from loaders.row_runs import gather_csr_rows, gather_dense_rows
from loaders.thread_priority import lower_current_thread_priority
from loaders.zarr_chunk_reader import LocalChunkReader


class _ArrayRanges:
    """Reads row ranges of one zarr array, directly from local chunk files when it can."""

    def __init__(self, array: zarr.Array, direct: bool) -> None:
        self._local = LocalChunkReader.for_array(array) if direct else None
        self._async = array.async_array
        self._ndim = len(array.shape)
        self.direct = self._local is not None

    def read_direct(self, starts: np.ndarray, stops: np.ndarray) -> list[np.ndarray]:
        return self._local.read_ranges(starts, stops)

    def _read_lowered(self, starts: np.ndarray, stops: np.ndarray) -> list[np.ndarray]:
        # In a worker thread of zarr's loop: decode on idle cycles. Only here: ``read_direct`` runs in the thread
        # that asks, which may be the training thread itself (inline reads, validation), never to be lowered.
        lower_current_thread_priority()
        return self.read_direct(starts, stops)

    async def ranges(self, starts: np.ndarray, stops: np.ndarray) -> list[np.ndarray]:
        if self._local is not None:
            return await asyncio.to_thread(self._read_lowered, starts, stops)
        tail = (slice(None),) * (self._ndim - 1)
        parts = await asyncio.gather(
            *(self._async.getitem((slice(int(a), int(b)), *tail)) for a, b in zip(starts, stops))
        )
        return [np.asarray(p) for p in parts]


class ZarrMatrixReader:
    """Row reader of one matrix element of a zarr store."""

    def __init__(self, elem: MatrixElement, *, direct: bool = True) -> None:
        """Args:
            elem: the element, resolved by ``anndata_layout.resolve_layout`` on a zarr group.
            direct: decode local zarr v2 chunks directly (False: always use zarr's reads).
        """
        self.kind = elem.kind
        self.shape = elem.shape
        node = elem.node
        if elem.kind == "csr":
            # indptr in memory: 8 bytes a cell, and every read needs it to locate rows.
            self.indptr = np.asarray(node["indptr"][...], dtype=np.int64)
            self._arrays = [_ArrayRanges(node["data"], direct), _ArrayRanges(node["indices"], direct)]
            mean_nnz = self.indptr[-1] / max(self.shape[0], 1)
            self.chunk_cells = max(1, int(node["data"].chunks[0] / max(mean_nnz, 1e-9)))
            self.bytes_per_cell = mean_nnz * (node["data"].dtype.itemsize + node["indices"].dtype.itemsize)
        elif elem.kind == "dense":
            self._arrays = [_ArrayRanges(node, direct)]
            self.chunk_cells = int(node.chunks[0])
            self.bytes_per_cell = float(node.dtype.itemsize * (node.shape[1] if len(node.shape) > 1 else 1))
        else:
            self._arrays = [_ArrayRanges(node[c], direct) for c in elem.columns]
            self.chunk_cells = int(node[elem.columns[0]].chunks[0]) if elem.columns else 1
            self.bytes_per_cell = float(sum(node[c].dtype.itemsize for c in elem.columns))
        self.chunk_bytes = self.chunk_cells * self.bytes_per_cell
        """Decoded bytes of one chunk (of every underlying array together): a read holds whole chunks."""

    @property
    def n_arrays(self) -> int:
        """Underlying arrays, i.e. entries of what ``requests`` / ``direct_reads`` give."""
        return len(self._arrays)

    @property
    def direct(self) -> bool:
        """True when every array is read from local chunk files directly."""
        return all(a.direct for a in self._arrays)

    def requests(self, starts: np.ndarray, stops: np.ndarray) -> list[Coroutine]:
        """Returns one coroutine per underlying array, each giving the parts for the ranges
        ``starts[i]:stops[i]`` (CSR: in entries, located through indptr; else in rows)."""
        starts, stops = self._array_ranges(starts, stops)
        return [a.ranges(starts, stops) for a in self._arrays]

    def direct_reads(self, starts: np.ndarray, stops: np.ndarray) -> list[Callable[[], list[np.ndarray]]]:
        """What ``requests`` gives, as one call per array that reads it without zarr's event loop (only when
        ``direct``): for local chunk files its hand-offs cost more than they overlap on a busy machine (~0.3 ms a
        training batch). The caller runs them (``split_reads.run_split`` spreads them over two threads)."""
        starts, stops = self._array_ranges(starts, stops)
        return [functools.partial(a.read_direct, starts, stops) for a in self._arrays]

    def _array_ranges(self, starts: np.ndarray, stops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Row ranges as ranges of the underlying arrays: entries (through indptr) for CSR, else the rows."""
        if self.kind == "csr":
            return self.indptr[starts], self.indptr[stops]
        return starts, stops

    def assemble_csr(self, results: list, ids, starts, stops) -> sp.csr_matrix:
        """Returns the ``ids`` rows as float32 CSR from the results of ``requests``."""
        if self.kind == "csr":
            return gather_csr_rows(results[0], results[1], self.indptr, ids, starts, stops, self.shape[1])
        return sp.csr_matrix(self.assemble_dense(results, ids, starts, stops))

    def assemble_dense(self, results: list, ids, starts, stops) -> np.ndarray:
        """Returns the ``ids`` rows as a float32 ``[n, n_cols]`` array from the results of ``requests``."""
        if self.kind == "csr":
            return self.assemble_csr(results, ids, starts, stops).toarray()
        if self.kind == "dense":
            parts = results[0]
        elif results:
            parts = [np.stack([col[i] for col in results], axis=1) for i in range(len(starts))]
        else:
            parts = [np.zeros((int(b - a), 0), np.float32) for a, b in zip(starts, stops)]
        return gather_dense_rows(parts, ids, starts, stops).astype(np.float32, copy=False)
