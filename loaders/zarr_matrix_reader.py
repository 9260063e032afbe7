"""Reads rows of one zarr matrix (CSR group, dense array or dataframe) for a ``ZarrSource``.

Every array is read through ``requests``, which hands back one coroutine per underlying array so that a Source
gathers every array of every modality in one event-loop round trip, and their latencies overlap. Zarr v2 arrays on
object storage are read by ``RemoteChunkReader``: each coroutine fetches every chunk its ranges touch at once (many
requests in flight, bounded by one semaphore per read) and decodes them in a worker thread while the other arrays'
chunks are still arriving. Other non-local arrays (zarr format 3, in-memory stores) go through zarr's async API.
Local zarr v2 arrays are decoded by ``LocalChunkReader`` without the event loop (``direct_reads``, one call per
array, which the source spreads over its thread and one helper): on a busy machine the event loop's hand-offs cost
more than they overlap.

Nothing read is silently wrong: a CSR matrix's indptr is checked when it is opened and the column indices of every
read before they are used (``csr_checks``); a chunk file of its data, indices or indptr that is absent is an error
on both paths (zarr's rule "absent = fill value" would read a lost file as zeros: these chunks always exist, see
``store_writer``); a chunk that cannot be decoded is an error naming it. Dense and dataframe arrays keep zarr's
rule: a protein chunk of a batch that did not measure those proteins holds only zeros and is legitimately not
written.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine

import numpy as np
import scipy.sparse as sp
import zarr
from zarr.storage import StorePath, WrapperStore

from loaders.anndata_layout import MatrixElement
from loaders.csr_checks import check_index_parts, check_indptr, check_part_lengths
from loaders.errors import StoreFormatError
from loaders.remote_chunk_reader import FETCH_CONCURRENCY, RemoteChunkReader
from loaders.row_runs import gather_csr_rows, gather_dense_rows
from loaders.thread_priority import lower_current_thread_priority
from loaders.zarr_chunk_reader import LocalChunkReader, blosc_chunk_problem


class _CheckedChunks(WrapperStore):
    """A store that checks the chunks zarr reads through it: a Blosc chunk cut short is an error (Blosc itself reads
    past its end), and so is an absent chunk where ``must_exist`` (instead of zarr's fill value). Used only to read
    chunks of arrays whose metadata is already loaded, so every key asked for is a chunk key."""

    def __init__(self, store, *, must_exist: bool, blosc: bool, where: str) -> None:
        super().__init__(store)
        self._must_exist, self._blosc, self._where = must_exist, blosc, where

    def _with_store(self, store):
        return type(self)(store, must_exist=self._must_exist, blosc=self._blosc, where=self._where)

    async def get(self, key, prototype, byte_range=None):
        value = await self._store.get(key, prototype, byte_range)
        if value is None:
            if self._must_exist:
                raise StoreFormatError(
                    f"{self._where}: chunk {key!r} is missing. Chunks of a CSR matrix are always written, so the "
                    "store is incomplete (an interrupted copy or sync, or a deleted file): copy the store again (or "
                    "re-run ingest)."
                )
            return value
        problem = blosc_chunk_problem(value.as_numpy_array()) if self._blosc and byte_range is None else None
        if problem is not None:
            raise StoreFormatError(
                f"{self._where}: chunk {key!r} {problem}: the chunk file is truncated or corrupt. Copy the store "
                "again (or re-run ingest)."
            )
        return value


def _checked(array: zarr.Array, *, must_exist: bool, where: str) -> zarr.Array:
    """``array`` read through a ``_CheckedChunks`` store."""
    meta = array.metadata
    blosc = meta.zarr_format == 2 and getattr(meta.compressor, "codec_id", None) == "blosc" and not meta.filters
    store = _CheckedChunks(array.store, must_exist=must_exist, blosc=blosc, where=where)
    return zarr.Array(zarr.AsyncArray(metadata=meta, store_path=StorePath(store, array.path),
                                      config=array.async_array.config))


class _ArrayRanges:
    """Reads row ranges of one zarr array, directly from local chunk files or concurrently fetched chunk objects
    when it can."""

    def __init__(self, array: zarr.Array, direct: bool, *, chunks_must_exist: bool, where: str) -> None:
        absent = "error" if chunks_must_exist else "fill"
        self._local = LocalChunkReader.for_array(array, absent_chunks=absent, where=where) if direct else None
        self._remote = (RemoteChunkReader.for_array(array, absent_chunks=absent, where=where)
                        if direct and self._local is None else None)
        self._async = _checked(array, must_exist=chunks_must_exist, where=where).async_array
        self._ndim = len(array.shape)
        self._rows_per_chunk = int(array.chunks[0])
        self._where = where
        self._path = array.path
        self.direct = self._local is not None
        self.remote = self._remote is not None

    def read_direct(self, starts: np.ndarray, stops: np.ndarray) -> list[np.ndarray]:
        return self._local.read_ranges(starts, stops)

    def _read_lowered(self, starts: np.ndarray, stops: np.ndarray) -> list[np.ndarray]:
        # In a worker thread of zarr's loop: decode on idle cycles. Only here: ``read_direct`` runs in the thread
        # that asks, which may be the training thread itself (inline reads, validation), never to be lowered.
        lower_current_thread_priority()
        return self.read_direct(starts, stops)

    def _decode_lowered(self, fetched: dict, starts: np.ndarray, stops: np.ndarray) -> list[np.ndarray]:
        lower_current_thread_priority()  # a worker thread of zarr's loop, as in ``_read_lowered``
        return self._remote.decode_ranges(fetched, starts, stops)

    async def ranges(self, starts: np.ndarray, stops: np.ndarray,
                     limit: asyncio.Semaphore | None = None) -> list[np.ndarray]:
        if self._local is not None:
            return await asyncio.to_thread(self._read_lowered, starts, stops)
        if self._remote is not None:
            fetched = await self._remote.fetch(self._remote.chunk_indices(starts, stops),
                                               limit or asyncio.Semaphore(FETCH_CONCURRENCY))
            # Decoded off the loop, so the loop keeps the other arrays' requests going meanwhile.
            return await asyncio.to_thread(self._decode_lowered, fetched, starts, stops)
        parts = await asyncio.gather(*(self._range(int(a), int(b)) for a, b in zip(starts, stops)))
        return [np.asarray(p) for p in parts]

    async def _range(self, a: int, b: int):
        tail = (slice(None),) * (self._ndim - 1)
        try:
            return await self._async.getitem((slice(a, b), *tail))
        except StoreFormatError:
            raise
        except Exception as err:  # a codec's error (RuntimeError, ValueError, ...) on a truncated or corrupt chunk
            c = self._rows_per_chunk
            chunks = f"{a // c}" if a // c == max(a, b - 1) // c else f"{a // c}..{max(a, b - 1) // c}"
            raise StoreFormatError(
                f"{self._where}: chunk {chunks} of {self._path!r} cannot be read ({type(err).__name__}: {err}); the "
                "chunk file is truncated or corrupt: copy the store again (or re-run ingest)."
            ) from err


class ZarrMatrixReader:
    """Row reader of one matrix element of a zarr store."""

    def __init__(self, elem: MatrixElement, *, where: str, direct: bool = True) -> None:
        """Args:
            elem: the element, resolved by ``anndata_layout.resolve_layout`` on a zarr group.
            where: the store, for messages (``"study 'x' (x.zarr)"``).
            direct: decode zarr v2 chunks directly, from local files or concurrently fetched objects on an async
                fsspec filesystem (False: always use zarr's reads).

        Raises:
            StoreFormatError: a CSR matrix whose indptr is corrupt or has an absent chunk (naming store and array).
        """
        self.kind = elem.kind
        self.shape = elem.shape
        self._where = where
        node = elem.node
        if elem.kind == "csr":
            self._path = elem.path
            self._indices_where = f"{where}: {elem.path}/indices"
            self.indptr = self._checked_indptr(node, elem.path)
            self._arrays = [_ArrayRanges(node[k], direct, chunks_must_exist=True, where=where)
                            for k in ("data", "indices")]
            mean_nnz = self.indptr[-1] / max(self.shape[0], 1)
            self.chunk_cells = max(1, int(node["data"].chunks[0] / max(mean_nnz, 1e-9)))
            self.bytes_per_cell = mean_nnz * (node["data"].dtype.itemsize + node["indices"].dtype.itemsize)
        elif elem.kind == "dense":
            self._arrays = [_ArrayRanges(node, direct, chunks_must_exist=False, where=where)]
            self.chunk_cells = int(node.chunks[0])
            self.bytes_per_cell = float(node.dtype.itemsize * (node.shape[1] if len(node.shape) > 1 else 1))
        else:
            self._arrays = [_ArrayRanges(node[c], direct, chunks_must_exist=False, where=where)
                            for c in elem.columns]
            self.chunk_cells = int(node[elem.columns[0]].chunks[0]) if elem.columns else 1
            self.bytes_per_cell = float(sum(node[c].dtype.itemsize for c in elem.columns))
        self.chunk_bytes = self.chunk_cells * self.bytes_per_cell
        """Decoded bytes of one chunk (of every underlying array together): a read holds whole chunks."""

    def _checked_indptr(self, node, path: str) -> np.ndarray:
        """The whole indptr (8 bytes a cell, and every read needs it to locate rows), read with absent chunks
        refused and checked against the shape and the data and indices arrays."""
        try:
            indptr = np.asarray(_checked(node["indptr"], must_exist=True, where=self._where)[...], dtype=np.int64)
        except StoreFormatError:
            raise
        except Exception as err:  # a codec's error on a truncated or corrupt chunk
            raise StoreFormatError(
                f"{self._where}: {path}/indptr cannot be read ({type(err).__name__}: {err}); a chunk file is "
                "truncated or corrupt: copy the store again (or re-run ingest)."
            ) from err
        n_data, n_indices = int(node["data"].shape[0]), int(node["indices"].shape[0])
        if n_data != n_indices:
            raise StoreFormatError(
                f"{self._where}: {path}/data holds {n_data} entries but {path}/indices {n_indices}; they must match "
                "(the store is corrupt)."
            )
        check_indptr(indptr, n_rows=self.shape[0], nnz=n_data, where=f"{self._where}: {path}/indptr")
        return indptr

    @property
    def n_arrays(self) -> int:
        """Underlying arrays, i.e. entries of what ``requests`` / ``direct_reads`` give."""
        return len(self._arrays)

    @property
    def direct(self) -> bool:
        """True when every array is read from local chunk files directly."""
        return all(a.direct for a in self._arrays)

    @property
    def remote(self) -> bool:
        """True when every array is read as concurrently fetched chunk objects (``RemoteChunkReader``)."""
        return all(a.remote for a in self._arrays)

    def requests(self, starts: np.ndarray, stops: np.ndarray,
                 limit: asyncio.Semaphore | None = None) -> list[Coroutine]:
        """Returns one coroutine per underlying array, each giving the parts for the ranges
        ``starts[i]:stops[i]`` (CSR: in entries, located through indptr; else in rows).

        Args:
            limit: bounds the chunk requests in flight of every coroutine together (remote arrays; default one
                semaphore of ``FETCH_CONCURRENCY`` per array).
        """
        starts, stops = self._array_ranges(starts, stops)
        return [a.ranges(starts, stops, limit) for a in self._arrays]

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
            lo, hi = self.indptr[starts], self.indptr[stops]
            for parts, name in zip(results, ("data", "indices")):
                check_part_lengths(parts, lo, hi, where=f"{self._where}: {self._path}/{name}")
            check_index_parts(results[1], lo, self.indptr, n_cols=self.shape[1], where=self._indices_where)
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
