"""``ArraySource``: a Source over in-memory arrays (an AnnData already loaded, or test data)."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import scipy.sparse as sp

from loaders.errors import InvalidCountsError, StoreFormatError
from loaders.ids import check_ids
from loaders.source import SourceRows


def _unique_names(values: Any, study: str, what: str, expected: int) -> np.ndarray:
    names = np.asarray(values).astype(str)
    if names.ndim != 1 or names.shape[0] != expected:
        raise StoreFormatError(
            f"study {study!r}: {what} has {names.size} entries but the matrix has {expected} columns"
        )
    uniq, counts = np.unique(names, return_counts=True)
    if (counts > 1).any():
        raise StoreFormatError(
            f"study {study!r}: {what} must be unique; duplicated: {uniq[counts > 1][:10].tolist()}. "
            "Make them unique (e.g. anndata's var_names_make_unique) before building the Source."
        )
    return names


def _check_counts(values: np.ndarray, study: str, where: str, locate) -> None:
    """Raises InvalidCountsError for the first NaN, infinite or negative value, located by ``locate(i)``."""
    bad = ~np.isfinite(values) | (values < 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        cell, column = locate(i)
        raise InvalidCountsError(
            f"study {study!r}: {where} count {float(values[i])} at cell {cell}, column {str(column)!r} is NaN, "
            f"infinite or negative ({int(bad.sum())} such values). Counts must be finite and >= 0; fix or drop "
            "those cells."
        )


class ArraySource:
    """A Source over in-memory arrays.

    Counts are validated once at construction (NaN, infinite, negative), so reads are plain slices.

    Attributes:
        name: study name.
        n_obs: number of cells.
        gene_names: ``[n_genes]`` str.
        protein_names: ``[n_proteins]`` str.
        obs_columns: names of the obs columns.
        protein_panels: ``[n_panels, n_proteins] bool``.
        location: always None (the data are in memory, not in a store).
    """

    location: str | None = None

    def __init__(
        self,
        name: str,
        rna: Any,
        protein: Any,
        gene_names: Any,
        protein_names: Any,
        obs: Mapping[str, Any] | None = None,
        protein_panels: Any = None,
        protein_panel_codes: Any = None,
        obs_names: Any = None,
    ) -> None:
        """Builds the source and validates shapes, names and counts.

        Args:
            name: study name (non-empty).
            rna: ``[n_obs, n_genes]`` counts, scipy sparse or dense; stored as CSR float32.
            protein: ``[n_obs, n_proteins]`` counts, dense (or a DataFrame); stored as float32.
            gene_names: ``[n_genes]`` unique names.
            protein_names: ``[n_proteins]`` unique names.
            obs: per-cell columns, each of length ``n_obs``.
            protein_panels: ``[n_panels, n_proteins] bool``; default one all-True panel.
            protein_panel_codes: ``[n_obs]`` panel index per cell; may be omitted with a single panel.
            obs_names: ``[n_obs]`` cell names (an AnnData's obs index); default the positions as str.

        Raises:
            StoreFormatError: a shape, length or name is inconsistent.
            InvalidCountsError: a count is NaN, infinite or negative.
        """
        if not isinstance(name, str) or not name:
            raise StoreFormatError(f"a Source needs a non-empty str name; got {name!r}")
        self.name = name
        matrix = sp.csr_matrix(rna, dtype=np.float32) if not sp.issparse(rna) else rna.tocsr().astype(np.float32)
        if not matrix.has_canonical_format:
            matrix.sum_duplicates()
        self._rna = matrix
        self.n_obs = int(matrix.shape[0])
        prot = np.asarray(protein.to_numpy() if hasattr(protein, "to_numpy") else protein, dtype=np.float32)
        if prot.ndim != 2 or prot.shape[0] != self.n_obs:
            raise StoreFormatError(
                f"study {name!r}: protein must be [n_obs={self.n_obs}, n_proteins]; got shape {prot.shape}"
            )
        self._protein = np.ascontiguousarray(prot)
        self.gene_names = _unique_names(gene_names, name, "gene_names", matrix.shape[1])
        self.protein_names = _unique_names(protein_names, name, "protein_names", prot.shape[1])

        self._obs = {}
        for key, column in (obs or {}).items():
            values = np.asarray(column.to_numpy() if hasattr(column, "to_numpy") else column)
            if values.shape != (self.n_obs,):
                raise StoreFormatError(
                    f"study {name!r}: obs column {key!r} has shape {values.shape}; expected ({self.n_obs},)"
                )
            self._obs[str(key)] = values
        self.obs_columns = list(self._obs)
        names = np.arange(self.n_obs).astype(str) if obs_names is None else np.asarray(obs_names).astype(str)
        if names.shape != (self.n_obs,):
            raise StoreFormatError(f"study {name!r}: obs_names has shape {names.shape}; expected ({self.n_obs},)")
        self._obs_names = names

        self.protein_panels, self._panel_codes = self._check_panels(protein_panels, protein_panel_codes)

        indptr = matrix.indptr
        _check_counts(
            matrix.data, name, "RNA",
            lambda i: (int(np.searchsorted(indptr, i, side="right") - 1), self.gene_names[matrix.indices[i]]),
        )
        n_prot = max(prot.shape[1], 1)
        _check_counts(prot.ravel(), name, "protein", lambda i: (i // n_prot, self.protein_names[i % n_prot]))

    def _check_panels(self, panels: Any, codes: Any) -> tuple[np.ndarray, np.ndarray]:
        n_prot = self._protein.shape[1]
        if panels is None:
            if codes is not None:
                raise StoreFormatError(f"study {self.name!r}: protein_panel_codes given without protein_panels")
            return np.ones((1, n_prot), dtype=bool), np.zeros(self.n_obs, dtype=np.int32)
        panels = np.asarray(panels, dtype=bool)
        if panels.ndim != 2 or panels.shape[1] != n_prot or panels.shape[0] == 0:
            raise StoreFormatError(
                f"study {self.name!r}: protein_panels must be [n_panels >= 1, n_proteins={n_prot}] bool; "
                f"got shape {panels.shape}"
            )
        if codes is None:
            if panels.shape[0] != 1:
                raise StoreFormatError(
                    f"study {self.name!r}: {panels.shape[0]} protein panels need protein_panel_codes (one per cell)"
                )
            return panels, np.zeros(self.n_obs, dtype=np.int32)
        codes = np.asarray(codes)
        if codes.shape != (self.n_obs,) or not np.issubdtype(codes.dtype, np.integer):
            raise StoreFormatError(
                f"study {self.name!r}: protein_panel_codes must be [n_obs={self.n_obs}] int; "
                f"got {codes.dtype} {codes.shape}"
            )
        if codes.size and (codes.min() < 0 or codes.max() >= panels.shape[0]):
            raise StoreFormatError(
                f"study {self.name!r}: protein_panel_codes must lie in [0, {panels.shape[0]}); "
                f"got {codes.min()}..{codes.max()}"
            )
        return panels, codes.astype(np.int32)

    @classmethod
    def from_anndata(
        cls,
        adata: Any,
        *,
        name: str,
        protein_key: str = "protein_expression",
        layer: str | None = None,
        protein_names_key: str = "protein_names",
        protein_panels: Any = None,
        protein_panel_codes: Any = None,
    ) -> "ArraySource":
        """Builds a source from an in-memory AnnData (scvi-tools layout for proteins).

        Args:
            adata: the AnnData; RNA counts in ``X`` or ``layers[layer]``.
            name: study name.
            protein_key: ``obsm`` key of the protein counts (array or DataFrame).
            layer: layer holding the RNA counts; None for ``X``.
            protein_names_key: ``uns`` key of the protein names when ``obsm[protein_key]`` is an array
                (a DataFrame's columns are used otherwise).
            protein_panels: passed to the constructor.
            protein_panel_codes: passed to the constructor.

        Returns:
            The source; obs holds every column of ``adata.obs``, ``obs_names()`` its index.

        Raises:
            StoreFormatError: the layer, protein key or protein names are missing (the message lists what exists).
            InvalidCountsError: as the constructor.
        """
        if layer is None:
            rna = adata.X
        elif layer in adata.layers:
            rna = adata.layers[layer]
        else:
            raise StoreFormatError(f"study {name!r}: no layer {layer!r}; layers are {list(adata.layers.keys())}")
        if rna is None:
            raise StoreFormatError(f"study {name!r}: adata.X is empty; pass layer= naming the RNA counts")
        if protein_key not in adata.obsm:
            raise StoreFormatError(
                f"study {name!r}: no obsm[{protein_key!r}] with protein counts; obsm keys are "
                f"{list(adata.obsm.keys())}. Pass protein_key=."
            )
        protein = adata.obsm[protein_key]
        if hasattr(protein, "columns"):
            protein_names = np.asarray(protein.columns).astype(str)
        elif protein_names_key in adata.uns:
            protein_names = np.asarray(adata.uns[protein_names_key]).astype(str)
        else:
            raise StoreFormatError(
                f"study {name!r}: obsm[{protein_key!r}] is an array and uns[{protein_names_key!r}] is missing; "
                "store the protein counts as a DataFrame or put their names in uns."
            )
        obs = {str(k): adata.obs[k].to_numpy() for k in adata.obs.columns}
        return cls(
            name, rna, protein, np.asarray(adata.var_names), protein_names, obs=obs,
            protein_panels=protein_panels, protein_panel_codes=protein_panel_codes,
            obs_names=np.asarray(adata.obs_names),
        )

    def obs_names(self) -> np.ndarray:
        """Returns the ``[n_obs]`` cell names (``obs_names`` given to the constructor, else the positions)."""
        return self._obs_names

    def obs_column(self, key: str) -> np.ndarray:
        """Returns one obs column for every cell.

        Raises:
            StoreFormatError: the column does not exist (the message lists those that do).
        """
        if key not in self._obs:
            raise StoreFormatError(f"study {self.name!r}: no obs column {key!r}; columns are {self.obs_columns}")
        return self._obs[key]

    def protein_panel_codes(self) -> np.ndarray:
        """Returns ``[n_obs] int32`` panel index per cell."""
        return self._panel_codes

    def read(self, ids: np.ndarray) -> SourceRows:
        """Reads RNA and protein rows for sorted unique ``ids``.

        Raises:
            InvalidIdsError: ids not sorted, unique, integer or in range.
        """
        ids = check_ids(ids, self.n_obs, f"study {self.name!r}")
        return SourceRows(rna=self._rna[ids], protein=self._protein[ids])
