"""totalANVI's label classifier: unlabelled cells add nothing, loss = ELBO part + ratio x CE, config checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from loaders.citebatch import CiteBatch
from streamtotal.config import DataConfig, RunConfig
from streamtotal.errors import ConfigError
from streamtotal.model import ModelConfig, TotalVAE

G, T, NB, K = 30, 6, 2, 3


def make_batch(n=24, seed=0, labelled=None):
    rng = np.random.default_rng(seed)
    rna = rng.poisson(rng.gamma(0.5, 4.0, size=(n, G))).astype(np.float32)
    protein = rng.poisson(np.exp(rng.normal(3.0, 1.0, size=(n, T)))).astype(np.float32)
    labels = np.arange(n) % K
    labels[np.arange(n) % 2 == 1] = -1 if labelled is None else labels[np.arange(n) % 2 == 1]
    if labelled is False:
        labels[:] = -1
    return CiteBatch(torch.tensor(rna), torch.tensor(protein), torch.ones((n, T), dtype=torch.bool),
                     torch.tensor(np.arange(n) % NB), torch.tensor(labels, dtype=torch.int64), torch.arange(n))


def make_model(seed=0, **config):
    torch.manual_seed(seed)
    config = {"n_latent": 4, "n_hidden": 16, "label_classifier": True, **config}
    return TotalVAE(ModelConfig(**config), G, T, NB, n_labels=K)


def run(model, batch, seed=1):
    torch.manual_seed(seed)
    return model(batch, kl_weight=0.5)


def test_unlabelled_cells_add_no_classification_loss():
    model = make_model().eval()  # eval: batch norm and dropout do not couple cells
    batch = make_batch()
    out = run(model, batch)
    unlabelled = batch.label < 0
    assert out.classification_loss.shape == (24,)
    assert torch.all(out.classification_loss[unlabelled] == 0) and torch.all(out.classification_loss[~unlabelled] > 0)
    # Whatever the unlabelled cells hold, the classification term is the same.
    other = make_batch(seed=7)
    mixed = CiteBatch(torch.where(unlabelled[:, None], other.rna, batch.rna),
                      torch.where(unlabelled[:, None], other.protein, batch.protein),
                      batch.protein_mask, batch.batch, batch.label, batch.cell_id)
    again = run(model, mixed)
    assert torch.equal(again.classification_loss, out.classification_loss)
    assert not torch.equal(again.neg_elbo, out.neg_elbo)


def test_unlabelled_only_batch_gives_the_classifier_no_gradient_and_the_loss_is_the_elbo():
    model = make_model().train()
    batch = make_batch(labelled=False)
    out = run(model, batch)
    out.loss.backward()
    for name, p in model.label_classifier.named_parameters():
        assert p.grad is None or torch.count_nonzero(p.grad) == 0, name
    classifier, model.label_classifier = model.label_classifier, None
    plain = run(model, batch)
    model.label_classifier = classifier
    assert torch.equal(plain.loss, out.loss)
    assert torch.isnan(out.classification_accuracy)


@pytest.mark.parametrize("ratio", [50.0, 2.5])
def test_loss_is_the_totalvi_loss_plus_ratio_times_the_mean_cross_entropy_of_labelled_cells(ratio):
    model = make_model(classification_ratio=ratio).train()
    batch = make_batch()
    out = run(model, batch)
    classifier, model.label_classifier = model.label_classifier, None
    plain = run(model, batch)  # same seed: the same ELBO draws (the classifier runs after the loss)
    model.label_classifier = classifier
    known = batch.label >= 0
    ce = F.cross_entropy(out.label_logits[known], batch.label[known])
    torch.testing.assert_close(out.loss, plain.loss + ratio * ce)
    assert torch.equal(out.neg_elbo, plain.neg_elbo)  # neg_elbo stays the pure ELBO
    accuracy = (out.label_logits.argmax(1)[known] == batch.label[known]).float().mean()
    torch.testing.assert_close(out.classification_accuracy, accuracy)
    # The classifier reads the posterior mean of z, and its gradient reaches the encoder.
    model.zero_grad()
    (ratio * ce).backward()
    assert model.z_head.weight.grad.abs().sum() > 0
    assert model.encoder.linears[0].weight.grad.abs().sum() > 0
    assert model.rna_head.weight.grad is None  # the classification term does not reach the decoder


def test_predict_proba_and_linear_classifier():
    model = make_model(label_classifier_n_layers=0).eval()
    assert model.label_classifier.hidden is None
    b = make_batch()
    probs = model.predict_proba(b.rna, b.protein, b.protein_mask, b.batch)
    assert probs.shape == (24, K)
    torch.testing.assert_close(probs.sum(1), torch.ones(24))
    z = model.encode(b.rna, b.protein, b.protein_mask, b.batch)
    torch.testing.assert_close(probs, torch.softmax(model.label_classifier(z), -1))
    plain = TotalVAE(ModelConfig(n_latent=4, n_hidden=16), G, T, NB, n_labels=K)
    assert plain.label_classifier is None
    with pytest.raises(ConfigError, match="--totalanvi"):
        plain.predict_proba(b.rna, b.protein, b.protein_mask, b.batch)


def test_config_checks():
    with pytest.raises(ConfigError, match="two label categories"):
        TotalVAE(ModelConfig(label_classifier=True), G, T, NB, n_labels=1)
    with pytest.raises(ConfigError, match="labels_key"):
        RunConfig(model=ModelConfig(label_classifier=True))
    RunConfig(data=DataConfig(labels_key="cell_type"), model=ModelConfig(label_classifier=True))
    with pytest.raises(ConfigError):
        ModelConfig(label_classifier_dropout=1.0)
    with pytest.raises(ConfigError):
        ModelConfig(classification_ratio=-1.0)


# ----------------------------------------------------------------------------- the M2 label-conditional prior

def _direct_label_prior_kl(prior, z, qz_mean, qz_var, probs, labels, eps):
    """The z term of the M1+M2 ELBO label by label with torch.distributions (eval mode: cells do not interact)."""
    from torch.distributions import Normal, kl_divergence

    n, k = z.shape[0], prior.n_labels
    weights = torch.where((labels >= 0)[:, None], F.one_hot(labels.clamp(min=0), k).float(), probs)
    total = Normal(qz_mean, qz_var.sqrt()).log_prob(z).sum(1)
    for y in range(k):
        codes = torch.full((n,), y)
        m2, log_v2 = prior.z2_head(prior.z2_encoder(z, codes)).chunk(2, -1)
        q_z2 = Normal(m2, (log_v2.exp() + 1e-4).sqrt())
        z2 = m2 + q_z2.scale * eps[y * n:(y + 1) * n]
        p_mean, p_log_var = prior.z_head(prior.z_decoder(z2, codes)).chunk(2, -1)
        log_p = Normal(p_mean, (p_log_var.exp() + 1e-4).sqrt()).log_prob(z).sum(1)
        kl_z2 = kl_divergence(q_z2, Normal(torch.zeros_like(m2), torch.ones_like(m2))).sum(1)
        total = total + weights[:, y] * (kl_z2 - log_p)
    return total + (weights * torch.log(weights.clamp(min=1e-12) * k)).sum(1)


def test_label_prior_term_matches_a_direct_computation():
    model = make_model(label_prior="m2").eval()
    batch = make_batch()
    out = run(model, batch)
    inf = out.inference
    probs = torch.softmax(model.label_classifier(inf.z), -1)
    torch.manual_seed(11)
    got = model.label_prior.kl_z(inf.z, inf.qz_mean, inf.qz_var, probs, batch.label)
    torch.manual_seed(11)
    eps = torch.randn(K * 24, 4)  # the one draw kl_z makes: z2 for every (label, cell)
    expected = _direct_label_prior_kl(model.label_prior, inf.z, inf.qz_mean, inf.qz_var, probs, batch.label, eps)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    # A labelled cell's term does not depend on the classifier; an unlabelled cell's does.
    flat = torch.full_like(probs, 1.0 / K)
    torch.manual_seed(11)
    other = model.label_prior.kl_z(inf.z, inf.qz_mean, inf.qz_var, flat, batch.label)
    known = batch.label >= 0
    torch.testing.assert_close(other[known], got[known])
    assert not torch.allclose(other[~known], got[~known])


def test_label_prior_replaces_the_z_kl_in_the_elbo_and_trains_the_classifier_on_unlabelled_cells():
    model = make_model(label_prior="m2").train()
    batch = make_batch(labelled=False)
    out = run(model, batch)
    prior, model.label_prior = model.label_prior, None
    plain = run(model, batch)  # same seed: the same draws up to the prior's own
    model.label_prior = prior
    # neg_elbo is ~1e3 per cell: its float32 difference carries ~1e-4 of rounding.
    torch.testing.assert_close(out.neg_elbo - plain.neg_elbo, out.kl_z - plain.kl_z, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(out.loss - plain.loss, 0.5 * (out.kl_z - plain.kl_z).mean())  # kl_weight 0.5
    assert torch.isfinite(out.neg_elbo).all()
    out.loss.backward()  # without a single label, the ELBO alone now reaches the classifier
    assert model.label_classifier.head.weight.grad.abs().sum() > 0
    assert model.label_prior.z2_head.weight.grad.abs().sum() > 0


def test_label_prior_config_checks():
    with pytest.raises(ConfigError, match="label_prior"):
        ModelConfig(label_prior="gmm", label_classifier=True)
    with pytest.raises(ConfigError, match="needs model.label_classifier"):
        ModelConfig(label_prior="m2")
    assert make_model().label_prior is None
