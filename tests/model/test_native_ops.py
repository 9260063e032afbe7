"""The compiled kernels as torch custom operators (streamtotal/model/native/ops.py): torch.library.opcheck of every
op, their fake (meta) implementations' shapes, and a compiled TotalVAE training step that calls them."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from loaders.citebatch import CiteBatch
from streamtotal.model import ModelConfig, TotalVAE, native
from streamtotal.model.count_terms import TABLE_WIDTH
from streamtotal.simulate import CiteSimulator, SimulationConfig

needs_native = pytest.mark.skipif(not native.available(), reason="compiled kernels not built or turned off")
pytestmark = needs_native

OPS = ("nb_log_likelihood", "nb_log_likelihood_backward", "protein_terms", "protein_terms_backward", "encoder_input",
       "dropout")


def _rna(n=12, g=40, seed=0, requires_grad=(True, True, True)):
    gen = torch.Generator().manual_seed(seed)
    x = torch.poisson(torch.distributions.Gamma(0.6, 0.3).sample((n, g)), generator=gen)
    x[0, :3] = torch.tensor([31.0, 500.0, 4000.0])  # past the count tables
    logits = torch.randn(n, g, generator=gen)
    log_library = torch.log(x.sum(1).clamp(min=1.0))
    log_theta = torch.randn(g, generator=gen)
    leaves = [t.requires_grad_(r) for t, r in zip((logits, log_library, log_theta), requires_grad)]
    return x, *leaves


def _protein(n=10, t=6, seed=1, theta_per_cell=False, requires_grad=True):
    gen = torch.Generator().manual_seed(seed)
    back_mean = 3.0 + 0.5 * torch.randn(n, t, generator=gen)
    back_scale = 0.1 + torch.rand(n, t, generator=gen)
    log_back = back_mean + back_scale * torch.randn(n, t, generator=gen)
    fore_scale = 1.0 + 3.0 * torch.rand(n, t, generator=gen)
    mix_logits = torch.randn(n, t, generator=gen)
    theta = (torch.rand(n, t, generator=gen) if theta_per_cell else torch.rand(t, generator=gen)) * 20.0 + 0.5
    prior_mean = 3.0 + 0.2 * torch.randn(n, t, generator=gen)
    prior_log_scale = -0.5 + 0.2 * torch.randn(n, t, generator=gen)
    y = torch.poisson(log_back.exp(), generator=gen)
    mask = torch.rand(n, t, generator=gen) > 0.2
    params = [p.requires_grad_(requires_grad) for p in (log_back, back_scale, back_mean, fore_scale, mix_logits,
                                                         theta, prior_mean, prior_log_scale)]
    return y, mask, params


@pytest.mark.parametrize("requires_grad", [(True, True, True), (True, False, False), (False, True, True)])
@pytest.mark.parametrize("count", [None, 2.5])  # 2.5: a count the kernel cannot take, computed by torch in the op
def test_opcheck_nb_log_likelihood(requires_grad, count):
    x, logits, log_library, log_theta = _rna(requires_grad=requires_grad)
    if count is not None:
        x[3, 5] = count
    for with_theta_grad in (True, False):
        torch.library.opcheck(torch.ops.streamtotal.nb_log_likelihood.default,
                              (x, logits, log_library, log_theta, with_theta_grad))


def test_opcheck_nb_log_likelihood_backward():
    x, logits, log_library, log_theta = _rna(requires_grad=(False, False, False))
    ll, mu, log1p_mu_theta, table, integer = torch.ops.streamtotal.nb_log_likelihood(x, logits, log_library,
                                                                                       log_theta, True)
    assert bool(integer) and table.shape == (40, TABLE_WIDTH)
    grad = torch.randn(12, generator=torch.Generator().manual_seed(3))
    for needs in ([True, True, True], [True, False, False], [False, False, True]):
        torch.library.opcheck(torch.ops.streamtotal.nb_log_likelihood_backward.default,
                              (grad, x, mu, log1p_mu_theta, log_library, log_theta, table, integer, needs))


@pytest.mark.parametrize("theta_per_cell", [False, True])
@pytest.mark.parametrize("requires_grad", [True, False])
def test_opcheck_protein_terms(theta_per_cell, requires_grad):
    y, mask, params = _protein(theta_per_cell=theta_per_cell, requires_grad=requires_grad)
    for with_grad in (True, False) if not requires_grad else (True,):
        torch.library.opcheck(torch.ops.streamtotal.protein_terms.default, (y, mask, *params, with_grad))


@pytest.mark.parametrize("theta_per_cell", [False, True])
def test_opcheck_protein_terms_backward(theta_per_cell):
    y, mask, params = _protein(theta_per_cell=theta_per_cell, requires_grad=False)
    _, _, local = torch.ops.streamtotal.protein_terms(y, mask, *params, True)
    gen = torch.Generator().manual_seed(4)
    grad_nll, grad_kl = torch.randn(10, generator=gen), torch.randn(10, generator=gen)
    for needs in ([True] * 8, [False, True, False, False, True, True, False, False]):
        torch.library.opcheck(torch.ops.streamtotal.protein_terms_backward.default,
                              (grad_nll, grad_kl, local, not theta_per_cell, needs))


def test_opcheck_encoder_input():
    gen = torch.Generator().manual_seed(5)
    rna, protein = torch.poisson(torch.full((9, 30), 2.0), generator=gen), torch.poisson(torch.full((9, 5), 40.0))
    measured = torch.full((9,), 5.0)
    for scale in (True, False):
        for log_transform in (True, False):
            torch.library.opcheck(torch.ops.streamtotal.encoder_input.default,
                                  (rna, protein, measured, scale, log_transform))


def test_opcheck_dropout():
    x = torch.randn(7, 33).requires_grad_()
    seed = torch.tensor(-123456789012345, dtype=torch.int64)
    torch.library.opcheck(torch.ops.streamtotal.dropout.default, (x, seed, 13107, 65536.0 / (65536 - 13107)))
    out, keep_scale = torch.ops.streamtotal.dropout(x, seed, 13107, 65536.0 / (65536 - 13107))
    # A function of its inputs: the same seed draws the same mask, which the gradient applies.
    torch.testing.assert_close(torch.ops.streamtotal.dropout(x, seed, 13107, 1.25)[1] > 0, keep_scale > 0)
    out.sum().backward()
    torch.testing.assert_close(x.grad, keep_scale)


def test_fake_implementations_give_the_real_shapes_and_dtypes():
    x, logits, log_library, log_theta = _rna(requires_grad=(False, False, False))
    y, mask, params = _protein(theta_per_cell=False, requires_grad=False)
    real = {
        "nb": torch.ops.streamtotal.nb_log_likelihood(x, logits, log_library, log_theta, False),
        "protein": torch.ops.streamtotal.protein_terms(y, mask, *params, True),
        "protein_no_grad": torch.ops.streamtotal.protein_terms(y, mask, *params, False),
        "input": (torch.ops.streamtotal.encoder_input(x[:10], y, torch.full((10,), 6.0), True, True),),
        "dropout": torch.ops.streamtotal.dropout(logits, torch.tensor(3), 100, 1.0),
    }
    needs = [True, False, True, False, False, True, False, True]
    real["protein_backward"] = torch.ops.streamtotal.protein_terms_backward(
        torch.ones(10), torch.ones(10), real["protein"][2], True, needs)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = {
            "nb": torch.ops.streamtotal.nb_log_likelihood(*(mode.from_tensor(t) for t in (x, logits, log_library,
                                                                                          log_theta)), False),
            "protein": torch.ops.streamtotal.protein_terms(mode.from_tensor(y), mode.from_tensor(mask),
                                                           *(mode.from_tensor(p) for p in params), True),
            "protein_no_grad": torch.ops.streamtotal.protein_terms(mode.from_tensor(y), mode.from_tensor(mask),
                                                                   *(mode.from_tensor(p) for p in params), False),
            "input": (torch.ops.streamtotal.encoder_input(mode.from_tensor(x[:10]), mode.from_tensor(y),
                                                          torch.empty(10), True, True),),
            "dropout": torch.ops.streamtotal.dropout(mode.from_tensor(logits), torch.empty((), dtype=torch.int64),
                                                     100, 1.0),
        }
        fake["protein_backward"] = torch.ops.streamtotal.protein_terms_backward(
            torch.empty(10), torch.empty(10), fake["protein"][2], True, needs)
    for name, outputs in real.items():
        got = [(tuple(t.shape), t.dtype, t.stride()) for t in fake[name]]
        assert got == [(tuple(t.shape), t.dtype, t.stride()) for t in outputs], name
    # The shapes the callers rely on: state only where asked for, theta's gradient with theta's shape.
    assert real["nb"][3].shape == (0, TABLE_WIDTH) and real["nb"][4].dtype == torch.bool
    assert real["protein"][2].shape == (native.ops.PROTEIN_LOCAL_TERMS, 10, 6)
    assert real["protein_no_grad"][2].shape == (0, 10, 6)
    assert [tuple(g.shape) for g in real["protein_backward"]] == [(10, 6), (0,), (10, 6), (0,), (0,), (6,), (0,),
                                                                  (10, 6)]


def _model_and_batch():
    sim = CiteSimulator(SimulationConfig(n_cells=64, n_genes=50, n_proteins=7, n_cell_types=3, n_batches=2,
                                         n_missing_proteins=2, block_cells=64, seed=2))
    rna, protein, obs = next(sim.blocks())
    batch = torch.as_tensor(obs["batch"].cat.codes.to_numpy(np.int64))
    mask = torch.ones(protein.shape, dtype=torch.bool)
    mask[(batch == 1).unsqueeze(1) & torch.as_tensor(sim.truth.missing_proteins)] = False  # the last batch lacks two
    cite = CiteBatch(torch.as_tensor(rna.toarray()), torch.as_tensor(protein), mask, batch,
                     torch.full((64,), -1), torch.arange(64))
    torch.manual_seed(0)
    model = TotalVAE(ModelConfig(n_latent=5, n_hidden=32), 50, 7, 2,
                     protein_prior=(torch.full((7, 2), 3.0), torch.full((7, 2), 0.5)),
                     library_prior=(torch.full((2,), 7.0), torch.full((2,), 0.5)))
    return model.train(), cite


def _step(model, batch):
    torch.manual_seed(11)
    model.zero_grad()
    loss = model(batch).loss
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="torch.compile on CPU needs g++")
def test_a_compiled_training_step_calls_every_kernel_op_and_matches_eager():
    from torch._inductor.utils import run_and_get_code

    model, batch = _model_and_batch()
    eager_loss, eager_grads = _step(model, batch)
    compiled = torch.compile(model, dynamic=True)
    # fallback_random: the compiled graph draws the dropout seeds from torch's generator as eager code does, so
    # both runs drop the same elements and can be compared value for value.
    with torch._inductor.config.patch(fallback_random=True):
        (loss, grads), code = run_and_get_code(_step, compiled, batch)
    code = "\n".join(code)
    for op in OPS:  # the forward graph calls four ops, the backward graph the two backward ops
        assert f"torch.ops.streamtotal.{op}.default(" in code, op
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-4)
    for got, want in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
