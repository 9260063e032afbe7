"""Importing saved scvi-tools TOTALVI / TOTALANVI models (``streamtotal import-scvi``): the imported run computes
scvi-tools' function on the same cells (latent means, decoder outputs, ELBO terms, label predictions), works
with embed / predict / map, and options that cannot be reproduced are refused by name."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

scvi = pytest.importorskip("scvi")  # a test-only extra

from torch.distributions import Normal, kl_divergence  # noqa: E402

from loaders.citebatch import CiteBatch  # noqa: E402
from loaders.ingest import ingest  # noqa: E402
from streamtotal.cli.main import main  # noqa: E402
from streamtotal.errors import InteropError, RunDirError  # noqa: E402
from streamtotal.inference.embed import embed  # noqa: E402
from streamtotal.inference.labels import predict_labels  # noqa: E402
from streamtotal.interop import import_scvi_model  # noqa: E402
from streamtotal.safe_load import load_weights_only  # noqa: E402
from streamtotal.simulate import CiteSimulator, SimulationConfig  # noqa: E402
from streamtotal.surgery.map_query import map_query  # noqa: E402
from streamtotal.training.run_dir import load_trained  # noqa: E402

from payloads import OpenPayload

# Two batches, two proteins missing in the last batch: scvi-tools records a protein_batch_mask, so the import of
# its encoder input (mean over all proteins) and its masked likelihood are exercised too.
SIM = SimulationConfig(n_cells=300, n_genes=100, n_proteins=12, n_cell_types=3, n_batches=2, n_missing_proteins=2,
                       block_cells=300, seed=3)
SMALL = dict(n_latent=6, n_hidden=32)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The simulated AnnData (as scvi-tools sees it) and the same cells ingested into a store."""
    root = tmp_path_factory.mktemp("scvi_import")
    adata = CiteSimulator(SIM).to_anndata()
    h5ad = root / "cite.h5ad"
    adata.write_h5ad(h5ad)
    store = root / "cite.zarr"
    ingest(h5ad, store, batch_key="batch", progress=False)
    return root, adata, store


def _train_save(cls, adata, path, setup: dict, batch_key: str | None = "batch", **model_kwargs):
    adata = adata.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cls.setup_anndata(adata, protein_expression_obsm_key="protein_expression", batch_key=batch_key, **setup)
        model = cls(adata, **SMALL, **model_kwargs)
        model.train(max_epochs=2, accelerator="cpu", batch_size=128, enable_progress_bar=False)
    model.module.eval()
    model.save(str(path), overwrite=True)
    return model, adata


@pytest.fixture(scope="module")
def totalvi(data):
    root, adata, _ = data
    model, adata = _train_save(scvi.model.TOTALVI, adata, root / "scvi_totalvi", {})
    return root / "scvi_totalvi", model, adata


def _tensors(adata, single_batch: bool = False):
    x = torch.tensor(adata.X.toarray(), dtype=torch.float32)
    y = torch.tensor(np.asarray(adata.obsm["protein_expression"]), dtype=torch.float32)
    codes = np.zeros(adata.n_obs) if single_batch else adata.obs["batch"].cat.codes.to_numpy()
    return x, y, torch.tensor(codes, dtype=torch.long)


def _mask(model, b: torch.Tensor, n_proteins: int) -> torch.Tensor:
    """scvi-tools' per-cell protein mask (all True without a protein_batch_mask)."""
    batch_mask = model.module.protein_batch_mask
    if batch_mask is None:
        return torch.ones(len(b), n_proteins, dtype=torch.bool)
    rows = torch.stack([torch.as_tensor(np.asarray(batch_mask[str(i)], dtype=bool)) for i in range(int(b.max()) + 1)])
    return rows[b]


def test_latent_means_match_scvi_tools(totalvi, data, tmp_path):
    model_dir, model, adata = totalvi
    _, _, store = data
    assert model.module.protein_batch_mask is not None  # scvi-tools saw the missing proteins
    run = import_scvi_model(model_dir, tmp_path / "run")
    assert run.config.model.foreground_activation == "relu" and run.config.model.protein_input_mean == "all"
    assert not all(all(row) for row in run.registry.extra["scvi_import"]["batch_protein_masks"].values())
    assert list(run.registry.batch_categories) == ["batch_0", "batch_1"]
    expected = model.get_latent_representation()
    # Through the store (streamed, aligned by name), as `streamtotal embed` does.
    got = embed(tmp_path / "run", str(store), key=None, return_latent=True, progress=False).latent
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() < 1e-4


def _scvi_elbo_terms(module, x, y, b, mask, latent_library: bool):
    """scvi-tools' per-cell decoder outputs and ELBO terms at the posterior means (deterministic)."""
    with torch.no_grad():
        inf = module.inference(x, y, batch_index=b[:, None], panel_index=b[:, None], label=torch.zeros_like(b)[:, None])
        qz, ql = inf["qz"], inf["ql"]
        library = ql.loc.clamp(max=15).exp() if latent_library else x.sum(1, keepdim=True)
        gen = module.generative(qz.loc, library, b[:, None], label=torch.zeros_like(b)[:, None])
        px, py = gen["px_"], dict(gen["py_"])
        py["rate_back"] = py["back_alpha"].exp()  # the background at its posterior mean, as ours with sample=False
        py["rate_fore"] = py["rate_back"] * py["fore_scale"]
        rec_gene, rec_protein = module.get_reconstruction_loss(x, y, px, py, mask.float(), gen["per_batch_efficiency"])
        kl_z = kl_divergence(qz, Normal(0.0, 1.0)).sum(1)
        kl_back = (kl_divergence(Normal(py["back_alpha"], py["back_beta"]), inf["back_mean_prior"]) * mask).sum(1)
        kl_l = torch.zeros_like(kl_z)
        if latent_library:
            onehot = torch.nn.functional.one_hot(b, module.n_batch).float()
            prior = Normal(onehot @ module.library_log_means.t(), (onehot @ module.library_log_vars.t()).sqrt())
            kl_l = kl_divergence(ql, prior).sum(1)
    return px, py, gen, rec_gene + rec_protein + kl_z + kl_back + kl_l


def _check_function(model_dir, model, adata, run_dir, latent_library=False, single_batch=False):
    x, y, b = _tensors(adata, single_batch)
    mask = _mask(model, b, y.shape[1])
    y = torch.where(mask, y, 0.0)
    px, py, gen_s, neg_elbo_s = _scvi_elbo_terms(model.module, x, y, b, mask, latent_library)
    ours = load_trained(run_dir).model
    with torch.no_grad():
        inf = ours.inference(x, y, mask, b, sample=False)
        gen = ours.generative(inf.z, inf.log_library, b, sample_background=False)
        batch = CiteBatch(x, y, mask, b, torch.full_like(b, -1), torch.arange(len(b)))
        out = ours.loss(batch, inf, gen)
    # Normalised RNA (the scale that get_normalized_expression multiplies by the library size).
    assert torch.allclose(torch.softmax(gen.rna_logits, dim=1), px["scale"], rtol=1e-4, atol=1e-7)
    # Protein foreground probability 1 - pi, and the foreground multiplier alpha (scvi-tools: 1 + relu).
    fg_ours = torch.sigmoid(-gen.mix_logits)
    assert (fg_ours - (1.0 - torch.sigmoid(py["mixing"]))).abs().max() < 1e-5
    assert (gen.fore_scale - py["fore_scale"]).abs().max() < 1e-4
    # Background: ours holds scvi-tools' per-batch efficiency in its log mean.
    log_eff = gen_s["per_batch_efficiency"].log()
    assert log_eff.abs().max() > 1e-4  # trained away from 0, so folding it in is tested
    assert (gen.back_mean - (py["back_alpha"] + log_eff)).abs().max() < 1e-4
    assert (gen.back_scale - py["back_beta"]).abs().max() < 1e-5
    # The negative ELBO at the posterior means: likelihoods and KL terms, per cell.
    np.testing.assert_allclose(out.neg_elbo.numpy(), neg_elbo_s.numpy(), rtol=1e-4)


def test_decoder_and_elbo_match_scvi_tools(totalvi, tmp_path):
    model_dir, model, adata = totalvi
    import_scvi_model(model_dir, tmp_path / "run")
    _check_function(model_dir, model, adata, tmp_path / "run")


def test_latent_library_batch_dispersion_two_decoder_layers(data, tmp_path):
    """Library encoder, per-batch dispersions, an encoder without covariates and a two-layer decoder (the
    block-diagonal layers of the parallel decoder stack)."""
    _, adata, _ = data
    model, adata = _train_save(scvi.model.TOTALVI, adata, tmp_path / "scvi", {}, use_observed_lib_size=False,
                               gene_dispersion="gene-batch", protein_dispersion="protein-batch",
                               encode_covariates=False, n_layers_decoder=2)
    run = import_scvi_model(tmp_path / "scvi", tmp_path / "run")
    cfg = run.config.model
    assert cfg.latent_library and not cfg.encode_covariates and cfg.n_layers_decoder == 2
    assert cfg.gene_dispersion == "gene-batch" and cfg.protein_dispersion == "protein-batch"
    x, y, b = _tensors(adata)
    mask = _mask(model, b, y.shape[1])
    ours = load_trained(tmp_path / "run").model
    with torch.no_grad():
        z = ours.encode(x, torch.where(mask, y, 0.0), mask, b).numpy()
    assert np.abs(z - model.get_latent_representation()).max() < 1e-4
    _check_function(tmp_path / "scvi", model, adata, tmp_path / "run", latent_library=True)


def test_single_batch_model_without_batch_key(data, tmp_path):
    """A model set up without batch_key has one batch and no covariate columns; its efficiency goes into the
    background head's bias, and the batch is named after the store it will read."""
    _, adata, _ = data
    adata = adata[adata.obs["batch"] == "batch_0"].copy()
    model, adata = _train_save(scvi.model.TOTALVI, adata, tmp_path / "scvi", {}, batch_key=None)
    with pytest.raises(InteropError, match="--batch-name"):
        import_scvi_model(tmp_path / "scvi", tmp_path / "run")
    adata.write_h5ad(tmp_path / "single.h5ad")
    ingest(tmp_path / "single.h5ad", tmp_path / "single.zarr", progress=False)
    run = import_scvi_model(tmp_path / "scvi", tmp_path / "run", batch_name="single")
    assert list(run.registry.batch_categories) == ["single"] and run.registry.batch_key is None
    got = embed(tmp_path / "run", str(tmp_path / "single.zarr"), key=None, return_latent=True, progress=False).latent
    assert np.abs(got - model.get_latent_representation()).max() < 1e-4
    _check_function(tmp_path / "scvi", model, adata, tmp_path / "run", single_batch=True)


def test_totalanvi_predictions_match_scvi_tools(data, tmp_path):
    _, adata, store = data
    model, adata = _train_save(scvi.external.TOTALANVI, adata, tmp_path / "scvi",
                               {"labels_key": "cell_type", "unlabeled_category": "unlabeled"})
    run = import_scvi_model(tmp_path / "scvi", tmp_path / "run")
    assert run.config.model.label_classifier
    assert "unlabeled" not in run.registry.label_categories and run.registry.n_labels == 3
    got = predict_labels(tmp_path / "run", str(store), write_back=False, keep=True, progress=False)
    expected_probs = model.predict(soft=True)
    expected_probs = expected_probs[got.label_names].to_numpy()  # same column order
    assert np.abs(got.probabilities - expected_probs).max() < 1e-4
    assert (np.asarray(got.predicted, dtype=str) == np.asarray(model.predict(), dtype=str)).all()
    assert np.abs(got.latent - model.get_latent_representation()).max() < 1e-4


def test_cli_import_embed_and_overwrite(totalvi, data, tmp_path, capsys):
    model_dir, model, _ = totalvi
    _, _, store = data
    run = tmp_path / "run"
    assert main(["import-scvi", str(model_dir), "--out", str(run)]) == 0
    assert "imported scvi-tools TOTALVI" in capsys.readouterr().out
    assert {p.name for p in run.iterdir()} >= {"config.toml", "registry.json", "model.pt", "metrics.jsonl"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp directory left behind
    assert main(["import-scvi", str(model_dir), "--out", str(run)]) == 2  # exists, no --overwrite
    assert "already exists" in capsys.readouterr().err
    assert main(["import-scvi", str(model_dir), "--out", str(run), "--overwrite"]) == 0
    out_h5ad = tmp_path / "latent.h5ad"
    assert main(["embed", str(run), str(store), "--no-write-back", "--export-h5ad", str(out_h5ad),
                 "--no-progress"]) == 0
    import anndata as ad

    latent = ad.read_h5ad(out_h5ad).obsm["X_streamtotal"]
    assert np.abs(latent - model.get_latent_representation()).max() < 1e-4
    denoised = tmp_path / "foreground.h5ad"
    assert main(["denoise", str(run), str(store), "--what", "foreground", "--no-write-back", "--out-h5ad",
                 str(denoised), "--no-progress"]) == 0
    foreground = np.asarray(ad.read_h5ad(denoised).obsm["protein_foreground_prob"])
    assert foreground.shape == (SIM.n_cells, SIM.n_proteins) and ((foreground >= 0) & (foreground <= 1)).all()


def test_map_query_onto_imported_reference(totalvi, tmp_path):
    model_dir, _, _ = totalvi
    import_scvi_model(model_dir, tmp_path / "ref")
    query = CiteSimulator(SimulationConfig(n_cells=120, n_genes=100, n_proteins=12, n_cell_types=3, n_batches=1,
                                           n_missing_proteins=0, block_cells=120, seed=9)).to_anndata()
    query.obs["batch"] = query.obs["batch"].cat.rename_categories(lambda v: f"query_{v}")
    query.write_h5ad(tmp_path / "query.h5ad")
    ingest(tmp_path / "query.h5ad", tmp_path / "query.zarr", batch_key="batch", progress=False)
    result = map_query(tmp_path / "ref", [str(tmp_path / "query.zarr")], tmp_path / "mapped", epochs=1,
                       train={"batch_size": 64, "progress": False}, verbose=False)
    assert result.report["new_batches"] == ["query_batch_0"]
    mapped = load_trained(tmp_path / "mapped")
    reference = load_trained(tmp_path / "ref")
    # The reference's weights are untouched (scArches): e.g. the encoder's first layer.
    assert torch.equal(mapped.model.encoder.linears[0].weight, reference.model.encoder.linears[0].weight)
    latent = embed(tmp_path / "mapped", str(tmp_path / "query.zarr"), key=None, return_latent=True,
                   progress=False).latent
    assert latent.shape == (120, SMALL["n_latent"]) and np.isfinite(latent).all()


def _edited_copy(model_dir, out_dir, edit):
    saved = load_weights_only(model_dir / "model.pt", inert_modules=("pandas",))
    del saved["attr_dict"]["history_"]  # pandas tables, loaded as inert stand-ins that would not load back
    edit(saved["attr_dict"])
    out_dir.mkdir()
    torch.save(saved, out_dir / "model.pt")
    return out_dir


@pytest.mark.parametrize("field, value", [("latent_distribution", "ln"), ("gene_likelihood", "zinb"),
                                          ("gene_dispersion", "gene-cell")])
def test_refuses_what_it_cannot_import(totalvi, tmp_path, field, value):
    model_dir, _, _ = totalvi
    bad = _edited_copy(model_dir, tmp_path / "bad",
                       lambda a: a["init_params_"]["non_kwargs"].__setitem__(field, value))
    with pytest.raises(InteropError, match=rf"{field} = '{value}'"):
        import_scvi_model(bad, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_refuses_extra_covariates_missing_file_and_existing_run(totalvi, tmp_path):
    model_dir, _, _ = totalvi
    bad = _edited_copy(model_dir, tmp_path / "covs",
                       lambda a: a["registry_"]["setup_args"].__setitem__("categorical_covariate_keys", ["donor"]))
    with pytest.raises(InteropError, match=r"categorical_covariate_keys = \['donor'\]"):
        import_scvi_model(bad, tmp_path / "run")
    with pytest.raises(InteropError, match="no model.pt"):
        import_scvi_model(tmp_path, tmp_path / "run")
    import_scvi_model(model_dir, tmp_path / "run")
    with pytest.raises(RunDirError, match="already exists"):
        import_scvi_model(model_dir, tmp_path / "run")


def test_cli_refuses_a_downloaded_model_that_would_run_code(totalvi, tmp_path):
    import subprocess
    import sys

    model_dir, _, _ = totalvi
    marker = tmp_path / "marker"
    bad = _edited_copy(model_dir, tmp_path / "downloaded",
                       lambda a: a["registry_"]["setup_args"].__setitem__("layer", OpenPayload(marker)))
    proc = subprocess.run([sys.executable, "-m", "streamtotal", "import-scvi", str(bad), "--out", str(tmp_path / "run")],
                          capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert str(bad / "model.pt") in proc.stderr and "would run code" in proc.stderr and "io.open" in proc.stderr
    assert "Traceback" not in proc.stderr and not marker.exists() and not (tmp_path / "run").exists()
