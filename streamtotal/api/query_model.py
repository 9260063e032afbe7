"""Query mapping for the Python API (scvi-tools' ``load_query_data`` then ``train``): scArches surgery through
``streamtotal.surgery.map_query``.

Store queries and in-memory queries (AnnData / MuData, as Sources) both go through ``build_query_trainer``, as
``streamtotal map``: the same alignment, report, expanded reference, freezing and ``Trainer(surgery=...)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streamtotal.surgery.freeze import SurgeryConfig
from streamtotal.surgery.map_query import build_query_trainer


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
    trainer, _ = build_query_trainer(pending.reference_run, stores if sources is None else (), out,
                                     surgery=pending.surgery, epochs=epochs, batch_key=batch_key, train=train,
                                     resume=resume, verbose=False, sources=sources)
    return trainer
