"""Per-cell batch and label codes of several studies, from their obs columns (optionally onto a registry).

Columns are factorised (hash-based, O(n)) and only their distinct values are turned into str and matched,
so millions of cells cost one pass, not a sort of millions of strings.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import pandas as pd

from loaders.alignment import PREFIX_SEP, as_str, index_map
from loaders.errors import AlignmentError, AlignmentWarning, StoreFormatError
from loaders.source import Source


def _column(source: Source, key: str) -> np.ndarray:
    if key not in source.obs_columns:
        raise StoreFormatError(
            f"study {source.name!r}: no obs column {key!r}; columns are {list(source.obs_columns)}. "
            "Pass the right key, or add the column to every study."
        )
    values = np.asarray(source.obs_column(key))
    if values.shape != (source.n_obs,):
        raise StoreFormatError(
            f"study {source.name!r}: obs column {key!r} has shape {values.shape}; expected ({source.n_obs},)"
        )
    return values


def _drop(codes: np.ndarray, values: np.ndarray, drop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Removes ``values[drop]``; their cells get code -1 (a trailing -1 entry keeps -1 at -1)."""
    remap = np.append(np.where(drop, -1, np.cumsum(~drop) - 1), -1)
    return remap[codes], values[~drop]


def factorize(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct values (as str) and each cell's index into them; -1 for missing (None, NaN, "").

    Returns:
        ``(codes [n] int64, uniques [k] str)`` with unique ``uniques``.
    """
    codes, uniques = pd.factorize(np.asarray(values), use_na_sentinel=True)
    # Different raw values can print alike (1 and "1"): merge them.
    merged, inverse = np.unique(as_str(np.asarray(uniques)), return_inverse=True)
    codes = np.append(inverse.reshape(-1), -1)[codes]
    return _drop(codes, merged, merged == "")


def batch_codes(
    sources: Sequence[Source],
    batch_key: str | None,
    prefix: bool,
    known: Sequence[str] | None,
    allow_new: bool,
) -> tuple[np.ndarray, list[str]]:
    """Batch code per cell and the full category list.

    Without ``known``: categories in study order, sorted within a study. With ``known`` (a registry's):
    those keep their codes; a value not among them is an error unless ``allow_new``, then it is appended
    (study order, sorted within a study).

    Args:
        sources: the studies.
        batch_key: obs column; None makes each study one batch named after the study.
        prefix: prefix values with ``"<study>/"`` so equal values of different studies stay apart.
        known: a registry's categories, or None.
        allow_new: with ``known``, append unseen values instead of refusing them.

    Returns:
        ``([n_total] int32 codes, categories)``.

    Raises:
        StoreFormatError: a study lacks the column.
        AlignmentError: a batch value is missing (names study and first cell), or unknown to the registry.
    """
    categories = list(known or [])
    index = {c: i for i, c in enumerate(categories)}
    parts = []
    for source in sources:
        if batch_key is None:
            codes, values = np.zeros(source.n_obs, dtype=np.int64), np.asarray([source.name])
        else:
            codes, values = factorize(_column(source, batch_key))
            if (codes < 0).any():
                raise AlignmentError(
                    f"study {source.name!r}: obs column {batch_key!r} is missing at cell "
                    f"{int(np.flatnonzero(codes < 0)[0])} ({int((codes < 0).sum())} cells in all). Every cell "
                    "needs a batch value; fill them in."
                )
            if prefix:
                values = np.asarray([f"{source.name}{PREFIX_SEP}{v}" for v in values.tolist()])
        new = [v for v in values.tolist() if v not in index]
        if new and known is not None and not allow_new:
            raise AlignmentError(
                f"study {source.name!r}: batch values {new[:10]} are not among the registry's "
                f"{len(categories)} batch categories (e.g. {categories[:5]}). A trained model cannot encode "
                "new batches; pass allow_new_batches=True for reference mapping (surgery)."
            )
        for v in new:
            index[v] = len(categories)
            categories.append(v)
        parts.append(np.asarray([index[v] for v in values.tolist()], dtype=np.int32)[codes])
    return np.concatenate(parts), categories


def label_codes(
    sources: Sequence[Source],
    labels_key: str | None,
    unlabeled: str | None,
    known: Sequence[str] | None,
) -> tuple[np.ndarray, list[str]]:
    """Label code per cell (-1 = unlabeled) and the label categories (without the unlabeled one).

    A study without the ``labels_key`` column counts as unlabeled (semi-supervised training mixes labelled
    and unlabelled studies), with an ``AlignmentWarning``. Missing values count as unlabeled.

    Args:
        sources: the studies.
        labels_key: obs column, or None (every cell unlabeled).
        unlabeled: the value meaning "no label", or None.
        known: a registry's label categories, or None to build them (sorted).

    Returns:
        ``([n_total] int32 codes, categories)``.

    Raises:
        AlignmentError: with ``known``, a label is not among them.
    """
    n_total = sum(int(s.n_obs) for s in sources)
    if labels_key is None:
        return np.full(n_total, -1, dtype=np.int32), list(known or [])
    per_study: list[tuple[np.ndarray, np.ndarray] | None] = []
    for source in sources:
        if labels_key not in source.obs_columns:
            warnings.warn(
                f"study {source.name!r} has no obs column {labels_key!r}; its cells are treated as unlabeled",
                AlignmentWarning, stacklevel=4,  # points at the Collection(...) call
            )
            per_study.append(None)
            continue
        codes, values = factorize(_column(source, labels_key))
        if unlabeled is not None:
            codes, values = _drop(codes, values, values == unlabeled)
        per_study.append((codes, values))
    if known is None:
        categories = sorted({v for item in per_study if item is not None for v in item[1].tolist()})
    else:
        categories = list(known)
    parts = []
    for source, item in zip(sources, per_study):
        if item is None:
            parts.append(np.full(source.n_obs, -1, dtype=np.int32))
            continue
        codes, values = item
        lut = index_map(values, categories)
        if (lut < 0).any():
            raise AlignmentError(
                f"study {source.name!r}: labels {values[lut < 0][:10].tolist()} in column {labels_key!r} are not "
                f"among the registry's label categories {categories[:10]}. Map them to the unlabeled category "
                f"{unlabeled!r} or pass labels_key=None."
            )
        parts.append(np.append(lut, -1).astype(np.int32)[codes])
    return np.concatenate(parts), categories
