"""Validation: the negative ELBO (KL weight 1) and its terms, averaged over held-out cells on every rank."""

from __future__ import annotations

import numpy as np
import torch

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

    Returns:
        ``{term: mean per cell}`` for every term in TERMS, plus ``n_cells``; with a label classifier
        (totalANVI) also ``label_accuracy`` (fraction of labelled cells classified right; NaN without any),
        ``classification_loss`` (mean cross-entropy over labelled cells) and ``n_labelled``.
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(len(TERMS) + 1, dtype=torch.float64)
    labels = torch.zeros(3, dtype=torch.float64)  # correct, cross-entropy sum, labelled cells
    config = StreamConfig(batch_size=batch_size, shuffle=False, seed=seed, num_workers=0)
    loader = StreamLoader(collection, ids, config, rank=dist.rank, world_size=dist.world_size)
    loader.set_epoch(0)
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
