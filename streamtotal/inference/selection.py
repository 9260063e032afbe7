"""Turning names a user asks for (genes, proteins, batches, cells) into the model's indexes, with clear errors."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from loaders.registry import Registry
from streamtotal.errors import SelectionError


def _as_list(requested: str | Sequence[str]) -> list[str]:
    return [requested] if isinstance(requested, str) else [str(r) for r in requested]


def feature_indices(requested: str | Sequence[str] | None, names: Sequence[str], what: str) -> np.ndarray | None:
    """Indexes of ``requested`` names in ``names``, in the requested order.

    Args:
        requested: names, or None for every feature.
        names: the model's feature names (registry order).
        what: "gene" or "protein" (for messages).

    Returns:
        ``int64`` indexes, or None when ``requested`` is None.

    Raises:
        SelectionError: a name is unknown or repeated, or the list is empty.
    """
    if requested is None:
        return None
    wanted = _as_list(requested)
    if not wanted:
        raise SelectionError(f"the {what} list is empty; pass None (no --{what}s flag) for all {what}s")
    position = {name: i for i, name in enumerate(names)}
    unknown = [name for name in wanted if name not in position]
    if unknown:
        raise SelectionError(
            f"{len(unknown)} requested {what}(s) are not among the model's {len(names)} {what}s: {unknown[:10]}"
            f"{' ...' if len(unknown) > 10 else ''}; names are matched exactly (case-sensitive) against the "
            f"run's registry.json"
        )
    if len(set(wanted)) != len(wanted):
        repeated = sorted({name for name in wanted if wanted.count(name) > 1})
        raise SelectionError(f"{what}s requested more than once: {repeated[:10]}")
    return np.array([position[name] for name in wanted], dtype=np.int64)


def batch_codes(requested: str | Sequence[str] | None, registry: Registry) -> list[int] | None:
    """Codes of batch names for ``transform_batch``.

    Args:
        requested: a batch name, a list of names, or None (each cell's own batch).
        registry: the model's registry.

    Returns:
        The codes, or None.

    Raises:
        SelectionError: an unknown name, or an empty list.
    """
    if requested is None:
        return None
    wanted = _as_list(requested)
    if not wanted:
        raise SelectionError("transform_batch is an empty list; pass None to decode with each cell's own batch")
    categories = list(registry.batch_categories)
    unknown = [name for name in wanted if name not in categories]
    if unknown:
        raise SelectionError(
            f"transform_batch {unknown} not among the model's batches {categories[:20]}"
            f"{' ...' if len(categories) > 20 else ''} (several studies: batches are named 'study/value')"
        )
    return [categories.index(name) for name in wanted]


def cell_ids(requested: Sequence[int] | np.ndarray | None, n_obs: int) -> np.ndarray:
    """Validated global cell ids (every cell when None), in the requested order.

    Raises:
        SelectionError: ids not integers, out of ``[0, n_obs)``, repeated, or none.
    """
    if requested is None:
        return np.arange(n_obs, dtype=np.int64)
    ids = np.asarray(requested)
    if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise SelectionError(f"cell_ids must be a non-empty 1-D integer array; got {ids.dtype} {ids.shape}")
    ids = ids.astype(np.int64)
    if ids.min() < 0 or ids.max() >= n_obs:
        raise SelectionError(f"cell_ids must lie in [0, {n_obs}); got {int(ids.min())}..{int(ids.max())}")
    if np.unique(ids).size != ids.size:
        raise SelectionError("cell_ids contain repeats; pass each cell once")
    return ids
