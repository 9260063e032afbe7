"""Turning sorted cell ids into few contiguous reads, and cutting the requested rows back out of them.

Backends are fastest reading long contiguous ranges: one request per range, and every compressed chunk
decoded once. So a read of sorted ids becomes a few "covers" (contiguous ranges of cells that hold all
the ids, bridging small gaps), and the rows are then gathered from the covers in memory. Pure numpy.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


def coalesce_runs(ids: np.ndarray, max_gap: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Returns ``(starts, stops)`` of contiguous cell ranges covering sorted unique ``ids``.

    Args:
        ids: sorted unique int64 ids.
        max_gap: runs separated by at most this many unrequested cells are merged into one range
            (those cells are read and dropped; cheaper than a second request into the same chunk).

    Returns:
        Two int64 arrays; ``stops`` exclusive.
    """
    if ids.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    breaks = np.flatnonzero(np.diff(ids) > max_gap + 1)
    starts = np.concatenate([ids[:1], ids[breaks + 1]])
    stops = np.concatenate([ids[breaks] + 1, ids[-1:] + 1])
    return starts, stops


def _positions_in_covers(ids, starts, stops, cover_offsets) -> np.ndarray:
    """Index of each id's row within the concatenation of the cover ranges."""
    cover = np.searchsorted(starts, ids, side="right") - 1
    return cover_offsets[cover] + (ids - starts[cover])


def gather_dense_rows(parts: list[np.ndarray], ids, starts, stops) -> np.ndarray:
    """Returns the rows of ``ids`` from dense cover blocks ``parts`` (rows ``starts[i]:stops[i]`` each)."""
    block = _concatenated(parts, copy_single=False)
    if block.shape[0] == ids.size:
        # A single part may be a read-only view of a decoded chunk; callers may write to rows.
        return block if block.flags.writeable else block.copy()
    offsets = np.concatenate([[0], np.cumsum(stops - starts)[:-1]])
    return block[_positions_in_covers(ids, starts, stops, offsets)]


def joined_parts(parts: list[np.ndarray]) -> np.ndarray | None:
    """The array that ``parts`` are consecutive views of, from its start (so their concatenation, without a copy);
    None when they are not (one part, or parts of separate arrays)."""
    if len(parts) < 2:
        return None
    base = parts[0].base
    if (not isinstance(base, np.ndarray) or not base.flags.c_contiguous or base.dtype != parts[0].dtype
            or base.shape[1:] != parts[0].shape[1:]):
        return None
    position = base.ctypes.data
    for p in parts:
        if p.base is not base or p.ctypes.data != position or not p.flags.c_contiguous:
            return None
        position += p.nbytes
    return base[: sum(len(p) for p in parts)]


def _concatenated(parts: list[np.ndarray], *, copy_single: bool = True) -> np.ndarray:
    """The parts as one array: their shared base when they already are consecutive views of one (a local zarr
    read's output), else a concatenation. A single part is copied unless ``copy_single`` is False (it may be a view
    of a decoded chunk that must not be written; a caller that only reads it, or copies it anyway, skips that)."""
    joined = joined_parts(parts)
    if joined is not None:
        return joined
    if len(parts) != 1:
        return np.concatenate(parts)
    return np.array(parts[0]) if copy_single else np.asarray(parts[0])


def gather_csr_rows(
    data_parts: list[np.ndarray],
    index_parts: list[np.ndarray],
    indptr: np.ndarray,
    ids: np.ndarray,
    starts: np.ndarray,
    stops: np.ndarray,
    n_cols: int,
) -> sp.csr_matrix:
    """Returns the CSR rows of ``ids`` from cover slices of a CSR matrix's data and indices.

    Args:
        data_parts: ``data[indptr[starts[i]]:indptr[stops[i]]]`` for each cover.
        index_parts: the same slices of ``indices``.
        indptr: the full ``[n_obs + 1]`` indptr.
        ids, starts, stops: requested ids and cover ranges.
        n_cols: number of columns.
    """
    data, indices = _concatenated(data_parts), _concatenated(index_parts)
    lengths = indptr[ids + 1] - indptr[ids]
    out_indptr = np.zeros(ids.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=out_indptr[1:])
    if out_indptr[-1] != data.size:
        # Gaps were bridged: pick each row's entries out of the covers.
        cover_nnz_offsets = np.concatenate([[0], np.cumsum(indptr[stops] - indptr[starts])[:-1]])
        cover = np.searchsorted(starts, ids, side="right") - 1
        row_starts = cover_nnz_offsets[cover] + indptr[ids] - indptr[starts[cover]]
        take = np.repeat(row_starts - out_indptr[:-1], lengths) + np.arange(out_indptr[-1])
        data, indices = data[take], indices[take]
    if out_indptr[-1] < np.iinfo(np.int32).max:
        out_indptr = out_indptr.astype(np.int32)
    return sp.csr_matrix(
        (data.astype(np.float32, copy=False), indices.astype(np.int32, copy=False), out_indptr),
        shape=(ids.size, n_cols),
    )
