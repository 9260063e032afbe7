"""Options of the downstream methods on an in-memory model: subsets, orders, sample axes and scores."""

import numpy as np
import pytest

from streamtotal import TOTALVI
from streamtotal.errors import ConfigError

from .conftest import FAST, TINY


@pytest.fixture(scope="module")
def model(simulation):
    import torch

    torch.set_num_threads(1)
    adata = simulation.to_anndata()
    TOTALVI.setup_anndata(adata, protein_expression_obsm_key="protein_expression", batch_key="batch")
    trained = TOTALVI(adata, **TINY)
    trained.train(max_epochs=2, **FAST)
    return trained


def test_expression_subsets_and_axes(model):
    adata = model.adata
    rna, protein = model.get_normalized_expression()
    genes, proteins = ["GENE00007", "GENE00002"], ["PROT004", "PROT000"]
    sub_rna, sub_protein = model.get_normalized_expression(gene_list=genes, protein_list=proteins, indices=[5, 1])
    np.testing.assert_allclose(sub_rna.to_numpy(), rna.loc[["cell5", "cell1"], genes].to_numpy(), rtol=1e-6)
    np.testing.assert_allclose(sub_protein.to_numpy(), protein.loc[["cell5", "cell1"], proteins].to_numpy(),
                               rtol=1e-6)
    some, _ = model.get_normalized_expression(n_samples_overall=50)
    assert len(some) == 50 and some.index.is_unique and set(some.index) <= set(adata.obs_names)
    np.testing.assert_allclose(some.to_numpy(), rna.loc[some.index].to_numpy(), rtol=1e-6)
    per10k, _ = model.get_normalized_expression(library_size=1e4)
    np.testing.assert_allclose(per10k.sum(axis=1), 1e4, rtol=1e-4)
    draws_rna, draws_protein = model.get_normalized_expression(n_samples=3, return_mean=False)
    assert draws_rna.shape == (3, adata.n_obs, adata.n_vars) and draws_protein.shape[0] == 3
    arrays = model.get_normalized_expression(return_numpy=True)
    assert isinstance(arrays[0], np.ndarray) and np.allclose(arrays[0], rna.to_numpy())


def test_scores_and_predictive(model):
    elbo = model.get_elbo()
    reconstruction = model.get_reconstruction_error()
    assert np.isfinite(elbo) and elbo < 0 and 0 < reconstruction < -elbo + 1e-6
    assert np.isfinite(model.get_marginal_ll(n_mc_samples=4))
    rna, protein = model.posterior_predictive_sample(indices=[0, 1, 2], n_samples=2)
    assert rna.shape == (2, 3, model.adata.n_vars) and (rna == np.round(rna)).all() and (protein >= 0).all()


def test_de_by_cells_and_pooled_groups(model):
    types = model.adata.obs["true_cell_type"].to_numpy()
    by_mask = model.differential_expression(idx1=types == "type_0", idx2=types == "type_1", silent=True)
    by_group = model.differential_expression(groupby="true_cell_type", group1="type_0", group2="type_1",
                                             silent=True)
    np.testing.assert_allclose(by_mask["lfc_mean"].to_numpy(), by_group["lfc_mean"].to_numpy(), rtol=1e-6)
    pooled = model.differential_expression(groupby="true_cell_type", group1=["type_0", "type_1"], silent=True)
    assert set(pooled["comparison"]) == {"type_0,type_1 vs rest"}
    corrected = model.differential_expression(groupby="true_cell_type", group1="type_0", batch_correction=True,
                                              batchid1=["batch_1"], batchid2=["batch_1"], silent=True)
    assert corrected.attrs["batchid1"] == corrected.attrs["batchid2"] == ["batch_1"]
    plain = model.differential_expression(groupby="true_cell_type", group1="type_0", silent=True)
    assert plain.attrs["batchid1"] is None
    assert not np.allclose(corrected["scale1"], plain.loc[corrected.index, "scale1"], rtol=1e-3)
    with pytest.raises(ConfigError, match="batchid1=\\['batch_1'\\] needs batch_correction=True"):
        model.differential_expression(groupby="true_cell_type", batchid1=["batch_1"], silent=True)
