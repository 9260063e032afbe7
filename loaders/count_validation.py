"""Checks that a block of counts is usable by totalVI: finite, non-negative and (by default) integer.

NaN or odd counts only show up later as a NaN loss with no hint of where they came from (scvi-tools
#873, #1084), so we check every block at ingest and at read and name the study, cell and column.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import scipy.sparse as sp

from loaders.errors import InvalidCountsError

_FEATURE_WORD = {"rna": "gene", "protein": "protein"}


def validate_counts(
    matrix_block: sp.spmatrix | sp.sparray | np.ndarray,
    *,
    study: str,
    modality: str,
    cell_names: Sequence[str] | Callable[[int], str] | None = None,
    feature_names: Sequence[str] | None = None,
    row_offset: int = 0,
    row_ids: np.ndarray | None = None,
    require_integer: bool = True,
    source_path: str | None = None,
) -> None:
    """Raises if any entry of a block of counts is NaN, infinite, negative or (optionally) non-integer.

    The happy path is two or three vectorised reductions over the stored values; the offending entry
    is only located when there is one.

    Args:
        matrix_block: ``[n_rows, n_features]`` CSR/any scipy sparse matrix or dense array.
        study: study name (or file) for the message.
        modality: ``"rna"`` or ``"protein"`` (any other word is used as is).
        cell_names: names of the block's rows (a sequence indexed by row in the block), or a callable
            mapping a global cell index to its name (for reads of scattered ids), or None.
        feature_names: column names of the block.
        row_offset: global index of the block's first row (ignored when ``row_ids`` is given).
        row_ids: global index of every row of the block, for blocks of non-contiguous cells.
        require_integer: also refuse non-integer values.
        source_path: file or URL of the data, named in the message when given.

    Raises:
        InvalidCountsError: naming study, file, modality, the first offending cell (name and global
            index), column (feature name), its value, how many entries are bad, and what to do.
    """
    if sp.issparse(matrix_block):
        block = matrix_block if matrix_block.format == "csr" else sp.csr_matrix(matrix_block)
        values = np.asarray(block.data)
    else:
        block = np.asarray(matrix_block)
        values = block
    if all_valid_counts(values, require_integer):
        return
    bad = _bad_mask(values, require_integer)
    first = int(np.flatnonzero(bad.ravel())[0])
    if sp.issparse(block):
        row = int(np.searchsorted(block.indptr, first, side="right") - 1)
        col = int(block.indices[first])
        value = float(block.data[first])
    else:
        row, col = divmod(first, block.shape[1]) if block.ndim == 2 else (first, 0)
        value = float(block.reshape(-1)[first])
    global_row = int(row_ids[row]) if row_ids is not None else row_offset + row
    raise InvalidCountsError(
        _message(
            study=study,
            modality=modality,
            source_path=source_path,
            cell=_cell_label(cell_names, row, global_row),
            feature=_feature_label(feature_names, col, modality),
            value=value,
            n_bad=int(bad.sum()),
        )
    )


def validate_rows(rows, *, study: str, gene_names, protein_names, row_ids, cell_names, source_path=None) -> None:
    """Checks both modalities of rows read from a store (finite, non-negative; integers are not required at read
    time, the store's ingest decided that).

    Args:
        rows: a ``SourceRows``.
        study: study name, for the message.
        gene_names, protein_names: column names of the two modalities.
        row_ids: the store's cell ids of the rows.
        cell_names: callable ``index -> name`` or array of cell names.
        source_path: the store, for the message.

    Raises:
        InvalidCountsError: naming the study, the modality, the cell and the column.
    """
    for block, modality, names in ((rows.rna, "rna", gene_names), (rows.protein, "protein", protein_names)):
        validate_counts(block, study=study, modality=modality, cell_names=cell_names, feature_names=names,
                        row_ids=row_ids, require_integer=False, source_path=source_path)


def all_valid_counts(values: np.ndarray, require_integer: bool = False) -> bool:
    """Whether every value is a finite, non-negative count (and an integer, with ``require_integer``): one or two
    reductions, no temporaries; use ``_bad_mask`` to locate the offenders when it is False."""
    if values.size == 0 or values.dtype.kind in "ub":
        return True
    if values.dtype.kind == "i":  # integers are finite; signed ones can still be negative
        return bool(values.min() >= 0)
    if values.dtype.kind != "f":
        values = values.astype(np.float64)
    lo, hi = values.min(), values.max()
    # min/max propagate NaN, so one comparison pair catches NaN, -inf, +inf and negatives.
    if not (lo >= 0 and hi < np.inf):
        return False
    if require_integer and values.dtype.kind == "f":
        return bool(np.array_equal(values, np.trunc(values)))
    return True


def _bad_mask(values: np.ndarray, require_integer: bool) -> np.ndarray:
    if values.dtype.kind in "uib":
        return values < 0
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(values) | (values < 0)
        if require_integer:
            bad |= values != np.trunc(values)
    return bad


def _cell_label(cell_names, row: int, global_row: int) -> str:
    name = None
    if callable(cell_names):
        name = cell_names(global_row)
    elif cell_names is not None and row < len(cell_names):
        name = cell_names[row]
    return f"cell {str(name)!r} (index {global_row})" if name is not None else f"cell index {global_row}"


def _feature_label(feature_names, col: int, modality: str) -> str:
    word = _FEATURE_WORD.get(modality, "column")
    if feature_names is not None and col < len(feature_names):
        return f"{word} {str(feature_names[col])!r} (column {col})"
    return f"{word} column {col}"


def _message(*, study, modality, source_path, cell, feature, value, n_bad) -> str:
    where = f"study {study!r}" + (f" ({source_path})" if source_path and source_path != study else "")
    what = modality.upper() if modality == "rna" else modality
    if np.isnan(value):
        kind, advice = "NaN", (
            "totalVI needs raw counts: ingest the raw count matrix (e.g. rna_layer='counts' or the raw "
            "protein matrix), or drop these cells before ingest."
        )
    elif np.isinf(value):
        kind, advice = "infinite", "totalVI needs raw counts: ingest the raw count matrix instead."
    elif value < 0:
        kind, advice = "negative", (
            "negative values mean normalised, scaled or background-subtracted data: ingest the raw "
            "counts instead (e.g. rna_layer='counts', or the protein counts before DSB/CLR)."
        )
    else:
        kind, advice = "not an integer", (
            "if these are ambient-corrected counts (SoupX, CellBender), pass allow_non_integer=True "
            "(CLI: --allow-non-integer); if they are normalised values, ingest the raw counts instead."
        )
    more = f"; {n_bad} entries of this block are invalid" if n_bad > 1 else ""
    return (
        f"{where}: {what} count {value!r} at {cell}, {feature} is {kind}{more}. {advice}"
    )
