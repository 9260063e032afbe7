"""``Collection``: several Sources (studies, backends) seen as one, aligned by name onto one registry.

Global cell id = offset of the source + local id. Genes and proteins are matched by name, never by position;
a protein a study did not measure is zero-filled and masked, never passed off as a true zero.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Sequence

import numpy as np
import scipy.sparse as sp

from loaders.aligned_rows import AlignedRows
from loaders.alignment import ABSENT_GENES, GENE_JOINS, check_overlap, index_map, reference_genes, union_in_order
from loaders.citebatch import CiteBatch
from loaders.count_validation import all_valid_counts
from loaders.covariates import batch_codes, label_codes
from loaders.errors import AlignmentError, AlignmentWarning, ConfigError, InvalidCountsError, StoreFormatError
from loaders.ids import check_ids
from loaders.registry import Registry
from loaders.source import Source

if TYPE_CHECKING:
    import pandas as pd


def _names(source: Source, attr: str) -> np.ndarray:
    names = np.asarray(getattr(source, attr)).astype(str)
    uniq, counts = np.unique(names, return_counts=True)
    if (counts > 1).any():
        raise AlignmentError(
            f"study {source.name!r}: {attr} must be unique to align by name; duplicated: "
            f"{uniq[counts > 1][:10].tolist()}"
        )
    return names


class Collection:
    """Several Sources as one, aligned onto one reference gene list, protein list and set of categories.

    Per-cell batch, label and panel codes are held in memory (int32, 12 bytes per cell); counts are read on
    demand with ``read`` / ``read_aligned``.

    Attributes:
        sources: the studies, in order.
        n_obs: total number of cells.
        offsets: ``[n_sources + 1] int64``; study ``s`` owns global ids ``offsets[s]:offsets[s+1]``.
        registry: genes, proteins, categories and study panels the data is aligned to.
        provenance: where the sources came from (see ``__init__``); ``{}`` when not given.
        batch_codes: ``[n_obs] int32`` batch code per cell (read-only).
        label_codes: ``[n_obs] int32`` label code per cell, -1 = unlabeled (read-only).
        study_gene_masks: ``[n_sources, G] bool``, which reference genes each study measured (read-only).
        absent_genes: ``"mask"`` or ``"zero"``, how unmeasured genes are read (see ``__init__``).
    """

    def __init__(
        self,
        sources: Sequence[Source],
        *,
        batch_key: str | None = None,
        labels_key: str | None = None,
        unlabeled_category: str | None = "unlabeled",
        gene_join: str = "inner",
        min_gene_overlap: float = 0.5,
        registry: Registry | None = None,
        allow_new_batches: bool = False,
        provenance: dict | None = None,
        absent_genes: str = "mask",
    ) -> None:
        """Aligns the sources.

        Args:
            sources: one or more Sources with unique names.
            batch_key: obs column of the batch covariate; None: one batch per study. With ``registry``,
                None means the registry's ``batch_key`` (the model's covariate must mean the same thing).
            labels_key: obs column of cell labels; None: every cell unlabeled (also with ``registry``, as
                queries are usually unlabelled).
            unlabeled_category: label value meaning "no label" (code -1).
            gene_join: ``"inner"`` (intersection, first study's order) or ``"outer"`` (union, zero-filled);
                ignored with ``registry``, whose genes are the reference.
            min_gene_overlap: a study sharing a smaller fraction of the reference genes is refused (how the
                fraction is measured for each join: ``alignment.reference_genes``).
            registry: align onto a trained model's registry instead of building one (query / inference):
                missing genes are zero-filled, extra genes dropped; missing proteins masked, extra ones
                dropped with an ``AlignmentWarning``.
            allow_new_batches: with ``registry``, append unseen batch values after its categories
                (reference mapping) instead of refusing them.
            provenance: JSON-safe record of where the sources came from (e.g. LaminDB collection and
                artifact uids); goes into the new registry's ``extra``. With ``registry``, the model's
                ``extra`` is kept and this is only available as ``self.provenance``.
            absent_genes: ``"mask"`` (default): reference genes a study did not measure (outer join, or a query
                lacking registry genes) are zero-filled and flagged in ``CiteBatch.rna_mask``, so models treat
                them as unmeasured; ``"zero"``: they read as measured zeros (``alignment.ABSENT_GENES``).

        Raises:
            ConfigError: an argument is out of range.
            StoreFormatError: a source is inconsistent (panel shapes, missing obs column).
            AlignmentError: duplicate names, too little gene overlap, no proteins, unknown batch/label values.
        """
        sources = tuple(sources)
        self._check_args(sources, gene_join, min_gene_overlap)
        if absent_genes not in ABSENT_GENES:
            raise ConfigError(f"absent_genes must be one of {ABSENT_GENES}; got {absent_genes!r}")
        self.absent_genes = absent_genes
        self.provenance = dict(provenance or {})
        self.sources = sources
        counts = np.array([int(s.n_obs) for s in sources], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.n_obs = int(self.offsets[-1])
        gene_lists = [_names(s, "gene_names") for s in sources]
        protein_lists = [_names(s, "protein_names") for s in sources]

        if registry is None:
            genes = reference_genes([(s.name, g) for s, g in zip(sources, gene_lists)], gene_join, min_gene_overlap)
            proteins = union_in_order(protein_lists)
            if proteins.size == 0:
                raise AlignmentError(
                    f"no study has protein counts (studies {[s.name for s in sources]}); totalVI needs proteins"
                )
        else:
            genes = np.asarray(registry.gene_names, dtype=str)
            proteins = np.asarray(registry.protein_names, dtype=str)
        self._gene_maps = [index_map(g, genes) for g in gene_lists]
        if registry is not None:
            for source, gmap in zip(sources, self._gene_maps):
                check_overlap(source.name, int((gmap >= 0).sum()), len(genes), "the registry's genes", min_gene_overlap)
        # Identity maps skip the column remap on every read (the common single-study case).
        self._gene_identity = [
            len(m) == len(genes) and bool((m == np.arange(len(genes))).all()) for m in self._gene_maps
        ]
        self._gene_all_kept = [bool((m >= 0).all()) for m in self._gene_maps]
        self.study_gene_masks = self._gene_presence(len(genes))
        # Only carried when some study lacks a gene: fully measured data keeps rna_mask None (no cost, fast paths).
        self._gene_mask_table = (
            self.study_gene_masks if absent_genes == "mask" and not self.study_gene_masks.all() else None
        )
        self._protein_maps = [index_map(p, proteins) for p in protein_lists]
        if registry is not None:
            self._warn_protein_mismatch(protein_lists, proteins)
        self._panel_table, self._panel_codes, study_masks = self._build_panels(proteins)

        self._set_covariates(batch_key, labels_key, unlabeled_category, registry, allow_new_batches)
        self.registry = self._build_registry(genes, proteins, study_masks, registry, unlabeled_category)

    # ---------------------------------------------------------------- construction helpers

    @staticmethod
    def _check_args(sources: tuple, gene_join: str, min_gene_overlap: float) -> None:
        if not sources:
            raise ConfigError("a Collection needs at least one Source")
        for s in sources:
            if not isinstance(s, Source):
                raise ConfigError(f"{s!r} is not a Source (needs name, n_obs, gene_names, ... and read())")
        names = [s.name for s in sources]
        if len(set(names)) != len(names):
            raise AlignmentError(f"study names must be unique (they become covariates); got {names}")
        if gene_join not in GENE_JOINS:
            raise ConfigError(f"gene_join must be one of {GENE_JOINS}; got {gene_join!r}")
        if not 0.0 <= float(min_gene_overlap) <= 1.0:
            raise ConfigError(f"min_gene_overlap must be a fraction in [0, 1]; got {min_gene_overlap}")

    def _gene_presence(self, n_genes: int) -> np.ndarray:
        """``[n_sources, G] bool``: which reference genes each study measured."""
        presence = np.zeros((len(self.sources), n_genes), dtype=bool)
        for s, gmap in enumerate(self._gene_maps):
            presence[s, gmap[gmap >= 0]] = True
        presence.flags.writeable = False
        return presence

    def _warn_protein_mismatch(self, protein_lists: list[np.ndarray], proteins: np.ndarray) -> None:
        for source, names, pmap in zip(self.sources, protein_lists, self._protein_maps):
            extra = names[pmap < 0]
            if extra.size:
                warnings.warn(
                    f"study {source.name!r}: dropping {extra.size} proteins not in the registry: "
                    f"{extra[:20].tolist()}", AlignmentWarning, stacklevel=3,
                )
            missing = proteins.size - int((pmap >= 0).sum())
            if missing == proteins.size and proteins.size:
                warnings.warn(
                    f"study {source.name!r} measured none of the registry's {proteins.size} proteins; "
                    "all are masked for its cells", AlignmentWarning, stacklevel=3,
                )

    def _build_panels(self, proteins: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every source's panels mapped to reference order, stacked; per-cell global panel codes."""
        tables, codes, study_masks = [], [], []
        n_before = 0
        for source, pmap in zip(self.sources, self._protein_maps):
            panels = np.asarray(source.protein_panels, dtype=bool)
            if panels.ndim != 2 or panels.shape[1] != pmap.size or panels.shape[0] == 0:
                raise StoreFormatError(
                    f"study {source.name!r}: protein_panels must be [n_panels >= 1, {pmap.size} proteins]; "
                    f"got {panels.shape}"
                )
            local = np.asarray(source.protein_panel_codes())
            if local.shape != (source.n_obs,) or (local.size and (local.min() < 0 or local.max() >= len(panels))):
                raise StoreFormatError(
                    f"study {source.name!r}: protein_panel_codes must be [{source.n_obs}] ints in "
                    f"[0, {len(panels)}); got shape {local.shape}"
                )
            keep = pmap >= 0
            table = np.zeros((len(panels), proteins.size), dtype=bool)
            table[:, pmap[keep]] = panels[:, keep]
            tables.append(table)
            codes.append(local.astype(np.int32) + n_before)
            study_masks.append(table.any(axis=0))
            n_before += len(panels)
        return np.concatenate(tables), np.concatenate(codes), np.stack(study_masks)

    def _set_covariates(self, batch_key, labels_key, unlabeled, registry, allow_new) -> None:
        if registry is not None and batch_key is None:
            batch_key = registry.batch_key
        # Prefix as the registry did, so a training study read again maps onto its own categories.
        prefix = batch_key is not None and (
            len(self.sources) > 1 or (registry is not None and registry.batch_prefixed)
        )
        known = registry.batch_categories if registry is not None else None
        codes, self._batch_categories = batch_codes(self.sources, batch_key, prefix, known, allow_new)
        if registry is None and labels_key is not None:
            self._check_some_study_has(labels_key)
        labels, self._label_categories = label_codes(
            self.sources, labels_key, unlabeled, registry.label_categories if registry is not None else None
        )
        codes.flags.writeable = False
        labels.flags.writeable = False
        self.batch_codes, self.label_codes = codes, labels
        self._batch_key, self._labels_key, self._prefixed = batch_key, labels_key, prefix

    def _check_some_study_has(self, labels_key: str) -> None:
        # One study without the labels column is a semi-supervised mix (a warning, in label_codes); none with it
        # is a misspelt key, which would otherwise train with every cell unlabeled.
        if any(labels_key in s.obs_columns for s in self.sources):
            return
        columns = sorted({str(c) for s in self.sources for c in s.obs_columns})
        raise StoreFormatError(
            f"labels key {labels_key!r}: no study has this obs column (studies {[s.name for s in self.sources]}); "
            f"their columns are {columns[:30]}"
        )

    def _build_registry(self, genes, proteins, study_masks, registry, unlabeled) -> Registry:
        names = [s.name for s in self.sources]
        if registry is not None:
            # Keep the model's studies (and their masks); add query studies it has not seen.
            old = list(registry.study_names)
            new = [i for i, n in enumerate(names) if n not in old]
            return Registry(
                gene_names=registry.gene_names,
                protein_names=registry.protein_names,
                batch_categories=self._batch_categories,
                label_categories=registry.label_categories,
                unlabeled_category=registry.unlabeled_category,
                study_names=old + [names[i] for i in new],
                study_protein_masks=np.concatenate([registry.study_protein_masks, study_masks[new]]),
                batch_key=registry.batch_key,
                labels_key=registry.labels_key,
                batch_prefixed=registry.batch_prefixed,
                extra=dict(registry.extra),
            )
        return Registry(
            gene_names=genes,
            protein_names=proteins,
            batch_categories=self._batch_categories,
            label_categories=self._label_categories,
            unlabeled_category=unlabeled,
            study_names=names,
            study_protein_masks=study_masks,
            batch_key=self._batch_key,
            labels_key=self._labels_key,
            batch_prefixed=self._prefixed,
            extra=dict(self.provenance),
        )

    # ---------------------------------------------------------------- per-cell metadata

    def study_codes(self, ids: np.ndarray) -> np.ndarray:
        """Index of the study (source) of each global id.

        Returns:
            ``[len(ids)] int64``.
        """
        return np.searchsorted(self.offsets, np.asarray(ids, dtype=np.int64), side="right") - 1

    def protein_mask(self, ids: np.ndarray) -> np.ndarray:
        """``[len(ids), T] bool``: which reference proteins were measured for each cell (no I/O)."""
        return self._panel_table[self._panel_codes[np.asarray(ids, dtype=np.int64)]]

    def obs_frame(self) -> "pd.DataFrame":
        """Every cell's obs columns as one DataFrame, in global id order (for exports and selection by name).

        Columns are the union over studies (a study without a column gets empty values) plus ``study``; text
        columns become categoricals. Columns whose name starts with ``_`` (internal, e.g. ``_study``) are left
        out. The index is the cells' names (``Source.obs_names``); when they are not unique across the studies,
        every name becomes ``"<study>:<name>"``.

        Returns:
            A ``[n_obs, ...]`` pandas DataFrame.
        """
        import pandas as pd

        frames = []
        for source in self.sources:
            columns = {c: source.obs_column(c) for c in source.obs_columns if not c.startswith("_")}
            frame = pd.DataFrame(columns, index=pd.Index(np.asarray(source.obs_names()).astype(str)))
            frame["study"] = source.name
            frames.append(frame)
        obs = pd.concat(frames)
        for column in obs.columns:
            if obs[column].dtype == object:
                obs[column] = obs[column].fillna("").astype(str).astype("category")
        if not obs.index.is_unique:
            obs.index = [f"{study}:{name}" for study, name in zip(obs["study"], obs.index)]
        return obs

    # ---------------------------------------------------------------- reads

    def read(self, ids: np.ndarray) -> CiteBatch:
        """Reads cells as a dense, aligned CiteBatch.

        Args:
            ids: sorted unique global ids.

        Returns:
            The batch, rows in the order of ``ids``; ``cell_id`` equals ``ids``.

        Raises:
            InvalidIdsError: ids not sorted, unique or in range.
            InvalidCountsError: a source returned NaN, infinite or negative counts (names study, cell, column).
            StoreFormatError: a source returned rows of the wrong shape.
        """
        return self.read_aligned(ids).to_citebatch()

    def read_aligned(self, ids: np.ndarray) -> AlignedRows:
        """Like ``read`` but keeps RNA sparse (CSR in reference gene order) and everything in numpy.

        One ``Source.read`` per study touched; the column remap is vectorised over all non-zeros.
        """
        ids = check_ids(ids, self.n_obs, "collection")
        bounds = np.searchsorted(ids, self.offsets)
        rna_parts, protein_parts = [], []
        for s, source in enumerate(self.sources):
            lo, hi = int(bounds[s]), int(bounds[s + 1])
            if lo == hi:
                continue
            rows = source.read(ids[lo:hi] - self.offsets[s])
            rna, protein = self._align(s, rows, ids[lo:hi])
            rna_parts.append(rna)
            protein_parts.append(protein)
        n_genes, n_proteins = self.registry.n_genes, self.registry.n_proteins
        if not rna_parts:
            rna = sp.csr_matrix((0, n_genes), dtype=np.float32)
            protein = np.zeros((0, n_proteins), dtype=np.float32)
        else:
            rna = rna_parts[0] if len(rna_parts) == 1 else sp.vstack(rna_parts, format="csr")
            protein = protein_parts[0] if len(protein_parts) == 1 else np.concatenate(protein_parts)
        mask = self.protein_mask(ids)
        protein[~mask] = 0.0  # a panel that did not measure a protein contributes no value, whatever is stored
        return AlignedRows(
            rna=rna, protein=protein, protein_mask=mask,
            batch=self.batch_codes[ids].astype(np.int64), label=self.label_codes[ids].astype(np.int64),
            cell_id=ids.copy(),
            gene_mask_table=self._gene_mask_table,
            gene_mask_codes=None if self._gene_mask_table is None else self.study_codes(ids).astype(np.int32),
        )

    def _align(self, s: int, rows, gids: np.ndarray) -> tuple[sp.csr_matrix, np.ndarray]:
        source, n = self.sources[s], len(gids)
        gmap, pmap = self._gene_maps[s], self._protein_maps[s]
        rna = sp.csr_matrix(rows.rna)  # also accepts csr_array or dense; shares CSR buffers (no copy)
        protein = np.asarray(rows.protein)
        if rna.shape != (n, gmap.size) or protein.shape != (n, pmap.size):
            raise StoreFormatError(
                f"study {source.name!r}: read of {n} cells returned RNA {rna.shape} and protein {protein.shape}; "
                f"expected ({n}, {gmap.size}) and ({n}, {pmap.size})"
            )
        self._check_counts(source, rna, protein, gids, int(self.offsets[s]))
        if self._gene_identity[s]:
            rna = rna.astype(np.float32, copy=False)
        elif self._gene_all_kept[s]:
            # Same entries, new column numbers: no row structure changes (the query/outer-join common case).
            rna = sp.csr_matrix(
                (rna.data.astype(np.float32, copy=False), gmap[rna.indices], rna.indptr),
                shape=(n, self.registry.n_genes),
            )
        else:
            cols = gmap[rna.indices]
            keep = cols >= 0
            # Kept entries per row, without a Python loop: cumulative kept count evaluated at the old indptr.
            kept_before = np.concatenate([[0], np.cumsum(keep, dtype=np.int64)])
            rna = sp.csr_matrix(
                (rna.data[keep].astype(np.float32, copy=False), cols[keep], kept_before[rna.indptr]),
                shape=(n, self.registry.n_genes),
            )
        out = np.zeros((n, self.registry.n_proteins), dtype=np.float32)
        keep = pmap >= 0
        out[:, pmap[keep]] = protein[:, keep]
        return rna, out

    @staticmethod
    def _check_counts(source: Source, rna: sp.csr_matrix, protein: np.ndarray, gids: np.ndarray, offset: int) -> None:
        """Refuses NaN, infinite or negative counts, naming study, cell and column (NaN losses start here)."""
        for what, values in (("RNA", rna.data), ("protein", protein.reshape(-1))):
            # Reductions first (one min of int32 counts, ~15x cheaper than elementwise masks on a training read);
            # the mask only to name the offender.
            if all_valid_counts(values):
                continue
            with np.errstate(invalid="ignore"):
                ok = (values >= 0) & (values < np.inf)
            i = int(np.flatnonzero(~ok)[0])
            if what == "RNA":
                row = int(np.searchsorted(rna.indptr, i, side="right") - 1)
                column = str(source.gene_names[rna.indices[i]])
            else:
                row, col = divmod(i, protein.shape[1])
                column = str(source.protein_names[col])
            raise InvalidCountsError(
                f"study {source.name!r}: {what} count {float(values[i])} of cell {int(gids[row])} (local id "
                f"{int(gids[row]) - offset}), column {column!r} is NaN, "
                "infinite or negative. Fix the store or drop the cell."
            )
