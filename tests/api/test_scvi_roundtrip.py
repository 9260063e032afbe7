"""``to_scvi_tools`` writes a directory scvi-tools' ``TOTALVI.load`` opens with the same latent means, and
``from_scvi_tools`` brings it back (the interop layer's export and import, driven from the model object)."""

import numpy as np
import pytest

from streamtotal import TOTALVI

from .conftest import FAST, TINY


def test_to_scvi_tools_and_back(adata, tmp_path):
    scvi = pytest.importorskip("scvi")
    pytest.importorskip("streamtotal.interop.scvi_export", reason="the scvi-tools export is not in this tree yet")
    adata = adata[adata.obs["batch"] != "batch_2"].copy()  # full protein panels: scvi-tools masks no protein
    TOTALVI.setup_anndata(adata, protein_expression_obsm_key="protein_expression", batch_key="batch")
    model = TOTALVI(adata, foreground_activation="relu", **TINY)
    model.train(max_epochs=2, **FAST)
    ours = model.get_latent_representation()

    out = model.to_scvi_tools(tmp_path / "scvi_model")
    theirs = scvi.model.TOTALVI.load(str(out), adata=adata.copy(), accelerator="cpu")
    np.testing.assert_allclose(theirs.get_latent_representation(), ours, atol=1e-4)

    back = TOTALVI.from_scvi_tools(out, adata=adata)
    np.testing.assert_allclose(back.get_latent_representation(), ours, atol=1e-4)
    back_from_object = TOTALVI.from_scvi_tools(theirs, adata=adata)
    np.testing.assert_allclose(back_from_object.get_latent_representation(), ours, atol=1e-4)
