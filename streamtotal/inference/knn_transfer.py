"""kNN label transfer from labelled reference cells to query cells in the latent space (totalVI references).

A totalVI model has no classifier, so labels travel by neighbourhood, as in scArches' ``weighted_knn_transfer``:

    reference store(s) ──► at most ``max_cells_per_label`` labelled cells per label (seeded sample; the
    unlabeled category never votes) ──► their latent means (encoded with the predicting model, streamed in
    chunks, or read from an obsm array the store already holds) ──► for every query latent: its ``k`` exact
    nearest reference cells (Euclidean; chunked matrix products in torch) ──► weights
    ``exp(-d / (2 / std(d))**2)`` normalised over the k neighbours ──► per-label probability = summed weight
    of the neighbours carrying it; uncertainty = 1 - max probability.

Memory: the reference sample (``labels x max_cells_per_label x n_latent`` float32) plus one
``query batch x reference_chunk`` distance block; nothing grows with the number of reference or query cells.
The sample is a pure function of (labels, ``max_cells_per_label``, ``seed``) and the search is exact, so the
transfer is deterministic.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from loaders.covariates import label_codes
from loaders.errors import StoreFormatError
from loaders.store_results import obsm_shape, read_obsm
from streamtotal.data import open_collection
from streamtotal.errors import ConfigError
from streamtotal.training.run_dir import TrainedModel, load_trained


@dataclass(frozen=True)
class KnnConfig:
    """How to transfer labels by nearest neighbours.

    Attributes:
        labels_key: obs column of the reference stores holding the labels; None = the reference run's
            ``data.labels_key``.
        k: neighbours per query cell (scArches: 15).
        max_cells_per_label: labelled reference cells sampled per label (bounds memory and search time).
        seed: seed of that sample.
        reference_run: the run whose stores hold the labelled reference cells; None = the reference a query
            run was mapped onto (its registry's surgery record), or the predicting run itself.
        latent_key: read the reference latent from this obsm key of the reference stores (written by
            ``streamtotal embed`` with the same encoder) instead of encoding the sampled cells.
        reference_chunk: reference cells per distance block (memory: query batch x this x 4 bytes).
    """

    labels_key: str | None = None
    k: int = 15
    max_cells_per_label: int = 10_000
    seed: int = 0
    reference_run: str | None = None
    latent_key: str | None = None
    reference_chunk: int = 8192

    def __post_init__(self) -> None:
        if self.k < 1 or self.max_cells_per_label < 1 or self.reference_chunk < 1:
            raise ConfigError(f"kNN transfer needs k >= 1, max_cells_per_label >= 1 and reference_chunk >= 1; got "
                              f"k={self.k}, max_cells_per_label={self.max_cells_per_label}, "
                              f"reference_chunk={self.reference_chunk}")


@dataclass
class ReferenceLatent:
    """The labelled reference cells that vote.

    Attributes:
        latent: ``[m, n_latent]`` float32 latent means.
        codes: ``[m]`` int64 label codes into ``label_names``.
        label_names: the labels (the unlabeled category excluded).
        cells_per_label: ``{label: cells sampled}``.
        reference_run: the run whose stores they come from.
    """

    latent: torch.Tensor
    codes: torch.Tensor
    label_names: list[str]
    cells_per_label: dict[str, int]
    reference_run: str


def sample_per_label(codes: np.ndarray, n_labels: int, max_per_label: int, seed: int) -> np.ndarray:
    """Sorted ids of at most ``max_per_label`` cells of every label code ``0..n_labels-1`` (code -1 never).

    Every label gets its own seeded stream, so adding cells of one label does not change another's sample.
    """
    picked = []
    for c in range(n_labels):
        ids = np.flatnonzero(codes == c)
        if len(ids) > max_per_label:
            rng = np.random.default_rng([int(seed), c])
            ids = rng.choice(ids, size=max_per_label, replace=False)
        picked.append(ids)
    return np.sort(np.concatenate(picked)).astype(np.int64) if picked else np.zeros(0, np.int64)


def resolve_reference_run(trained: TrainedModel, config: KnnConfig) -> Path:
    """The run holding the labelled reference cells (see ``KnnConfig.reference_run``)."""
    if config.reference_run is not None:
        return Path(config.reference_run)
    surgery = trained.registry.extra.get("surgery")
    if surgery and surgery.get("reference"):
        return Path(surgery["reference"])
    return trained.source.parent


@torch.no_grad()
def reference_latent(trained: TrainedModel, config: KnnConfig, *, batch_size: int = 4096,
                     device: torch.device | str = "cpu") -> ReferenceLatent:
    """Samples the labelled reference cells and gets their latent means.

    The cells are encoded with ``trained``'s model (for a query run: the expanded model, whose reference
    batches are the reference's own), so reference and query latents come from one encoder.

    Args:
        trained: the predicting model (a query run or a reference run).
        config: the kNN options.
        batch_size: cells per forward pass.
        device: where to encode.

    Returns:
        A ReferenceLatent.

    Raises:
        ConfigError: no labels key, no labelled reference cell, or a bad ``latent_key`` array.
        RunDirError: the reference run is gone.
    """
    ref_dir = resolve_reference_run(trained, config)
    reference = trained if ref_dir.resolve() == trained.source.parent.resolve() else load_trained(ref_dir)
    data = reference.config.data
    labels_key = config.labels_key or data.labels_key
    if not labels_key:
        raise ConfigError(
            f"kNN label transfer needs the obs column holding the reference's labels, and reference run {ref_dir} "
            "was trained without one: pass --labels-key KEY (a column of its stores "
            f"{list(data.stores)})")
    # Aligned onto the predicting model's registry: the reference batches keep their codes in a query model.
    collection = open_collection(replace(data, labels_key=None), registry=trained.registry)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a study without the column only adds no voters; checked below
        codes, names = label_codes(collection.sources, labels_key, data.unlabeled_category, None)
    if not (codes >= 0).any():
        raise ConfigError(
            f"reference run {ref_dir}: no cell of {list(data.stores)} carries a label in obs column "
            f"{labels_key!r} (other than {data.unlabeled_category!r}); pass the --labels-key of a labelled column")
    ids = sample_per_label(codes, len(names), config.max_cells_per_label, config.seed)
    if config.latent_key:
        latent = _read_obsm_rows(collection, ids, config.latent_key, trained.config.model.n_latent)
    else:
        latent = _encode(trained.model, collection, ids, batch_size, torch.device(device))
    sampled = codes[ids].astype(np.int64)
    counts = np.bincount(sampled, minlength=len(names))
    return ReferenceLatent(latent=torch.from_numpy(latent), codes=torch.from_numpy(sampled), label_names=list(names),
                           cells_per_label=dict(zip(names, counts.tolist())), reference_run=str(ref_dir))


def _encode(model, collection, ids: np.ndarray, batch_size: int, device: torch.device) -> np.ndarray:
    model = model.to(device).eval()
    parts = []
    for start in range(0, len(ids), batch_size):
        b = collection.read(ids[start:start + batch_size]).to(device)
        z = model.encode(b.rna, b.protein, b.protein_mask, b.batch, give_mean=True, rna_mask=b.rna_mask)
        parts.append(z.float().cpu().numpy())
    return np.concatenate(parts) if parts else np.zeros((0, model.config.n_latent), np.float32)


def _read_obsm_rows(collection, ids: np.ndarray, key: str, n_latent: int) -> np.ndarray:
    """Rows ``ids`` (global, sorted) of every reference study's ``obsm/key`` (local Zarr stores)."""
    out = np.zeros((len(ids), n_latent), np.float32)
    study = collection.study_codes(ids)
    for s, source in enumerate(collection.sources):
        rows = np.flatnonzero(study == s)
        if not len(rows):
            continue
        path = source.location
        shape = obsm_shape(path, key) if path is not None else None
        if shape is None:
            raise ConfigError(f"study {source.name!r} ({path}) has no obsm/{key} Zarr array to read the reference "
                              "latent from; run `streamtotal embed` on it first, or drop --reference-latent-key "
                              "to encode the sampled cells")
        if shape != (source.n_obs, n_latent):
            raise ConfigError(f"study {source.name!r}: obsm/{key} has shape {shape}, expected "
                              f"({source.n_obs}, {n_latent}) (a latent of this model); re-run `streamtotal embed`")
        local = ids[rows] - collection.offsets[s]
        try:
            out[rows] = read_obsm(path, key, rows=local)
        except StoreFormatError as err:
            raise ConfigError(f"study {source.name!r}: cannot read the reference latent: {err}") from err
    return out


def nearest_neighbours(query: torch.Tensor, reference: torch.Tensor, k: int,
                       chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest reference rows of every query row (Euclidean), one reference chunk at a time.

    Returns:
        ``(distances [n, k], indices [n, k])``, nearest first; ``k`` is capped at the reference size.
    """
    k = min(k, reference.shape[0])
    query = query.float()
    q2 = (query * query).sum(1, keepdim=True)
    best_d = query.new_zeros((query.shape[0], 0))
    best_i = torch.zeros((query.shape[0], 0), dtype=torch.long, device=query.device)
    for start in range(0, reference.shape[0], chunk):
        r = reference[start:start + chunk].to(query.device, torch.float32)
        # |q - r|^2 by one matrix product; rounding can make it slightly negative, hence the clamp.
        d2 = (q2 - 2.0 * query @ r.T + (r * r).sum(1)[None, :]).clamp_(min=0.0)
        cand_d = torch.cat([best_d, d2], dim=1)
        ids = torch.arange(start, start + r.shape[0], device=query.device).expand(len(query), -1)
        cand_i = torch.cat([best_i, ids], dim=1)
        best_d, pos = torch.topk(cand_d, min(k, cand_d.shape[1]), dim=1, largest=False, sorted=True)
        best_i = torch.gather(cand_i, 1, pos)
    return best_d.sqrt(), best_i


class KnnLabelTransfer:
    """Turns query latents into label probabilities by a weighted vote of their reference neighbours.

    Args:
        reference: the voting reference cells.
        k: neighbours per query cell.
        reference_chunk: reference cells per distance block.
    """

    def __init__(self, reference: ReferenceLatent, k: int = 15, reference_chunk: int = 8192) -> None:
        self.reference = reference
        self.label_names = reference.label_names
        self.k, self.chunk = k, reference_chunk

    def __call__(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """Probabilities ``[n, K]``, predicted code, uncertainty (1 - max p) and entropy (nats) of latents ``z``."""
        ref = self.reference
        dist, idx = nearest_neighbours(z, ref.latent, self.k, self.chunk)
        # scArches' Gaussian kernel: the bandwidth follows the spread of each cell's own neighbour distances;
        # equal distances (std 0) give an infinite bandwidth, i.e. equal weights. exp(-d / s) normalised is a
        # softmax, which stays finite where every exp(-d / s) of a far-away cell would underflow to 0.
        std = dist.std(dim=1, unbiased=False, keepdim=True)
        weights = torch.softmax(-dist / (2.0 / std) ** 2, dim=1)
        votes = ref.codes.to(z.device)[idx]
        probs = torch.zeros((len(z), len(self.label_names)), dtype=weights.dtype, device=z.device)
        probs.scatter_add_(1, votes, weights)
        top, code = probs.max(dim=-1)
        entropy = torch.special.entr(probs).sum(dim=-1)
        return {"probs": probs, "code": code, "uncertainty": 1.0 - top, "entropy": entropy}
