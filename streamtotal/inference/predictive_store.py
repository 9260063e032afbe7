"""Posterior predictive counts and per-cell ELBO / marginal log-likelihood over a store: write-back and export.

The per-block computations are those of ``predictive.py`` (``predictive_block``, ``elbo_block``,
``marginal_ll_block``) with the same per-block random sources, so a value written back here equals the one the
Python API (``predictive.elbo(..., per_cell=True)``, ``predictive.marginal_ll``, ``posterior_predictive_sample``)
returns for the same cell, seed and batch size. Write-backs go through ``write_back.WriteBack`` (chunk by chunk,
resumable after an interruption, published by renames when complete):

    obs/PREFIX_elbo                  float64  one-draw ELBO per cell (KL weight 1)
    obs/PREFIX_reconstruction_error  float64  rna_nll + protein_nll at that draw (measured proteins only)
    obs/PREFIX_marginal_ll           float64  importance-sampled log p(x, y | s) (with ``marginal_ll=True``)
    obsm/predictive_rna              [n, G'] float32  one posterior predictive draw of the RNA counts
    obsm/predictive_protein          [n, T'] float32  one draw of the protein counts (unmeasured ones included)

Memory: one block of ``batch_size`` cells at a time (marginal LL: ``chunk_size`` importance samples of it);
``export_predictive`` holds its cells' draws in memory (``n_samples * cells * (G' + T')`` floats: size the
subset).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from loaders.atomic_files import write_directory_atomically, write_file_atomically
from loaders.store_results import read_obs_column
from streamtotal.errors import ConfigError
from streamtotal.inference import predictive
from streamtotal.inference.selection import cell_ids as check_cell_ids, feature_indices
from streamtotal.inference.write_back import ObsmTarget, ObsTarget, WriteBack
from streamtotal.inference.write_ledger import file_sha256

PREDICTIVE_KEYS = {"rna": "predictive_rna", "protein": "predictive_protein"}
"""obsm key each posterior predictive modality is written to by default."""


@dataclass
class ScoreResult:
    """What ``score_cells`` produced.

    Attributes:
        n_cells: cells scored.
        means: dataset-level means per cell: ``elbo``, ``reconstruction_error`` (and ``marginal_ll``); without
            write-back also ``rna_nll``, ``protein_nll``, ``kl_z``, ``kl_background``, ``kl_library``.
        per_cell: ``{name: [cells] float64}`` in the requested order (not kept for write-backs).
        written: ``{name: "obs/<column>"}`` for each column written into the store.
        chunks_skipped: write units found complete from an interrupted run (resumed, not recomputed).
        chunks_computed: write units computed by this call.
    """

    n_cells: int
    means: dict[str, float]
    per_cell: dict[str, np.ndarray] = field(default_factory=dict)
    written: dict[str, str] = field(default_factory=dict)
    chunks_skipped: int = 0
    chunks_computed: int = 0


def _model_description(post, method: str, **options) -> dict:
    return {"method": method, "model_sha256": file_sha256(post.trained.source), "options": options}


def _check_prefix(prefix: str) -> None:
    if not prefix or "/" in prefix or prefix.startswith("."):
        raise ConfigError(f"prefix {prefix!r} must be a plain non-empty name (no '/', not starting with '.')")


def score_cells(
    post, cell_ids: Sequence[int] | np.ndarray | None = None, *, marginal_ll: bool = False,
    n_mc_samples: int = 100, chunk_size: int = 25, seed: int = 0, write_back: bool = False,
    prefix: str = "streamtotal",
) -> ScoreResult:
    """ELBO, reconstruction error and (optionally) marginal log-likelihood of cells, in one pass.

    Args:
        post: a ``StorePosterior``.
        cell_ids: global cell ids (any order); None = every cell.
        marginal_ll: also estimate log p(x, y | s) by importance sampling.
        n_mc_samples: importance samples per cell.
        chunk_size: importance samples evaluated at once (memory bound).
        seed: seed of the draws (ELBO and marginal LL each use the per-block sources of their own API call).
        write_back: write per-cell columns into ``obs`` (needs every cell: ``cell_ids=None``).
        prefix: prefix of the obs columns written.

    Returns:
        A ScoreResult.

    Raises:
        ConfigError: a write-back of a subset, a bad prefix, ``n_mc_samples`` or ``chunk_size`` < 1.
        SelectionError: unknown cells.
        StoreFormatError: the store cannot be written to.
    """
    if marginal_ll:
        predictive._positive("n_mc_samples", n_mc_samples)
        predictive._positive("chunk_size", chunk_size)
    if write_back and cell_ids is not None:
        raise ConfigError("write-back covers every cell of the store; leave out the cell selection (--cells)")
    _check_prefix(prefix)
    columns = {"elbo": f"{prefix}_elbo", "reconstruction_error": f"{prefix}_reconstruction_error"}
    if marginal_ll:
        columns["marginal_ll"] = f"{prefix}_marginal_ll"
    writer = None
    if write_back:
        options = {"seed": seed, "marginal_ll": marginal_ll}
        if marginal_ll:
            options.update(n_mc_samples=n_mc_samples, chunk_size=chunk_size)
        data = post.trained.config.data
        writer = WriteBack(post.store, post.n_obs, post.batch_size, _model_description(post, "elbo", **options),
                           obs=[ObsTarget(c, "float64") for c in columns.values()],
                           protected=[c for c in (data.labels_key, data.batch_key) if c])
        ids = writer.pending_ids()
    else:
        ids = check_cell_ids(cell_ids, post.n_obs)
    terms = (*predictive.ELBO_TERMS, "elbo", "reconstruction")
    kept = {} if writer else {t: np.zeros(ids.size) for t in (*terms, *(("marginal_ll",) if marginal_ll else ()))}
    for block, batch, rows in predictive._blocks(post, ids, "elbo + marginal ll" if marginal_ll else "elbo"):
        out = predictive.elbo_block(post, block, batch, seed)
        if marginal_ll:
            out["marginal_ll"] = predictive.marginal_ll_block(post, block, batch, n_mc_samples, chunk_size, seed)
        out["reconstruction_error"] = out["reconstruction"]
        if writer is not None:
            writer.write_unit(block, obs={column: out[name] for name, column in columns.items()})
        else:
            for name, array in kept.items():
                array[rows] = out[name]
    if writer is None:
        kept["reconstruction_error"] = kept.pop("reconstruction")
        means = {name: float(values.mean()) for name, values in kept.items() if name != "neg_elbo"}
        return ScoreResult(n_cells=int(ids.size), means=means, per_cell=kept)
    writer.commit()
    means = {name: float(np.mean(read_obs_column(post.store, column))) for name, column in columns.items()}
    return ScoreResult(n_cells=post.n_obs, means=means, written={n: f"obs/{c}" for n, c in columns.items()},
                       chunks_skipped=writer.skipped, chunks_computed=writer.computed)


@dataclass
class PredictiveWrite:
    """What ``write_predictive`` wrote: ``{modality: "obsm/<key>"}`` and the resume counts."""

    written: dict[str, str]
    chunks_skipped: int
    chunks_computed: int


def write_predictive(
    post, *, what: Sequence[str] = ("rna", "protein"), genes: Sequence[str] | None = None,
    proteins: Sequence[str] | None = None, seed: int = 0, keys: dict[str, str] | None = None,
) -> PredictiveWrite:
    """Writes one posterior predictive draw per cell into ``obsm`` (resumable, chunk by chunk).

    Args:
        post: a ``StorePosterior`` on a local Zarr store.
        what: modalities among "rna" and "protein".
        genes: gene names (None = all).
        proteins: protein names (None = all).
        seed: seed of the draws (equal to ``posterior_predictive_sample(post, seed=seed)`` over every cell).
        keys: obsm key per modality (default ``PREDICTIVE_KEYS``).

    Returns:
        A PredictiveWrite.

    Raises:
        ConfigError: unknown modalities.
        SelectionError: unknown genes or proteins.
        StoreFormatError: the store cannot be written to.
    """
    what = list(dict.fromkeys(what))
    if not what or any(w not in PREDICTIVE_KEYS for w in what):
        raise ConfigError(f"what must be among {list(PREDICTIVE_KEYS)}; got {what}")
    keys = {**PREDICTIVE_KEYS, **(keys or {})}
    reg = post.registry
    gidx = feature_indices(genes, reg.gene_names, "gene")
    pidx = feature_indices(proteins, reg.protein_names, "protein")
    names = {"rna": _names(reg.gene_names, gidx), "protein": _names(reg.protein_names, pidx)}
    targets = [ObsmTarget(keys[m], len(names[m]), attrs={
        "feature_names": names[m],
        "streamtotal": {"quantity": f"posterior_predictive_{m}", "seed": seed, "model": str(post.trained.source)}})
        for m in what]
    writer = WriteBack(post.store, post.n_obs, post.batch_size,
                       _model_description(post, "sample", seed=seed, what=what, genes=names["rna"],
                                          proteins=names["protein"]), obsm=targets)
    gt = None if gidx is None else torch.as_tensor(gidx, device=post.device)
    pt = None if pidx is None else torch.as_tensor(pidx, device=post.device)
    for block, batch, _ in predictive._blocks(post, writer.pending_ids(), "predictive"):
        rna, protein = predictive.predictive_block(post, block, batch, 1, seed, gt, pt)
        values = {"rna": rna[0], "protein": protein[0]}
        writer.write_unit(block, obsm={keys[m]: values[m] for m in what})
    writer.commit()
    return PredictiveWrite(written={m: f"obsm/{keys[m]}" for m in what}, chunks_skipped=writer.skipped,
                           chunks_computed=writer.computed)


def export_predictive(
    post, path: str | Path, cell_ids: Sequence[int] | np.ndarray | None = None, n_samples: int = 1, *,
    genes: Sequence[str] | None = None, proteins: Sequence[str] | None = None, seed: int = 0,
) -> Path:
    """Writes posterior predictive counts of the chosen cells to an AnnData file (``.h5ad`` or ``.zarr``).

    ``X`` holds the RNA counts (sparse CSR, genes as ``var``), ``obsm["protein_counts"]`` the protein counts (a
    DataFrame named by protein), ``obs`` the cells' store obs. With ``n_samples > 1`` each cell appears once per
    draw (draw-major), with obs columns ``cell`` (its name) and ``sample`` (the draw). Written under a temporary
    name and renamed into place.

    Raises:
        ConfigError: another file type, ``n_samples`` < 1.
        SelectionError: unknown cells, genes or proteins.
    """
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    path = Path(path)
    kind = path.suffix.lower()
    if kind not in (".h5ad", ".zarr"):
        raise ConfigError(f"--out {path}: write posterior predictive samples to a .h5ad or .zarr file")
    ids = check_cell_ids(cell_ids, post.n_obs)
    rna, protein = predictive.posterior_predictive_sample(post, ids, n_samples, genes=genes, proteins=proteins,
                                                          seed=seed)
    rna, protein = rna.reshape(-1, rna.shape[-1]), protein.reshape(-1, protein.shape[-1])
    reg = post.registry
    obs = post.collection.obs_frame().iloc[ids]
    if n_samples > 1:
        names = obs.index.astype(str)
        obs = pd.concat([obs] * n_samples)
        obs.insert(0, "cell", np.tile(names, n_samples))
        obs.insert(1, "sample", np.repeat(np.arange(n_samples), ids.size))
        obs.index = [f"{cell}-{s}" for cell, s in zip(obs["cell"], obs["sample"])]
    gene_names = _names(reg.gene_names, feature_indices(genes, reg.gene_names, "gene"))
    protein_names = _names(reg.protein_names, feature_indices(proteins, reg.protein_names, "protein"))
    adata = ad.AnnData(X=sp.csr_matrix(rna), obs=obs, var=pd.DataFrame(index=pd.Index(gene_names)),
                       obsm={"protein_counts": pd.DataFrame(protein, index=obs.index, columns=protein_names)})
    adata.uns["streamtotal"] = {"quantity": "posterior_predictive", "n_samples": int(n_samples), "seed": int(seed),
                                "model": str(post.trained.source)}
    if kind == ".h5ad":
        return write_file_atomically(path, adata.write_h5ad)

    def write_zarr(tmp: Path) -> None:
        with warnings.catch_warnings():  # anndata's notice that v3 will become its default; stores here are v2
            warnings.filterwarnings("ignore", message="Writing zarr v2 data", category=UserWarning)
            adata.write_zarr(tmp)

    return write_directory_atomically(path, write_zarr)


def _names(all_names: Sequence[str], index: np.ndarray | None) -> list[str]:
    return list(all_names) if index is None else [all_names[i] for i in index]
