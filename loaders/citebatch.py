"""The minibatch that the data layer hands to a model."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class CiteBatch:
    """One minibatch of CITE-seq cells, aligned to a registry's genes and proteins.

    Attributes:
        rna: ``[B, G] float32`` raw RNA counts in reference gene order.
        protein: ``[B, T] float32`` raw protein counts in reference protein order; zero where not measured.
        protein_mask: ``[B, T] bool``; True where the protein was measured for that cell. Unmeasured
            entries must be left out of any likelihood (they are not true zeros).
        batch: ``[B] int64`` batch covariate code (index into the registry's batch categories).
        label: ``[B] int64`` label code; -1 means unlabeled / no label column.
        cell_id: ``[B] int64`` global cell id in the collection, used to write results back.
        rna_mask: ``[B, G] bool``, True where the cell's study measured the gene; None (the common case) means
            every gene was measured. Absent genes are zero in ``rna`` but are not true zeros: models leave them
            out of the RNA likelihood and do not read them as zeros in the encoder. Only set for batches with at
            least one absent gene (``Collection(absent_genes="mask")``), so fully measured data costs nothing.
    """

    rna: torch.Tensor
    protein: torch.Tensor
    protein_mask: torch.Tensor
    batch: torch.Tensor
    label: torch.Tensor
    cell_id: torch.Tensor
    rna_mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.rna.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "CiteBatch":
        """Returns a copy with every tensor moved to ``device``."""
        return CiteBatch(**{f.name: _maybe(getattr(self, f.name), lambda t: t.to(device, non_blocking=non_blocking))
                            for f in fields(self)})

    def pin_memory(self) -> "CiteBatch":
        """Pins every tensor (called by torch's DataLoader when ``pin_memory=True``)."""
        return CiteBatch(**{f.name: _maybe(getattr(self, f.name), lambda t: t.pin_memory()) for f in fields(self)})


def _maybe(tensor: torch.Tensor | None, apply):
    """``apply(tensor)``, or None for an optional field that is not set (``rna_mask``)."""
    return None if tensor is None else apply(tensor)
