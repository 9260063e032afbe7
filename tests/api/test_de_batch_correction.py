"""``differential_expression(batch_correction=True)`` computes what scvi-tools' does: on a model exported with
``to_scvi_tools``, the pooled expression means under the chosen batches (``scale1`` / ``scale2``) and the mean
log fold changes agree within Monte Carlo error (both draw at random, so seeds cannot make samples equal)."""

import numpy as np
import pytest

from streamtotal import TOTALVI

from .conftest import FAST, TINY


@pytest.fixture
def both(adata, tmp_path):
    """Our model and the same weights in scvi-tools (full protein panels: scvi-tools masks no protein)."""
    scvi = pytest.importorskip("scvi")
    pytest.importorskip("streamtotal.interop.scvi_export", reason="the scvi-tools export is not in this tree yet")
    adata = adata[adata.obs["batch"] != "batch_2"].copy()
    TOTALVI.setup_anndata(adata, protein_expression_obsm_key="protein_expression", batch_key="batch")
    model = TOTALVI(adata, foreground_activation="relu", **TINY)
    model.train(max_epochs=5, **FAST)
    theirs = scvi.model.TOTALVI.load(str(model.to_scvi_tools(tmp_path / "scvi_model")), adata=adata.copy(),
                                     accelerator="cpu")
    return model, theirs, scvi


@pytest.mark.parametrize("batchid", [None, ["batch_1"]])
def test_batch_corrected_de_agrees_with_scvi_tools(both, batchid):
    model, theirs, scvi = both
    kwargs = dict(groupby="true_cell_type", group1="type_0", group2="type_1", batch_correction=True,
                  batchid1=batchid, batchid2=batchid, silent=True)
    ours = model.differential_expression(draws_per_cell=40, **kwargs)
    scvi.settings.seed = 0
    expected = theirs.differential_expression(**kwargs)
    rna = (ours["modality"] == "rna").to_numpy()
    ours.index = [name if is_rna else f"{name}_protein" for name, is_rna in zip(ours.index, rna)]
    expected = expected.loc[ours.index]
    assert ours.attrs["batchid1"] == (batchid or ["batch_0", "batch_1"])
    for column in ("scale1", "scale2"):
        np.testing.assert_allclose(ours[column][rna], expected[column][rna], rtol=0.08)
        # scvi-tools' protein scale includes protein_prior_count (0.1), added before its mean
        np.testing.assert_allclose(ours[column][~rna] + 0.1, expected[column][~rna], rtol=0.1)
    np.testing.assert_allclose(ours["lfc_mean"], expected["lfc_mean"], atol=0.15)
    # P(DE) as scvi-tools reads it (test_mode "three": the more likely direction), within Monte Carlo error
    np.testing.assert_allclose(ours["proba_de"], expected["proba_de"], atol=0.12)

