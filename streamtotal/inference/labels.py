"""``streamtotal predict``: totalANVI label transfer, streamed over a store and written back chunk by chunk.

For every cell of the store: the label classifier's per-class probabilities at the posterior mean of z, the
predicted label (the most probable class), two uncertainty figures, and the latent. With ``write_back``
(``PREFIX`` = ``prefix``, default "streamtotal"):

    obs/PREFIX_label                    categorical  predicted label (categories: the model's labels)
    obs/PREFIX_label_uncertainty        float32      1 - max class probability (0 = certain, at most 1 - 1/K)
    obs/PREFIX_label_entropy            float32      entropy of the class probabilities, in nats (<= log K)
    obsm/PREFIX_label_probs             [n, K] float32  class probabilities; attrs["label_names"] = the K classes
    obsm/PREFIX_latent                  [n, n_latent] float32  posterior mean of z

Each obsm array goes through ``loaders.obsm_writer`` and the obs columns through ``obs_writer``: written into
hidden temporary elements as the minibatches come, published by renames only when every row is written,
then the consolidated metadata is rebuilt, so ``anndata.read_zarr(store)`` shows them in ``obs`` / ``obsm``.
A job killed half-way leaves the store's previous results intact.

A totalVI run (no label classifier) is refused: train a totalANVI model (``streamtotal train --totalanvi
--labels-key KEY [--from TOTALVI_RUN]``); kNN transfer on a totalVI latent is not implemented yet.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import zarr
from tqdm.auto import tqdm

from loaders.obsm_writer import ObsmWriter
from loaders.store_layout import ZARR_FORMAT
from loaders.stream import StreamConfig
from loaders.stream_loader import StreamLoader
from streamtotal.data import open_collection
from streamtotal.errors import ConfigError
from streamtotal.inference.embed import collection_obs
from streamtotal.inference.obs_writer import ObsColumnWriter
from streamtotal.training.run_dir import TrainedModel, load_trained
from streamtotal.training.trainer import resolve_device


@dataclass
class LabelPrediction:
    """What ``predict_labels`` produced.

    Attributes:
        n_cells: cells predicted.
        label_names: the K classes, in probability-column order.
        counts: ``{label: number of cells predicted as it}``.
        written: ``{what: "obs/<column>" or "obsm/<key>"}`` for each result written into the store.
        predicted: ``[n]`` predicted labels (object array of str), when kept in memory (``keep``), else None.
        probabilities: ``[n, K]`` class probabilities (kept), else None.
        uncertainty: ``[n]`` 1 - max probability (kept), else None.
        entropy: ``[n]`` entropy of the probabilities in nats (kept), else None.
        latent: ``[n, n_latent]`` posterior mean of z (kept), else None.
        exported: the h5ad written, if any.
    """

    n_cells: int
    label_names: list[str]
    counts: dict[str, int]
    written: dict[str, str]
    predicted: np.ndarray | None = None
    probabilities: np.ndarray | None = None
    uncertainty: np.ndarray | None = None
    entropy: np.ndarray | None = None
    latent: np.ndarray | None = None
    exported: Path | None = None


def classify_latent(model, z: torch.Tensor) -> dict[str, torch.Tensor]:
    """Class probabilities, predicted code, uncertainty (1 - max p) and entropy (nats) of latents ``z``."""
    logits = model.label_classifier(z)
    probs = torch.softmax(logits, dim=-1)
    top, code = probs.max(dim=-1)
    entropy = -(probs * torch.log_softmax(logits, dim=-1)).sum(dim=-1)
    return {"probs": probs, "code": code, "uncertainty": 1.0 - top, "entropy": entropy}


@torch.no_grad()
def predict_labels(
    run_dir: str | Path | TrainedModel,
    store: str | Path,
    *,
    write_back: bool = True,
    prefix: str = "streamtotal",
    keep: bool = False,
    export_h5ad: str | Path | None = None,
    batch_size: int = 4096,
    device: str = "auto",
    progress: bool = True,
) -> LabelPrediction:
    """Predicts the labels of every cell of ``store`` with the totalANVI model of ``run_dir``.

    The store is aligned onto the model's registry by gene and protein names; its batches must be among the
    model's. Its own label column, if any, is not read.

    Args:
        run_dir: a totalANVI training run directory (or a loaded TrainedModel).
        store: the store (a local AnnData Zarr store for write-back).
        write_back: write the results into the store (see the module doc for the layout).
        prefix: prefix of the obs columns and obsm keys written.
        keep: also return the results in memory (``[n, K]`` + ``[n, n_latent]`` floats: for data that fit).
        export_h5ad: also write an AnnData (the store's obs + the predictions, obsm probabilities and latent).
        batch_size: cells per forward pass.
        device: "auto", "cpu" or "cuda[:N]".
        progress: show a progress bar.

    Returns:
        A LabelPrediction.

    Raises:
        ConfigError: the run has no label classifier (a totalVI run), or a bad prefix.
        RunDirError: no trained model in ``run_dir``.
        AlignmentError, StoreFormatError: the store cannot be aligned onto the model or written to.
    """
    trained = run_dir if isinstance(run_dir, TrainedModel) else load_trained(run_dir)
    if trained.model.label_classifier is None:
        raise ConfigError(
            f"{trained.source.parent} is a totalVI run without a label classifier, so it cannot predict labels: "
            "train totalANVI on labelled data, e.g. `streamtotal train STORE --out RUN --totalanvi --labels-key "
            f"cell_type --from {trained.source.parent}` (kNN label transfer on a totalVI latent is not available yet)"
        )
    if not prefix or "/" in prefix or prefix.startswith("."):
        raise ConfigError(f"prefix {prefix!r} must be a plain non-empty name")
    dev = resolve_device(device)
    model = trained.model.to(dev).eval()
    registry = trained.registry
    names = list(registry.label_categories)
    k, n_latent = len(names), trained.config.model.n_latent
    # The query's own labels are not needed (and may hold values the model never saw).
    data = replace(trained.config.data, stores=(str(store),), labels_key=None)
    collection = open_collection(data, registry=registry)
    n = collection.n_obs

    keys = {"label": f"{prefix}_label", "uncertainty": f"{prefix}_label_uncertainty",
            "entropy": f"{prefix}_label_entropy", "probs": f"{prefix}_label_probs", "latent": f"{prefix}_latent"}
    obsm_writers = obs_writer = None
    if write_back:
        obsm_writers = {"probs": ObsmWriter(store, keys["probs"], n, k),
                        "latent": ObsmWriter(store, keys["latent"], n, n_latent)}
        protected = [c for c in (trained.config.data.labels_key, trained.config.data.batch_key) if c]
        obs_writer = ObsColumnWriter(store, n, {keys["label"]: names, keys["uncertainty"]: "float32",
                                                keys["entropy"]: "float32"}, protected=protected)
    keep = keep or export_h5ad is not None
    kept = None
    if keep:
        kept = {"code": np.zeros(n, np.int64), "probs": np.zeros((n, k), np.float32),
                "uncertainty": np.zeros(n, np.float32), "entropy": np.zeros(n, np.float32),
                "latent": np.zeros((n, n_latent), np.float32)}
    counts = np.zeros(k, dtype=np.int64)

    loader = StreamLoader(collection, np.arange(n, dtype=np.int64),
                          StreamConfig(batch_size=batch_size, shuffle=False, num_workers=0))
    loader.set_epoch(0)
    for batch in tqdm(loader, total=len(loader), desc="predict", unit="batch", disable=not progress):
        b = batch.to(dev)
        z = model.encode(b.rna, b.protein, b.protein_mask, b.batch, give_mean=True)
        out = {name: v.float().cpu().numpy() if v.is_floating_point() else v.cpu().numpy()
               for name, v in classify_latent(model, z).items()}
        out["latent"] = z.float().cpu().numpy()
        ids = batch.cell_id.numpy()
        counts += np.bincount(out["code"], minlength=k)
        if write_back:
            obsm_writers["probs"].write_rows(ids, out["probs"])
            obsm_writers["latent"].write_rows(ids, out["latent"])
            obs_writer.write_rows(ids, {keys["label"]: out["code"], keys["uncertainty"]: out["uncertainty"],
                                        keys["entropy"]: out["entropy"]})
        if kept is not None:
            for name, array in kept.items():
                array[ids] = out[name]

    written: dict[str, str] = {}
    if write_back:
        _annotate(store, keys["probs"], {"label_names": names, "streamtotal": {"quantity": "label_probabilities",
                                                                               "model": str(trained.source)}})
        _annotate(store, keys["latent"], {"streamtotal": {"quantity": "latent_mean", "model": str(trained.source)}})
        for what, writer in obsm_writers.items():
            writer.commit()
            written[what] = f"obsm/{keys[what]}"
        obs_writer.commit()
        written.update({w: f"obs/{keys[w]}" for w in ("label", "uncertainty", "entropy")})

    result = LabelPrediction(n_cells=n, label_names=names, counts=dict(zip(names, counts.tolist())), written=written)
    if kept is not None:
        result.predicted = np.asarray(names, dtype=object)[kept["code"]]
        result.probabilities, result.uncertainty = kept["probs"], kept["uncertainty"]
        result.entropy, result.latent = kept["entropy"], kept["latent"]
    if export_h5ad is not None:
        result.exported = _export(collection, result, keys, Path(export_h5ad))
    return result


def _annotate(store, key: str, attrs: dict) -> None:
    """Sets attrs of the not-yet-committed obsm array ``key``."""
    obsm = zarr.open_group(str(Path(store) / "obsm"), mode="r+", zarr_format=ZARR_FORMAT, use_consolidated=False)
    obsm[f".tmp-{key}"].attrs.update(attrs)


def _export(collection, result: LabelPrediction, keys: dict[str, str], path: Path) -> Path:
    import anndata as ad
    import pandas as pd

    obs = collection_obs(collection)
    obs[keys["label"]] = pd.Categorical(result.predicted, categories=result.label_names)
    obs[keys["uncertainty"]] = result.uncertainty
    obs[keys["entropy"]] = result.entropy
    obsm = {keys["probs"]: pd.DataFrame(result.probabilities, index=obs.index, columns=result.label_names),
            keys["latent"]: result.latent}
    tmp = path.with_name(f".{path.name}.tmp")
    ad.AnnData(obs=obs, obsm=obsm).write_h5ad(tmp)
    tmp.replace(path)
    return path
