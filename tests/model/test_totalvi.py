"""TotalVAE: loss definition, masking, gradients, configurations, priors, adversarial classifier, config checks."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from loaders.citebatch import CiteBatch
from streamtotal.errors import ConfigError, ModelInputError
from streamtotal.model import ModelConfig, TotalVAE
from streamtotal.model.likelihoods import log_nb_mixture

G, T, NB = 60, 8, 3


def make_batch(n=32, seed=0, zero_fraction=0.5, scale=1.0, masked_proteins=(5, 6), masked_batch=2):
    rng = np.random.default_rng(seed)
    rna = rng.poisson(rng.gamma(0.5, 4.0, size=(n, G)) * scale).astype(np.float32)
    rna[rng.random((n, G)) < zero_fraction] = 0
    protein = rng.poisson(np.exp(rng.normal(3.0, 1.0, size=(n, T))) * scale).astype(np.float32)
    batch = np.arange(n) % NB
    mask = np.ones((n, T), dtype=bool)
    mask[np.ix_(batch == masked_batch, list(masked_proteins))] = False  # one batch lacks two antibodies
    protein[~mask] = 0
    return CiteBatch(torch.tensor(rna), torch.tensor(protein), torch.tensor(mask), torch.tensor(batch),
                     torch.full((n,), -1), torch.arange(n))


def make_model(seed=0, **config):
    torch.manual_seed(seed)
    prior = (torch.full((T, NB), 3.0), torch.full((T, NB), 0.5))
    library = (torch.full((NB,), 7.0), torch.full((NB,), 0.5))
    return TotalVAE(ModelConfig(**config), G, T, NB, protein_prior=prior, library_prior=library)


def run(model, batch, kl_weight=1.0, seed=1):
    torch.manual_seed(seed)
    return model(batch, kl_weight=kl_weight)


@pytest.mark.parametrize("config", [{}, {"latent_library": True}])
def test_loss_at_full_kl_weight_is_the_mean_negative_elbo(config):
    model, batch = make_model(**config), make_batch()
    out = run(model, batch, kl_weight=1.0)
    terms = out.rna_nll + out.protein_nll + out.kl_z + out.kl_background + out.kl_library
    torch.testing.assert_close(out.neg_elbo, terms)
    torch.testing.assert_close(out.loss, out.neg_elbo.mean())
    assert (out.kl_library > 0).all() if config else (out.kl_library == 0).all()
    for name in ("neg_elbo", "rna_nll", "protein_nll", "kl_z", "kl_background", "kl_library"):
        assert getattr(out, name).shape == (32,) and torch.isfinite(getattr(out, name)).all()


def test_warmup_scales_only_the_kl_of_z_and_background():
    model, batch = make_model(latent_library=True, protein_reconstruction_weight=0.7), make_batch()
    out = run(model, batch, kl_weight=0.3)
    expected = (out.rna_nll + 0.7 * out.protein_nll + 0.3 * (out.kl_z + out.kl_background) + out.kl_library).mean()
    torch.testing.assert_close(out.loss, expected)
    assert out.kl_weight == 0.3
    torch.testing.assert_close(run(model, batch, kl_weight=0.9).rna_nll, out.rna_nll)  # terms are unweighted


def test_masked_proteins_change_nothing():
    model, batch = make_model(), make_batch()
    garbage = batch.protein.clone()
    garbage[~batch.protein_mask] = torch.tensor([1e9, float("nan"), 3.0, float("inf")]).repeat(100)[
        : int((~batch.protein_mask).sum())]
    noisy = dataclasses.replace(batch, protein=garbage)
    outs, grads = [], []
    for b in (batch, noisy):
        model.zero_grad()
        out = run(model, b)
        out.loss.backward()
        outs.append(out)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    for name in ("protein_nll", "kl_background", "rna_nll", "kl_z", "neg_elbo"):
        torch.testing.assert_close(getattr(outs[0], name), getattr(outs[1], name), rtol=0, atol=0)
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=0, atol=0)
    # and an unmeasured (batch, protein) prior gets no gradient at all
    assert grads[0]["background_prior_mean"][2, 5] == 0 and grads[0]["background_prior_mean"][1, 5] != 0


def test_protein_nll_is_the_masked_mixture_likelihood_of_the_decoded_parameters():
    model, batch = make_model(), make_batch()
    out = run(model, batch)
    gen = out.generative
    full = -log_nb_mixture(batch.protein, gen.protein_rate_back, gen.protein_rate_fore, gen.protein_theta,
                           gen.mix_logits, eps=0.0)
    torch.testing.assert_close(out.protein_nll, (full * batch.protein_mask).sum(1), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("zero_fraction,scale", [(0.99, 1.0), (0.0, 500.0)])
def test_gradients_are_finite_on_sparse_and_large_count_data(zero_fraction, scale):
    model, batch = make_model(latent_library=True), make_batch(zero_fraction=zero_fraction, scale=scale)
    if zero_fraction > 0.9:
        batch.rna[:4] = 0  # cells with no RNA counts at all
    out = run(model, batch)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    for name, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize(
    "config",
    [
        {"gene_dispersion": "gene-batch", "protein_dispersion": "protein-batch"},
        {"n_layers_decoder": 2, "n_layers_encoder": 3, "use_layer_norm": "both", "use_batch_norm": "none"},
        {"encode_covariates": False, "deeply_inject_covariates": False, "scale_encoder_input": False},
        {"log_variational": False, "dropout_rate_encoder": 0.0, "dropout_rate_decoder": 0.0},
    ],
)
def test_configurations_train(config):
    model, batch = make_model(**config), make_batch(n=64)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for step in range(40):
        out = run(model, batch, seed=step)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert np.isfinite(losses).all() and np.mean(losses[-5:]) < np.mean(losses[:5])


def test_default_training_reduces_the_negative_elbo():
    model, batch = make_model(), make_batch(n=128)
    opt = torch.optim.Adam(model.parameters(), lr=4e-3, eps=0.01)
    model.eval()
    before = run(model, batch).neg_elbo.mean().item()
    model.train()
    for step in range(60):
        out = run(model, batch, kl_weight=min(1.0, step / 30), seed=step)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    model.eval()
    assert run(model, batch).neg_elbo.mean().item() < 0.8 * before


def test_encode_returns_the_posterior_mean_in_eval_mode():
    model, batch = make_model(), make_batch()
    model.eval()
    z = model.encode(batch.rna, batch.protein, batch.protein_mask, batch.batch)
    inf = model.inference(batch.rna, batch.protein, batch.protein_mask, batch.batch, sample=False)
    torch.testing.assert_close(z, inf.qz_mean)
    torch.testing.assert_close(z, model.encode(batch.rna, batch.protein, batch.protein_mask, batch.batch))
    sample = model.encode(batch.rna, batch.protein, batch.protein_mask, batch.batch, give_mean=False)
    assert sample.shape == (32, 20) and not torch.equal(sample, z)


def test_generative_outputs_give_consistent_downstream_quantities():
    model, batch = make_model(), make_batch()
    model.eval()
    with torch.no_grad():
        inf = model.inference(batch.rna, batch.protein, batch.protein_mask, batch.batch, sample=False)
        gen = model.generative(inf.z, inf.log_library, batch.batch, sample_background=False)
    torch.testing.assert_close(gen.rna_scale.sum(1), torch.ones(32))
    torch.testing.assert_close(gen.rna_rate.sum(1), batch.rna.sum(1).clamp(min=1))  # observed library
    assert (gen.fore_scale >= 1).all() and torch.equal(gen.log_back, gen.back_mean)
    prob = gen.protein_foreground_prob
    assert ((prob > 0) & (prob < 1)).all()
    torch.testing.assert_close(gen.denoised_protein, prob * gen.protein_rate_back * gen.fore_scale)


def test_priors_are_per_batch_parameters_and_a_state_dict_restores_them():
    c = torch.arange(T * NB, dtype=torch.float32).reshape(T, NB) / 10
    d = torch.full((T, NB), 0.25)
    model = TotalVAE(ModelConfig(latent_library=True), G, T, NB, protein_prior=(c, d),
                    library_prior=(torch.tensor([6.0, 7.0, 8.0]), torch.tensor([0.1, 0.2, 0.3])))
    torch.testing.assert_close(model.background_prior_mean, c.t())
    torch.testing.assert_close(model.background_prior_log_scale.exp(), d.t())
    assert isinstance(model.background_prior_mean, torch.nn.Parameter)
    fresh = TotalVAE(ModelConfig(latent_library=True), G, T, NB)  # what the trainer builds before loading
    torch.testing.assert_close(fresh.background_prior_mean, torch.full((NB, T), 3.0))
    fresh.load_state_dict(model.state_dict())
    model.eval(), fresh.eval()
    batch = make_batch()
    torch.testing.assert_close(run(model, batch).neg_elbo, run(fresh, batch).neg_elbo)
    broadcast = TotalVAE(ModelConfig(), G, T, NB, protein_prior=(c[:, :1], d[:, :1]))
    torch.testing.assert_close(broadcast.background_prior_mean, c[:, 0].expand(NB, T))
    fixed = TotalVAE(ModelConfig(empirical_protein_background_prior=False), G, T, NB, protein_prior=(c, d))
    torch.testing.assert_close(fixed.background_prior_mean, torch.full((NB, T), 3.0))
    torch.testing.assert_close(fixed.background_prior_log_scale, torch.zeros(NB, T))


@pytest.mark.parametrize(
    "prior",
    [(torch.zeros(T + 1, NB), torch.ones(T + 1, NB)), (torch.zeros(T, NB), torch.zeros(T, NB)),
     (torch.full((T, NB), float("nan")), torch.ones(T, NB))],
)
def test_bad_protein_priors_are_refused(prior):
    with pytest.raises(ModelInputError):
        TotalVAE(ModelConfig(), G, T, NB, protein_prior=prior)


def test_batches_that_do_not_fit_the_model_are_refused():
    model, batch = make_model(), make_batch()
    with pytest.raises(ModelInputError):
        model(dataclasses.replace(batch, rna=batch.rna[:, :-1]))
    with pytest.raises(ModelInputError):
        model(dataclasses.replace(batch, protein_mask=batch.protein_mask.float()))


def test_adversarial_classifier_losses_and_parameter_groups():
    model, batch = make_model(adversarial_classifier=True), make_batch()
    classifier = set(map(id, model.classifier_parameters()))
    assert classifier and not classifier & set(map(id, model.vae_parameters()))
    assert len(classifier) + len(model.vae_parameters()) == len(list(model.parameters()))
    out = run(model, batch)
    fool = model.adversarial_fool_loss(out.z, batch.batch)
    fool.backward()
    assert model.encoder.linears[0].weight.grad.abs().sum() > 0  # the encoder learns to fool
    model.zero_grad()
    model.adversarial_classifier_loss(out.z.detach(), batch.batch).backward()
    assert model.encoder.linears[0].weight.grad is None
    assert all(p.grad is not None for p in model.classifier_parameters())
    plain = make_model()
    assert plain.classifier_parameters() == []
    with pytest.raises(ConfigError):
        plain.adversarial_fool_loss(out.z, batch.batch)
    with pytest.raises(ConfigError):
        TotalVAE(ModelConfig(adversarial_classifier=True), G, T, 1)


def test_unused_heads_are_not_built():
    names = {n for n, _ in make_model().named_parameters()}
    assert not any(n.startswith(("library_", "batch_classifier")) for n in names)
    assert {n for n, _ in make_model(latent_library=True).named_buffers()} >= {"library_log_mean", "library_log_var"}


@pytest.mark.parametrize(
    "kwargs",
    [{"n_latent": 0}, {"dropout_rate_encoder": 1.0}, {"gene_dispersion": "gene-cell"}, {"use_batch_norm": "yes"},
     {"protein_reconstruction_weight": -1.0}, {"label_classifier_n_layers": -1}, {"n_hidden": 2.5}],
)
def test_invalid_configs_are_refused(kwargs):
    with pytest.raises(ConfigError):
        ModelConfig(**kwargs)


def test_defaults_match_scvi_tools_totalvi():
    c = ModelConfig()
    assert (c.n_latent, c.n_hidden, c.n_layers_encoder, c.n_layers_decoder) == (20, 256, 2, 1)
    assert (c.dropout_rate_encoder, c.dropout_rate_decoder) == (0.2, 0.2)
    assert (c.use_batch_norm, c.use_layer_norm) == ("both", "none")
    assert (c.gene_dispersion, c.protein_dispersion) == ("gene", "protein")
    assert (c.latent_library, c.encode_covariates, c.log_variational) == (False, True, True)


def test_mixed_precision_autocast_keeps_the_likelihood_in_float32():
    model, batch = make_model(), make_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run(model, batch)
    out.loss.backward()
    assert out.rna_nll.dtype == out.protein_nll.dtype == out.kl_z.dtype == torch.float32
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    torch.testing.assert_close(out.neg_elbo, run(model, batch).neg_elbo, rtol=0.05, atol=5.0)


@pytest.mark.parametrize("config", [
    {},  # scaled, log1p, protein mean over the measured ones
    {"protein_input_mean": "all"},
    {"scale_encoder_input": False},
    {"log_variational": False},
])
def test_compiled_encoder_input_equals_the_torch_operations(monkeypatch, config):
    from streamtotal.model import native

    if not native.available():
        pytest.skip("compiled kernels not built")
    batch = make_batch(n=40, scale=30.0)
    protein = batch.protein.clone()
    protein[~batch.protein_mask] = float("nan")  # unmeasured entries may hold anything
    model = make_model(**config)
    fast = model._encoder_input(batch.rna, protein, batch.protein_mask)
    monkeypatch.setenv("STREAMTOTAL_NATIVE", "0")
    slow = model._encoder_input(batch.rna, protein, batch.protein_mask)
    assert torch.isfinite(fast).all()
    torch.testing.assert_close(fast, slow, rtol=2e-6, atol=2e-6)
