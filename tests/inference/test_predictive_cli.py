"""``streamtotal sample`` and ``streamtotal elbo`` end to end: files, write-back, resume, agreement with the API."""

import json
import shutil

import anndata as ad
import numpy as np
import pytest

from streamtotal.cli.main import main
from streamtotal.inference import predictive
from streamtotal.inference.expression import StorePosterior
from streamtotal.inference.write_back import FAIL_ENV, InjectedFailure


@pytest.fixture
def store(small_store, tmp_path):
    path = tmp_path / "copy.zarr"
    shutil.copytree(small_store, path)
    return path


@pytest.fixture
def post(trained, store):
    return StorePosterior(trained, store, batch_size=64, device="cpu", progress=False)


def _json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_elbo_written_per_cell_equals_the_api_and_marginal_ll_bounds_it(trained_run, store, post, capsys,
                                                                        monkeypatch):
    args = ["elbo", str(trained_run), str(store), "--marginal-ll", "--n-mc-samples", "30", "--mc-chunk", "8",
            "--write", "--seed", "3", "--batch-size", "64", "--device", "cpu", "--no-progress"]
    monkeypatch.setenv(FAIL_ENV, "2")
    with pytest.raises(InjectedFailure):  # interrupted after 2 of 8 chunks ...
        main(args)
    monkeypatch.delenv(FAIL_ENV)
    assert main(args) == 0  # ... and resumed
    report = _json(capsys)
    assert (report["chunks_skipped"], report["chunks_computed"]) == (2, 6)
    obs = ad.read_zarr(store).obs
    api = predictive.elbo(post, per_cell=True, seed=3)
    np.testing.assert_array_equal(obs["streamtotal_elbo"].to_numpy(), api["elbo"])
    np.testing.assert_array_equal(obs["streamtotal_reconstruction_error"].to_numpy(), api["reconstruction"])
    ll = predictive.marginal_ll(post, n_mc_samples=30, chunk_size=8, per_cell=True, seed=3)
    np.testing.assert_array_equal(obs["streamtotal_marginal_ll"].to_numpy(), ll)
    assert report["marginal_ll"] >= report["elbo"]
    assert report["elbo"] == pytest.approx(api["elbo"].mean()) and report["n_cells"] == 500


def test_elbo_of_chosen_cells_prints_means_and_rejects_unknown_cells(trained_run, store, post, capsys, tmp_path):
    names = list(post.collection.obs_frame().index[[7, 300, 42]])
    assert main(["elbo", str(trained_run), str(store), "--cells", *names, "--batch-size", "64", "--device", "cpu",
                 "--no-progress"]) == 0
    report = _json(capsys)
    expected = predictive.elbo(post, [7, 300, 42], seed=0)
    assert report["n_cells"] == 3 and report["elbo"] == pytest.approx(expected["elbo"])
    assert report["reconstruction_error"] == pytest.approx(expected["reconstruction"])
    cells_file = tmp_path / "cells.txt"
    cells_file.write_text(f"# chosen\n{names[0]}\nnot-a-cell\n")
    assert main(["elbo", str(trained_run), str(store), "--cells-file", str(cells_file), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "not-a-cell" in err and "not in the store" in err
    assert main(["elbo", str(trained_run), str(store), "--cells", names[0], "--write", "--no-progress"]) == 2
    assert "every cell" in capsys.readouterr().err


def test_sample_exports_chosen_cells_and_writes_back_every_cell(trained_run, store, post, tmp_path, capsys):
    reg = post.registry
    obs_names = post.collection.obs_frame().index
    ids = np.array([450, 3, 128])
    out = tmp_path / "draws.h5ad"
    genes = [reg.gene_names[5], reg.gene_names[1]]
    assert main(["sample", str(trained_run), str(store), "--cells", *obs_names[ids], "--n-samples", "2",
                 "--genes", *genes, "--seed", "6", "--out", str(out), "--batch-size", "64", "--device", "cpu",
                 "--no-progress"]) == 0
    assert _json(capsys)["n_cells"] == 3
    adata = ad.read_h5ad(out)
    rna, protein = predictive.posterior_predictive_sample(post, ids, 2, genes=genes, seed=6)
    assert adata.shape == (6, 2) and list(adata.var_names) == genes
    np.testing.assert_array_equal(adata.X.toarray(), rna.reshape(6, 2))
    np.testing.assert_array_equal(adata.obsm["protein_counts"].to_numpy(), protein.reshape(6, -1))
    assert list(adata.obs["cell"]) == list(obs_names[ids]) * 2 and list(adata.obs["sample"]) == [0, 0, 0, 1, 1, 1]
    zarr_out = tmp_path / "draws.zarr"
    assert main(["sample", str(trained_run), str(store), "--cells", *obs_names[ids], "--seed", "6", "--out",
                 str(zarr_out), "--batch-size", "64", "--device", "cpu", "--no-progress"]) == 0
    one_rna, _ = predictive.posterior_predictive_sample(post, ids, seed=6)
    np.testing.assert_array_equal(ad.read_zarr(zarr_out).X.toarray(), one_rna)
    assert list(ad.read_zarr(zarr_out).obs_names) == list(obs_names[ids])

    assert main(["sample", str(trained_run), str(store), "--write-back", "--seed", "6", "--batch-size", "64",
                 "--device", "cpu", "--no-progress"]) == 0
    assert _json(capsys)["written"] == {"rna": "obsm/predictive_rna", "protein": "obsm/predictive_protein"}
    stored = ad.read_zarr(store).obsm
    rna, protein = predictive.posterior_predictive_sample(post, seed=6)
    np.testing.assert_array_equal(stored["predictive_rna"], rna)
    np.testing.assert_array_equal(stored["predictive_protein"], protein)
    assert (rna == np.round(rna)).all() and rna.sum() > 0

    assert main(["sample", str(trained_run), str(store), "--no-progress"]) == 2
    assert "--out" in capsys.readouterr().err
    assert main(["sample", str(trained_run), str(store), "--out", str(tmp_path / "x.csv"), "--no-progress"]) == 2
    assert ".h5ad or .zarr" in capsys.readouterr().err
