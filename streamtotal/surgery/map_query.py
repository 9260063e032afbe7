"""``streamtotal map``: map a query onto a trained reference by scArches surgery, with the reference's Trainer.

    REFERENCE_RUN + QUERY_STORE(s) ──► align the query onto the reference registry by name (genes zero-filled /
    dropped, proteins masked / dropped, new batches appended) ──► alignment.json ──► expanded model (reference
    weights + new-batch rows, expand.py) ──► freeze per the recipe (freeze.py) ──► Trainer: streamed,
    checkpointed, exactly resumable, DDP ──► QUERY_RUN/model.pt + registry.json (embed / predict work on it)
    ──► optionally predict_labels_many into every query store (totalANVI classifier, or kNN transfer from the
    reference's labelled cells for a totalVI reference).

The recipe and the reference are recorded in the query registry's ``extra["surgery"]`` (so in every checkpoint
and in model.pt); resuming with another recipe or reference is refused.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from loaders.alignment import index_map
from loaders.collection import Collection
from loaders.object_store import refuse_url
from loaders.plan import split_validation
from loaders.registry import Registry
from streamtotal.config import RunConfig
from streamtotal.data import open_collection
from streamtotal.errors import CheckpointError, ConfigError
from streamtotal.inference.knn_transfer import KnnConfig
from streamtotal.model.totalvi import TotalVAE
from streamtotal.surgery.expand import expand_reference, query_model_config
from streamtotal.surgery.freeze import Freezing, SurgeryConfig, freeze
from streamtotal.training.checkpoint import atomic_write_bytes
from streamtotal.training.priors import estimate_priors
from streamtotal.training.run_dir import RunDir, TrainedModel, load_trained

logger = logging.getLogger(__name__)

ALIGNMENT_FILE = "alignment.json"
ABSENT_GENE_HANDLING = {
    "mask": "reference genes a query study lacks are zero-filled in storage but flagged unmeasured (CiteBatch."
            "rna_mask): they are left out of the RNA likelihood (softmax renormalised over the measured genes, "
            "library = their total), and the encoder reads the model's expected counts given the measured genes "
            "there instead of zeros",
    "zero": "reference genes a query study lacks are zero-filled and read as measured zeros by the encoder and the "
            "RNA likelihood (as scvi-tools' prepare_query_anndata)",
}
"""What each ``[data] absent_genes`` mode does, as written into alignment.json."""


@dataclass
class QuerySurgery:
    """What ``Trainer(surgery=...)`` trains: the expanded, partly frozen model and its optimiser groups.

    Attributes:
        model: the query model (reference weights + new-batch rows), frozen per the recipe.
        freezing: which tensors train.
        batch_rows: names of its batch-indexed tensors (rows ``[:n_reference_batches]`` are the reference's).
        n_reference_batches: batches of the reference.
    """

    model: TotalVAE
    freezing: Freezing
    batch_rows: set[str]
    n_reference_batches: int

    def param_groups(self, weight_decay: float) -> list[dict]:
        """The optimiser's param groups (frozen tensors excluded; see ``Freezing.param_groups``)."""
        return self.freezing.param_groups(weight_decay)


def query_config(reference: TrainedModel, stores, *, epochs: int | None = None, batch_key: str | None = None,
                 min_gene_overlap: float | None = None, train: dict | None = None,
                 absent_genes: str | None = None) -> RunConfig:
    """The query run's config: the reference's [data] read options on the query stores, its architecture
    (``query_model_config``) and its [train] options with ``epochs`` (None = scvi-tools' rule on the query's
    size) and ``train`` overrides. ``data.labels_key`` stays the reference's (a totalANVI config needs one), but
    the query's labels are not read (``build_query_trainer`` opens it without): queries are usually unlabelled
    and the label classifier is frozen. ``absent_genes`` (None = the reference's ``[data] absent_genes``): how
    reference genes the query lacks are read (``DataConfig.absent_genes``)."""
    ref = reference.config
    data = replace(ref.data, stores=tuple(str(s) for s in stores),
                   absent_genes=ref.data.absent_genes if absent_genes is None else absent_genes,
                   batch_key=batch_key if batch_key is not None else ref.data.batch_key,
                   min_gene_overlap=ref.data.min_gene_overlap if min_gene_overlap is None else min_gene_overlap)
    train_cfg = replace(ref.train, max_epochs=epochs, init_from=None, **(train or {}))
    return RunConfig(data=data, model=query_model_config(ref.model), train=train_cfg)


def alignment_report(collection, reference: Registry, captured: list[str]) -> dict:
    """What aligning the query onto the reference did, per study: genes zero-filled / dropped, proteins masked /
    dropped (and whether the panel came in another order), and the new batches; ``absent_genes`` records how the
    reference genes a study lacks are handled (``collection.absent_genes``, see ``ABSENT_GENE_HANDLING``)."""
    genes, proteins = list(reference.gene_names), list(reference.protein_names)
    mode = getattr(collection, "absent_genes", "zero")
    studies = []
    for source in collection.sources:
        g = np.asarray(source.gene_names).astype(str)
        p = np.asarray(source.protein_names).astype(str)
        gmap, pmap = index_map(g, genes), index_map(p, proteins)
        measured_cols = np.asarray(source.protein_panels, dtype=bool).any(axis=0)
        measured = set(p[measured_cols & (pmap >= 0)].tolist())
        missing_genes = sorted(set(genes) - set(g.tolist()))
        kept_order = pmap[pmap >= 0]
        studies.append({
            "study": source.name, "n_cells": int(source.n_obs),
            "genes_missing_handling": mode if missing_genes else "none missing",
            "gene_overlap": float((gmap >= 0).sum()) / max(len(genes), 1),
            "genes_missing_zero_filled": len(missing_genes), "genes_missing_examples": missing_genes[:20],
            "genes_dropped": int((gmap < 0).sum()), "genes_dropped_examples": g[gmap < 0][:20].tolist(),
            "proteins_masked": [name for name in proteins if name not in measured],
            "proteins_dropped": p[pmap < 0].tolist(),
            "protein_order_differs": bool((np.diff(kept_order) < 0).any()),
        })
    registry = collection.registry
    return {"reference_batches": list(reference.batch_categories),
            "new_batches": list(registry.batch_categories[reference.n_batch:]),
            "absent_genes": {"mode": mode, "handling": ABSENT_GENE_HANDLING[mode]},
            "studies": studies, "warnings": captured}


def _log_report(report: dict, out: Path) -> None:
    for s in report["studies"]:
        logger.info(f"streamtotal map: study {s['study']!r} ({s['n_cells']} cells): gene overlap "
                    f"{s['gene_overlap']:.1%}, {s['genes_missing_zero_filled']} genes missing "
                    f"({report['absent_genes']['mode']}), "
                    f"{s['genes_dropped']} dropped; proteins masked {s['proteins_masked']}, dropped "
                    f"{s['proteins_dropped']}"
                    + (" (panel in another order, aligned by name)" if s["protein_order_differs"] else ""))
    logger.info("streamtotal map: new batches %s; report in %s", report["new_batches"], out / ALIGNMENT_FILE)


def _check_resume(out: Path, surgery_record: dict) -> None:
    path = out / "registry.json"
    if not path.is_file():
        return
    saved = json.loads(path.read_text()).get("extra", {}).get("surgery")
    if saved != surgery_record:
        raise CheckpointError(f"{out} was mapped with another reference or surgery recipe ({saved}); resume with the "
                              f"same ones ({surgery_record}) or choose another --out")


def build_query_trainer(reference_run, stores, out, *, surgery: SurgeryConfig = SurgeryConfig(),
                        epochs: int | None = None, batch_key: str | None = None,
                        min_gene_overlap: float | None = None, train: dict | None = None, resume: bool = False,
                        verbose: bool = True, absent_genes: str | None = None, sources: Sequence | None = None):
    """Aligns the query, writes the alignment report, builds and freezes the expanded model, returns the Trainer.

    Args:
        reference_run: the reference run directory (totalVI or totalANVI).
        stores: the query stores (any backend ``open_collection`` reads); empty with ``sources``.
        out: the query run directory.
        surgery: the recipe.
        epochs: query epochs (None = scvi-tools' rule on the query's size).
        batch_key: obs column of the query's batch (default: the reference's).
        min_gene_overlap: refuse a query study sharing less of the reference's genes (default: the reference's).
        train: other [train] overrides (e.g. ``{"batch_size": 128, "weight_decay": 0.0}``).
        resume: continue from the newest checkpoint in ``out``.
        verbose: log the alignment summary (rank 0; logger ``streamtotal.surgery.map_query``, INFO).
        absent_genes: ``"mask"`` or ``"zero"``: how reference genes the query lacks are read (None = the
            reference's ``[data] absent_genes``; see ``DataConfig.absent_genes``).
        sources: in-memory query Sources (e.g. the Python API's ``ArraySource`` of an AnnData) instead of stores,
            aligned onto the reference with the same ``[data]`` options as stores.

    Returns:
        ``(trainer, report)``.

    Raises:
        RunDirError: no trained reference. AlignmentError: too little gene overlap, no proteins, bad batches.
        CheckpointError: resuming with another reference or recipe. ConfigError: nothing to train, or both
        (or neither of) stores and sources.
    """
    from streamtotal.training.trainer import Trainer

    refuse_url(out, "a query run directory", "map into a local directory, then upload it")
    if sources is not None and (len(stores or ()) or not len(sources)):
        raise ConfigError(f"map a query from stores or from in-memory sources, one of them: got {len(stores or ())} "
                          f"stores and {len(sources)} sources")
    out = Path(out)
    reference = load_trained(reference_run)
    config = query_config(reference, stores or (), epochs=epochs, batch_key=batch_key,
                          min_gene_overlap=min_gene_overlap, train=train, absent_genes=absent_genes)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if sources is None:
            collection = open_collection(replace(config.data, labels_key=None), registry=reference.registry,
                                         allow_new_batches=True)
        else:
            data = config.data
            collection = Collection(list(sources), registry=reference.registry, allow_new_batches=True,
                                    batch_key=data.batch_key, labels_key=None,
                                    unlabeled_category=data.unlabeled_category, gene_join=data.gene_join,
                                    min_gene_overlap=data.min_gene_overlap, absent_genes=data.absent_genes)
    messages = [str(w.message) for w in caught]
    for w in caught:  # still shown to the user, and kept in the report
        warnings.warn(w.message, w.category, stacklevel=2)
    record = {"reference": str(Path(reference_run).resolve()), "n_reference_batches": reference.registry.n_batch,
              "recipe": asdict(surgery)}
    collection.registry = replace(collection.registry, extra={**collection.registry.extra, "surgery": record})
    is_main = int(os.environ.get("RANK", "0")) == 0
    report = alignment_report(collection, reference.registry, messages)
    if resume:
        _check_resume(out, record)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        text = json.dumps(report, indent=1)
        atomic_write_bytes(out / ALIGNMENT_FILE, lambda f: f.write(text.encode()))
        if verbose:
            _log_report(report, out)

    tc = config.train
    resuming = resume and RunDir(out).has_checkpoints()
    protein_prior = library_prior = None
    if not resuming:  # a checkpoint holds the new batches' priors
        train_ids, _ = split_validation(collection.n_obs, tc.validation_fraction, tc.seed)
        protein_prior, library_prior = estimate_priors(collection, train_ids, collection.registry.n_batch,
                                                       seed=tc.seed, progress=False)
    model, rows = expand_reference(reference, collection.registry, new_batch_init=surgery.new_batch_init,
                                   protein_prior=protein_prior, library_prior=library_prior, seed=tc.seed)
    n_ref = reference.registry.n_batch
    query = QuerySurgery(model, freeze(model, rows, n_ref, surgery), rows, n_ref)
    return Trainer(config, out, resume=resume, collection=collection, surgery=query), report


@dataclass
class MapResult:
    """What ``map_query`` did: the query run, its alignment report, training summary and label predictions."""

    run_dir: Path
    report: dict
    summary: object
    predictions: list


def check_predictable(reference: TrainedModel, stores, knn) -> None:
    """Refuses, before any training, a ``--predict`` that could not run at the end: a totalVI reference without
    a labels column for kNN transfer, or a query store results cannot be written into.

    Raises:
        ConfigError: naming the reference run or the store, and what to pass instead.
    """
    run = reference.source.parent
    if knn is None and reference.model.label_classifier is None:
        raise ConfigError(f"--predict: reference {run} is a totalVI run without a label classifier; transfer the "
                          "labels of its cells by kNN with --labels-key KEY (their obs column), or map onto a "
                          "totalANVI reference")
    if knn is not None and knn.reference_run is None and not (knn.labels_key or reference.config.data.labels_key):
        raise ConfigError(f"--predict: kNN transfer needs the obs column of reference {run}'s labels; pass "
                          "--labels-key KEY")
    for store in stores:
        if not (Path(str(store)) / "obs" / ".zattrs").is_file():
            raise ConfigError(f"--predict writes into every query store, and {store} is not a local AnnData Zarr "
                              "store; convert it with `streamtotal ingest`, or map without --predict and run "
                              "`streamtotal predict` on a Zarr copy")


def map_query(reference_run, stores, out, *, predict: bool = False, prefix: str = "streamtotal",
              progress: bool = False, knn: KnnConfig | None = None, **kwargs) -> MapResult:
    """Maps ``stores`` onto ``reference_run`` into ``out`` (see ``build_query_trainer`` for the options); with
    ``predict``, writes labels, probabilities, uncertainty and latent into every query store chunk by chunk
    (``predict_labels_many``): by the classifier of a totalANVI reference, or by kNN transfer (``knn``) from
    the reference's labelled cells. The stores are read as one collection, as the mapping read them, so the
    new batches (``batch_key``) mean the same in training and prediction.

    Raises:
        ConfigError: ``predict`` cannot run (checked before training; see ``check_predictable``).
        As ``build_query_trainer``.
    """
    if predict:
        check_predictable(load_trained(reference_run), stores, knn)
    trainer, report = build_query_trainer(reference_run, stores, out, **kwargs)
    summary = trainer.fit()
    predictions = []
    if predict and trainer.dist.is_main:
        from streamtotal.inference.labels import predict_labels_many

        predictions = predict_labels_many(out, stores, prefix=prefix, progress=progress,
                                          device=trainer.config.train.device, knn=knn)
    trainer.dist.barrier()
    trainer.dist.close()
    return MapResult(Path(out), report, summary, predictions)
