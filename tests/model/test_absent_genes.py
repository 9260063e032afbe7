"""Absent genes (``rna_mask`` False) are unmeasured: out of the RNA likelihood, never read by the encoder."""

from dataclasses import replace

import pytest
import torch

from loaders.citebatch import CiteBatch
from streamtotal.model import native
from streamtotal.model.config import ModelConfig
from streamtotal.model.rna_likelihood import nb_log_likelihood_from_logits
from streamtotal.model.totalvi import TotalVAE

B, G, T = 12, 40, 6
ABSENT = torch.arange(5, 11)  # genes the query study lacks


def _inputs(seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.poisson(torch.rand(B, G, generator=gen, dtype=dtype) * 8.0, generator=gen)
    logits = torch.randn(B, G, generator=gen, dtype=dtype, requires_grad=True)
    log_theta = torch.randn(G, generator=gen, dtype=dtype, requires_grad=True)
    return x, logits, log_theta


def _query_mask(rows=slice(0, B)):
    mask = torch.ones(B, G, dtype=torch.bool)
    mask[rows, ABSENT] = False
    return mask


@pytest.mark.parametrize("path", ["native", "torch"])
def test_masked_likelihood_is_the_likelihood_of_the_measured_genes_alone(monkeypatch, path):
    if path == "native" and not native.available():
        pytest.skip("compiled kernels not built")
    if path == "torch":
        monkeypatch.setenv("STREAMTOTAL_NATIVE", "0")
    x, logits, log_theta = _inputs()
    mask = _query_mask()
    keep = mask[0]
    x = torch.where(mask, x, 0.0)
    log_library = x.sum(1).clamp(min=1).log()
    ll = nb_log_likelihood_from_logits(x, logits, log_library, log_theta, mask=mask)
    ll.sum().backward()
    grads = logits.grad.clone(), log_theta.grad.clone()

    # Direct: the same function on the measured columns only (the softmax renormalised over them).
    sub_logits = logits.detach()[:, keep].requires_grad_()
    sub_theta = log_theta.detach()[keep].requires_grad_()
    expected = nb_log_likelihood_from_logits(x[:, keep], sub_logits, log_library, sub_theta)
    expected.sum().backward()
    torch.testing.assert_close(ll, expected, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(grads[0][:, keep], sub_logits.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[1][keep], sub_theta.grad, rtol=1e-5, atol=1e-4)
    # No gradient at all through the absent genes' terms: exactly zero, not small.
    assert torch.count_nonzero(grads[0][:, ABSENT]) == 0 and torch.count_nonzero(grads[1][ABSENT]) == 0


@pytest.mark.skipif(not native.available(), reason="compiled kernels not built")
def test_native_and_torch_paths_agree_under_a_mask(monkeypatch):
    x, logits, log_theta = _inputs(seed=3)
    mask = _query_mask(slice(0, B // 2))  # half the cells from a study lacking genes, half fully measured
    x = torch.where(mask, x, 0.0)
    log_library = x.sum(1).clamp(min=1).log()
    results = []
    for flag in ("1", "0"):
        monkeypatch.setenv("STREAMTOTAL_NATIVE", flag)
        lg, lt = logits.detach().clone().requires_grad_(), log_theta.detach().clone().requires_grad_()
        ll = nb_log_likelihood_from_logits(x, lg, log_library, lt, mask=mask)
        ll.sum().backward()
        results.append((ll.detach(), lg.grad, lt.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-3)


def test_all_true_mask_equals_no_mask_and_a_cell_without_measured_genes_gives_zero():
    x, logits, log_theta = _inputs(seed=1)
    log_library = x.sum(1).clamp(min=1).log()
    full = torch.ones(B, G, dtype=torch.bool)
    torch.testing.assert_close(nb_log_likelihood_from_logits(x, logits, log_library, log_theta, mask=full),
                               nb_log_likelihood_from_logits(x, logits, log_library, log_theta), rtol=0, atol=0)
    none = full.clone()
    none[0] = False
    ll = nb_log_likelihood_from_logits(x, logits, log_library, log_theta, mask=none)
    assert ll[0] == 0 and torch.isfinite(ll).all()


@pytest.fixture
def query_batch():
    torch.manual_seed(0)
    rna = torch.poisson(torch.rand(B, G) * 6.0)
    protein = torch.poisson(torch.rand(B, T) * 40.0)
    mask = _query_mask(slice(0, 8))  # cells 0-7: the query study; 8-11: fully measured
    return CiteBatch(torch.where(mask, rna, 0.0), protein, torch.ones(B, T, dtype=torch.bool),
                     torch.tensor([0, 1] * (B // 2)), torch.full((B,), -1), torch.arange(B), rna_mask=mask)


def _model(**kw):
    torch.manual_seed(1)
    return TotalVAE(ModelConfig(n_latent=4, n_hidden=16, **kw), G, T, 2)


def test_training_loss_passes_no_gradient_through_absent_genes_likelihood_terms(query_batch):
    model = _model()
    out = model(query_batch)
    logits = out.generative.rna_logits
    log_theta = model.rna_log_theta
    d_logits, d_theta = torch.autograd.grad(out.rna_nll.sum(), [logits, log_theta])
    absent = ~query_batch.rna_mask
    assert torch.count_nonzero(d_logits[absent]) == 0 and torch.count_nonzero(d_logits[~absent]) > 0
    # Genes 5-10 are measured only by cells 8-11: their dispersion gradient comes from those cells alone.
    only_measured = replace(query_batch, rna=query_batch.rna[8:], protein=query_batch.protein[8:],
                            protein_mask=query_batch.protein_mask[8:], batch=query_batch.batch[8:],
                            label=query_batch.label[8:], cell_id=query_batch.cell_id[8:], rna_mask=None)
    per_cell = -nb_log_likelihood_from_logits(only_measured.rna, logits.detach()[8:],
                                              out.generative.log_library.detach()[8:], log_theta)
    (expected,) = torch.autograd.grad(per_cell.sum(), [log_theta])
    torch.testing.assert_close(d_theta[ABSENT], expected[ABSENT], rtol=1e-5, atol=1e-5)
    # The library is the total of the measured genes (the likelihood's softmax runs over them).
    torch.testing.assert_close(out.inference.log_library, query_batch.rna.sum(1).clamp(min=1).log())


@pytest.mark.parametrize("latent_library", [False, True])
def test_encoder_output_ignores_whatever_absent_genes_hold(query_batch, latent_library):
    model = _model(latent_library=latent_library).eval()
    b = query_batch
    wild = torch.where(b.rna_mask, b.rna, torch.rand(B, G) * 1e4)
    z = model.encode(b.rna, b.protein, b.protein_mask, b.batch, rna_mask=b.rna_mask)
    assert torch.equal(z, model.encode(wild, b.protein, b.protein_mask, b.batch, rna_mask=b.rna_mask))
    inf = model.inference(wild, b.protein, b.protein_mask, b.batch, sample=False, rna_mask=b.rna_mask)
    assert torch.equal(inf.qz_mean, z)
    # Fully measured cells encode exactly as without a mask; the query cells do not read their zeros as zeros.
    plain = model.encode(b.rna, b.protein, b.protein_mask, b.batch)
    assert torch.equal(z[8:], plain[8:])
    assert not torch.allclose(z[:8], plain[:8])
    # In training too, the loss does not depend on the absent values (same random draws).
    model.train()
    losses = []
    for rna in (b.rna, wild):
        torch.manual_seed(2)
        losses.append(model(replace(b, rna=rna)).neg_elbo)
    assert torch.equal(losses[0], losses[1])


def test_encoder_input_estimate_is_closer_to_the_hidden_counts_than_zeros(query_batch):
    # A model trained on fully measured cells: its estimate at the absent genes should beat zero-filling.
    torch.manual_seed(4)
    model = _model()
    gen = torch.Generator().manual_seed(5)
    profile = torch.softmax(torch.randn(G, generator=gen) * 1.5, 0)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(400):
        rna = torch.poisson(profile * 300.0 * (0.5 + torch.rand(64, 1, generator=gen)), generator=gen)
        batch = CiteBatch(rna, torch.poisson(torch.full((64, T), 30.0)), torch.ones(64, T, dtype=torch.bool),
                          torch.zeros(64, dtype=torch.long), torch.full((64,), -1), torch.arange(64))
        optimiser.zero_grad()
        model(batch).loss.backward()
        optimiser.step()
    model.eval()
    truth = torch.poisson(profile * 300.0 * torch.ones(B, 1), generator=gen)
    absent = profile.argsort()[-6:]  # the most expressed genes: where zero-filling misleads the encoder most
    mask = torch.ones(B, G, dtype=torch.bool)
    mask[:, absent] = False
    with torch.no_grad():
        filled = model._fill_absent_genes(torch.where(mask, truth, 0.0), query_batch.protein,
                                          query_batch.protein_mask, torch.zeros(B, dtype=torch.long), mask)
    assert torch.equal(filled[mask], truth[mask])
    # Against the true mean of the hidden counts, scaled to each cell's measured total as the model sees it.
    share = profile[absent] / profile[mask[0]].sum()
    expected = truth[:, mask[0]].sum(1, keepdim=True) * share
    error_filled = (filled[:, absent] - expected).abs().mean()
    error_zero = expected.abs().mean()
    assert error_filled < 0.25 * error_zero, (error_filled, error_zero)


def test_mask_of_the_wrong_shape_is_refused(query_batch):
    from streamtotal.errors import ModelInputError

    with pytest.raises(ModelInputError, match="rna_mask must be bool"):
        _model()(replace(query_batch, rna_mask=query_batch.rna_mask[:, :-1]))
