"""Reading back the per-cell results written into a Zarr store (``obsm`` matrices, ``obs`` columns).

``loaders.obsm_writer`` and ``loaders.obs_writer`` write results into an AnnData-layout store; this module is
their reading side, so the inference layer reads what it wrote (a resumed write-back's earlier chunks, a
reference latent, the means of a written score) without opening the store's format itself. The store is opened
fresh on each call, without its consolidated metadata, so an element published a moment ago is seen.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import zarr

from loaders.errors import StoreFormatError


def _element(store: str | os.PathLike, parent: str, name: str, what: str) -> Any:
    """The zarr array or group ``<store>/<parent>/<name>``.

    Raises:
        StoreFormatError: the store or the element does not exist.
    """
    try:
        root = zarr.open_group(os.fspath(store), mode="r", use_consolidated=False)
    except (FileNotFoundError, KeyError, ValueError, TypeError) as err:
        raise StoreFormatError(f"{store} is not a Zarr store (looking for {parent}/{name}): {err}") from err
    group = root.get(parent)
    element = group.get(name) if isinstance(group, zarr.Group) else None
    if element is None:
        raise StoreFormatError(f"store {store} has no {parent}/{name} ({what})")
    return element


def obsm_shape(store: str | os.PathLike, key: str) -> tuple[int, ...] | None:
    """The shape of ``<store>/obsm/<key>``, or None when the store has no such matrix (or is not a Zarr store)."""
    try:
        element = _element(store, "obsm", key, "an obsm matrix")
    except StoreFormatError:
        return None
    return tuple(element.shape) if isinstance(element, zarr.Array) else None


def has_obsm(store: str | os.PathLike, key: str) -> bool:
    """Whether ``<store>/obsm/<key>`` is a matrix (dense array) that ``read_obsm`` can read."""
    return obsm_shape(store, key) is not None


def read_obsm(store: str | os.PathLike, key: str, rows: np.ndarray | None = None) -> np.ndarray:
    """Reads ``<store>/obsm/<key>``, all of it or the rows ``rows``.

    Args:
        store: a local AnnData-layout Zarr store.
        key: the obsm key.
        rows: int row indexes (any order) to read; None reads every row.

    Returns:
        The matrix (``[n_obs, ...]``, or ``[len(rows), ...]``) in its stored dtype.

    Raises:
        StoreFormatError: the store has no such dense matrix.
    """
    element = _element(store, "obsm", key, "an obsm matrix")
    if not isinstance(element, zarr.Array):
        raise StoreFormatError(f"store {store}: obsm/{key} is not a dense matrix (a sparse or DataFrame entry)")
    if rows is None:
        return element[:]
    rows = np.asarray(rows, dtype=np.int64)
    return element.get_orthogonal_selection((rows,) + (slice(None),) * (element.ndim - 1))


def read_obs_column(store: str | os.PathLike, name: str) -> np.ndarray:
    """Reads the obs column ``name`` for every cell: numeric values, or the labels of a categorical column.

    Raises:
        StoreFormatError: the store has no such column.
    """
    from anndata.io import read_elem

    element = _element(store, "obs", name, "an obs column")
    if isinstance(element, zarr.Array):
        return element[:]
    return np.asarray(read_elem(element), dtype=object)


def read_obs_codes(store: str | os.PathLike, name: str) -> np.ndarray:
    """Reads the category codes (int64, -1 = missing) of the categorical obs column ``name``.

    Raises:
        StoreFormatError: the store has no such categorical column.
    """
    element = _element(store, "obs", name, "a categorical obs column")
    if not isinstance(element, zarr.Group) or "codes" not in element:
        raise StoreFormatError(f"store {store}: obs/{name} is not a categorical column (no codes)")
    return np.asarray(element["codes"][:], dtype=np.int64)
