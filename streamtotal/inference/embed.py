"""``streamtotal embed``: the latent posterior mean of every cell, streamed and written back chunk by chunk.

Write-back goes through ``write_back.WriteBack``: an interrupted embed resumes where it stopped when rerun with
the same model and batch size (completed chunks are not recomputed); the previous ``obsm/<key>`` is replaced
only when every cell is written.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from loaders.store_results import read_obsm
from loaders.atomic_files import write_file_atomically
from streamtotal.data import open_collection
from streamtotal.inference.cell_stream import stream_blocks
from streamtotal.inference.write_back import ObsmTarget, WriteBack
from streamtotal.inference.write_ledger import file_sha256
from streamtotal.training.run_dir import load_trained
from streamtotal.device import resolve_device


@dataclass
class EmbedResult:
    """What ``embed`` did.

    Attributes:
        n_cells: cells embedded.
        key: the obsm key written (None when not written back).
        latent: the ``[n_cells, n_latent]`` matrix when ``return_latent`` was asked for, else None.
        exported: the AnnData file written, if any.
        chunks_skipped: write units found complete from an interrupted run (resumed, not recomputed).
        chunks_computed: write units computed by this call.
    """

    n_cells: int
    key: str | None
    latent: np.ndarray | None
    exported: Path | None
    chunks_skipped: int = 0
    chunks_computed: int = 0


@torch.no_grad()
def embed(
    run_dir: str | Path,
    store: str,
    *,
    key: str | None = "X_streamtotal",
    export_h5ad: str | Path | None = None,
    return_latent: bool = False,
    batch_size: int = 4096,
    device: str = "auto",
    progress: bool = True,
) -> EmbedResult:
    """Computes the latent mean of every cell of ``store`` with the model of ``run_dir``.

    The store is aligned onto the model's registry by gene and protein names; its batches must be among the
    model's (new batches need query mapping).

    Args:
        run_dir: a training run directory.
        store: the store to embed (often the training store itself).
        key: obsm key to write the latent into; None to not write back.
        export_h5ad: also write an AnnData (obs of the store + the latent in ``obsm[key]``) to this path.
        return_latent: return the latent matrix in memory (only for data that fit).
        batch_size: cells per forward pass.
        device: "auto", "cpu" or "cuda[:N]".
        progress: show a progress bar.

    Returns:
        An EmbedResult.
    """
    trained = load_trained(run_dir)
    dev = resolve_device(device)
    model = trained.model.to(dev).eval()
    data = replace(trained.config.data, stores=(store,))
    collection = open_collection(data, registry=trained.registry)
    n_latent = trained.config.model.n_latent
    writer = None
    if key:
        writer = WriteBack(store, collection.n_obs, batch_size,
                           {"method": "embed", "model_sha256": file_sha256(trained.source)},
                           obsm=[ObsmTarget(key, n_latent, attrs={"streamtotal": {
                               "quantity": "latent_mean", "model": str(trained.source)}})])
    ids = writer.pending_ids() if writer else np.arange(collection.n_obs, dtype=np.int64)
    keep = np.zeros((collection.n_obs, n_latent), dtype=np.float32) if (return_latent or export_h5ad) else None
    for unit, gpu_batch, _ in stream_blocks(collection, ids, block_rows=batch_size, device=dev, desc="embed",
                                            progress=progress):
        z = model.encode(gpu_batch.rna, gpu_batch.protein, gpu_batch.protein_mask, gpu_batch.batch, give_mean=True,
                         rna_mask=gpu_batch.rna_mask)
        z = z.float().cpu().numpy()
        if writer is not None:
            writer.write_unit(unit, obsm={key: z})
        if keep is not None:
            keep[gpu_batch.cell_id.cpu().numpy()] = z
    if writer is not None:
        writer.commit()
        if keep is not None and writer.skipped:  # chunks done before the interruption: read them back
            keep[:] = read_obsm(store, key)
    exported = None
    if export_h5ad:
        exported = _export_anndata(collection, keep, key or "X_streamtotal", Path(export_h5ad))
    return EmbedResult(n_cells=collection.n_obs, key=key, latent=keep if return_latent else None, exported=exported,
                       chunks_skipped=writer.skipped if writer else 0,
                       chunks_computed=writer.computed if writer else 0)


def _export_anndata(collection, latent: np.ndarray, key: str, path: Path) -> Path:
    """Writes the stores' obs columns and the latent as an h5ad (temp name, then rename)."""
    import anndata as ad

    adata = ad.AnnData(obs=collection.obs_frame(), obsm={key: latent})
    return write_file_atomically(path, adata.write_h5ad)
