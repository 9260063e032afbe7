"""Query mapping for the Python API (scvi-tools' ``load_query_data`` then ``train``): scArches surgery through
``streamtotal.surgery.map_query``.

Store queries go through ``build_query_trainer`` itself (as ``streamtotal map``). An in-memory query (AnnData /
MuData) is aligned here from its Sources, then takes the same steps with the same functions (alignment report,
expanded reference, freezing, ``Trainer(surgery=...)``): ``build_query_trainer`` opens its query from store paths.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from loaders.collection import Collection
from loaders.plan import split_validation
from streamtotal.surgery.expand import expand_reference
from streamtotal.surgery.freeze import SurgeryConfig, freeze
from streamtotal.surgery.map_query import (ALIGNMENT_FILE, QuerySurgery, alignment_report, build_query_trainer,
                                           query_config)
from streamtotal.training.checkpoint import atomic_write_bytes
from streamtotal.training.priors import estimate_priors
from streamtotal.training.run_dir import RunDir, load_trained


@dataclass(frozen=True)
class PendingQuery:
    """A query waiting for ``train()``: the reference run and the surgery recipe."""

    reference_run: Path
    """The reference's run directory."""
    surgery: SurgeryConfig
    """What query training may change."""


def surgery_config(unfrozen: bool | str = False, freeze_dropout: bool = False) -> SurgeryConfig:
    """The recipe for scvi-tools' ``load_query_data`` switches.

    Args:
        unfrozen: False = scArches (only the new batches' weights train); True = every weight; or one of
            ``SurgeryConfig.unfrozen``'s values ("covariates", "covariates+batchnorm", "all").
        freeze_dropout: turn dropout off during query training.

    Raises:
        ConfigError: an unknown ``unfrozen`` value (from ``SurgeryConfig``).
    """
    mode = {False: "covariates", True: "all"}.get(unfrozen, unfrozen) if isinstance(unfrozen, bool) else unfrozen
    return SurgeryConfig(unfrozen=mode, dropout=not freeze_dropout)


def query_trainer(pending: PendingQuery, *, stores: tuple[str, ...], sources: list | None, batch_key: str | None,
                  out: Path, epochs: int | None, train: dict[str, Any], resume: bool):
    """The Trainer of a query run (``streamtotal map``'s, without its printing).

    Args:
        pending: reference and recipe.
        stores: the query stores (when ``sources`` is None).
        sources: in-memory query Sources instead of stores.
        batch_key: obs column of the query's batches (None = the reference's).
        out: the query run directory.
        epochs: query epochs (None = scvi-tools' rule).
        train: ``[train]`` overrides.
        resume: continue from the newest checkpoint in ``out``.

    Returns:
        The Trainer.
    """
    if sources is None:
        trainer, _ = build_query_trainer(pending.reference_run, stores, out, surgery=pending.surgery, epochs=epochs,
                                         batch_key=batch_key, train=train, resume=resume, verbose=False)
        return trainer
    from streamtotal.training.trainer import Trainer

    reference = load_trained(pending.reference_run)
    config = query_config(reference, (), epochs=epochs, batch_key=batch_key, train=train)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        collection = Collection(sources, registry=reference.registry, allow_new_batches=True,
                                batch_key=config.data.batch_key, labels_key=None)
    for w in caught:
        warnings.warn(w.message, w.category, stacklevel=2)
    record = {"reference": str(Path(pending.reference_run).resolve()),
              "n_reference_batches": reference.registry.n_batch, "recipe": asdict(pending.surgery)}
    collection.registry = replace(collection.registry, extra={**collection.registry.extra, "surgery": record})
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(alignment_report(collection, reference.registry, [str(w.message) for w in caught]), indent=1)
    atomic_write_bytes(out / ALIGNMENT_FILE, lambda f: f.write(text.encode()))
    tc = config.train
    protein_prior = library_prior = None
    if not (resume and RunDir(out).has_checkpoints()):
        train_ids, _ = split_validation(collection.n_obs, tc.validation_fraction, tc.seed)
        protein_prior, library_prior = estimate_priors(collection, train_ids, collection.registry.n_batch,
                                                       seed=tc.seed, progress=False)
    model, rows = expand_reference(reference, collection.registry, new_batch_init=pending.surgery.new_batch_init,
                                   protein_prior=protein_prior, library_prior=library_prior, seed=tc.seed)
    n_ref = reference.registry.n_batch
    surgery = QuerySurgery(model, freeze(model, rows, n_ref, pending.surgery), rows, n_ref)
    return Trainer(config, out, resume=resume, collection=collection, surgery=surgery)
