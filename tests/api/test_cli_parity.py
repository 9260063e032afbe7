"""The API and the CLI are two faces of the same functions: on the run directory the API saved, ``streamtotal
embed`` / ``denoise`` / ``de`` (real subprocesses) give the API's latent, denoised expression and DE table; and
``write_to=`` writes into the store what the API returns."""

import shutil

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import zarr
from bad_input_harness import run_cli

from streamtotal import TOTALVI

from .conftest import FAST, TINY


def _cli(*args) -> str:
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def saved(tmp_path_factory, store):
    """A model trained through the API on the store, saved as a run directory."""
    import torch

    torch.set_num_threads(1)
    model = TOTALVI(str(store), batch_key="batch", **TINY)
    model.train(max_epochs=2, **FAST)
    run = tmp_path_factory.mktemp("api-runs") / "run"
    model.save(run)
    return model, run


def test_latent_equals_streamtotal_embed(saved, store, tmp_path):
    model, run = saved
    _cli("embed", run, store, "--no-write-back", "--export-h5ad", tmp_path / "z.h5ad", "--device", "cpu",
         "--no-progress")
    cli = ad.read_h5ad(tmp_path / "z.h5ad")
    np.testing.assert_allclose(model.get_latent_representation(), cli.obsm["X_streamtotal"], atol=1e-5)


def test_denoised_equals_streamtotal_denoise(saved, store, tmp_path):
    model, run = saved
    _cli("denoise", run, store, "--no-write-back", "--out-h5ad", tmp_path / "d.h5ad", "--transform-batch",
         "batch_0", "batch_1", "--device", "cpu", "--no-progress")
    cli = ad.read_h5ad(tmp_path / "d.h5ad")
    rna, protein = model.get_normalized_expression(transform_batch=["batch_0", "batch_1"])
    foreground = model.get_protein_foreground_probability(transform_batch=["batch_0", "batch_1"])
    assert list(rna.index) == list(cli.obs_names)
    np.testing.assert_allclose(rna.to_numpy(), np.asarray(cli.obsm["denoised_rna"]), rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(protein.to_numpy(), np.asarray(cli.obsm["denoised_protein"]), rtol=1e-5)
    np.testing.assert_allclose(foreground.to_numpy(), np.asarray(cli.obsm["protein_foreground_prob"]), atol=1e-6)
    assert list(protein.columns) == list(cli.obsm["denoised_protein"].columns)


def test_de_equals_streamtotal_de(saved, store, tmp_path):
    model, run = saved
    _cli("de", run, store, "--groupby", "true_cell_type", "--group1", "type_1", "--out", tmp_path / "de.csv",
         "--device", "cpu", "--no-progress")
    cli = pd.read_csv(tmp_path / "de.csv", index_col=0)
    api = model.differential_expression(groupby="true_cell_type", group1="type_1", silent=True)
    assert list(api.index) == list(cli.index)
    for ours, theirs in (("proba_de", "proba_de"), ("bayes_factor", "bayes_factor"), ("lfc_mean", "lfc_mean"),
                         ("lfc_median", "lfc_median"), ("scale1", "norm_mean1"), ("raw_mean2", "raw_mean2"),
                         ("non_zeros_proportion1", "nonzero_frac1")):
        np.testing.assert_allclose(api[ours].to_numpy(), cli[theirs].to_numpy(), rtol=1e-5, atol=1e-7,
                                   err_msg=ours)
    assert (api["is_de_fdr_0.05"].to_numpy() == cli["is_de_fdr"].to_numpy()).all()


def test_write_to_writes_what_the_api_returns(saved, store, tmp_path):
    model, run = saved
    copy = tmp_path / "copy.zarr"
    shutil.copytree(store, copy)
    on_copy = TOTALVI.load(run, adata=str(copy))
    assert on_copy.get_latent_representation(write_to="X_api") == {"latent": "obsm/X_api"}
    written = on_copy.get_normalized_expression(write_to="api", protein_list=["PROT001", "PROT003"])
    assert written == {"rna": "obsm/api_rna", "protein": "obsm/api_protein"}
    root = zarr.open_group(str(copy), mode="r", use_consolidated=False)
    np.testing.assert_allclose(root["obsm/X_api"][:], model.get_latent_representation(), atol=1e-5)
    _, protein = model.get_normalized_expression(protein_list=["PROT001", "PROT003"])
    np.testing.assert_allclose(root["obsm/api_protein"][:], protein.to_numpy(), rtol=1e-5)
    assert list(root["obsm/api_protein"].attrs["feature_names"]) == ["PROT001", "PROT003"]
    assert on_copy.get_protein_foreground_probability(write_to="api_fg") == {"foreground": "obsm/api_fg"}
    scores = on_copy.get_elbo(write_to="api")
    assert scores["written"]["elbo"] == "obs/api_elbo"
    assert scores["means"]["elbo"] == pytest.approx(model.get_elbo(), rel=1e-6)
    root = zarr.open_group(str(copy), mode="r", use_consolidated=False)
    np.testing.assert_allclose(root["obsm/api_fg"][:], model.get_protein_foreground_probability().to_numpy(),
                               atol=1e-6)
    assert "X_api" not in zarr.open_group(str(store), mode="r", use_consolidated=False)["obsm"]
