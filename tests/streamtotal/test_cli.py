import anndata as ad
import numpy as np
import pytest

from streamtotal.cli.main import main


def test_simulate_ingest_train_embed_from_the_command_line(tmp_path):
    h5ad, store, run = tmp_path / "sim.h5ad", tmp_path / "sim.zarr", tmp_path / "run"
    assert main(["simulate", str(h5ad), "--cells", "400", "--genes", "40", "--proteins", "6", "--batches", "2",
                 "--missing-proteins", "1"]) == 0
    assert main(["ingest", str(h5ad), "--out", str(store), "--batch-key", "batch", "--no-progress"]) == 0
    assert main(["train", str(store), "--out", str(run), "--batch-key", "batch", "--epochs", "2",
                 "--batch-size", "64", "--n-latent", "3", "--no-progress"]) == 0
    exported = tmp_path / "latent.h5ad"
    assert main(["embed", str(run), str(store), "--export-h5ad", str(exported), "--no-progress"]) == 0
    stored = ad.read_zarr(store)
    latent = stored.obsm["X_streamtotal"]
    assert latent.shape == (400, 3) and np.isfinite(latent).all() and latent.std() > 0
    out = ad.read_h5ad(exported)
    np.testing.assert_allclose(out.obsm["X_streamtotal"], latent, rtol=1e-5, atol=1e-5)
    assert list(out.obs["batch"].astype(str)[:3]) == list(stored.obs["batch"].astype(str)[:3])


def test_bad_input_gives_a_clear_error_and_exit_code_2(tmp_path, capsys):
    adata = ad.AnnData(X=np.array([[1.0, np.nan], [2.0, 3.0]], dtype=np.float32))
    adata.obsm["protein_expression"] = np.ones((2, 2), dtype=np.float32)
    adata.uns["protein_names"] = ["P1", "P2"]
    bad = tmp_path / "bad.h5ad"
    adata.write_h5ad(bad)
    assert main(["ingest", str(bad), "--out", str(tmp_path / "bad.zarr"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "bad.h5ad" in err and "NaN" in err
    assert not (tmp_path / "bad.zarr").exists()


def test_train_without_stores_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    assert "no stores given" in capsys.readouterr().err


def test_train_streams_from_an_s3_url_with_credentials_from_the_environment(small_store, s3_server, tmp_path,
                                                                             monkeypatch):
    fs = s3_server.filesystem()
    fs.mkdir("cli-bucket")
    fs.put(str(small_store), "cli-bucket/small.zarr", recursive=True)
    s3_server.set_environment(monkeypatch)
    run = tmp_path / "run"
    assert main(["train", "s3://cli-bucket/small.zarr", "--out", str(run), "--batch-key", "batch", "--epochs", "1",
                 "--batch-size", "64", "--n-latent", "3", "--no-progress"]) == 0
    assert (run / "model.pt").is_file()
    assert s3_server.secret not in (run / "config.toml").read_text()
    assert 's3://cli-bucket/small.zarr' in (run / "config.toml").read_text()
