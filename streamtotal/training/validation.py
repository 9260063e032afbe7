"""Validation: the negative ELBO (KL weight 1) and its terms, averaged over held-out cells on every rank."""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np
import torch

from loaders.citebatch import CiteBatch
from loaders.collection import Collection
from loaders.stream import StreamConfig
from loaders.stream_loader import StreamLoader
from streamtotal.training.distributed import DistContext

TERMS = ("neg_elbo", "rna_nll", "protein_nll", "kl_z", "kl_background", "kl_library")


@torch.no_grad()
def evaluate_elbo(
    model: torch.nn.Module,
    collection: Collection,
    ids: np.ndarray,
    *,
    dist: DistContext,
    device: torch.device,
    batch_size: int = 1024,
    seed: int = 0,
    batches: Iterable[CiteBatch] | None = None,
) -> dict[str, float]:
    """Mean per-cell negative ELBO and its terms over ``ids`` (each rank reads its own share).

    The model is put in eval mode (dropout off, batch-norm running statistics) and restored afterwards.

    Args:
        model: the (unwrapped) model; ``model(batch, kl_weight=1.0)`` returns a LossOutput.
        collection: the collection the ids belong to.
        ids: cell ids to evaluate (e.g. the validation cells).
        dist: the distributed context; sums are all-reduced.
        device: where the model lives.
        batch_size: cells per forward pass.
        seed: seed of the latent samples (the ELBO is a one-sample estimate), so repeated evaluations agree.
        batches: this rank's minibatches of ``ids`` in stream order (e.g. a ``ValidationBatches``), instead of
            reading them; ``collection`` and ``batch_size`` are then unused.

    Returns:
        ``{term: mean per cell}`` for every term in TERMS, plus ``n_cells``; with a label classifier
        (totalANVI) also ``label_accuracy`` (fraction of labelled cells classified right; NaN without any),
        ``classification_loss`` (mean cross-entropy over labelled cells) and ``n_labelled``.
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(len(TERMS) + 1, dtype=torch.float64)
    labels = torch.zeros(3, dtype=torch.float64)  # correct, cross-entropy sum, labelled cells
    loader = batches if batches is not None else _validation_loader(collection, ids, dist, batch_size, seed)
    rng_state = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        for batch in loader:
            out = model(batch.to(device), kl_weight=1.0)
            for i, term in enumerate(TERMS):
                sums[i] += getattr(out, term).double().sum().cpu()
            sums[-1] += len(batch)
            if out.label_logits is not None:  # totalANVI
                known = batch.label >= 0
                hits = (out.label_logits.argmax(dim=1).cpu() == batch.label) & known
                labels += torch.tensor([hits.sum().item(), out.classification_loss.double().sum().item(),
                                        known.sum().item()], dtype=torch.float64)
    finally:
        torch.set_rng_state(rng_state)
        model.train(was_training)
    sums = dist.all_reduce_sum(sums)
    n = max(float(sums[-1]), 1.0)
    result = {term: float(sums[i]) / n for i, term in enumerate(TERMS)}
    result["n_cells"] = int(sums[-1])
    if getattr(model, "label_classifier", None) is not None:
        labels = dist.all_reduce_sum(labels)
        n_labelled = float(labels[2])
        result["label_accuracy"] = float(labels[0]) / n_labelled if n_labelled else float("nan")
        result["classification_loss"] = float(labels[1]) / n_labelled if n_labelled else float("nan")
        result["n_labelled"] = int(n_labelled)
    return result


def _validation_loader(collection: Collection, ids: np.ndarray, dist: DistContext, batch_size: int,
                       seed: int) -> StreamLoader:
    config = StreamConfig(batch_size=batch_size, shuffle=False, seed=seed, num_workers=0)
    loader = StreamLoader(collection, ids, config, rank=dist.rank, world_size=dist.world_size)
    loader.set_epoch(0)
    return loader


class ValidationBatches:
    """This rank's validation minibatches, read on the first pass and kept in memory when they fit.

    The same cells are evaluated after every epoch; re-reading them from the stores cost ~0.3 s a pass on
    the 2-core benchmark machine (a cold read-ahead thread the trainer waits for, then densifying), about 4%
    of a 3-epoch run. Kept as the dense CPU tensors the model reads, so later passes cost only the forward.
    When the dense batches would exceed ``max_bytes``, every pass streams them as before. The first pass reads
    them when it runs (~50 ms for 2,000 cells): read on a background thread during training instead, they delayed
    training batches by more than that (the readers share 2 cores with the step).

    Args:
        collection: the collection the ids belong to.
        ids: the validation cell ids.
        dist: the distributed context (each rank keeps its own share).
        batch_size: cells per forward pass.
        seed: the stream seed (the order is unshuffled, so it does not change which cells come).
        max_bytes: cache only when ``cells x (genes + 2 * proteins) x 4`` bytes is at most this (0 = never).
    """

    def __init__(self, collection: Collection, ids: np.ndarray, *, dist: DistContext, batch_size: int,
                 seed: int, max_bytes: int) -> None:
        self._loader = _validation_loader(collection, ids, dist, batch_size, seed)
        registry = collection.registry
        per_cell = 4 * (registry.n_genes + 2 * registry.n_proteins) + 24
        self._cache_ok = max_bytes > 0 and len(ids) * per_cell <= max_bytes
        self._cached: list[CiteBatch] | None = None

    @property
    def cached(self) -> bool:
        """Whether the batches are held in memory (after a first complete pass)."""
        return self._cached is not None

    def __iter__(self) -> Iterator[CiteBatch]:
        if self._cached is not None:
            yield from self._cached
            return
        kept: list[CiteBatch] = []
        for batch in self._loader:
            if self._cache_ok:
                kept.append(batch)
            yield batch
        if self._cache_ok:
            self._cached = kept  # only a complete pass is kept
