"""``load_query_data`` and query training of ``TOTALVI`` / ``TOTALANVI`` (scArches surgery; see query_model.py)."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from loaders.collection import Collection
from streamtotal.api import data_setup as ds
from streamtotal.api.train_options import device_name
from streamtotal.data import open_collection
from streamtotal.errors import ConfigError
from streamtotal.training.run_dir import load_trained


class QueryMixin:
    """scvi-tools' ``load_query_data`` (a classmethod giving an untrained query model) and the query branch of
    ``train`` (``TOTALVI`` provides ``_temporary_run_dir`` and the attributes set here)."""

    def _train_query(self, tc, device: str, progress: bool, run_dir, resume: bool) -> None:
        """Query training (after ``load_query_data``): the reference's architecture, partly frozen."""
        from streamtotal.api.query_model import query_trainer

        target = Path(run_dir) if run_dir is not None else self._temporary_run_dir()
        overrides = {k: v for k, v in tc.__dict__.items() if k not in ("max_epochs", "init_from")}
        sources = None if self.stores else self._collection.sources
        trainer = query_trainer(self._query, stores=self.stores, sources=sources,
                                batch_key=self.setup.batch_key if self.setup is not None else self._query_batch_key,
                                out=target, epochs=tc.max_epochs, train=overrides, resume=resume)
        try:
            trainer.fit()
        finally:
            trainer.dist.close()
        self.config, self.run_dir, self._trained = trainer.config, target, load_trained(target)
        self._collection = trainer.collection
        self._device, self._progress, self._seed = device, progress, tc.seed

    @classmethod
    def load_query_data(cls, adata: Any, reference_model: Any, inplace_subset_query_vars: bool = False,
                        accelerator: str = "auto", device: Any = "auto", unfrozen: bool | str = False,
                        freeze_dropout: bool = False, *, batch_key: str | None = None, **kwargs: Any) -> "TOTALVI":
        """A query model for scArches surgery onto a trained reference (scvi-tools' call); ``train()`` maps it.

        The query is aligned onto the reference's genes and proteins by name (missing genes zero-filled, missing
        proteins masked, extra ones dropped with a warning) and its batches are new ones; training updates only
        the new batches' weights (``unfrozen=False``, as scArches), streamed and checkpointed as ``streamtotal
        map``.

        Args:
            adata: the query: an AnnData / MuData set up like the reference's, or store path(s).
            reference_model: a trained TOTALVI / TOTALANVI, or its run directory.
            inplace_subset_query_vars: ignored (alignment is by name, never by subsetting the query).
            accelerator, device: where training and inference run.
            unfrozen: False (scArches), True (every weight) or a ``SurgeryConfig.unfrozen`` value.
            freeze_dropout: no dropout during query training.
            batch_key: for store queries, the obs column of their batches (default the reference's).
            **kwargs: scvi-tools' finer freezing switches, refused (use ``unfrozen``).

        Returns:
            An untrained model of this class on the query data.

        Raises:
            ConfigError: an unsupported switch, or a reference that is not trained.
        """
        from streamtotal.api.query_model import PendingQuery, surgery_config

        if kwargs:
            raise ConfigError(f"load_query_data: {sorted(kwargs)} are not supported; choose what trains with "
                              "unfrozen=False (new batches only), 'covariates+batchnorm' or True (everything)")
        reference = (reference_model.run_dir if hasattr(reference_model, "run_dir") else Path(reference_model))
        if reference is None:
            raise ConfigError("load_query_data: the reference model is not trained")
        trained = load_trained(reference)
        model = cls.__new__(cls)
        model.config, model.run_dir, model._trained, model._init_from = trained.config, None, None, None
        model._device, model._progress, model._seed = device_name(accelerator, device), True, 0
        model.adata, model.stores, model.setup = None, (), None
        model._query = PendingQuery(Path(reference), surgery_config(unfrozen, freeze_dropout))
        model._query_batch_key = batch_key
        model._keep_alive = reference_model  # a reference's temporary run directory lives as long as it does
        if ds.is_store_list(adata):
            paths = [adata] if isinstance(adata, (str, os.PathLike)) else list(adata)
            model.stores = tuple(str(p) for p in paths)
            data = replace(trained.config.data, stores=model.stores,
                           batch_key=batch_key or trained.config.data.batch_key)
            model._collection = open_collection(replace(data, labels_key=None), registry=trained.registry,
                                                allow_new_batches=True)
        else:
            model.adata, model.setup = adata, ds.read_setup(adata)
            model._collection = Collection(ds.sources_for(adata, model.setup), registry=trained.registry,
                                           allow_new_batches=True, batch_key=model.setup.batch_key, labels_key=None)
        return model
