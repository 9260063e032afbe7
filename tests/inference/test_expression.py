"""The streaming driver: subsets, names, write-back into the store, determinism, the CLI."""

import shutil

import anndata as ad
import numpy as np
import pytest
import torch
import zarr

from streamtotal.cli.main import main
from streamtotal.errors import SelectionError
from streamtotal.inference import expression
from streamtotal.inference.expression import ExpressionOptions, StorePosterior


@pytest.fixture(scope="module")
def post(trained, small_store):
    return StorePosterior(trained, small_store, batch_size=96, device="cpu", progress=False)


@torch.no_grad()
def _direct_denoised(post, ids, batch_code=None):
    """(1 - pi) beta alpha at the posterior means, from the model's own methods, for cells ``ids`` (any order)."""
    batch = post.collection.read(np.sort(ids))
    model = post.model
    inf = model.inference(batch.rna, batch.protein, batch.protein_mask, batch.batch, sample=False)
    codes = batch.batch if batch_code is None else torch.full_like(batch.batch, batch_code)
    gen = model.generative(inf.qz_mean, inf.log_library, codes, sample_background=False)
    value = (torch.sigmoid(-gen.mix_logits) * gen.back_mean.exp() * gen.fore_scale).numpy()
    return value[np.searchsorted(np.sort(ids), ids)]


def test_subset_in_requested_order_matches_direct_computation(post):
    ids = np.array([430, 3, 250, 77, 499, 12])
    np.testing.assert_allclose(post.denoised_protein(ids), _direct_denoised(post, ids), rtol=1e-5, atol=1e-6)
    tb = post.registry.batch_categories
    averaged = post.denoised_protein(ids, transform_batch=list(tb))
    expected = (_direct_denoised(post, ids, 0) + _direct_denoised(post, ids, 1)) / 2
    np.testing.assert_allclose(averaged, expected, rtol=1e-5, atol=1e-6)
    latent = post.latent(ids)
    batch = post.collection.read(np.sort(ids))
    z = post.model.encode(batch.rna, batch.protein, batch.protein_mask, batch.batch).detach().numpy()
    np.testing.assert_allclose(latent, z[np.searchsorted(np.sort(ids), ids)], rtol=1e-5, atol=1e-6)


def test_names_select_columns_and_unknown_names_fail_clearly(post):
    reg = post.registry
    genes, proteins = [reg.gene_names[7], reg.gene_names[2]], [reg.protein_names[4], reg.protein_names[0]]
    ids = np.arange(30)
    full = post.normalized_rna(ids, library_size=1e4)
    np.testing.assert_allclose(post.normalized_rna(ids, library_size=1e4, genes=genes), full[:, [7, 2]], rtol=1e-6)
    fg = post.protein_foreground_probability(ids)
    np.testing.assert_allclose(post.protein_foreground_probability(ids, proteins=proteins), fg[:, [4, 0]], rtol=1e-6)
    with pytest.raises(SelectionError, match="NOT_A_GENE"):
        post.normalized_rna(ids, genes=[genes[0], "NOT_A_GENE"])
    with pytest.raises(SelectionError, match="CD_nope"):
        post.denoised_protein(ids, proteins=["CD_nope"])
    with pytest.raises(SelectionError, match="batch_zz"):
        post.denoised_protein(ids, transform_batch="batch_zz")
    with pytest.raises(SelectionError, match="cell_ids"):
        post.latent([0, 0])


def test_sampling_is_deterministic_given_the_seed(post):
    ids = np.arange(50)
    a = post.denoised_protein(ids, n_samples=3, seed=5, return_mean=False)
    assert a.shape == (3, 50, post.registry.n_proteins)
    np.testing.assert_array_equal(a, post.denoised_protein(ids, n_samples=3, seed=5, return_mean=False))
    np.testing.assert_allclose(post.denoised_protein(ids, n_samples=3, seed=5), a.mean(0), rtol=1e-6)
    assert not np.allclose(a, post.denoised_protein(ids, n_samples=3, seed=6, return_mean=False))


def test_imputation_over_the_store(post):
    values, measured = post.impute_proteins()
    denoised = post.denoised_protein()
    assert (~measured).sum() > 0
    np.testing.assert_array_equal(values[~measured], denoised[~measured])
    observed = post.collection.read(np.arange(post.n_obs)).protein.numpy()
    np.testing.assert_array_equal(values[measured], observed[measured])


def test_write_back_equals_in_memory_and_reads_with_anndata(trained, small_store, tmp_path):
    store = tmp_path / "copy.zarr"
    shutil.copytree(small_store, store)
    post = StorePosterior(trained, store, batch_size=128, device="cpu", progress=False)
    proteins = list(post.registry.protein_names[:4])
    opts = ExpressionOptions(library_size=1e4, proteins=proteins, n_samples=2, seed=3)
    result = post.compute(["rna", "protein", "foreground"], options=opts, write_back=True)
    assert result.written == expression.DEFAULT_KEYS
    adata = ad.read_zarr(store)
    for quantity, key in result.written.items():
        np.testing.assert_array_equal(adata.obsm[key], result.values[quantity])
    np.testing.assert_array_equal(result.values["protein"], post.denoised_protein(options=opts))
    np.testing.assert_array_equal(result.values["rna"], post.normalized_rna(options=opts))
    attrs = zarr.open_group(str(store), mode="r").get("obsm/denoised_protein").attrs
    assert attrs["feature_names"] == proteins and attrs["streamtotal"]["options"]["n_samples"] == 2
    assert not [p for p in (store / "obsm").iterdir() if p.name.startswith(".tmp-")]


def test_interrupted_write_back_keeps_the_previous_result(trained, small_store, tmp_path, monkeypatch):
    store = tmp_path / "copy.zarr"
    shutil.copytree(small_store, store)
    post = StorePosterior(trained, store, batch_size=128, device="cpu", progress=False)
    before = post.compute(["foreground"], write_back=True).values["foreground"]
    calls = {"n": 0}
    original = expression.posterior.protein_foreground_probability

    def dies_on_third_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs) + 1.0

    monkeypatch.setattr(expression.posterior, "protein_foreground_probability", dies_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        post.compute(["foreground"], write_back=True)
    np.testing.assert_array_equal(ad.read_zarr(store).obsm["protein_foreground_prob"], before)


def test_cli_writes_the_store_and_reports_unknown_names(trained_run, small_store, tmp_path, capsys):
    store = tmp_path / "copy.zarr"
    shutil.copytree(small_store, store)
    out = tmp_path / "denoised.h5ad"
    reg = StorePosterior(trained_run, store, progress=False).registry
    args = ["denoise", str(trained_run), str(store), "--what", "protein", "--proteins", reg.protein_names[1],
            reg.protein_names[0], "--transform-batch", *reg.batch_categories, "--include-protein-background",
            "--out-h5ad", str(out), "--no-progress"]
    assert main(args) == 0
    stored = ad.read_zarr(store).obsm["denoised_protein"]
    assert stored.shape == (500, 2) and np.isfinite(stored).all() and (stored > 0).all()
    exported = ad.read_h5ad(out).obsm["denoised_protein"]
    assert list(exported.columns) == [reg.protein_names[1], reg.protein_names[0]]
    np.testing.assert_array_equal(exported.to_numpy(), stored)
    capsys.readouterr()
    assert main(["denoise", str(trained_run), str(store), "--genes", "NOPE", "--no-progress"]) == 2
    assert "NOPE" in capsys.readouterr().err
