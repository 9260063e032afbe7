"""Imputed proteins (a batch that did not measure them) come with their spread over posterior draws."""

import shutil

import anndata as ad
import numpy as np
import pytest

from streamtotal.cli.main import main
from streamtotal.errors import ConfigError
from streamtotal.inference.expression import PROTEIN_STD_KEY, ExpressionOptions, StorePosterior


@pytest.fixture(scope="module")
def post(trained, small_store):
    return StorePosterior(trained, small_store, batch_size=96, device="cpu", progress=False)


def test_protein_std_is_the_spread_of_the_draws_whose_mean_is_the_denoised_protein(post):
    opts = ExpressionOptions(n_samples=6, seed=4, include_protein_background=True)
    result = post.compute(["protein", "protein_std"], options=opts)
    draws = post.denoised_protein(options=opts, return_mean=False)
    np.testing.assert_allclose(result.values["protein"], draws.mean(0), rtol=1e-5)
    np.testing.assert_allclose(result.values["protein_std"], draws.std(0, ddof=1), rtol=1e-4, atol=1e-6)
    # Where the cell's batch did not measure the protein, the imputed value is finite and has a positive spread.
    _, measured = post.impute_proteins()
    assert (~measured).any()
    std = result.values["protein_std"]
    assert np.isfinite(result.values["protein"][~measured]).all() and (std[~measured] > 0).all()
    with pytest.raises(ConfigError, match="n_samples >= 2"):
        post.compute(["protein_std"])


def test_cli_denoise_with_samples_writes_the_std_alongside(trained_run, small_store, tmp_path, capsys):
    store = tmp_path / "copy.zarr"
    shutil.copytree(small_store, store)
    assert main(["denoise", str(trained_run), str(store), "--what", "protein", "--n-samples", "4", "--protein-std",
                 "--no-progress"]) == 0
    adata = ad.read_zarr(store)
    std, mean = adata.obsm[PROTEIN_STD_KEY], adata.obsm["denoised_protein"]
    assert std.shape == mean.shape == (500, 6) and np.isfinite(std).all() and (std > 0).all()
    # Without --protein-std nothing extra is written; with one sample there is no spread: a clear error, exit 2.
    other = tmp_path / "other.zarr"
    shutil.copytree(small_store, other)
    assert main(["denoise", str(trained_run), str(other), "--what", "protein", "--n-samples", "4",
                 "--no-progress"]) == 0
    assert PROTEIN_STD_KEY not in ad.read_zarr(other).obsm
    capsys.readouterr()
    assert main(["denoise", str(trained_run), str(other), "--what", "protein", "--protein-std", "--no-progress"]) == 2
    assert "n_samples >= 2" in capsys.readouterr().err
