"""``streamtotal predict``: totalANVI label transfer, streamed over a store and written back chunk by chunk.

For every cell of the store: the label classifier's per-class probabilities at the posterior mean of z, the
predicted label (the most probable class), two uncertainty figures, and the latent. With ``write_back``
(``PREFIX`` = ``prefix``, default "streamtotal"):

    obs/PREFIX_label                    categorical  predicted label (categories: the model's labels)
    obs/PREFIX_label_uncertainty        float32      1 - max class probability (0 = certain, at most 1 - 1/K)
    obs/PREFIX_label_entropy            float32      entropy of the class probabilities, in nats (<= log K)
    obsm/PREFIX_label_probs             [n, K] float32  class probabilities; attrs["label_names"] = the K classes
    obsm/PREFIX_latent                  [n, n_latent] float32  posterior mean of z

Everything goes through ``write_back.WriteBack``: written into hidden temporary elements unit by unit (a unit =
``batch_size`` cells), published by renames only when every unit is written, then the consolidated metadata is
rebuilt, so ``anndata.read_zarr(store)`` shows them in ``obs`` / ``obsm``. A job killed half-way leaves the
store's previous results intact, and the same command run again computes only the units not yet written.

A totalVI run (no label classifier) transfers labels by kNN instead (``knn_transfer``): the weighted vote of
the ``k`` nearest labelled reference cells gives the probabilities, written back the same way (the obsm
attrs record the method, ``k`` and the reference cells sampled per label).

Several stores (a query run mapped over several) are read as one collection, as the mapping read them, so
their batches mean the same; each store gets its own results.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from loaders.store_results import read_obs_codes, read_obs_column, read_obsm
from loaders.atomic_files import write_file_atomically
from streamtotal.data import open_collection
from streamtotal.errors import ConfigError
from streamtotal.inference.knn_transfer import KnnConfig, KnnLabelTransfer, reference_latent
from streamtotal.inference.cell_stream import stream_blocks
from streamtotal.inference.write_back import ObsmTarget, ObsTarget, WriteBack
from streamtotal.inference.write_ledger import file_sha256
from streamtotal.training.run_dir import TrainedModel, load_trained
from streamtotal.device import resolve_device

logger = logging.getLogger(__name__)


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
        method: "classifier" (totalANVI) or "knn" (transfer from labelled reference cells).
        transfer: how: the method, and for kNN ``k``, the reference run and the cells sampled per label.
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
    method: str = "classifier"
    transfer: dict = field(default_factory=dict)


def classify_latent(model, z: torch.Tensor) -> dict[str, torch.Tensor]:
    """Class probabilities, predicted code, uncertainty (1 - max p) and entropy (nats) of latents ``z``."""
    logits = model.label_classifier(z)
    probs = torch.softmax(logits, dim=-1)
    top, code = probs.max(dim=-1)
    entropy = -(probs * torch.log_softmax(logits, dim=-1)).sum(dim=-1)
    return {"probs": probs, "code": code, "uncertainty": 1.0 - top, "entropy": entropy}


def label_transfer(trained: TrainedModel, knn: KnnConfig | None, *, batch_size: int = 4096,
                   device: torch.device | str = "cpu") -> tuple[Callable, list[str], dict]:
    """How latents become labels: the totalANVI classifier, or (``knn`` given) a kNN vote of labelled reference
    cells (``knn_transfer``; the way for a totalVI model).

    Returns:
        ``(classify(z) -> {"probs", "code", "uncertainty", "entropy"}, label names, description)``.

    Raises:
        ConfigError: a totalVI model and no ``knn`` options, or no labelled reference cells.
    """
    model = trained.model
    if knn is None:
        if model.label_classifier is None:
            raise ConfigError(
                f"{trained.source.parent} is a totalVI run without a label classifier: transfer labels by kNN from "
                "the reference's labelled cells (--labels-key KEY, the obs column of the reference stores holding "
                "them), or train totalANVI on labelled data, e.g. `streamtotal train STORE --out RUN --totalanvi "
                f"--labels-key cell_type --from {trained.source.parent}`")
        return (lambda z: classify_latent(model, z)), list(trained.registry.label_categories), {"method": "classifier"}
    reference = reference_latent(trained, knn, batch_size=batch_size, device=device)
    transfer = KnnLabelTransfer(reference, k=knn.k, reference_chunk=knn.reference_chunk)
    return transfer, reference.label_names, {"method": "knn", "k": knn.k, "reference_run": reference.reference_run,
                                             "reference_cells_per_label": reference.cells_per_label}


@torch.no_grad()
def predict_labels_many(
    run_dir: str | Path | TrainedModel,
    stores: Sequence[str | Path],
    *,
    write_back: bool = True,
    prefix: str = "streamtotal",
    keep: bool = False,
    batch_size: int = 4096,
    device: str = "auto",
    progress: bool = True,
    knn: KnnConfig | None = None,
) -> list[LabelPrediction]:
    """Predicts the labels of every cell of several stores, read as one collection exactly as the model's
    training (or query mapping) read them, so a query run mapped over several stores sees the same batches;
    each store gets its own results written back.

    Args:
        run_dir: a run directory (or a loaded TrainedModel): totalANVI (classifier) or totalVI (kNN transfer).
        stores: the stores (local AnnData Zarr stores for write-back).
        write_back: write the results into each store (see the module doc for the layout).
        prefix: prefix of the obs columns and obsm keys written.
        keep: also return the results in memory (``[n, K]`` + ``[n, n_latent]`` floats: for data that fit).
        batch_size: cells per forward pass.
        device: "auto", "cpu" or "cuda[:N]".
        progress: show a progress bar.
        knn: transfer labels by kNN with these options (needed for a totalVI model); None = the totalANVI
            classifier.

    Returns:
        One LabelPrediction per store, in order.

    Raises:
        ConfigError: a bad prefix, or a totalVI model without a labels column to transfer from.
        RunDirError: no trained model in ``run_dir``.
        AlignmentError, StoreFormatError: a store cannot be aligned onto the model or written to.
    """
    trained = run_dir if isinstance(run_dir, TrainedModel) else load_trained(run_dir)
    if not prefix or "/" in prefix or prefix.startswith("."):
        raise ConfigError(f"prefix {prefix!r} must be a plain non-empty name")
    dev = resolve_device(device)
    classify, names, how = label_transfer(trained, knn, batch_size=batch_size, device=dev)
    model = trained.model.to(dev).eval()
    k, n_latent = len(names), trained.config.model.n_latent
    # The query's own labels are not needed (and may hold values the model never saw).
    data = replace(trained.config.data, stores=tuple(str(s) for s in stores), labels_key=None)
    collection = open_collection(data, registry=trained.registry)
    sizes = np.diff(collection.offsets)

    keys = _keys(prefix)
    protected = [c for c in (trained.config.data.labels_key, trained.config.data.batch_key) if c]
    description = {"method": "predict", "model_sha256": file_sha256(trained.source), "transfer": how}
    results = []
    for s, store in enumerate(stores):
        n, offset = int(sizes[s]), int(collection.offsets[s])
        writer = _store_writer(store, n, batch_size, description, keys, names, n_latent, trained, how,
                               protected) if write_back else None
        kept = _kept(n, k, n_latent) if keep else None
        local_ids = writer.pending_ids() if writer is not None else np.arange(n, dtype=np.int64)
        if writer is not None and writer.skipped and progress:
            logger.info("%s: resumed: %d of %d chunks were already written", store, writer.skipped, writer.n_units)
        for unit, b, _ in stream_blocks(collection, local_ids + offset, block_rows=batch_size, device=dev,
                                        desc=f"predict {Path(str(store)).name}", progress=progress, offset=offset):
            z = model.encode(b.rna, b.protein, b.protein_mask, b.batch, give_mean=True, rna_mask=b.rna_mask)
            out = {name: v.float().cpu().numpy() if v.is_floating_point() else v.cpu().numpy()
                   for name, v in classify(z).items()}
            out["latent"] = z.float().cpu().numpy()
            if writer is not None:
                writer.write_unit(unit, obsm={keys["probs"]: out["probs"], keys["latent"]: out["latent"]},
                                  obs={keys["label"]: out["code"], keys["uncertainty"]: out["uncertainty"],
                                       keys["entropy"]: out["entropy"]})
            if kept is not None:
                local = b.cell_id.cpu().numpy() - offset
                for name, array in kept.items():
                    array[local] = out[name]
        written = {}
        if writer is not None:
            writer.commit()
            written = {what: f"obs/{keys[what]}" for what in ("label", "uncertainty", "entropy")}
            written.update({what: f"obsm/{keys[what]}" for what in ("probs", "latent")})
            if kept is not None and writer.skipped:
                kept = _read_back(store, keys, n)  # units done by the interrupted run were not recomputed here
        codes = kept["code"] if kept is not None else (read_obs_codes(store, keys["label"]) if writer is not None
                                                      else None)
        counts = np.bincount(codes, minlength=k) if codes is not None else np.zeros(k, dtype=np.int64)
        result = LabelPrediction(n_cells=n, label_names=names, counts=dict(zip(names, counts.tolist())),
                                 written=written, method=how["method"], transfer=how)
        if kept is not None:
            result.predicted = np.asarray(names, dtype=object)[kept["code"]]
            result.probabilities, result.uncertainty = kept["probs"], kept["uncertainty"]
            result.entropy, result.latent = kept["entropy"], kept["latent"]
        results.append(result)
    return results


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
    knn: KnnConfig | None = None,
) -> LabelPrediction:
    """Predicts the labels of every cell of ``store`` (see ``predict_labels_many``) with the totalANVI classifier
    of ``run_dir``, or by kNN transfer from the reference's labelled cells for a totalVI run.

    The store is aligned onto the model's registry by gene and protein names; its batches must be among the
    model's. Its own label column, if any, is not read.

    Args:
        export_h5ad: also write an AnnData (the store's obs + the predictions, obsm probabilities and latent).
        Others: as ``predict_labels_many``.

    Returns:
        A LabelPrediction.

    Raises:
        As ``predict_labels_many``.
    """
    keep = keep or export_h5ad is not None
    trained = run_dir if isinstance(run_dir, TrainedModel) else load_trained(run_dir)
    result = predict_labels_many(trained, [store], write_back=write_back, prefix=prefix, keep=keep,
                                 batch_size=batch_size, device=device, progress=progress, knn=knn)[0]
    if export_h5ad is not None:
        data = replace(trained.config.data, stores=(str(store),), labels_key=None)
        collection = open_collection(data, registry=trained.registry)
        result.exported = _export(collection, result, _keys(prefix), Path(export_h5ad))
    return result


def _kept(n: int, k: int, n_latent: int) -> dict[str, np.ndarray]:
    return {"code": np.zeros(n, np.int64), "probs": np.zeros((n, k), np.float32),
            "uncertainty": np.zeros(n, np.float32), "entropy": np.zeros(n, np.float32),
            "latent": np.zeros((n, n_latent), np.float32)}


def _keys(prefix: str) -> dict[str, str]:
    return {"label": f"{prefix}_label", "uncertainty": f"{prefix}_label_uncertainty",
            "entropy": f"{prefix}_label_entropy", "probs": f"{prefix}_label_probs", "latent": f"{prefix}_latent"}


def _store_writer(store, n: int, batch_size: int, description: dict, keys: dict[str, str], names: list[str],
                  n_latent: int, trained: TrainedModel, how: dict, protected) -> WriteBack:
    """The resumable write-back of one store's predictions (hidden until ``commit``)."""
    probs_attrs = {"label_names": names, "streamtotal": {"quantity": "label_probabilities",
                                                          "model": str(trained.source), **how}}
    latent_attrs = {"streamtotal": {"quantity": "latent_mean", "model": str(trained.source)}}
    return WriteBack(store, n, batch_size, description,
                     obsm=[ObsmTarget(keys["probs"], len(names), attrs=probs_attrs),
                           ObsmTarget(keys["latent"], n_latent, attrs=latent_attrs)],
                     obs=[ObsTarget(keys["label"], tuple(names)), ObsTarget(keys["uncertainty"], "float32"),
                          ObsTarget(keys["entropy"], "float32")],
                     protected=protected)


def _read_back(store, keys: dict[str, str], n: int) -> dict[str, np.ndarray]:
    """The published predictions of a store, for ``keep`` after a resumed write-back."""
    return {"code": read_obs_codes(store, keys["label"]),
            "probs": np.asarray(read_obsm(store, keys["probs"]), dtype=np.float32),
            "latent": np.asarray(read_obsm(store, keys["latent"]), dtype=np.float32),
            "uncertainty": np.asarray(read_obs_column(store, keys["uncertainty"]), dtype=np.float32),
            "entropy": np.asarray(read_obs_column(store, keys["entropy"]), dtype=np.float32)}


def _export(collection, result: LabelPrediction, keys: dict[str, str], path: Path) -> Path:
    import anndata as ad
    import pandas as pd

    obs = collection.obs_frame()
    obs[keys["label"]] = pd.Categorical(result.predicted, categories=result.label_names)
    obs[keys["uncertainty"]] = result.uncertainty
    obs[keys["entropy"]] = result.entropy
    obsm = {keys["probs"]: pd.DataFrame(result.probabilities, index=obs.index, columns=result.label_names),
            keys["latent"]: result.latent}
    return write_file_atomically(path, ad.AnnData(obs=obs, obsm=obsm).write_h5ad)
