"""scvi-tools' totalVI tutorial calls, run against streamtotal: only the import line differs from scvi-tools'
(``from scvi.model import TOTALVI`` / ``from scvi.external import TOTALANVI``)."""

import numpy as np
import pandas as pd
import pytest

from streamtotal import TOTALANVI, TOTALVI  # the one line that differs from scvi-tools

from .conftest import FAST, TINY


def test_anndata_tutorial(adata, tmp_path):
    reference = adata[adata.obs["batch"] != "batch_2"].copy()
    query = adata[adata.obs["batch"] == "batch_2"].copy()
    TOTALVI.setup_anndata(reference, batch_key="batch", protein_expression_obsm_key="protein_expression")
    vae = TOTALVI(reference, latent_distribution="normal", n_layers_decoder=2, **TINY)
    assert not vae.is_trained and "Not Trained" in repr(vae)
    vae.train(max_epochs=3, **FAST)
    assert vae.is_trained and "Training status: Trained" in repr(vae)

    history = vae.history
    train_elbo, validation_elbo = history["elbo_train"], history["elbo_validation"]
    assert list(train_elbo.index) == [0, 1, 2] and list(validation_elbo.index) == [0, 1, 2]
    assert {"kl_weight", "reconstruction_loss_train"} <= set(history)
    assert np.isfinite(train_elbo["elbo_train"]).all() and train_elbo["elbo_train"].iloc[-1] < train_elbo[
        "elbo_train"].iloc[0]

    reference.obsm["X_totalVI"] = vae.get_latent_representation()
    assert reference.obsm["X_totalVI"].shape == (reference.n_obs, 4)

    batches = ["batch_0", "batch_1"]
    rna, protein = vae.get_normalized_expression(n_samples=1, return_mean=True, transform_batch=batches)
    assert list(rna.index) == list(reference.obs_names) and list(rna.columns) == list(reference.var_names)
    assert list(protein.columns) == list(reference.obsm["protein_expression"].columns)
    # Several transform batches are averaged: the mean of the single-batch results.
    singles = [vae.get_normalized_expression(transform_batch=b) for b in batches]
    np.testing.assert_allclose(rna.to_numpy(), np.mean([s[0].to_numpy() for s in singles], axis=0), rtol=1e-5)
    np.testing.assert_allclose(protein.to_numpy(), np.mean([s[1].to_numpy() for s in singles], axis=0), rtol=1e-5)
    np.testing.assert_allclose(rna.sum(axis=1), 1.0, rtol=1e-4)
    reference.layers["denoised_rna"], reference.obsm["denoised_protein"] = rna, protein

    foreground = vae.get_protein_foreground_probability(n_samples=3, return_mean=True, transform_batch=batches)
    reference.obsm["protein_foreground_prob"] = foreground
    assert foreground.shape == protein.shape and ((foreground >= 0) & (foreground <= 1)).all().all()

    de = vae.differential_expression(groupby="true_cell_type", delta=0.5, batch_correction=True)
    for column in ("proba_de", "proba_not_de", "bayes_factor", "lfc_mean", "lfc_median", "lfc_std", "scale1",
                   "scale2", "raw_mean1", "raw_mean2", "non_zeros_proportion1", "non_zeros_proportion2",
                   "raw_normalized_mean1", "raw_normalized_mean2", "is_de_fdr_0.05", "comparison"):
        assert column in de.columns, column
    assert set(de["comparison"]) == {f"type_{k} vs rest" for k in range(3)}
    assert len(de) == 3 * (reference.n_vars + protein.shape[1])

    vae.save(tmp_path / "model", save_anndata=True)
    with pytest.raises(Exception, match="overwrite=True"):
        vae.save(tmp_path / "model")
    loaded = TOTALVI.load(tmp_path / "model", adata=reference)
    np.testing.assert_allclose(loaded.get_latent_representation(), reference.obsm["X_totalVI"], atol=1e-6)

    TOTALVI.setup_anndata(query, batch_key="batch", protein_expression_obsm_key="protein_expression")
    query_model = TOTALVI.load_query_data(query, vae)
    query_model.train(max_epochs=2, plan_kwargs=dict(weight_decay=0.0), **FAST)
    query_latent = query_model.get_latent_representation()
    assert query_latent.shape == (query.n_obs, 4) and np.isfinite(query_latent).all()
    # The reference's weights stay frozen: the reference cells embed as before.
    np.testing.assert_allclose(query_model.get_latent_representation(reference), reference.obsm["X_totalVI"],
                               atol=1e-5)

    reference.obs["cell_type"] = reference.obs["cell_type"].astype(str)
    anvi = TOTALANVI.from_totalvi_model(vae, "unlabeled", labels_key="cell_type")
    anvi.train(max_epochs=2, **FAST)
    predicted = anvi.predict()
    assert predicted.shape == (reference.n_obs,) and set(predicted) <= {"type_0", "type_1", "type_2"}
    soft = anvi.predict(soft=True)
    assert isinstance(soft, pd.DataFrame) and list(soft.columns) == ["type_0", "type_1", "type_2"]
    np.testing.assert_allclose(soft.sum(axis=1), 1.0, rtol=1e-5)
    assert (soft.idxmax(axis=1).to_numpy() == predicted).all()


def test_mudata_tutorial(adata):
    mudata = pytest.importorskip("mudata")
    import anndata as ad

    rna = ad.AnnData(X=adata.X.copy(), obs=adata.obs.copy(), var=adata.var.copy())
    rna.layers["counts"] = adata.X.copy()
    rna.X = rna.X * 0.5  # X holds something else: the counts are in the layer
    protein = ad.AnnData(X=adata.obsm["protein_expression"].to_numpy(), obs=adata.obs[[]].copy())
    protein.var_names = list(adata.obsm["protein_expression"].columns)
    mdata = mudata.MuData({"rna": rna, "protein": protein})
    TOTALVI.setup_mudata(mdata, rna_layer="counts", protein_layer=None, batch_key="batch",
                         modalities={"rna_layer": "rna", "protein_layer": "protein", "batch_key": "rna"})
    model = TOTALVI(mdata, **TINY)
    model.train(max_epochs=2, **FAST)
    latent = model.get_latent_representation()
    assert latent.shape == (mdata.n_obs, 4)
    rna_values, protein_values = model.get_normalized_expression(transform_batch=["batch_0", "batch_2"])
    assert list(rna_values.index) == list(rna.obs_names) and list(protein_values.columns) == list(protein.var_names)

    # The same data as an AnnData gives the same model, so the same latent: the MuData was read as such.
    TOTALVI.setup_anndata(adata, batch_key="batch", protein_expression_obsm_key="protein_expression")
    twin = TOTALVI(adata, **TINY)
    twin.train(max_epochs=2, **FAST)
    np.testing.assert_allclose(twin.get_latent_representation(), latent, atol=1e-5)
