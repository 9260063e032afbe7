"""``streamtotal.TOTALANVI``: totalANVI (a cell-type classifier on z trained jointly) with scvi-tools'
``TOTALANVI`` calls: ``from_totalvi_model``, ``predict``."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from streamtotal.api import data_setup as ds
from streamtotal.api.downstream import LATENT_BATCH
from streamtotal.api.totalvi_model import TOTALVI
from streamtotal.errors import ConfigError


class TOTALANVI(TOTALVI):
    """totalANVI on in-memory data or stores (scvi-tools' ``TOTALANVI`` interface); see ``TOTALVI``.

    Args:
        adata: as ``TOTALVI``; its setup (or ``labels_key=`` for stores) must name the labels column.
        linear_classifier: a linear classifier on z instead of scvi-tools' default hidden layers.
        **kwargs: as ``TOTALVI``.

    Raises:
        ConfigError: no labels column.
    """

    _label_classifier = True
    _model_name = "TotalANVI"

    def __init__(self, adata: Any = None, n_latent: int = 20, gene_dispersion: str = "gene",
                 protein_dispersion: str = "protein", gene_likelihood: str = "nb",
                 latent_distribution: str = "normal", empirical_protein_background_prior: bool | None = None,
                 override_missing_proteins: bool = False, linear_classifier: bool = False, **kwargs: Any) -> None:
        if not ds.is_anndata(adata) and not ds.is_mudata(adata):
            labelled = kwargs.get("labels_key") is not None
        else:
            labelled = ds.read_setup(adata).labels_key is not None
        if not labelled:
            raise ConfigError("TOTALANVI needs cell-type labels: pass labels_key= to setup_anndata / setup_mudata "
                              "(or to the constructor for stores)")
        if linear_classifier:
            kwargs["label_classifier_n_layers"] = 0
        super().__init__(adata, n_latent, gene_dispersion, protein_dispersion, gene_likelihood, latent_distribution,
                         empirical_protein_background_prior, override_missing_proteins, **kwargs)

    @classmethod
    def from_totalvi_model(cls, totalvi_model: TOTALVI, unlabeled_category: str = "unlabeled",
                           labels_key: str | None = None, adata: Any = None, **totalanvi_kwargs: Any) -> "TOTALANVI":
        """A TOTALANVI on the TOTALVI's data whose training starts from its weights (scvi-tools' call).

        Args:
            totalvi_model: a trained TOTALVI.
            unlabeled_category: label value meaning "no label".
            labels_key: obs column of the labels (default: the one set up on the data).
            adata: other data (set up like the TOTALVI's); default the TOTALVI's.
            **totalanvi_kwargs: ``TOTALANVI`` arguments (the architecture is the TOTALVI's).

        Returns:
            An untrained TOTALANVI; ``train()`` copies every shared weight from the TOTALVI's run first.

        Raises:
            ConfigError: the TOTALVI is not trained, or no labels column is known.
        """
        trained = totalvi_model._require_trained()
        data = adata if adata is not None else (totalvi_model.adata if totalvi_model.adata is not None
                                                else list(totalvi_model.stores))
        model_kwargs = _architecture(trained.config.model)
        model_kwargs.update(totalanvi_kwargs)
        if ds.is_anndata(data) or ds.is_mudata(data):
            setup = ds.read_setup(data) if adata is not None else totalvi_model.setup
            setup = replace(setup, labels_key=labels_key or setup.labels_key, unlabeled_category=unlabeled_category)
            if setup.labels_key is None:
                raise ConfigError("from_totalvi_model: pass labels_key= (the obs column of the cell types)")
            (ds.check_mudata if ds.is_mudata(data) else ds.check_anndata)(data, setup)
            ds.record_setup(data, setup)
            model = cls(data, **model_kwargs)
        else:
            source = trained.config.data
            model = cls(data, batch_key=source.batch_key, labels_key=labels_key or source.labels_key,
                        protein_key=source.protein_key, unlabeled_category=unlabeled_category,
                        gene_join=source.gene_join, **model_kwargs)
        model._init_from = Path(totalvi_model.run_dir)
        model._keep_alive = totalvi_model  # its temporary run directory lives as long as the TOTALVI object
        return model

    def predict(self, adata: Any = None, indices: Sequence[int] | None = None, soft: bool = False,
                batch_size: int | None = None, use_posterior_mean: bool = True, *,
                write_to: str | None = None) -> np.ndarray | pd.DataFrame | dict:
        """Cell-type predictions of the classifier on the posterior mean of z (scvi-tools' ``predict``).

        Args:
            adata, indices, batch_size: as ``get_latent_representation``.
            soft: class probabilities (DataFrame, one column per label) instead of the predicted labels.
            use_posterior_mean: must be True (the classifier reads the posterior mean, as in training).
            write_to: on a store, write labels, probabilities and uncertainty under this prefix as
                ``streamtotal predict --prefix`` does, and return what was written.

        Returns:
            ``[cells]`` label names, a cells x labels DataFrame (``soft``), or with ``write_to`` the written keys.
        """
        if not use_posterior_mean:
            raise ConfigError("use_posterior_mean=False is not supported: the classifier reads the posterior mean")
        trained = self._require_trained()
        size = batch_size or LATENT_BATCH
        if write_to is not None:
            from streamtotal.inference.labels import predict_labels

            if indices is not None:
                raise ConfigError("write_to predicts every cell of the store: drop indices=")
            result = predict_labels(trained, self._store_for_write(adata), prefix=write_to, batch_size=size,
                                    device=self._device, progress=self._progress)
            return dict(result.written)
        from streamtotal.inference.labels import classify_latent

        post = self._posterior(adata, size)
        ids = None if indices is None else np.asarray(indices, dtype=np.int64)
        z = torch.as_tensor(post.latent(ids), device=post.device)
        with torch.no_grad():
            probs = classify_latent(post.model, z)["probs"].float().cpu().numpy()
        labels = list(trained.registry.label_categories)
        if soft:
            cells = self._cell_names(adata, post)
            return pd.DataFrame(probs, index=cells if ids is None else cells[ids], columns=labels)
        return np.asarray(labels, dtype=object)[probs.argmax(axis=1)]


def _architecture(model) -> dict[str, Any]:
    """The TOTALVI's architecture as constructor keywords, so the TOTALANVI can take its weights."""
    keep = ("n_latent", "n_hidden", "n_layers_encoder", "n_layers_decoder", "dropout_rate_encoder",
            "dropout_rate_decoder", "use_batch_norm", "use_layer_norm", "gene_dispersion", "protein_dispersion",
            "log_variational", "scale_encoder_input", "protein_input_mean", "latent_library",
            "empirical_protein_background_prior", "foreground_activation", "encode_covariates",
            "deeply_inject_covariates", "adversarial_classifier")
    return {k: getattr(model, k) for k in keep}
