"""Bad input through the Python API is refused with streamtotal's own exception types and messages that name
the key, column, cell or option at fault."""

import numpy as np
import pytest

from loaders.errors import InvalidCountsError, LoaderError
from streamtotal import TOTALANVI, TOTALVI
from streamtotal.errors import ConfigError, RunDirError, StreamtotalError

from .conftest import TINY


def test_missing_protein_obsm_key(adata):
    with pytest.raises(ConfigError, match=r"obsm_key 'adt' is not in adata.obsm; its keys are \['protein_expression"):
        TOTALVI.setup_anndata(adata, protein_expression_obsm_key="adt")


def test_batch_key_not_in_obs(adata):
    with pytest.raises(ConfigError, match=r"batch_key 'sample' is not a column of adata.obs.*'batch'"):
        TOTALVI.setup_anndata(adata, protein_expression_obsm_key="protein_expression", batch_key="sample")


def test_normalised_rna_is_not_counts(adata):
    adata.X = adata.X.multiply(1.0 / adata.X.sum(axis=1)).tocsr() * 1e4  # normalize_total
    with pytest.raises(InvalidCountsError, match=r"(?i)cell0.*GENE|GENE.*cell0"):
        TOTALVI.setup_anndata(adata, protein_expression_obsm_key="protein_expression")


def test_log_protein_values_are_not_counts(adata):
    adata.obsm["protein_expression"] = np.log1p(adata.obsm["protein_expression"])
    with pytest.raises(InvalidCountsError, match="PROT"):
        TOTALVI.setup_anndata(adata, protein_expression_obsm_key="protein_expression")


def test_data_not_set_up(adata):
    with pytest.raises(ConfigError, match=r"setup_anndata"):
        TOTALVI(adata)


def test_unsupported_model_options(adata):
    TOTALVI.setup_anndata(adata, protein_expression_obsm_key="protein_expression")
    with pytest.raises(ConfigError, match="gene_likelihood='zinb' is not supported"):
        TOTALVI(adata, gene_likelihood="zinb")
    with pytest.raises(ConfigError, match="latent_distribution='ln'"):
        TOTALVI(adata, latent_distribution="ln")
    with pytest.raises(ConfigError, match="gene_dispersion='gene-cell'"):
        TOTALVI(adata, gene_dispersion="gene-cell")
    with pytest.raises(ConfigError, match="unknown model argument 'n_hiden'"):
        TOTALVI(adata, n_hiden=8)
    with pytest.raises(ConfigError, match="categorical_covariate_keys is not supported"):
        TOTALVI.setup_anndata(adata, protein_expression_obsm_key="protein_expression",
                              categorical_covariate_keys=["batch"])


def test_unsupported_train_options_and_untrained_use(adata):
    TOTALVI.setup_anndata(adata, protein_expression_obsm_key="protein_expression", batch_key="batch")
    model = TOTALVI(adata, **TINY)
    with pytest.raises(ConfigError, match="check_val_every_n_epoch=5"):
        model.train(max_epochs=1, check_val_every_n_epoch=5)
    with pytest.raises(ConfigError, match=r"plan_kwargs: 'momentum'"):
        model.train(max_epochs=1, plan_kwargs={"momentum": 0.9})
    with pytest.raises(ConfigError, match="devices=2"):
        model.train(max_epochs=1, accelerator="gpu", devices=2)
    with pytest.raises(RunDirError, match=r"not trained: call model.train\(\)"):
        model.get_latent_representation()


def test_totalanvi_without_labels(adata):
    TOTALVI.setup_anndata(adata, protein_expression_obsm_key="protein_expression", batch_key="batch")
    with pytest.raises(ConfigError, match="TOTALANVI needs cell-type labels: pass labels_key="):
        TOTALANVI(adata, **TINY)


def test_store_with_a_batch_key_it_lacks(store):
    with pytest.raises((StreamtotalError, LoaderError), match="sample"):
        TOTALVI(str(store), batch_key="sample", **TINY)


def test_write_to_needs_a_store(adata):
    TOTALVI.setup_anndata(adata, protein_expression_obsm_key="protein_expression", batch_key="batch")
    model = TOTALVI(adata, **TINY)
    model.train(max_epochs=1, batch_size=64, progress=False)
    with pytest.raises(ConfigError, match="write_to writes into a store"):
        model.get_latent_representation(write_to="X_totalvi")
