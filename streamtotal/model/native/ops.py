"""The compiled kernels as torch custom operators (``torch.ops.streamtotal.*``), so eager code and ``torch.compile``
call them the same way.

Each kernel is a ``torch.library.custom_op`` with a fake (meta) implementation that gives only the outputs' shapes
and dtypes, and the kernels with a backward have it as a second custom op, registered as the first one's autograd
formula. Dynamo and inductor then see one opaque call per kernel (traced on fake tensors, run on real ones in the
compiled graph) instead of tracing into the C call, which would run it at trace time on fake tensors.

The ops take CPU float32 tensors only: callers check ``native.float32_cpu`` / ``native.applies`` first and use
torch operations otherwise (GPUs, other dtypes, extension not built). Every output is a new tensor (the ops neither
mutate nor alias their inputs), and outputs that a call does not need are empty (first dimension 0), so that their
shapes follow from the arguments alone.
"""

from __future__ import annotations

import torch  # first: the extension then shares torch's OpenMP runtime (and its thread count)
from torch import Tensor
from torch.library import custom_op

from streamtotal.model.count_terms import TABLE_WIDTH

try:
    from streamtotal.model.native import _cpu_kernels as kernels
except ImportError:  # not built (no compiler when installed): callers use the torch path
    kernels = None

PROTEIN_LOCAL_TERMS = 7
"""Elementwise derivatives the protein forward stores for its backward (see protein_kernel.c)."""

_PROTEIN_PARAMS = 8
"""Differentiable inputs of ``protein_terms``: log_back, back_scale, back_mean, fore_scale, mix_logits, theta,
prior_mean, prior_log_scale."""


def _ptr(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


# ---------------------------------------------------------------------------------------------- RNA NB likelihood

@custom_op("streamtotal::nb_log_likelihood", mutates_args=())
def nb_log_likelihood(x: Tensor, logits: Tensor, log_library: Tensor, log_theta: Tensor,
                      with_theta_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per-cell log NB(x; exp(log_library) * softmax(logits), exp(log_theta)) by nb_kernel.c, and the backward's state.

    Args:
        x: ``[B, G]`` counts.
        logits: ``[B, G]`` decoder logits.
        log_library: ``[B]`` log library sizes.
        log_theta: ``[G]`` log inverse dispersions.
        with_theta_grad: also build the digamma table that the dispersion gradient reads.

    Returns:
        ``(ll [B], mu [B, G], log1p(mu / theta) [B, G], digamma table [G, W] float64 ([0, W] without
        with_theta_grad), integer_counts [] bool)``. Where a count is not an integer in [0, 2^24) the values come
        from torch operations and ``integer_counts`` is False: the backward then computes digamma itself.
    """
    x, logits, log_library, log_theta = (t.contiguous() for t in (x, logits, log_library, log_theta))
    theta = log_theta.exp()
    n, g = x.shape
    c_table = torch.empty(g, TABLE_WIDTH, dtype=torch.float64)  # count_terms.count_tables' values, in one pass
    d_table = torch.empty(g if with_theta_grad else 0, TABLE_WIDTH, dtype=torch.float64)
    kernels.nb_tables(theta.data_ptr(), g, TABLE_WIDTH, c_table.data_ptr(), _ptr(d_table if with_theta_grad else None))
    ll, mu, log1p_mu_theta = torch.empty(n), torch.empty(n, g), torch.empty(n, g)
    bad = kernels.nb_forward(x.data_ptr(), logits.data_ptr(), log_library.data_ptr(), theta.data_ptr(),
                             log_theta.data_ptr(), c_table.data_ptr(), TABLE_WIDTH, n, g, ll.data_ptr(), mu.data_ptr(),
                             log1p_mu_theta.data_ptr())
    if bad:  # rare (normalised or corrupt counts): decided here, inside the op, so a compiled graph needs no branch
        ll, mu, log1p_mu_theta = _nb_forward_general(x, logits, log_library, log_theta)
    return ll, mu, log1p_mu_theta, d_table, torch.tensor(not bad)


def _nb_forward_general(x: Tensor, logits: Tensor, log_library: Tensor,
                        log_theta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``nb_log_likelihood``'s values for any counts, in torch operations (as rna_likelihood.py's general path)."""
    theta = log_theta.exp()
    centred = logits - logits.amax(dim=1, keepdim=True)
    x_log_mu = torch.linalg.vecdot(x, centred)
    mu = centred.exp()
    norm = mu.sum(dim=1)
    x_log_mu = x_log_mu - x.sum(dim=1) * (norm.log() - log_library)
    mu = mu * (log_library.exp() / norm).unsqueeze(1)
    log1p_mu_theta = torch.log1p(mu / theta)
    x_theta = x + theta
    ll = (x_log_mu - torch.mv(x, log_theta) - torch.linalg.vecdot(x_theta, log1p_mu_theta)
          - torch.lgamma(theta).sum() + torch.lgamma(x_theta).sum(1) - torch.lgamma(x + 1.0).sum(1))
    return ll, mu, log1p_mu_theta


@nb_log_likelihood.register_fake
def _(x, logits, log_library, log_theta, with_theta_grad):
    n, g = x.shape
    return (x.new_empty(n), x.new_empty(n, g), x.new_empty(n, g),
            x.new_empty(g if with_theta_grad else 0, TABLE_WIDTH, dtype=torch.float64),
            x.new_empty((), dtype=torch.bool))


@custom_op("streamtotal::nb_log_likelihood_backward", mutates_args=())
def nb_log_likelihood_backward(grad: Tensor, x: Tensor, mu: Tensor, log1p_mu_theta: Tensor, log_library: Tensor,
                               log_theta: Tensor, digamma_table: Tensor, integer_counts: Tensor,
                               needs: list[bool]) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``sum_b grad_b * ll_b`` by nb_kernel.c, from ``nb_log_likelihood``'s state.

    Args:
        grad: ``[B]`` upstream gradient.
        x, mu, log1p_mu_theta, log_library, log_theta, digamma_table, integer_counts: the forward's inputs and
            outputs.
        needs: ``[logits, log_library, log_theta]``: which gradients to compute.

    Returns:
        ``(grad_logits [B, G], grad_log_library [B], grad_log_theta [G])``, each empty (first dimension 0) where
        ``needs`` says not needed.

    Raises:
        MemoryError: the kernel could not allocate its per-thread sums.
    """
    need_logits, need_library, need_theta = needs
    n, g = x.shape
    grad, x, mu, log1p_mu_theta, log_library, log_theta = (
        t.contiguous() for t in (grad.to(torch.float32), x, mu, log1p_mu_theta, log_library, log_theta))
    theta = log_theta.exp()
    # The kernel's dispersion gradient reads digamma differences from the table of integer counts; without one
    # (non-integer counts, or a forward run without with_theta_grad) torch computes that gradient below.
    by_table = need_theta and bool(integer_counts) and digamma_table.shape[0] == g
    grad_logits = torch.empty(n if need_logits else 0, g)
    grad_library = torch.empty(n if need_library else 0)
    grad_log_theta = torch.empty(g if need_theta else 0)
    if need_logits or need_library or by_table:
        kernels.nb_backward(grad.data_ptr(), x.data_ptr(), mu.data_ptr(), log1p_mu_theta.data_ptr(),
                            log_library.data_ptr(), theta.data_ptr(), _ptr(digamma_table if by_table else None),
                            TABLE_WIDTH, n, g, _ptr(grad_logits if need_logits else None),
                            _ptr(grad_library if need_library else None), _ptr(grad_log_theta if by_table else None))
    if need_theta and not by_table:
        # As rna_likelihood.py's general path (imported here: it imports this package):
        # d ll / d log theta = theta [psi(x + theta) - psi(theta) - log1p(mu / theta) - (x - mu) / (theta + mu)]
        from streamtotal.model.rna_likelihood import fast_digamma

        per_elem = fast_digamma(x + theta).sub_(fast_digamma(theta)).sub_(log1p_mu_theta).sub_((x - mu) / (mu + theta))
        grad_log_theta = torch.mv(per_elem.t(), grad) * theta
    return grad_logits, grad_library, grad_log_theta


@nb_log_likelihood_backward.register_fake
def _(grad, x, mu, log1p_mu_theta, log_library, log_theta, digamma_table, integer_counts, needs):
    n, g = x.shape
    return (x.new_empty(n if needs[0] else 0, g), x.new_empty(n if needs[1] else 0),
            x.new_empty(g if needs[2] else 0))


def _nb_setup_context(ctx, inputs, output) -> None:
    x, _, log_library, log_theta, _ = inputs
    _, mu, log1p_mu_theta, digamma_table, integer_counts = output
    ctx.save_for_backward(x, mu, log1p_mu_theta, log_library, log_theta, digamma_table, integer_counts)


def _nb_backward(ctx, grad, *_state_grads):
    needs = list(ctx.needs_input_grad[1:4])
    grads = torch.ops.streamtotal.nb_log_likelihood_backward(grad, *ctx.saved_tensors, needs)
    return None, *(gr if need else None for gr, need in zip(grads, needs)), None


nb_log_likelihood.register_autograd(_nb_backward, setup_context=_nb_setup_context)


# ---------------------------------------------------------------------------------------------- protein terms

@custom_op("streamtotal::protein_terms", mutates_args=())
def protein_terms(y: Tensor, mask: Tensor, log_back: Tensor, back_scale: Tensor, back_mean: Tensor,
                  fore_scale: Tensor, mix_logits: Tensor, theta: Tensor, prior_mean: Tensor, prior_log_scale: Tensor,
                  with_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Per-cell protein negative log-likelihood and background KL by protein_kernel.c (see protein_terms.py).

    Args:
        y: ``[B, T]`` counts (any value where unmeasured, as every other ``[B, T]`` input).
        mask: ``[B, T]`` bool, True where measured.
        log_back, back_scale, back_mean, fore_scale, mix_logits, prior_mean, prior_log_scale: ``[B, T]``.
        theta: ``[T]`` (one per protein) or ``[B, T]``.
        with_grad: store the elementwise derivatives for the backward.

    Returns:
        ``(nll [B], kl [B], local [PROTEIN_LOCAL_TERMS, B, T])``; ``local`` is ``[0, B, T]`` without with_grad.
    """
    n, t = y.shape
    on = mask.to(torch.float32)  # the kernel selects measured entries by it: unmeasured ones may hold NaN or inf
    y, lb, s, m, a, pi, th, pm, pls = (v.contiguous() for v in (y, log_back, back_scale, back_mean, fore_scale,
                                                                mix_logits, theta, prior_mean, prior_log_scale))
    nll, kl = torch.empty(n), torch.empty(n)
    local = torch.empty(PROTEIN_LOCAL_TERMS if with_grad else 0, n, t)
    kernels.protein_forward(y.data_ptr(), on.data_ptr(), lb.data_ptr(), s.data_ptr(), m.data_ptr(), a.data_ptr(),
                            pi.data_ptr(), th.data_ptr(), 0 if th.dim() == 1 else t, pm.data_ptr(), pls.data_ptr(), n,
                            t, nll.data_ptr(), kl.data_ptr(), _ptr(local if with_grad else None))
    return nll, kl, local


@protein_terms.register_fake
def _(y, mask, log_back, back_scale, back_mean, fore_scale, mix_logits, theta, prior_mean, prior_log_scale,
      with_grad):
    n, t = y.shape
    return y.new_empty(n), y.new_empty(n), y.new_empty(PROTEIN_LOCAL_TERMS if with_grad else 0, n, t)


@custom_op("streamtotal::protein_terms_backward", mutates_args=())
def protein_terms_backward(grad_nll: Tensor, grad_kl: Tensor, local: Tensor, shared_theta: bool,
                           needs: list[bool]) -> list[Tensor]:
    """Gradients of ``protein_terms`` by protein_kernel.c.

    Args:
        grad_nll, grad_kl: ``[B]`` upstream gradients.
        local: the forward's ``[PROTEIN_LOCAL_TERMS, B, T]`` derivatives.
        shared_theta: theta was ``[T]`` (one per protein) rather than ``[B, T]``.
        needs: which of (log_back, back_scale, back_mean, fore_scale, mix_logits, theta, prior_mean,
            prior_log_scale) need a gradient.

    Returns:
        Their gradients in that order, theta's with theta's shape; empty (first dimension 0) where not needed.
    """
    _, n, t = local.shape
    grad_nll, grad_kl, local = (v.to(torch.float32).contiguous() for v in (grad_nll, grad_kl, local))
    grads = [torch.empty(*_protein_grad_shape(i, need, n, t, shared_theta)) for i, need in enumerate(needs)]
    lb, s, m, a, pi, th, pm, pls = (gr if need else None for gr, need in zip(grads, needs))
    kernels.protein_backward(grad_nll.data_ptr(), grad_kl.data_ptr(), local.data_ptr(), 0 if shared_theta else t, n,
                             t, *(_ptr(gr) for gr in (lb, a, pi, th, s, m, pm, pls)))
    return grads


def _protein_grad_shape(index: int, need: bool, n, t, shared_theta: bool) -> tuple:
    if not need:
        return (0,)
    return (t,) if index == 5 and shared_theta else (n, t)


@protein_terms_backward.register_fake
def _(grad_nll, grad_kl, local, shared_theta, needs):
    _, n, t = local.shape
    return [local.new_empty(*_protein_grad_shape(i, need, n, t, shared_theta)) for i, need in enumerate(needs)]


def _protein_setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(output[2])
    ctx.shared_theta = inputs[7].dim() == 1


def _protein_backward(ctx, grad_nll, grad_kl, _grad_local):
    needs = list(ctx.needs_input_grad[2:2 + _PROTEIN_PARAMS])
    (local,) = ctx.saved_tensors
    grads = torch.ops.streamtotal.protein_terms_backward(grad_nll, grad_kl, local, ctx.shared_theta, needs)
    return None, None, *(gr if need else None for gr, need in zip(grads, needs)), None


protein_terms.register_autograd(_protein_backward, setup_context=_protein_setup_context)


# ---------------------------------------------------------------------------------------------- layers

@custom_op("streamtotal::encoder_input", mutates_args=())
def encoder_input(rna: Tensor, protein: Tensor, measured: Tensor, scale: bool, log_transform: bool) -> Tensor:
    """The encoder's input by layer_kernel.c: ``[f(rna / (1 + row mean)), f(protein / (1 + row sum / measured))]``
    with f = log1p (or the identity), the divisions only with ``scale``; no gradient (its inputs are counts).

    Args:
        rna: ``[B, G]`` counts.
        protein: ``[B, T]`` counts, 0 where unmeasured.
        measured: ``[B]`` float32, >= 1.
        scale: divide by the row means as above.
        log_transform: f = log1p.

    Returns:
        ``[B, G + T]``.
    """
    rna, protein, measured = (v.contiguous() for v in (rna, protein, measured))
    (n, g), t = rna.shape, protein.shape[1]
    out = torch.empty(n, g + t)
    kernels.encoder_input(rna.data_ptr(), protein.data_ptr(), measured.data_ptr(), n, g, t, int(scale),
                          int(log_transform), out.data_ptr())
    return out


@encoder_input.register_fake
def _(rna, protein, measured, scale, log_transform):
    return rna.new_empty(rna.shape[0], rna.shape[1] + protein.shape[1])


@custom_op("streamtotal::dropout", mutates_args=())
def dropout(x: Tensor, seed: Tensor, threshold: int, scale: float) -> tuple[Tensor, Tensor]:
    """Inverted dropout by layer_kernel.c: ``(x * keep * scale, keep * scale)``, an element kept when its 16-bit
    uniform, hashed from ``seed`` and its index, is >= ``threshold``.

    Args:
        x: any shape, < 2^32 elements.
        seed: ``[]`` int64 (its 64 bits seed the hash): the op is a function of its inputs, so a compiled graph
            can run it where it likes and the mask is still the one drawn from torch's generator.
        threshold: keep threshold in [0, 65536).
        scale: the inverse of the keep probability.

    Returns:
        ``(output, keep * scale)``, both of ``x``'s shape.

    Raises:
        ValueError: ``x`` has 2^32 elements or more.
    """
    x = x.contiguous()
    if x.numel() >= 1 << 32:
        raise ValueError(f"native dropout takes < 2^32 elements, got {x.numel()}")
    out, keep_scale = torch.empty_like(x), torch.empty_like(x)
    kernels.dropout_forward(x.data_ptr(), x.numel(), threshold, scale, int(seed) & (2**64 - 1), out.data_ptr(),
                            keep_scale.data_ptr())
    return out, keep_scale


@dropout.register_fake
def _(x, seed, threshold, scale):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(
        x, memory_format=torch.contiguous_format)


def _dropout_setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(output[1])


def _dropout_backward(ctx, grad, _grad_keep_scale):
    (keep_scale,) = ctx.saved_tensors
    return grad * keep_scale, None, None, None


dropout.register_autograd(_dropout_backward, setup_context=_dropout_setup_context)
