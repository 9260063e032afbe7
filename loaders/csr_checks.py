"""Structural checks of CSR matrices read from files: a corrupt indptr or indices must be an error, never wrong rows.

A corrupt ``indices`` (e.g. 0xFF bytes read as -1) is silently wrong under numpy fancy indexing (-1 wraps to the last
gene) and writes out of bounds in scipy's ``toarray`` (heap corruption). A corrupt ``indptr`` cuts rows at the wrong
entries. So indptr is checked once when a matrix is opened (it is read whole then anyway), and the indices of every
read are checked before anything indexes with them. The read path is hot: the index check is one reduction over
what was read (the indices viewed as unsigned, so that negative values become huge and one ``max`` checks both
bounds). Sorted indices within a row are not checked: nothing downstream relies on them (scipy's ``toarray`` and
the gene alignment accept any order).
"""

from __future__ import annotations

import numpy as np

from loaders.errors import StoreFormatError
from loaders.row_runs import joined_parts


def check_indptr(indptr: np.ndarray, *, n_rows: int, nnz: int, where: str) -> None:
    """Checks a CSR indptr: ``n_rows + 1`` entries, starting at 0, non-decreasing, ending at ``nnz``.

    Args:
        indptr: the whole indptr, int64.
        n_rows: rows of the matrix (from its recorded shape).
        nnz: entries of its data and indices arrays.
        where: the file or store and the array (``"pbmc.h5ad: X/indptr"``), for messages.

    Raises:
        StoreFormatError: naming ``where``, the first bad row and what was expected.
    """
    if indptr.shape != (n_rows + 1,):
        raise StoreFormatError(
            f"{where}: has {indptr.size} entries for a matrix of {n_rows} rows; expected {n_rows + 1} (the file is "
            "corrupt or not a CSR matrix)."
        )
    if indptr[0] != 0:
        raise StoreFormatError(f"{where}: starts at {int(indptr[0])}, expected 0 (the file is corrupt).")
    steps = np.diff(indptr)
    if steps.size and steps.min() < 0:
        row = int(np.flatnonzero(steps < 0)[0])
        raise StoreFormatError(
            f"{where}: decreases at row {row} ({int(indptr[row])} then {int(indptr[row + 1])}); a CSR indptr never "
            "decreases (the file is corrupt)."
        )
    if indptr[-1] != nnz:
        raise StoreFormatError(
            f"{where}: ends at {int(indptr[-1])} but the matrix's data and indices hold {nnz} entries (the file is "
            "corrupt or truncated)."
        )


def check_index_parts(parts: list[np.ndarray], entry_starts: np.ndarray, indptr: np.ndarray, *, n_cols: int,
                      where: str) -> None:
    """Checks that every column index read lies in ``[0, n_cols)``, before anything indexes with them.

    Args:
        parts: slices of the indices array, as read.
        entry_starts: the entry (position in the whole indices array) at which each part starts.
        indptr: the matrix's whole (checked) indptr, to name the row of a bad entry.
        n_cols: columns of the matrix.
        where: the file or store and the array (``"study 'x' (x.zarr): X/indices"``), for messages.

    Raises:
        StoreFormatError: naming ``where``, the first bad value, its row and entry, and the valid range.
    """
    joined = joined_parts(parts)
    if joined is not None and _highest(joined, where) < n_cols:
        return  # the usual case of a local read: its parts are views of one array, checked in one reduction
    for part, start in zip(parts, entry_starts.tolist()):
        if part.size == 0 or _highest(part, where) < n_cols:
            continue
        bad = int(np.flatnonzero((part < 0) | (part >= n_cols))[0])
        entry = int(start) + bad
        row = int(np.searchsorted(indptr, entry, side="right") - 1)
        raise StoreFormatError(
            f"{where}: column index {int(part[bad])} at row {row} (entry {entry}) is outside [0, {n_cols}) (the file "
            "is corrupt)."
        )


def _highest(indices: np.ndarray, where: str) -> int:
    """The largest index, negative ones counted as above every valid index."""
    if indices.size == 0:
        return -1
    if indices.dtype.kind == "i":
        # Viewed as unsigned, a negative value is above every valid index: one reduction checks both bounds.
        return int(np.ascontiguousarray(indices).view(indices.dtype.str.replace("i", "u")).max())
    if indices.dtype.kind == "u":
        return int(indices.max())
    raise StoreFormatError(f"{where}: has dtype {indices.dtype}; column indices must be integers.")


def check_part_lengths(parts: list[np.ndarray], starts: np.ndarray, stops: np.ndarray, *, where: str) -> None:
    """Checks that a read returned every entry asked for (a short chunk must not shift later rows' entries).

    Args:
        parts: what was read for each range.
        starts, stops: the ranges asked for, in entries.
        where: the file or store and the array, for messages.

    Raises:
        StoreFormatError: naming ``where`` and the first range that came back short.
    """
    got = np.fromiter((len(p) for p in parts), dtype=np.int64, count=len(parts))
    short = np.flatnonzero(got != stops - starts)
    if short.size:
        i = int(short[0])
        raise StoreFormatError(
            f"{where}: entries {int(starts[i])}..{int(stops[i]) - 1} read back as {int(got[i])} values, expected "
            f"{int(stops[i] - starts[i])} (a chunk of the array is truncated)."
        )
