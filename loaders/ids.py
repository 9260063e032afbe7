"""Validation of cell-id arrays handed to reads (shared by Sources and the Collection)."""

from __future__ import annotations

import numpy as np

from loaders.errors import InvalidIdsError


def check_ids(ids: np.ndarray, n_obs: int, owner: str) -> np.ndarray:
    """Checks that ``ids`` are sorted, unique integers in ``[0, n_obs)``.

    Args:
        ids: the ids asked for.
        n_obs: number of cells of the source.
        owner: who is read, for the message (e.g. ``"study 'pbmc'"`` or ``"collection"``).

    Returns:
        ``ids`` as a 1-D int64 array.

    Raises:
        InvalidIdsError: the ids are not integers, not 1-D, not strictly increasing or out of range.
    """
    arr = np.asarray(ids)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise InvalidIdsError(f"{owner}: ids must be a 1-D integer array; got {arr.dtype} {arr.shape}")
    arr = arr.astype(np.int64, copy=False)
    if arr.size > 1 and not (np.diff(arr) > 0).all():
        raise InvalidIdsError(f"{owner}: ids must be sorted and unique (sort with np.unique first)")
    if arr.size and (arr[0] < 0 or arr[-1] >= n_obs):
        raise InvalidIdsError(f"{owner}: ids must lie in [0, {n_obs}); got {arr[0]}..{arr[-1]}")
    return arr
