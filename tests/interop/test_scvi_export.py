"""Exporting a trained streamtotal run as a scvi-tools TOTALVI model directory (``streamtotal export-scvi``):
scvi-tools' ``TOTALVI.load`` opens it and computes streamtotal's function on the same cells, importing it back
gives the same model, what scvi-tools cannot compute is refused by name, and the directory is written whole."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch

scvi = pytest.importorskip("scvi")  # a test-only extra

from loaders.ingest import ingest  # noqa: E402
from loaders.registry import Registry  # noqa: E402
from streamtotal.config import DataConfig, RunConfig, TrainConfig  # noqa: E402
from streamtotal.errors import InteropError  # noqa: E402
from streamtotal.interop import export_scvi_model, import_scvi_model  # noqa: E402
from streamtotal.model.config import ModelConfig  # noqa: E402
from streamtotal.simulate import CiteSimulator, SimulationConfig  # noqa: E402
from streamtotal.training.run_dir import load_trained  # noqa: E402
from streamtotal.training.trainer import Trainer  # noqa: E402

# Two batches (so the batch covariate columns are exercised), every protein measured in both.
SIM = SimulationConfig(n_cells=300, n_genes=60, n_proteins=8, n_cell_types=3, n_batches=2, n_missing_proteins=0,
                       block_cells=300, seed=3)
SMALL = dict(n_latent=4, n_hidden=16, foreground_activation="relu")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The simulated AnnData (as scvi-tools reads it) and the same cells ingested into a store."""
    root = tmp_path_factory.mktemp("scvi_export")
    adata = CiteSimulator(SIM).to_anndata()
    adata.write_h5ad(root / "cite.h5ad")
    ingest(root / "cite.h5ad", root / "cite.zarr", batch_key="batch", progress=False)
    return adata, root / "cite.zarr"


def _train(store, run_dir, **model):
    config = RunConfig(data=DataConfig(stores=(str(store),), batch_key="batch"), model=ModelConfig(**model),
                       train=TrainConfig(max_epochs=2, batch_size=64, progress=False, seed=1, device="cpu"))
    Trainer(config, run_dir).fit()
    return load_trained(run_dir)


@pytest.fixture(scope="module")
def run_dir(data, tmp_path_factory):
    run = tmp_path_factory.mktemp("scvi_export_run") / "run"
    _train(data[1], run, **SMALL)
    return run


def _tensors(adata):
    x = torch.tensor(adata.X.toarray(), dtype=torch.float32)
    y = torch.tensor(np.asarray(adata.obsm["protein_expression"]), dtype=torch.float32)
    b = torch.tensor(adata.obs["batch"].cat.codes.to_numpy(), dtype=torch.long)
    return x, y, torch.ones_like(y, dtype=torch.bool), b


def _latent(trained, adata) -> np.ndarray:
    with torch.no_grad():
        return trained.model.encode(*_tensors(adata)).numpy()


def _scvi_load(model_dir, adata):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return scvi.model.TOTALVI.load(str(model_dir), adata=adata.copy(), accelerator="cpu")


def test_scvi_tools_opens_the_export_with_the_same_latent_and_decoder(run_dir, data, tmp_path):
    adata, _ = data
    trained = load_trained(run_dir)
    result = export_scvi_model(trained, tmp_path / "scvi")
    assert result.batch_key == "batch" and (tmp_path / "scvi" / "model.pt").is_file()
    model = _scvi_load(tmp_path / "scvi", adata)
    assert not model.module.training
    expected = _latent(trained, adata)
    got = model.get_latent_representation()
    assert got.shape == expected.shape and np.abs(got - expected).max() < 1e-4

    # The decoder at the posterior means: RNA scale, protein background, foreground multiplier and mixing.
    x, y, mask, b = _tensors(adata)
    with torch.no_grad():
        inf = model.module.inference(x, y, batch_index=b[:, None], panel_index=b[:, None],
                                     label=torch.zeros_like(b)[:, None])
        gen = model.module.generative(inf["qz"].loc, x.sum(1, keepdim=True), b[:, None],
                                      label=torch.zeros_like(b)[:, None])
        ours_inf = trained.model.inference(x, y, mask, b, sample=False)
        ours = trained.model.generative(ours_inf.z, ours_inf.log_library, b, sample_background=False)
    px, py = gen["px_"], gen["py_"]
    assert torch.allclose(torch.softmax(ours.rna_logits, dim=1), px["scale"], rtol=1e-4, atol=1e-7)
    assert (ours.back_mean - py["back_alpha"]).abs().max() < 1e-4
    assert (ours.back_scale - py["back_beta"]).abs().max() < 1e-5
    assert (ours.fore_scale - py["fore_scale"]).abs().max() < 1e-4
    assert (torch.sigmoid(-ours.mix_logits) - (1.0 - torch.sigmoid(py["mixing"]))).abs().max() < 1e-5
    assert torch.equal(gen["per_batch_efficiency"], torch.ones_like(gen["per_batch_efficiency"]))


def test_round_trip_through_import_gives_the_same_model(run_dir, data, tmp_path):
    adata, _ = data
    trained = load_trained(run_dir)
    export_scvi_model(trained, tmp_path / "scvi")
    back = import_scvi_model(tmp_path / "scvi", tmp_path / "back")
    assert list(back.registry.batch_categories) == list(trained.registry.batch_categories)
    assert back.registry.gene_names == trained.registry.gene_names
    imported = load_trained(tmp_path / "back")
    assert np.abs(_latent(imported, adata) - _latent(trained, adata)).max() < 1e-5
    for name, value in trained.model.state_dict().items():
        assert torch.allclose(imported.model.state_dict()[name].float(), value.float(), atol=1e-6), name


def test_latent_library_batch_dispersions_layer_norm_and_shallow_covariates(data, tmp_path):
    """A library encoder, per-batch dispersions, layer norm, batch norm in the encoder only, a two-layer decoder
    whose second layers have no batch covariate (zero columns in scvi-tools) and an adversarial classifier
    (training only, left behind)."""
    adata, store = data
    trained = _train(store, tmp_path / "run", **SMALL, latent_library=True, gene_dispersion="gene-batch",
                     protein_dispersion="protein-batch", use_layer_norm="both", use_batch_norm="encoder",
                     n_layers_decoder=2, deeply_inject_covariates=False, adversarial_classifier=True)
    result = export_scvi_model(trained, tmp_path / "scvi")
    assert result.not_exported == ["adversarial_classifier"]
    model = _scvi_load(tmp_path / "scvi", adata)
    assert not model.module.use_observed_lib_size
    assert np.abs(model.get_latent_representation() - _latent(trained, adata)).max() < 1e-4
    import_scvi_model(tmp_path / "scvi", tmp_path / "back")
    assert np.abs(_latent(load_trained(tmp_path / "back"), adata) - _latent(trained, adata)).max() < 1e-5


def _with_model(trained, labels_key=None, **changes):
    config = trained.config
    data = replace(config.data, labels_key=labels_key) if labels_key else config.data
    return replace(trained, config=replace(config, data=data, model=replace(config.model, **changes)))


def test_refuses_what_scvi_tools_cannot_compute(run_dir, tmp_path, caplog):
    trained = load_trained(run_dir)
    softplus = _with_model(trained, foreground_activation="softplus")
    with pytest.raises(InteropError, match="foreground_activation = 'softplus'"):
        export_scvi_model(softplus, tmp_path / "a")
    with pytest.raises(InteropError, match="totalANVI export is not supported"):
        export_scvi_model(_with_model(trained, labels_key="cell_type", label_classifier=True), tmp_path / "a")
    with pytest.raises(InteropError, match="scale_encoder_input = False"):
        export_scvi_model(_with_model(trained, scale_encoder_input=False), tmp_path / "a")
    registry = trained.registry.to_dict()
    registry["study_protein_masks"] = [[True] * (len(registry["protein_names"]) - 1) + [False]]  # one lacking
    measured = replace(_with_model(trained, protein_input_mean="measured"), registry=Registry.from_dict(registry))
    with pytest.raises(InteropError, match="protein_input_mean = 'measured'"):
        export_scvi_model(measured, tmp_path / "a")
    assert not (tmp_path / "a").exists() and not list(tmp_path.iterdir())  # nothing written when refused

    # Accepted on request: the softplus foreground becomes scvi-tools' relu, everything else exact.
    with caplog.at_level(logging.WARNING, logger="streamtotal"):
        export_scvi_model(softplus, tmp_path / "approx", approximate_foreground=True)
    assert (tmp_path / "approx" / "model.pt").is_file()
    assert "1 + relu(.)" in caplog.text  # said, not silent


def test_several_stores_without_a_batch_key_need_one_named(run_dir, data, tmp_path):
    adata, _ = data
    trained = load_trained(run_dir)
    registry = trained.registry.to_dict()
    registry["batch_key"] = None  # each store its own batch: scvi-tools needs the obs column that holds them
    per_store = replace(trained, registry=Registry.from_dict(registry))
    with pytest.raises(InteropError, match="pass batch_key"):
        export_scvi_model(per_store, tmp_path / "scvi")
    assert export_scvi_model(per_store, tmp_path / "scvi", batch_key="store").batch_key == "store"
    renamed = adata.copy()
    renamed.obs["store"] = renamed.obs["batch"]
    model = _scvi_load(tmp_path / "scvi", renamed)
    assert np.abs(model.get_latent_representation() - _latent(trained, adata)).max() < 1e-4


def test_existing_directory_is_refused_unless_overwrite_which_keeps_other_files(run_dir, tmp_path):
    trained = load_trained(run_dir)
    out = tmp_path / "scvi"
    export_scvi_model(trained, out)
    first = (out / "model.pt").read_bytes()
    (out / "adata.h5ad").write_bytes(b"kept")  # what scvi-tools' save(save_anndata=True) puts beside it
    with pytest.raises(InteropError, match="already exists"):
        export_scvi_model(trained, out)
    assert (out / "model.pt").read_bytes() == first
    export_scvi_model(trained, out, overwrite=True)
    assert (out / "adata.h5ad").read_bytes() == b"kept"
    assert sorted(p.name for p in out.iterdir()) == ["adata.h5ad", "model.pt"]  # no temp file left
    assert [p.name for p in tmp_path.iterdir()] == ["scvi"]  # no temp directory left
    (tmp_path / "file").write_text("x")
    with pytest.raises(InteropError, match="is a file"):
        export_scvi_model(trained, tmp_path / "file", overwrite=True)


def test_cli_export_scvi(run_dir, data, tmp_path):
    adata, _ = data
    out = tmp_path / "scvi"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "streamtotal", "export-scvi", str(run_dir), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "scvi-tools TOTALVI model" in proc.stdout and "obs['batch']" in proc.stdout
    again = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr
    assert subprocess.run(cmd + ["--overwrite"], env=env, capture_output=True, text=True).returncode == 0
    model = _scvi_load(out, adata)
    assert np.abs(model.get_latent_representation() - _latent(load_trained(run_dir), adata)).max() < 1e-4
