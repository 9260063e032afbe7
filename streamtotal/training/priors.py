"""One bounded streaming pass over a per-batch sample of cells to set the model's empirical priors.

scvi-tools needs the whole AnnData in memory for this; we read at most ``cells_per_batch`` cells of each batch
(stratified, so small batches still get their own prior) in sorted blocks, and feed them to the priors'
streaming estimators.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from loaders.collection import Collection
from streamtotal.model.protein_prior import LibraryPrior, ProteinBackgroundPrior


def stratified_sample(ids: np.ndarray, batch_codes: np.ndarray, cells_per_batch: int, seed: int) -> np.ndarray:
    """Up to ``cells_per_batch`` random cells of each batch among ``ids``, sorted.

    Args:
        ids: candidate global cell ids.
        batch_codes: batch code of every cell of the collection (indexed by global id).
        cells_per_batch: the per-batch cap.
        seed: the sampling seed.

    Returns:
        Sorted int64 ids.
    """
    rng = np.random.default_rng([seed, 7])
    codes = batch_codes[ids]
    picked = []
    for b in np.unique(codes):
        members = ids[codes == b]
        if len(members) > cells_per_batch:
            members = rng.choice(members, size=cells_per_batch, replace=False)
        picked.append(members)
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)


def estimate_priors(
    collection: Collection,
    ids: np.ndarray,
    n_batch: int,
    *,
    cells_per_batch: int = 2000,
    read_cells: int = 4096,
    seed: int = 0,
    progress: bool = True,
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Estimates the protein background prior and the library-size prior from a sample of ``ids``.

    Args:
        collection: the training collection.
        ids: training cell ids (validation cells are never looked at).
        n_batch: number of batch categories.
        cells_per_batch: cap on sampled cells per batch (memory and time bound of this pass).
        read_cells: cells per read.
        seed: sampling seed.
        progress: show a progress bar.

    Returns:
        ``((background_mean, background_scale), (library_log_mean, library_log_var))`` as the model takes them.
    """
    sample = stratified_sample(ids, collection.batch_codes, cells_per_batch, seed)
    protein_prior = ProteinBackgroundPrior(collection.registry.n_proteins, n_batch, seed=seed)
    library_prior = LibraryPrior(n_batch)
    blocks = range(0, len(sample), read_cells)
    for start in tqdm(blocks, desc="priors", unit="block", disable=not progress, leave=False):
        batch = collection.read(sample[start : start + read_cells])
        protein_prior.update(batch.protein, batch.batch, batch.protein_mask)
        library_prior.update(batch.rna, batch.batch)
    return protein_prior.finalize(), library_prior.finalize()
