"""totalANVI's label classifier: unlabelled cells add nothing, loss = ELBO part + ratio x CE, config checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from loaders.citebatch import CiteBatch
from streamtotal.config import DataConfig, RunConfig
from streamtotal.errors import ConfigError
from streamtotal.model import ModelConfig, TotalVI

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
    return TotalVI(ModelConfig(**config), G, T, NB, n_labels=K)


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
    plain = TotalVI(ModelConfig(n_latent=4, n_hidden=16), G, T, NB, n_labels=K)
    assert plain.label_classifier is None
    with pytest.raises(ConfigError, match="--totalanvi"):
        plain.predict_proba(b.rna, b.protein, b.protein_mask, b.batch)


def test_config_checks():
    with pytest.raises(ConfigError, match="two label categories"):
        TotalVI(ModelConfig(label_classifier=True), G, T, NB, n_labels=1)
    with pytest.raises(ConfigError, match="labels_key"):
        RunConfig(model=ModelConfig(label_classifier=True))
    RunConfig(data=DataConfig(labels_key="cell_type"), model=ModelConfig(label_classifier=True))
    with pytest.raises(ConfigError):
        ModelConfig(label_classifier_dropout=1.0)
    with pytest.raises(ConfigError):
        ModelConfig(classification_ratio=-1.0)
