"""Every posterior option checked against a direct computation from the model's own inference/generative outputs."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from loaders.citebatch import CiteBatch
from streamtotal.data import open_collection
from streamtotal.errors import ConfigError, ModelInputError
from streamtotal.inference import posterior
from streamtotal.model.config import ModelConfig
from streamtotal.model.totalvi import TotalVAE


@pytest.fixture(scope="module")
def model_and_batch(trained, small_store):
    """The trained model and 40 cells from both batches (the second batch lacks two proteins)."""
    data = replace(trained.config.data, stores=(str(small_store),))
    collection = open_collection(data, registry=trained.registry)
    ids = np.r_[0:20, collection.n_obs - 20: collection.n_obs]
    batch = collection.read(ids)
    assert set(batch.batch.tolist()) == {0, 1} and not batch.protein_mask.all()
    return trained.model.eval(), batch


def _direct(model, batch, batch_codes=None, z=None, log_library=None):
    """Decoder outputs at the posterior means, computed with the model's own methods."""
    inf = model.inference(batch.rna, batch.protein, batch.protein_mask, batch.batch, sample=False)
    codes = batch.batch if batch_codes is None else batch_codes
    return model.generative(inf.qz_mean if z is None else z, inf.log_library if log_library is None else log_library,
                            codes, sample_background=False), inf


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def test_latent_mean_and_draws(model_and_batch):
    model, batch = model_and_batch
    _, inf = _direct(model, batch)
    torch.testing.assert_close(posterior.latent(model, batch), inf.qz_mean)
    draws = posterior.latent(model, batch, give_mean=False, n_samples=3, generator=_gen(1))
    assert draws.shape == (3, len(batch), model.config.n_latent)
    torch.testing.assert_close(draws, posterior.latent(model, batch, give_mean=False, n_samples=3, generator=_gen(1)))
    assert not torch.equal(draws, posterior.latent(model, batch, give_mean=False, n_samples=3, generator=_gen(2)))
    assert posterior.latent(model, batch, give_mean=False, generator=_gen(1)).shape == inf.qz_mean.shape
    many = posterior.latent(model, batch, give_mean=False, n_samples=4000, generator=_gen(3))
    torch.testing.assert_close(many.mean(0), inf.qz_mean, atol=0.1 * inf.qz_var.sqrt().max().item(), rtol=0)
    torch.testing.assert_close(many.var(0), inf.qz_var, rtol=0.15, atol=1e-6)


def test_rna_library_size_is_applied_exactly_once(model_and_batch):
    model, batch = model_and_batch
    gen, _ = _direct(model, batch)
    rho = torch.softmax(gen.rna_logits, dim=-1)
    torch.testing.assert_close(posterior.normalized_rna(model, batch), rho)
    scaled = posterior.normalized_rna(model, batch, library_size=1e4)
    torch.testing.assert_close(scaled, 1e4 * rho)
    torch.testing.assert_close(scaled.sum(1), torch.full((len(batch),), 1e4))

    codes = [torch.full_like(batch.batch, b) for b in (0, 1)]
    rho_b = [torch.softmax(_direct(model, batch, c)[0].rna_logits, dim=-1) for c in codes]
    both = posterior.normalized_rna(model, batch, library_size=1e4, transform_batch=[0, 1])
    torch.testing.assert_close(both, 1e4 * (rho_b[0] + rho_b[1]) / 2)  # not 1e8: scaled once, after averaging
    singles = [posterior.normalized_rna(model, batch, library_size=1e4, transform_batch=b) for b in (0, 1)]
    torch.testing.assert_close(both, (singles[0] + singles[1]) / 2)
    assert not torch.allclose(singles[0], singles[1])


def test_rna_latent_library_uses_each_cells_own_library(model_and_batch):
    model, batch = model_and_batch
    gen, _ = _direct(model, batch)
    own = batch.rna.sum(1)
    expected = torch.softmax(gen.rna_logits, dim=-1) * own[:, None]
    torch.testing.assert_close(posterior.normalized_rna(model, batch, library_size="latent"), expected)

    torch.manual_seed(0)
    lib_model = TotalVAE(ModelConfig(n_latent=3, n_hidden=16, latent_library=True), model.n_genes, model.n_proteins,
                        model.n_batch).eval()
    gen, inf = _direct(lib_model, batch)
    expected = torch.softmax(gen.rna_logits, dim=-1) * inf.ql_mean.exp()[:, None]
    torch.testing.assert_close(posterior.normalized_rna(lib_model, batch, library_size="latent"), expected)


def test_protein_foreground_background_and_scaling(model_and_batch):
    model, batch = model_and_batch
    gen, _ = _direct(model, batch)
    pi = torch.sigmoid(gen.mix_logits)
    beta = gen.back_mean.exp()
    fore = (1 - pi) * beta * gen.fore_scale
    torch.testing.assert_close(posterior.denoised_protein(model, batch), fore)
    torch.testing.assert_close(posterior.denoised_protein(model, batch, include_protein_background=True),
                               fore + pi * beta)
    scaled = posterior.denoised_protein(model, batch, scale_protein=True)
    torch.testing.assert_close(scaled.sum(1), torch.ones(len(batch)))
    torch.testing.assert_close(scaled, fore / fore.sum(1, keepdim=True))
    torch.testing.assert_close(posterior.protein_foreground_probability(model, batch), 1 - pi)

    gens = [_direct(model, batch, torch.full_like(batch.batch, b))[0] for b in (0, 1)]
    expected = sum(1 - torch.sigmoid(g.mix_logits) for g in gens) / 2
    torch.testing.assert_close(posterior.protein_foreground_probability(model, batch, transform_batch=[0, 1]), expected)
    expected = sum((1 - torch.sigmoid(g.mix_logits)) * g.back_mean.exp() * g.fore_scale for g in gens) / 2
    torch.testing.assert_close(posterior.denoised_protein(model, batch, transform_batch=[0, 1]), expected)


def test_sampled_mixing_picks_foreground_or_background(model_and_batch):
    model, batch = model_and_batch
    gen, _ = _direct(model, batch)
    beta, fore = gen.back_mean.exp(), gen.back_mean.exp() * gen.fore_scale
    value = posterior.denoised_protein(model, batch, include_protein_background=True, sample_protein_mixing=True,
                                       generator=_gen(4))
    is_fore, is_back = torch.isclose(value, fore), torch.isclose(value, beta)
    assert (is_fore | is_back).all() and is_fore.any() and is_back.any()
    only_fore = posterior.denoised_protein(model, batch, sample_protein_mixing=True, generator=_gen(4))
    torch.testing.assert_close(only_fore, torch.where(is_fore, fore, 0.0))


def test_n_samples_decode_each_draw_and_average(model_and_batch):
    model, batch = model_and_batch
    draws = posterior.draw_posterior(model, batch, 5, generator=_gen(7))
    expected = []
    for s in range(5):
        gen = model.generative(draws.z[s], draws.log_library[s], batch.batch, sample_background=False)
        beta = (gen.back_mean + gen.back_scale * draws.back_noise[s]).exp()
        expected.append((1 - torch.sigmoid(gen.mix_logits)) * beta * gen.fore_scale)
    kept = posterior.denoised_protein(model, batch, n_samples=5, return_mean=False, generator=_gen(7))
    assert kept.shape == (5, len(batch), model.n_proteins)
    torch.testing.assert_close(kept, torch.stack(expected))
    mean = posterior.denoised_protein(model, batch, n_samples=5, generator=_gen(7))
    torch.testing.assert_close(mean, kept.mean(0))
    rna = posterior.normalized_rna(model, batch, n_samples=5, return_mean=False, generator=_gen(7))
    assert rna.shape == (5, len(batch), model.n_genes) and not torch.allclose(rna[0], rna[1])


def test_subsets_select_columns(model_and_batch):
    model, batch = model_and_batch
    genes, proteins = torch.tensor([5, 0, 17]), torch.tensor([3, 1])
    torch.testing.assert_close(posterior.normalized_rna(model, batch, genes=genes),
                               posterior.normalized_rna(model, batch)[:, genes])
    torch.testing.assert_close(posterior.denoised_protein(model, batch, proteins=proteins),
                               posterior.denoised_protein(model, batch)[:, proteins])
    # scale_protein normalises over every protein, then subsets
    torch.testing.assert_close(posterior.denoised_protein(model, batch, proteins=proteins, scale_protein=True),
                               posterior.denoised_protein(model, batch, scale_protein=True)[:, proteins])


def test_imputation_fills_exactly_the_unmeasured_entries(model_and_batch):
    model, batch = model_and_batch
    values, measured = posterior.impute_proteins(model, batch)
    assert torch.equal(measured, batch.protein_mask) and (~measured).any()
    denoised = posterior.denoised_protein(model, batch)
    assert torch.equal(values[~measured], denoised[~measured])
    assert torch.equal(values[measured], batch.protein[measured])
    with pytest.raises(ConfigError, match="scale_protein"):
        posterior.impute_proteins(model, batch, scale_protein=True)


def test_bad_inputs_raise(model_and_batch):
    model, batch = model_and_batch
    with pytest.raises(ConfigError, match="outside"):
        posterior.denoised_protein(model, batch, transform_batch=[0, 7])
    with pytest.raises(ConfigError, match="library_size"):
        posterior.normalized_rna(model, batch, library_size=0)
    with pytest.raises(ConfigError, match="n_samples"):
        posterior.normalized_rna(model, batch, n_samples=0)
    model.train()
    try:
        with pytest.raises(ModelInputError, match="eval"):
            posterior.latent(model, batch)
    finally:
        model.eval()
    wrong = CiteBatch(batch.rna[:, :5], batch.protein, batch.protein_mask, batch.batch, batch.label, batch.cell_id)
    with pytest.raises(ModelInputError):
        posterior.latent(model, wrong)
