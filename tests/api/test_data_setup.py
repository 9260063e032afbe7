"""Data registration: the setup is a JSON-able record in ``uns`` that survives a round trip through h5ad, a
backed AnnData streams from its file, and scvi-tools' missing-protein rule masks all-zero proteins of a batch."""

import json

import anndata as ad
import numpy as np

from streamtotal import TOTALVI
from streamtotal.api.data_setup import SETUP_UNS_KEY, read_setup

from .conftest import FAST, TINY


def test_setup_is_json_and_survives_h5ad(adata, tmp_path):
    TOTALVI.setup_anndata(adata, protein_expression_obsm_key="protein_expression", batch_key="batch",
                          labels_key="cell_type")
    json.dumps(dict(adata.uns[SETUP_UNS_KEY]))
    adata.write_h5ad(tmp_path / "a.h5ad")
    setup = read_setup(ad.read_h5ad(tmp_path / "a.h5ad"))
    assert (setup.batch_key, setup.labels_key, setup.layer) == ("batch", "cell_type", None)
    assert setup.protein_expression_obsm_key == "protein_expression"


def test_backed_anndata_streams_and_equals_in_memory(adata, tmp_path):
    adata.write_h5ad(tmp_path / "a.h5ad")
    backed = ad.read_h5ad(tmp_path / "a.h5ad", backed="r")
    TOTALVI.setup_anndata(backed, protein_expression_obsm_key="protein_expression", batch_key="batch")
    TOTALVI.setup_anndata(adata, protein_expression_obsm_key="protein_expression", batch_key="batch")
    streamed, in_memory = TOTALVI(backed, **TINY), TOTALVI(adata, **TINY)
    assert type(streamed._collection.sources[0]).__name__ == "H5adSource"
    streamed.train(max_epochs=1, **FAST)
    in_memory.train(max_epochs=1, **FAST)
    np.testing.assert_allclose(streamed.get_latent_representation(), in_memory.get_latent_representation(),
                               atol=1e-5)


def test_missing_proteins_of_a_batch_are_masked(adata):
    TOTALVI.setup_anndata(adata, protein_expression_obsm_key="protein_expression", batch_key="batch")
    masked = TOTALVI(adata, **TINY)._collection
    TOTALVI.setup_anndata(adata, protein_expression_obsm_key="protein_expression", batch_key="batch")
    kept = TOTALVI(adata, override_missing_proteins=True, **TINY)._collection
    last = np.flatnonzero(adata.obs["batch"].to_numpy() == "batch_2")[:4]
    zero = (adata.obsm["protein_expression"].to_numpy()[adata.obs["batch"].to_numpy() == "batch_2"] == 0).all(0)
    assert zero.sum() == 1  # the simulation's one unmeasured protein
    assert not masked.read(last).protein_mask[:, zero].any()
    assert kept.read(last).protein_mask.all()
