"""Posterior predictive counts, ELBO / reconstruction error and the importance-sampled marginal log-likelihood."""

import math
import numpy as np
import pytest
import torch

from streamtotal.errors import ConfigError, SelectionError
from streamtotal.inference import predictive
from streamtotal.inference.cell_stream import block_generator
from streamtotal.inference.expression import StorePosterior
from streamtotal.inference.posterior import decode, draw_posterior
from streamtotal.model.likelihoods import log_nb, log_nb_mixture


@pytest.fixture(scope="module")
def post(trained, small_store):
    return StorePosterior(trained, small_store, batch_size=64, device="cpu", progress=False)


def _read(post, ids):
    return post.collection.read(np.sort(np.asarray(ids)))


def test_predictive_shapes_subsets_and_determinism(post):
    reg = post.registry
    ids = np.array([401, 5, 260, 33, 120])
    rna, protein = predictive.posterior_predictive_sample(post, ids, seed=4)
    assert rna.shape == (5, reg.n_genes) and protein.shape == (5, reg.n_proteins)
    rna3, protein3 = predictive.posterior_predictive_sample(post, ids, 3, seed=4)
    assert rna3.shape == (3, 5, reg.n_genes) and protein3.shape == (3, 5, reg.n_proteins)
    for counts in (rna3, protein3):
        assert (counts >= 0).all() and (counts == np.round(counts)).all()
    again = predictive.posterior_predictive_sample(post, ids, 3, seed=4)
    np.testing.assert_array_equal(again[0], rna3)
    np.testing.assert_array_equal(again[1], protein3)
    other = predictive.posterior_predictive_sample(post, ids, 3, seed=5)
    assert not np.array_equal(other[0], rna3)
    genes, proteins = [reg.gene_names[3], reg.gene_names[0]], [reg.protein_names[2]]
    sub_rna, sub_protein = predictive.posterior_predictive_sample(post, ids, genes=genes, proteins=proteins)
    assert sub_rna.shape == (5, 2) and sub_protein.shape == (5, 1)
    with pytest.raises(SelectionError, match="NOPE"):
        predictive.posterior_predictive_sample(post, ids, genes=["NOPE"])
    with pytest.raises(ConfigError):
        predictive.posterior_predictive_sample(post, ids, 0)


@torch.no_grad()
def test_predictive_mean_matches_expected_counts(post):
    """Mean of many predictive draws ~= E_q[l rho] (RNA) and E_q[(1 - pi) beta alpha + pi beta] (protein)."""
    ids = np.array([3, 90, 200, 333, 480])
    n = 1500
    rna, protein = predictive.posterior_predictive_sample(post, ids, n, seed=1)
    batch = _read(post, ids)
    draws = draw_posterior(post.model, batch, 4000, sample=True, generator=torch.Generator().manual_seed(99))
    gen = decode(post.model, draws, batch.batch)
    pi = torch.sigmoid(gen.mix_logits)
    expected_rna = gen.rna_rate.reshape(4000, len(ids), -1).double().mean(0).numpy()
    expected_protein = ((1 - pi) * gen.protein_rate_fore + pi * gen.protein_rate_back)
    expected_protein = expected_protein.reshape(4000, len(ids), -1).double().mean(0).numpy()
    for counts, expected in ((rna, expected_rna), (protein, expected_protein)):
        mean, se = counts.mean(0), counts.std(0) / np.sqrt(n)
        # Monte Carlo error of the draws (5 standard errors) plus 3% for the 4000-draw expectation itself.
        assert (np.abs(mean - expected) <= 5 * se + 0.03 * expected + 1e-3).all()
    assert expected_rna.sum() > 1000 and expected_protein.sum() > 50  # the check is not vacuous


@torch.no_grad()
def test_reconstruction_error_is_rna_plus_protein_nll_from_reference_likelihoods(post):
    ids = np.arange(70, 120)  # within block 1 (rows 64..127) of batch size 64: one draw_posterior call
    terms = predictive.elbo(post, ids, per_cell=True, seed=7)
    recon = predictive.reconstruction_error(post, ids, per_cell=True, seed=7)
    np.testing.assert_array_equal(recon, terms["reconstruction"])
    batch = _read(post, ids)
    draws = draw_posterior(post.model, batch, 1, sample=True, generator=block_generator(7, 1, "cpu"))
    gen = decode(post.model, draws, batch.batch)
    rna_nll = -log_nb(batch.rna, gen.rna_rate, gen.rna_log_theta.exp()).sum(1)
    protein_ll = log_nb_mixture(batch.protein, gen.protein_rate_back, gen.protein_rate_fore, gen.protein_theta,
                                gen.mix_logits)
    protein_nll = -torch.where(batch.protein_mask, protein_ll, 0.0).sum(1)
    np.testing.assert_allclose(terms["rna_nll"], rna_nll.numpy(), rtol=1e-4)
    np.testing.assert_allclose(terms["protein_nll"], protein_nll.numpy(), rtol=1e-4)
    np.testing.assert_allclose(recon, (rna_nll + protein_nll).numpy(), rtol=1e-4)
    kl = terms["kl_z"] + terms["kl_background"] + terms["kl_library"]
    np.testing.assert_allclose(terms["elbo"], -(terms["reconstruction"] + kl), rtol=1e-6)
    means = predictive.elbo(post, ids, seed=7)
    assert means["elbo"] == pytest.approx(terms["elbo"].mean())


def test_marginal_ll_bounds_the_elbo_and_tightens_with_more_samples(post):
    ids = np.arange(0, 500, 10)
    elbo = np.mean([predictive.elbo(post, ids, seed=s)["elbo"] for s in range(4)])
    ll = {k: predictive.marginal_ll(post, ids, n_mc_samples=k, chunk_size=16, seed=2) for k in (1, 10, 100, 200)}
    # One importance sample is a one-draw ELBO (analytic KLs there): same expectation. Same seeds = same z and
    # log beta draws (per block), so the comparison is paired and the Monte Carlo noise of z mostly cancels.
    one_sample = np.mean([predictive.marginal_ll(post, ids, n_mc_samples=1, seed=s) for s in range(4)])
    assert one_sample == pytest.approx(elbo, abs=0.02 * abs(elbo))
    assert ll[100] >= elbo
    assert ll[1] <= ll[10] + 0.5 and ll[10] <= ll[100] + 0.5
    assert ll[100] - ll[1] > 1.0  # the bound really tightens
    assert abs(ll[200] - ll[100]) < 0.25 * (ll[100] - ll[1])  # and settles
    per_cell = predictive.marginal_ll(post, ids, n_mc_samples=10, chunk_size=3, per_cell=True, seed=2)
    assert per_cell.shape == (ids.size,) and np.isfinite(per_cell).all()
    with pytest.raises(ConfigError):
        predictive.marginal_ll(post, ids, n_mc_samples=0)


@torch.no_grad()
def test_importance_weights_average_to_minus_neg_elbo_with_a_latent_library(post):
    """E_q[log w] = -E_q[neg_elbo] (analytic KLs of z, log beta and log l), here for a latent-library model."""
    from streamtotal.model.config import ModelConfig
    from streamtotal.model.totalvi import TotalVAE

    reg = post.registry
    torch.manual_seed(0)
    model = TotalVAE(ModelConfig(n_latent=3, n_hidden=16, latent_library=True), reg.n_genes, reg.n_proteins,
                    len(reg.batch_categories), library_prior=(torch.full((2,), 6.0), torch.full((2,), 0.05))).eval()
    # Narrow posteriors (q(log l) = N(7.8, 0.01), var z ~ 0.02, sd log beta ~ 0.05) keep the Monte Carlo error
    # well below each KL term.
    model.library_head.weight.zero_()
    model.library_head.bias.copy_(torch.tensor([7.8, math.log(0.01)]))
    model.z_head.weight[3:].zero_()
    model.z_head.bias[3:] = -4.0
    t = reg.n_proteins
    model.background_head.weight[t:].zero_()
    model.background_head.cov_weight[:, t:].zero_()
    model.background_head.bias[t:] = -3.0
    batch = _read(post, np.r_[0:6, 300:306])  # both batches; the second lacks two proteins
    gen = torch.Generator().manual_seed(0)
    log_w = predictive.log_importance_weights(model, batch, 3000, generator=gen).double()
    neg_elbo = torch.stack([predictive.elbo_terms(model, batch, generator=gen).neg_elbo for _ in range(600)]).double()
    assert (predictive.elbo_terms(model, batch, generator=gen).kl_library != 0).all()
    se = (log_w.var(0) / log_w.shape[0] + neg_elbo.var(0) / neg_elbo.shape[0]).sqrt()
    diff = (log_w.mean(0) + neg_elbo.mean(0)).abs()
    assert (diff < 4 * se).all(), (diff / se).tolist()
    terms = predictive.elbo_terms(model, batch, generator=gen)
    assert (4 * se < terms.kl_library).all() and (4 * se < terms.kl_background).all()  # a missing term would show


# ----------------------------------------------------------------------------- the m2 label prior of totalANVI

N_LABELS = 3


def _m2_model(registry):
    from streamtotal.model.config import ModelConfig
    from streamtotal.model.totalvi import TotalVAE

    torch.manual_seed(0)
    config = ModelConfig(n_latent=4, n_hidden=16, label_classifier=True, label_prior="m2")
    return TotalVAE(config, registry.n_genes, registry.n_proteins, len(registry.batch_categories),
                    n_labels=N_LABELS).eval()


def _labelled_batch(post):
    """Cells of both batches (the second lacks two proteins), half of them labelled."""
    from dataclasses import replace

    batch = _read(post, np.r_[0:8, 300:308])
    labels = torch.arange(len(batch)) % N_LABELS
    labels[1::2] = -1
    return replace(batch, label=labels)


@torch.no_grad()
def test_elbo_of_an_m2_model_is_its_training_loss_terms(post):
    model = _m2_model(post.registry)
    batch = _labelled_batch(post)
    # Training draws z, log beta, then the prior's z2 from torch's global generator; elbo_terms draws them in the
    # same order from its own: seeded alike, both see the same draws.
    torch.manual_seed(3)
    trained = model(batch, kl_weight=1.0)
    got = predictive.elbo_terms(model, batch, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(got.z, trained.z)
    for term in predictive.ELBO_TERMS:
        torch.testing.assert_close(getattr(got, term), getattr(trained, term), msg=lambda m: f"{term}: {m}")
    # the z term is the label prior's, not KL(q(z) || N(0, I)) (what the ELBO used to take)
    inf = got.inference
    standard = 0.5 * (inf.qz_var + inf.qz_mean.square() - 1.0 - inf.qz_var.log()).sum(1)
    assert (got.kl_z - standard).abs().min() > 1e-2


@torch.no_grad()
def test_importance_weights_of_an_m2_model_use_its_label_prior(post):
    from torch.distributions import Normal

    model = _m2_model(post.registry)
    prior = model.label_prior
    batch = _labelled_batch(post)
    s = 3
    got = predictive.log_importance_weights(model, batch, s, generator=torch.Generator().manual_seed(4))

    # Directly, with the draws in the function's order: z, the z2 of every (label, draw), then log beta noise.
    g = torch.Generator().manual_seed(4)
    inf = model.inference(batch.rna, batch.protein, batch.protein_mask, batch.batch, sample=False)
    n, k = inf.qz_mean.shape
    z = inf.qz_mean + inf.qz_var.sqrt() * torch.randn((s, n, k), generator=g)
    flat = z.reshape(s * n, k)
    eps = torch.randn((N_LABELS * s * n, k), generator=g)  # label-major
    per_label = []
    for label in range(N_LABELS):
        codes = torch.full((s * n,), label)
        m2, log_v2 = prior.z2_head(prior.z2_encoder(flat, codes)).chunk(2, -1)
        q_z2 = Normal(m2, (log_v2.exp() + 1e-4).sqrt())
        z2 = m2 + q_z2.scale * eps[label * s * n:(label + 1) * s * n]
        p_mean, p_log_var = prior.z_head(prior.z_decoder(z2, codes)).chunk(2, -1)
        p_z = Normal(p_mean, (p_log_var.exp() + 1e-4).sqrt())
        per_label.append(p_z.log_prob(flat).sum(1) + Normal(0.0, 1.0).log_prob(z2).sum(1) - q_z2.log_prob(z2).sum(1))
    # log p(z) = log (1/K) sum_y p(z | y): the labels are summed over, labelled cells too
    log_p_z = torch.logsumexp(torch.stack(per_label, 1), 1) - math.log(N_LABELS)
    standard = Normal(0.0, 1.0).log_prob(flat).sum(1)
    assert (log_p_z - standard).abs().mean() > 0.1  # the check is not vacuous: N(0, I) would fail it

    gen = model.generative(flat, inf.log_library.repeat(s), batch.batch.repeat(s), sample_background=False)
    log_back = gen.back_mean + gen.back_scale * torch.randn(gen.back_mean.shape, generator=g)
    rna_ll = log_nb(batch.rna.repeat(s, 1), gen.rna_rate, gen.rna_log_theta.exp()).sum(1)
    mask = batch.protein_mask.repeat(s, 1)
    protein = torch.where(batch.protein_mask, batch.protein, 0.0).repeat(s, 1)
    protein_ll = log_nb_mixture(protein, log_back.exp(), log_back.exp() * gen.fore_scale, gen.protein_theta,
                                gen.mix_logits)
    codes = batch.batch.repeat(s)
    back_prior = Normal(model.background_prior_mean[codes], model.background_prior_log_scale[codes].exp())
    back_terms = back_prior.log_prob(log_back) - Normal(gen.back_mean, gen.back_scale).log_prob(log_back)
    per_draw = rna_ll + torch.where(mask, protein_ll + back_terms, 0.0).sum(1)
    log_q_z = Normal(inf.qz_mean, inf.qz_var.sqrt()).log_prob(z).sum(-1)
    expected = (log_p_z + per_draw).view(s, n) - log_q_z
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-3)
