"""Pure helpers that align studies by name: reference gene/protein lists, column maps, category codes.

Kept apart from ``collection.py`` so the rules (and their error messages) can be read and tested on their own.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from loaders.errors import AlignmentError

GENE_JOINS = ("inner", "outer")
ABSENT_GENES = ("mask", "zero")
"""How reference genes a study did not measure are read: ``"mask"``: zero-filled and flagged in
``CiteBatch.rna_mask``, so models treat them as unmeasured; ``"zero"``: zero-filled as if measured zeros (the
behaviour before masking, and scvi-tools')."""
PREFIX_SEP = "/"
"""Separator between study name and batch value in prefixed batch categories (``"study/batch"``)."""


def index_map(names: np.ndarray, reference: Sequence[str] | np.ndarray) -> np.ndarray:
    """Maps each name to its index in ``reference`` (unique), or -1 when absent.

    Args:
        names: names to look up.
        reference: the reference list.

    Returns:
        ``[len(names)] int64``.
    """
    return pd.Index(np.asarray(reference, dtype=str)).get_indexer(np.asarray(names, dtype=str)).astype(np.int64)


def union_in_order(name_lists: Iterable[np.ndarray]) -> np.ndarray:
    """Union of several name lists, in order of first appearance (first list's order, then new names)."""
    merged = dict.fromkeys(str(n) for names in name_lists for n in names)
    return np.asarray(list(merged), dtype=str)


def check_overlap(study: str, n_shared: int, n_basis: int, basis: str, min_overlap: float) -> None:
    """Refuses a study that shares no genes, or fewer than ``min_overlap`` of ``n_basis``.

    Raises:
        AlignmentError: naming the study, the shared count and the fraction.
    """
    fraction = n_shared / n_basis if n_basis else 0.0
    if n_shared == 0:
        raise AlignmentError(
            f"study {study!r} shares no genes with {basis} (0 of {n_basis}). Check that every study uses the "
            "same kind of gene identifier (symbols vs Ensembl ids) and the same organism."
        )
    if fraction < min_overlap:
        raise AlignmentError(
            f"study {study!r} shares {n_shared} of {n_basis} genes with {basis} ({fraction:.1%}), below "
            f"min_gene_overlap={min_overlap:.1%}. Drop the study, harmonise gene names, or lower min_gene_overlap."
        )


def reference_genes(studies: Sequence[tuple[str, np.ndarray]], join: str, min_overlap: float) -> np.ndarray:
    """Builds the reference gene list of several studies and refuses studies that overlap too little.

    ``inner``: the intersection, in the first study's order. Each further study is checked by the fraction of
    the first study's genes still in the intersection once it joins, so the study that shrinks the
    intersection below ``min_overlap`` is the one named. ``outer``: the union in order of first appearance;
    each study is checked twice against ``min_overlap``: by the fraction of the union it measures (the rest is
    zero-filled for it), and by how many of its genes the other studies measure too (the overlap coefficient of
    ``_check_outer_sharing``), so a study that shares no gene is refused even when it is half of the union.

    Args:
        studies: ``(name, gene_names)`` per study, in collection order.
        join: ``"inner"`` or ``"outer"``.
        min_overlap: minimum fraction, in ``[0, 1]``.

    Returns:
        The reference gene names.

    Raises:
        AlignmentError: a study shares no genes, or too few.
    """
    first_name, ref = studies[0]
    ref = np.asarray(ref, dtype=str)
    if ref.size == 0:
        raise AlignmentError(f"study {first_name!r} has no genes")
    if join == "outer":
        ref = union_in_order(genes for _, genes in studies)
        for name, genes in studies:
            check_overlap(name, len(genes), len(ref), "the union of all studies' genes", min_overlap)
        _check_outer_sharing(studies, min_overlap)
        return ref
    n_anchor = len(ref)
    for name, genes in studies[1:]:
        ref = ref[np.isin(ref, np.asarray(genes, dtype=str))]
        check_overlap(
            name, len(ref), n_anchor,
            f"the genes of the first study {first_name!r} (kept by the studies before it)", min_overlap,
        )
    return ref


def _check_outer_sharing(studies: Sequence[tuple[str, np.ndarray]], min_overlap: float) -> None:
    """Refuses, in an outer join, a study that shares too few genes with the other studies.

    Measuring much of the union is not enough: two studies with disjoint gene lists of equal size each measure
    half of it, and nothing in the data links them. Each study is measured by the overlap coefficient with the
    union of the other studies' genes: the genes in both, over the smaller of the two lists. So a targeted panel
    inside a whole-transcriptome study counts as fully shared (how little of the union it measures is what the
    union check is for), and a study that shares nothing is refused whatever its size.
    """
    if len(studies) < 2:
        return
    names, n_studies = np.unique(np.concatenate([np.asarray(g, dtype=str) for _, g in studies]), return_counts=True)
    n_union = len(names)
    # The first study last: of two studies that share nothing, the one joining the first is named (as in inner).
    for name, genes in [*studies[1:], studies[0]]:
        n_own = len(genes)
        n_shared = int((n_studies[np.searchsorted(names, np.asarray(genes, dtype=str))] > 1).sum())
        n_others = n_union - (n_own - n_shared)  # the union minus the genes only this study measures
        check_overlap(
            name, n_shared, min(n_own, n_others),
            f"the other studies (basis: the smaller of its {n_own} genes and their {n_others})", min_overlap,
        )


def as_str(values: np.ndarray) -> np.ndarray:
    """Obs values as str (numbers become their decimal text, so a numeric batch column works too)."""
    values = np.asarray(values)
    if values.dtype.kind == "f" and np.isfinite(values).all() and np.all(np.mod(values, 1) == 0):
        values = values.astype(np.int64)  # 1.0 -> "1", as the same column stored as int would read
    return values.astype(str)
