"""``streamtotal.TOTALVI``: scvi-tools' TOTALVI calls over streamtotal's engine.

The object holds its data (an AnnData / MuData in memory, a backed AnnData, or store paths) and, once trained or
loaded, a run directory: the same directory ``streamtotal train`` writes and every CLI command reads. ``train``
drives the streaming ``Trainer``; the downstream methods (``downstream.py``) drive the inference layer;
``load_query_data`` drives scArches surgery (``query_model.py``).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import weakref
from dataclasses import replace
from pathlib import Path
from typing import Any

from loaders.collection import Collection
from loaders.object_store import refuse_url
from streamtotal.api import data_setup as ds
from streamtotal.api.downstream import DownstreamMixin
from streamtotal.api.global_rng import preserved_global_rng
from streamtotal.api.history import history_from_metrics
from streamtotal.api.model_kwargs import model_config, summary
from streamtotal.api.persistence import SaveLoadMixin
from streamtotal.api.posterior_access import CollectionPosterior
from streamtotal.api.query_mixin import QueryMixin
from streamtotal.api.train_options import train_config
from streamtotal.config import DataConfig, RunConfig
from streamtotal.data import open_collection
from streamtotal.errors import ConfigError, RunDirError
from streamtotal.training.run_dir import TrainedModel, load_trained

log = logging.getLogger("streamtotal.api")

_UNSUPPORTED_SETUP = ("panel_key", "size_factor_key", "categorical_covariate_keys", "continuous_covariate_keys")


def _refuse_unsupported(kwargs: dict, where: str) -> None:
    for key in _UNSUPPORTED_SETUP:
        if kwargs.pop(key, None) is not None:
            raise ConfigError(f"{where}: {key} is not supported by streamtotal (batch_key is its one covariate)")
    if kwargs:
        raise ConfigError(f"{where}: unknown arguments {sorted(kwargs)}")


class TOTALVI(SaveLoadMixin, QueryMixin, DownstreamMixin):
    """totalVI on an AnnData / MuData in memory or on stores of any size (scvi-tools' ``TOTALVI`` interface).

    Args:
        adata: an AnnData set up with ``setup_anndata``, a MuData set up with ``setup_mudata``, a store path
            (Zarr, ``.h5ad``, TileDB-SOMA, ``lamin://``, ``s3://``) or a list of them (several studies), or None
            (a model loaded without data).
        n_latent, gene_dispersion, protein_dispersion, gene_likelihood, latent_distribution,
            empirical_protein_background_prior: as scvi-tools (see ``model_kwargs.model_config``).
        override_missing_proteins: as scvi-tools: all-zero proteins of a batch are true zeros, not unmeasured.
        batch_key, labels_key, protein_key, unlabeled_category, gene_join: for stores, what ``setup_anndata``
            records for an AnnData (``--batch-key``, ``--labels-key``, ``--protein-key`` of the CLI).
        **model_kwargs: scvi-tools' ``TOTALVAE`` keywords or ``ModelConfig`` fields.

    Raises:
        ConfigError: data not set up, setup keywords given with an AnnData, or an unsupported model option.
        LoaderError: the data cannot be read or aligned (e.g. ``InvalidCountsError``, ``AlignmentError``).
    """

    _label_classifier = False
    _model_name = "TotalVI"

    def __init__(self, adata: Any = None, n_latent: int = 20, gene_dispersion: str = "gene",
                 protein_dispersion: str = "protein", gene_likelihood: str = "nb",
                 latent_distribution: str = "normal", empirical_protein_background_prior: bool | None = None,
                 override_missing_proteins: bool = False, *, batch_key: str | None = None,
                 labels_key: str | None = None, protein_key: str = "protein_expression",
                 unlabeled_category: str = "unlabeled", gene_join: str = "inner", **model_kwargs: Any) -> None:
        self.adata = None
        self.stores: tuple[str, ...] = ()
        self.setup: ds.DataSetup | None = None
        if ds.is_store_list(adata):
            paths = [adata] if isinstance(adata, (str, os.PathLike)) else list(adata)
            self.stores = tuple(str(p) for p in paths)
            data = DataConfig(stores=self.stores, batch_key=batch_key, labels_key=labels_key, protein_key=protein_key,
                              unlabeled_category=unlabeled_category, gene_join=gene_join)
            self._collection = open_collection(data)
        elif adata is not None:
            if batch_key is not None or labels_key is not None:
                raise ConfigError("batch_key / labels_key of an AnnData or MuData are set with "
                                  "TOTALVI.setup_anndata(adata, ...) / setup_mudata(mdata, ...), not the constructor")
            self.adata = adata
            setup = ds.read_setup(adata)
            if override_missing_proteins and not setup.override_missing_proteins:
                setup = replace(setup, override_missing_proteins=True)
            self.setup = setup
            data = DataConfig(batch_key=setup.batch_key, labels_key=setup.labels_key,
                              unlabeled_category=setup.unlabeled_category,
                              protein_key=setup.protein_expression_obsm_key or protein_key)
            self._collection = Collection(ds.sources_for(adata, setup), batch_key=setup.batch_key,
                                          labels_key=setup.labels_key, unlabeled_category=setup.unlabeled_category)
        else:
            raise ConfigError("TOTALVI needs data: an AnnData / MuData (set up first) or store path(s); "
                              "use TOTALVI.load(run_dir) for a trained model")
        n_proteins = self._collection.registry.n_proteins
        model = model_config(n_proteins, n_latent=n_latent, gene_dispersion=gene_dispersion,
                             protein_dispersion=protein_dispersion, gene_likelihood=gene_likelihood,
                             latent_distribution=latent_distribution,
                             empirical_protein_background_prior=empirical_protein_background_prior, **model_kwargs)
        if self._label_classifier:
            model = replace(model, label_classifier=True)
        self.config = RunConfig(data=data, model=model)
        self.run_dir: Path | None = None
        self._trained: TrainedModel | None = None
        self._init_from: Path | None = None
        self._query = None
        self._query_batch_key: str | None = None
        self._device, self._progress, self._seed = "auto", True, 0

    # ------------------------------------------------------------------ data registration (scvi-tools)

    @classmethod
    def setup_anndata(cls, adata: Any, protein_expression_obsm_key: str, protein_names_uns_key: str | None = None,
                      batch_key: str | None = None, panel_key: str | None = None, layer: str | None = None,
                      size_factor_key: str | None = None, categorical_covariate_keys: list | None = None,
                      continuous_covariate_keys: list | None = None, *, labels_key: str | None = None,
                      unlabeled_category: str = "unlabeled", **kwargs: Any) -> None:
        """Records where ``adata`` keeps RNA counts, protein counts, batch and labels (scvi-tools' call).

        Args:
            adata: the AnnData (in memory or backed); the setup goes into ``adata.uns["_streamtotal_setup"]``.
            protein_expression_obsm_key: ``obsm`` key of the protein counts.
            protein_names_uns_key: ``uns`` key of the protein names when ``obsm`` holds an array.
            batch_key: obs column of the batch; None = one batch.
            layer: layer of the RNA counts; None = ``X``.
            labels_key: obs column of cell types (totalANVI; also recorded for TOTALVI).
            unlabeled_category: label value meaning "no label".
            panel_key, size_factor_key, categorical_covariate_keys, continuous_covariate_keys: scvi-tools'
                arguments streamtotal does not implement; refused unless None (the batch is its one covariate).

        Raises:
            ConfigError: a key names nothing in ``adata``, or an unsupported scvi-tools argument.
            InvalidCountsError: RNA or protein values are not counts (NaN, negative, or non-integer such as
                normalised or log values), naming the cell and feature.
        """
        _refuse_unsupported(dict(kwargs, panel_key=panel_key, size_factor_key=size_factor_key,
                                 categorical_covariate_keys=categorical_covariate_keys,
                                 continuous_covariate_keys=continuous_covariate_keys), f"{cls.__name__}.setup_anndata")
        if not ds.is_anndata(adata):
            raise ConfigError(f"{cls.__name__}.setup_anndata needs an AnnData, got {type(adata).__name__} "
                              "(a MuData goes to setup_mudata, a store path to the constructor)")
        setup = ds.DataSetup(method="setup_anndata", protein_expression_obsm_key=protein_expression_obsm_key,
                             protein_names_uns_key=protein_names_uns_key, layer=layer, batch_key=batch_key,
                             labels_key=labels_key, unlabeled_category=unlabeled_category)
        ds.check_anndata(adata, setup)
        ds.record_setup(adata, setup)

    @classmethod
    def setup_mudata(cls, mdata: Any, rna_layer: str | None = None, protein_layer: str | None = None,
                     batch_key: str | None = None, panel_key: str | None = None, size_factor_key: str | None = None,
                     categorical_covariate_keys: list | None = None, continuous_covariate_keys: list | None = None,
                     modalities: dict[str, str] | None = None, *, labels_key: str | None = None,
                     unlabeled_category: str = "unlabeled", **kwargs: Any) -> None:
        """Records where ``mdata`` keeps RNA counts, protein counts, batch and labels (scvi-tools' call).

        Args:
            mdata: the MuData; the setup goes into ``mdata.uns["_streamtotal_setup"]``.
            rna_layer, protein_layer: layers of the counts in their modality; None = its ``X``.
            batch_key: obs column (of ``mdata.obs`` or the RNA modality) of the batch.
            modalities: scvi-tools' ``{"rna_layer": RNA_MODALITY, "protein_layer": PROTEIN_MODALITY, ...}``.
            labels_key, unlabeled_category, panel_key, size_factor_key, categorical_covariate_keys,
                continuous_covariate_keys: as ``setup_anndata``.

        Raises:
            ConfigError: a modality, layer or column is missing, or the modalities list different cells.
            InvalidCountsError: values that are not counts.
        """
        _refuse_unsupported(dict(kwargs, panel_key=panel_key, size_factor_key=size_factor_key,
                                 categorical_covariate_keys=categorical_covariate_keys,
                                 continuous_covariate_keys=continuous_covariate_keys), f"{cls.__name__}.setup_mudata")
        if not ds.is_mudata(mdata):
            raise ConfigError(f"{cls.__name__}.setup_mudata needs a MuData, got {type(mdata).__name__}")
        rna_mod, protein_mod = ds.mudata_modalities(mdata, modalities)
        setup = ds.DataSetup(method="setup_mudata", rna_modality=rna_mod, protein_modality=protein_mod,
                             rna_layer=rna_layer, protein_layer=protein_layer, batch_key=batch_key,
                             labels_key=labels_key, unlabeled_category=unlabeled_category)
        ds.check_mudata(mdata, setup)
        ds.record_setup(mdata, setup)

    # ------------------------------------------------------------------ training

    def train(self, max_epochs: int | None = None, lr: float | None = None, accelerator: str = "auto",
              devices: Any = "auto", train_size: float | None = None, validation_size: float | None = None,
              shuffle_set_split: bool = True, batch_size: int | None = None, early_stopping: bool = True,
              check_val_every_n_epoch: int | None = None, reduce_lr_on_plateau: bool = True,
              n_steps_kl_warmup: int | None = None, n_epochs_kl_warmup: int | None = None,
              adversarial_classifier: bool | None = None, datasplitter_kwargs: dict | None = None,
              plan_kwargs: dict | None = None, *, run_dir: str | Path | None = None, resume: bool = False,
              progress: bool = True, **trainer_kwargs: Any) -> None:
        """Trains with the streaming Trainer (checkpoints, exact resume), as ``streamtotal train``.

        Args:
            max_epochs: epochs; None = scvi-tools' rule from the number of cells.
            lr: Adam learning rate (default 4e-3 totalVI, 1e-3 totalANVI); also ``plan_kwargs["lr"]``.
            accelerator, devices: "auto" / "cpu" / "gpu" and one device (several: use torchrun with the CLI).
            train_size, validation_size: training / held-out fractions (default 0.9 / 0.1).
            shuffle_set_split: must be True (the held-out cells are drawn from the seed).
            batch_size: cells per minibatch (default 256 totalVI, 128 totalANVI).
            early_stopping: stop after 45 epochs without validation improvement (scvi-tools' TOTALVI patience).
            check_val_every_n_epoch: None or 1 (validation runs every epoch).
            reduce_lr_on_plateau: as scvi-tools.
            n_steps_kl_warmup, n_epochs_kl_warmup: KL warm-up length (converted to a fraction of the run).
            adversarial_classifier: add an adversarial batch classifier (None = no).
            datasplitter_kwargs: unsupported (must be empty).
            plan_kwargs: ``lr``, ``weight_decay``, ``eps``, ``reduce_lr_on_plateau``, ``lr_factor``,
                ``lr_patience``, ``n_epochs_kl_warmup``, ``n_steps_kl_warmup`` or any ``TrainConfig`` field.
            run_dir: the run directory (None = a temporary one, deleted with the object; ``save`` keeps it).
            resume: continue from the newest checkpoint in ``run_dir``.
            progress: show the tqdm progress bar.
            **trainer_kwargs: ``TrainConfig`` fields (``seed``, ``checkpoint_every_steps``, ``num_workers``,
                ``early_stopping_patience``, ``precision``, ...).

        Raises:
            ConfigError: an unsupported option. RunDirError: ``run_dir`` holds another run and ``resume`` is False.
            CheckpointError: ``resume`` with a config or data that differ from the checkpoint's.
        """
        from streamtotal.training.trainer import Trainer

        tc, device, model = train_config(
            self.config.model, n_cells=self._collection.n_obs, max_epochs=max_epochs, lr=lr,
            accelerator=accelerator, devices=devices, train_size=train_size, validation_size=validation_size,
            shuffle_set_split=shuffle_set_split, batch_size=batch_size, early_stopping=early_stopping,
            check_val_every_n_epoch=check_val_every_n_epoch, reduce_lr_on_plateau=reduce_lr_on_plateau,
            n_steps_kl_warmup=n_steps_kl_warmup, n_epochs_kl_warmup=n_epochs_kl_warmup,
            adversarial_classifier=adversarial_classifier, datasplitter_kwargs=datasplitter_kwargs,
            plan_kwargs=plan_kwargs, progress=progress, **trainer_kwargs)
        if self._query is not None and self.run_dir is None:
            self._train_query(tc, device, progress, run_dir, resume)
            return
        start_from = self.run_dir if self.run_dir is not None else self._init_from
        if start_from is not None and not resume and "init_from" not in trainer_kwargs:
            # scvi-tools continues from the current weights on a second train() (and TOTALANVI from its TOTALVI):
            # a fresh run directory whose weights start from the previous run's.
            tc = replace(tc, init_from=str(Path(start_from).resolve()))
        config = RunConfig(data=self.config.data, model=model, train=tc)
        # The model object keeps, copies and reads its run directory as local files (save, history, load).
        refuse_url(run_dir, "the run directory of a model object", "train with `streamtotal train --out s3://...`, "
                   "or train into a local directory and upload it")
        target = Path(run_dir) if run_dir is not None else self._temporary_run_dir()
        with preserved_global_rng():  # the user's random, numpy and torch generators are theirs
            trainer = Trainer(config, target, resume=resume, collection=self._collection)
            try:
                trainer.fit()
            finally:
                trainer.dist.close()
            self._trained = load_trained(target)  # builds the module (random init) before loading its weights
        self.config = trainer.config
        self.run_dir = target
        self._device, self._progress, self._seed = device, progress, tc.seed
        log.info("trained %s in %s", self._model_name, target)

    def _temporary_run_dir(self) -> Path:
        path = Path(tempfile.mkdtemp(prefix="streamtotal-run-"))
        weakref.finalize(self, shutil.rmtree, str(path), ignore_errors=True)
        return path

    @property
    def is_trained(self) -> bool:
        """True once trained or loaded (scvi-tools' ``is_trained``)."""
        return self._trained is not None

    is_trained_ = is_trained

    @property
    def history(self) -> dict:
        """scvi-tools' training history: ``{"elbo_train": DataFrame, "elbo_validation": ..., "kl_weight": ...}``,
        each indexed by epoch (from the run's ``metrics.jsonl``; see ``history.py``)."""
        if self.run_dir is None:
            return {}
        return history_from_metrics(self.run_dir / "metrics.jsonl")

    history_ = history

    @property
    def module(self):
        """The trained ``TotalVAE`` (scvi-tools' ``model.module``).

        Raises:
            RunDirError: the model is not trained.
        """
        return self._require_trained().model

    @property
    def summary_string(self) -> str:
        """scvi-tools' model summary line."""
        return f"{self._model_name} Model with the following params: \n{summary(self.config.model)}"

    def __repr__(self) -> str:
        registry = (self._trained.registry if self._trained is not None
                    else getattr(getattr(self, "_collection", None), "registry", None))
        data = "no data"
        if getattr(self, "_collection", None) is not None:
            where = ", ".join(self.stores) if self.stores else ("MuData" if ds.is_mudata(self.adata) else "AnnData")
            data = f"{self._collection.n_obs} cells from {where}"
        shape = (f"{registry.n_genes} genes, {registry.n_proteins} proteins, {registry.n_batch} batches"
                 if registry is not None else "")
        status = f"Trained (run directory {self.run_dir})" if self.is_trained else "Not Trained"
        return f"{self.summary_string}\nData: {data}; {shape}\nTraining status: {status}"

    # ------------------------------------------------------------------ save / load
    def _attach(self, data: Any) -> None:
        """Makes ``data`` the model's data, aligned onto its registry (no training)."""
        registry = self._require_trained().registry
        if ds.is_store_list(data):
            paths = [data] if isinstance(data, (str, os.PathLike)) else list(data)
            self.stores = tuple(str(p) for p in paths)
            self._collection = open_collection(replace(self.config.data, stores=self.stores), registry=registry)
            return
        self.adata, self.setup = data, self._setup_of(data)
        self._collection = Collection(ds.sources_for(data, self.setup), registry=registry,
                                      batch_key=self.setup.batch_key, labels_key=None)

    def _setup_of(self, data: Any) -> ds.DataSetup:
        """The setup recorded on ``data``, or the model's own (scvi-tools transfers the setup to new data)."""
        try:
            return ds.read_setup(data)
        except ConfigError:
            if self.setup is None or self.setup.method != ("setup_mudata" if ds.is_mudata(data) else "setup_anndata"):
                raise
            setup = self.setup
        check = ds.check_mudata if ds.is_mudata(data) else ds.check_anndata
        check(data, setup)
        return setup

    # ------------------------------------------------------------------ plumbing of the downstream methods

    def _require_trained(self) -> TrainedModel:
        if self._trained is None:
            raise RunDirError(f"this {type(self).__name__} is not trained: call model.train() first, or "
                              f"{type(self).__name__}.load(run_dir)")
        return self._trained

    def _posterior(self, adata: Any, batch_size: int, progress: bool | None = None):
        """A ``StorePosterior`` over ``adata`` (None = the model's data) aligned onto the trained registry."""
        trained = self._require_trained()
        show = self._progress if progress is None else progress
        if adata is None:
            if self._collection is None:
                raise ConfigError("this model was loaded without data: pass adata= (an AnnData / MuData set up like "
                                  "the model's, or store paths)")
            if len(self.stores) == 1:
                return self._store_posterior(self.stores[0], batch_size, progress=show)
            collection = self._collection
            if collection.registry != trained.registry:  # aligned for training: realign onto the model's registry
                self._attach(self.adata if self.adata is not None else list(self.stores))
                collection = self._collection
            return CollectionPosterior(trained, collection, batch_size=batch_size, device=self._device,
                                       progress=show)
        if ds.is_store_list(adata):
            paths = [adata] if isinstance(adata, (str, os.PathLike)) else list(adata)
            if len(paths) == 1:
                return self._store_posterior(str(paths[0]), batch_size, progress=show)
            data = replace(trained.config.data, stores=tuple(str(p) for p in paths))
            return CollectionPosterior(trained, open_collection(data, registry=trained.registry),
                                       batch_size=batch_size, device=self._device, progress=show)
        setup = self._setup_of(adata)
        collection = Collection(ds.sources_for(adata, setup), registry=trained.registry, batch_key=setup.batch_key,
                                labels_key=None)
        return CollectionPosterior(trained, collection, batch_size=batch_size, device=self._device, progress=show)

    def _store_posterior(self, store: str, batch_size: int, progress: bool | None = None):
        from streamtotal.inference.expression import StorePosterior

        return StorePosterior(self._require_trained(), store, batch_size=batch_size, device=self._device,
                              progress=self._progress if progress is None else progress)

    def _store_for_write(self, adata: Any) -> str:
        if adata is None and len(self.stores) == 1:
            return self.stores[0]
        if isinstance(adata, (str, os.PathLike)):
            return str(adata)
        raise ConfigError("write_to writes into a store: it needs a model on one store (TOTALVI('data.zarr')) or "
                          "adata='data.zarr'; for in-memory data, call without write_to and keep the result")

    def _cell_names(self, adata: Any, post) -> Any:
        import pandas as pd

        data = self.adata if adata is None else adata
        if data is not None and not ds.is_store_list(data):
            setup = self.setup if adata is None else self._setup_of(adata)
            return pd.Index(ds.cell_names(data, setup))
        return post.collection.obs_frame().index
