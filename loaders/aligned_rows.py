"""``AlignedRows``: cells already aligned to a registry, still sparse and in numpy.

The Stream holds whole I/O groups in this form (RNA as CSR), and densifies only the minibatch it hands out,
so read-ahead memory scales with the non-zeros, not with cells x genes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import scipy.sparse as sp
import torch

from loaders.citebatch import CiteBatch


@dataclass
class AlignedRows:
    """Rows of a Collection in reference gene/protein order.

    Attributes:
        rna: ``[n, G]`` CSR float32, columns in reference gene order (zero-filled genes have no entries).
        protein: ``[n, T]`` float32, zero where not measured.
        protein_mask: ``[n, T]`` bool, True where measured.
        batch: ``[n]`` int64 batch codes.
        label: ``[n]`` int64 label codes (-1 = unlabeled).
        cell_id: ``[n]`` int64 global cell ids.
        gene_mask_table: ``[n_patterns, G]`` bool, the gene-presence patterns of the collection's studies (True =
            measured); None when every gene is measured for every cell or absent genes are read as zeros. Shared
            by every AlignedRows of one Collection, so read-ahead memory does not grow with cells x genes.
        gene_mask_codes: ``[n]`` int32 row of ``gene_mask_table`` for each cell (None with the table).
    """

    rna: sp.csr_matrix
    protein: np.ndarray
    protein_mask: np.ndarray
    batch: np.ndarray
    label: np.ndarray
    cell_id: np.ndarray
    gene_mask_table: np.ndarray | None = None
    gene_mask_codes: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.rna.shape[0])

    def take(self, rows: np.ndarray | slice) -> "AlignedRows":
        """Returns the rows ``rows`` (an index array or a slice), in that order, as a new object."""
        return AlignedRows(
            rna=self.rna[rows],
            protein=self.protein[rows],
            protein_mask=self.protein_mask[rows],
            batch=self.batch[rows],
            label=self.label[rows],
            cell_id=self.cell_id[rows],
            gene_mask_table=self.gene_mask_table,
            gene_mask_codes=None if self.gene_mask_codes is None else self.gene_mask_codes[rows],
        )

    @staticmethod
    def concat(parts: Sequence["AlignedRows"]) -> "AlignedRows":
        """Stacks parts row-wise (one part is returned as is)."""
        if len(parts) == 1:
            return parts[0]
        return AlignedRows(
            rna=sp.vstack([p.rna for p in parts], format="csr"),
            protein=np.concatenate([p.protein for p in parts]),
            protein_mask=np.concatenate([p.protein_mask for p in parts]),
            batch=np.concatenate([p.batch for p in parts]),
            label=np.concatenate([p.label for p in parts]),
            cell_id=np.concatenate([p.cell_id for p in parts]),
            # One Collection has one table; parts of it are cut from the same reads.
            gene_mask_table=parts[0].gene_mask_table,
            gene_mask_codes=(None if parts[0].gene_mask_codes is None
                             else np.concatenate([p.gene_mask_codes for p in parts])),
        )

    def to_citebatch(self) -> CiteBatch:
        """Densifies RNA and wraps everything as torch tensors (no copy beyond the densification).

        ``rna_mask`` is set only when a cell of the batch lacks a gene, so fully measured batches stay on the
        models' fast (unmasked) paths.
        """
        rna_mask = None
        if self.gene_mask_table is not None:
            used = np.unique(self.gene_mask_codes)
            if not self.gene_mask_table[used].all():
                rna_mask = torch.from_numpy(np.ascontiguousarray(self.gene_mask_table[self.gene_mask_codes]))
        return CiteBatch(
            rna=torch.from_numpy(self.rna.toarray().astype(np.float32, copy=False)),
            protein=torch.from_numpy(np.ascontiguousarray(self.protein, dtype=np.float32)),
            protein_mask=torch.from_numpy(np.ascontiguousarray(self.protein_mask, dtype=bool)),
            batch=torch.from_numpy(np.ascontiguousarray(self.batch, dtype=np.int64)),
            label=torch.from_numpy(np.ascontiguousarray(self.label, dtype=np.int64)),
            cell_id=torch.from_numpy(np.ascontiguousarray(self.cell_id, dtype=np.int64)),
            rna_mask=rna_mask,
        )
