"""Tests of the compiled RNA-likelihood kernels (streamtotal/model/native) against the torch path and float64."""

import shutil

import pytest
import torch
from torch.special import gammaln

from streamtotal.model import native
from streamtotal.model.rna_likelihood import nb_log_likelihood_from_logits

needs_native = pytest.mark.skipif(not native.available(), reason="compiled kernels not built or turned off")


def test_kernels_are_built_wherever_a_c_compiler_is():
    # The extension is optional so installs without a compiler still work; where one exists (CI, this repository's
    # machines) a missing module means the build broke, which must not pass silently.
    if not (shutil.which("gcc") or shutil.which("cc")):
        pytest.skip("no C compiler: the torch path is used")
    assert native._cpu_kernels is not None, (
        "streamtotal.model.native._cpu_kernels was not built: reinstall with pip install -e .")


def _data(n=64, g=300, seed=0, big=True):
    gen = torch.Generator().manual_seed(seed)
    rate = torch.distributions.Gamma(0.6, 0.3).sample((n, g))
    x = torch.poisson(rate, generator=gen)
    if big:  # counts past the tables (TABLE_WIDTH) and far past them
        x[0, :5] = torch.tensor([31.0, 32.0, 33.0, 500.0, 4000.0])
    x[1] = 0.0  # a cell without counts
    logits = torch.randn(n, g, generator=gen) * 1.5
    log_library = torch.log(x.sum(1).clamp(min=1.0)) + 0.2 * torch.randn(n, generator=gen)
    log_theta = torch.randn(g, generator=gen) * 1.5  # theta from ~0.01 to ~90
    log_theta[0] = -4.0
    log_theta[1] = 6.0
    return x, logits, log_library, log_theta


def _run(x, logits, log_library, log_theta, grad, requires=(True, True, True)):
    leaves = [t.clone().requires_grad_(r) for t, r in zip((logits, log_library, log_theta), requires)]
    ll = nb_log_likelihood_from_logits(x, *leaves)
    ll.backward(grad)
    return ll.detach(), [t.grad for t in leaves]


def _reference64(x, logits, log_library, log_theta):
    x, h, l, lt = (t.double() for t in (x, logits, log_library, log_theta))
    mu = torch.softmax(h, dim=1) * l.exp().unsqueeze(1)
    theta = lt.exp()
    return (x * mu.log() - (x + theta) * (theta + mu).log() + theta * lt
            + gammaln(x + theta) - gammaln(theta) - gammaln(x + 1.0)).sum(1)


@needs_native
@pytest.mark.parametrize("seed", [0, 1])
def test_native_matches_the_torch_path_in_values_and_every_gradient(monkeypatch, seed):
    x, logits, log_library, log_theta = _data(seed=seed)
    grad = torch.randn(x.shape[0], generator=torch.Generator().manual_seed(5))  # not uniform: per-cell weights
    ll_native, grads_native = _run(x, logits, log_library, log_theta, grad)
    monkeypatch.setenv("STREAMTOTAL_NATIVE", "0")
    assert not native.available()
    ll_torch, grads_torch = _run(x, logits, log_library, log_theta, grad)
    torch.testing.assert_close(ll_native, ll_torch, rtol=1e-5, atol=1e-2)
    for a, b in zip(grads_native, grads_torch):
        # relative to the gradient's scale: at theta ~ 400 both round in float32 (the torch path ~10x more, see
        # the float64 test below), and d/dlog(theta) multiplies by theta
        assert (a - b).abs().max() <= 3e-5 * b.abs().max() + 1e-6


@needs_native
def test_native_values_agree_with_a_float64_reference_including_large_counts():
    x, logits, log_library, log_theta = _data(seed=2)
    ll = nb_log_likelihood_from_logits(x, logits, log_library, log_theta)
    reference = _reference64(x, logits, log_library, log_theta)
    assert ll.dtype == torch.float32
    # float32 of sums in the thousands: a few 1e-4 relative is rounding; a wrong large-count branch would be >> 1
    torch.testing.assert_close(ll.double(), reference, rtol=2e-6, atol=5e-3)


@needs_native
def test_native_gradients_agree_with_float64_autograd():
    x, logits, log_library, log_theta = _data(n=16, g=80, seed=3)
    grad = torch.randn(16, generator=torch.Generator().manual_seed(1))
    _, grads = _run(x, logits, log_library, log_theta, grad)
    leaves = [t.double().requires_grad_() for t in (logits, log_library, log_theta)]
    _reference64(x, *leaves).backward(grad.double())
    for got, want in zip(grads, (t.grad for t in leaves)):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


@needs_native
def test_only_the_gradients_asked_for_are_computed():
    x, logits, log_library, log_theta = _data(n=8, g=40, seed=4)
    grad = torch.ones(8)
    _, (g_logits, g_library, g_theta) = _run(x, logits, log_library, log_theta, grad, requires=(True, False, False))
    assert g_logits is not None and g_library is None and g_theta is None
    _, (_, _, g_theta_only) = _run(x, logits, log_library, log_theta, grad, requires=(False, False, True))
    _, (_, _, g_theta_all) = _run(x, logits, log_library, log_theta, grad)
    torch.testing.assert_close(g_theta_only, g_theta_all)
    with_grad = _run(x, logits, log_library, log_theta, grad)[0]
    with torch.no_grad():  # validation and inference: no backward state is prepared
        torch.testing.assert_close(nb_log_likelihood_from_logits(x, logits, log_library, log_theta), with_grad)


@needs_native
@pytest.mark.parametrize("value", [2.5, float(2**24), -1.0])
def test_counts_the_kernels_cannot_take_fall_back_to_the_general_path(monkeypatch, value):
    x, logits, log_library, log_theta = _data(n=8, g=40, seed=6, big=False)
    x[3, 7] = value
    if value < 0:  # a negative count has no likelihood; the general path's lgamma gives NaN there, as before
        ll = nb_log_likelihood_from_logits(x, logits, log_library, log_theta)
        assert torch.isfinite(ll[[0, 1, 2, 4]]).all()
        return
    grad = torch.ones(8)
    got, got_grads = _run(x, logits, log_library, log_theta, grad)
    monkeypatch.setenv("STREAMTOTAL_NATIVE", "0")
    want, want_grads = _run(x, logits, log_library, log_theta, grad)
    torch.testing.assert_close(got, want)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b)


@needs_native
def test_results_do_not_depend_on_the_thread_count():
    x, logits, log_library, log_theta = _data(n=96, g=200, seed=7)
    grad = torch.full((96,), -1.0 / 96)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run(x, logits, log_library, log_theta, grad)
        torch.set_num_threads(max(2, before))
        many = _run(x, logits, log_library, log_theta, grad)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(one[0], many[0], rtol=0, atol=0)  # rows are independent
    for a, b in zip(one[1], many[1]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)  # theta sums are added per thread


def test_calls_outside_the_kernels_scope_use_the_torch_path():
    x, logits, log_library, log_theta = _data(n=8, g=40, seed=8)
    per_batch_theta = log_theta.expand(8, -1)
    assert not native.applies(x, logits, log_library, per_batch_theta)
    assert not native.applies(x.double(), logits.double(), log_library.double(), log_theta.double())
    ll = nb_log_likelihood_from_logits(x, logits, log_library, per_batch_theta)
    torch.testing.assert_close(ll, nb_log_likelihood_from_logits(x, logits, log_library, log_theta), rtol=1e-5,
                               atol=1e-3)


@pytest.mark.parametrize("use_native", [True, False])
def test_dispersion_gradient_is_accurate_where_nb_is_nearly_poisson(monkeypatch, use_native):
    # At large theta the textbook d/dtheta is a difference of terms near log theta + 1; in float32 its rounding,
    # multiplied by theta, gave relative errors ~1 at theta = 8,000. Both paths now avoid the cancellation.
    if use_native and not native.available():
        pytest.skip("compiled kernels not built")
    if not use_native:
        monkeypatch.setenv("STREAMTOTAL_NATIVE", "0")
    x, logits, log_library, log_theta = _data(n=16, g=80, seed=1)
    log_theta[2:6] = torch.tensor([7.0, 8.0, 9.0, 10.0])
    grad = torch.randn(16, generator=torch.Generator().manual_seed(1))
    _, grads = _run(x, logits, log_library, log_theta, grad)
    leaves = [t.double().requires_grad_() for t in (logits, log_library, log_theta)]
    _reference64(x, *leaves).backward(grad.double())
    want = leaves[2].grad
    relative = (grads[2].double() - want).abs() / (want.abs() + 1e-3)
    assert relative.max() < 2e-3, f"worst gene {int(relative.argmax())}: {float(relative.max()):.2e}"


@needs_native
def test_native_count_tables_equal_count_terms():
    from streamtotal.model.count_terms import TABLE_WIDTH, count_tables

    theta = torch.tensor([0.02, 0.7, 1.0, 3.3, 90.0, 5000.0] * 50)  # 300 genes: more than one block of 256
    c_want, d_want = count_tables(theta)
    c_got = torch.empty(300, TABLE_WIDTH, dtype=torch.float64)
    d_got = torch.empty(300, TABLE_WIDTH, dtype=torch.float64)
    native._cpu_kernels.nb_tables(theta.data_ptr(), 300, TABLE_WIDTH, c_got.data_ptr(), d_got.data_ptr())
    torch.testing.assert_close(c_got, c_want, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(d_got, d_want, rtol=1e-12, atol=1e-12)
