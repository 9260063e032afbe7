"""Compiled CPU kernels of the RNA likelihood (nb_kernel.c), the protein terms (protein_kernel.c), the encoder input
and dropout (layer_kernel.c), with the checks the C code relies on.

The per-cell NB log-likelihood is most of a CPU training step's non-matmul time when written in torch operations
(about 25 passes over the [B, G] tensors, ~5 ms of a ~20 ms step at B = 256, G = 2,000). The kernels do it in
three passes forward and two backward over OpenMP threads (~1.5 ms), giving the same values to float32 rounding
(tests/model/test_native_kernels.py; they are closer to a float64 reference than the torch path). The protein NB
mixture and background KL take ~160 small torch operations forward and backward (~1.7 ms); the kernel does them in
one pass each way (~0.5 ms; tests/model/test_protein_terms.py).

The extension is built at install (setup.py) and is optional: without a C compiler the install succeeds and
``available()`` is False, and the callers (rna_likelihood.py, protein_terms.py, totalvi.py, layers.py) use torch
operations. ``STREAMTOTAL_NATIVE=0`` turns it off."""

from __future__ import annotations

import os

import torch  # first: the extension then shares torch's OpenMP runtime (and its thread count)

from streamtotal.model.count_terms import TABLE_WIDTH

try:
    from streamtotal.model.native import _nb
except ImportError:  # not built (no compiler when installed): the torch path is used
    _nb = None

MIN_WIDTH = 31
"""The kernels continue the tables with asymptotic series from count TABLE_WIDTH - 1, exact only from 30 on."""
assert TABLE_WIDTH >= MIN_WIDTH


def available() -> bool:
    """Whether the compiled kernels are installed, not turned off (``STREAMTOTAL_NATIVE=0``), and not being traced by
    ``torch.compile``: dynamo would run a C call at trace time, on fake tensors, and leave its outputs uninitialised
    in the compiled graph (inductor fuses the torch path's operations there instead)."""
    return (_nb is not None and os.environ.get("STREAMTOTAL_NATIVE", "1") != "0"
            and not torch.compiler.is_compiling())


def describe() -> str:
    """Which path computes the likelihoods and layers, in words: for ``streamtotal info`` and the run log."""
    if _nb is None:
        return "torch operations (the compiled kernels were not built: no C compiler or OpenMP at install)"
    if os.environ.get("STREAMTOTAL_NATIVE", "1") == "0":
        return "torch operations (compiled kernels turned off by STREAMTOTAL_NATIVE=0)"
    return (f"compiled CPU kernels ({_nb.__name__}) for CPU float32; torch operations on GPUs, "
            "under torch.compile and in other precisions")


def float32_cpu(*tensors: torch.Tensor) -> bool:
    """Whether the kernels can take these tensors: compiled kernels available and all CPU float32."""
    return available() and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)


def applies(x: torch.Tensor, logits: torch.Tensor, log_library: torch.Tensor, log_theta: torch.Tensor) -> bool:
    """Whether the kernels can compute this call: CPU float32 tensors, ``[B, G]`` counts and logits, ``[B]``
    library, and one dispersion per gene (``[G]``)."""
    return (float32_cpu(x, logits, log_library, log_theta) and x.dim() == 2 and log_theta.dim() == 1
            and logits.shape == x.shape and log_library.shape == x.shape[:1] and log_theta.shape == x.shape[1:])


class NBState:
    """What the backward needs from the forward."""

    def __init__(self, x, mu, log1p_mu_theta, log_library, theta, digamma_table) -> None:
        self.x, self.mu, self.log1p_mu_theta = x, mu, log1p_mu_theta
        self.log_library, self.theta = log_library, theta
        self.digamma_table = digamma_table


def nb_forward(x: torch.Tensor, logits: torch.Tensor, log_library: torch.Tensor, log_theta: torch.Tensor,
               with_theta_grad: bool = True) -> tuple[torch.Tensor, NBState] | None:
    """Per-cell log NB(x; exp(log_library) * softmax(logits), exp(log_theta)) and the backward's state.

    Call only where ``applies`` is True. ``with_theta_grad``: prepare the backward's dispersion gradient.

    Returns:
        ``([B] log-likelihoods, state)``, or None when a count is not an integer in [0, 2^24) (use the general
        path then).
    """
    x, logits, log_library, log_theta = (t.detach().contiguous() for t in (x, logits, log_library, log_theta))
    theta = log_theta.exp()
    n, g = x.shape
    c_table = torch.empty(g, TABLE_WIDTH, dtype=torch.float64)  # count_terms.count_tables' values, in one pass
    d_table = torch.empty(g, TABLE_WIDTH, dtype=torch.float64) if with_theta_grad else None
    _nb.nb_tables(theta.data_ptr(), g, TABLE_WIDTH, c_table.data_ptr(), 0 if d_table is None else d_table.data_ptr())
    ll = torch.empty(n)
    mu, log1p_mu_theta = torch.empty(n, g), torch.empty(n, g)
    bad = _nb.nb_forward(x.data_ptr(), logits.data_ptr(), log_library.data_ptr(), theta.data_ptr(),
                         log_theta.data_ptr(), c_table.data_ptr(), TABLE_WIDTH, n, g, ll.data_ptr(), mu.data_ptr(),
                         log1p_mu_theta.data_ptr())
    if bad:
        return None
    return ll, NBState(x, mu, log1p_mu_theta, log_library, theta, d_table)


def nb_backward(grad: torch.Tensor, state: NBState, need_logits: bool, need_library: bool,
                need_theta: bool) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``sum_b grad_b * ll_b`` with respect to logits, log library and log theta (None where not
    needed), from ``nb_forward``'s state (``need_theta`` needs ``with_theta_grad`` there).

    Raises:
        MemoryError: the kernel could not allocate its per-thread sums.
    """
    s = state
    n, g = s.x.shape
    grad = grad.detach().to(torch.float32).contiguous()
    grad_logits = torch.empty(n, g) if need_logits else None
    grad_library = torch.empty(n) if need_library else None
    grad_log_theta = torch.empty(g) if need_theta else None
    d_table = s.digamma_table if need_theta else None
    if need_theta and d_table is None:
        raise ValueError("nb_backward: the dispersion gradient needs nb_forward(..., with_theta_grad=True)")
    _nb.nb_backward(grad.data_ptr(), s.x.data_ptr(), s.mu.data_ptr(), s.log1p_mu_theta.data_ptr(),
                    s.log_library.data_ptr(), s.theta.data_ptr(), 0 if d_table is None else d_table.data_ptr(),
                    TABLE_WIDTH, n, g,
                    0 if grad_logits is None else grad_logits.data_ptr(),
                    0 if grad_library is None else grad_library.data_ptr(),
                    0 if grad_log_theta is None else grad_log_theta.data_ptr())
    return grad_logits, grad_library, grad_log_theta


PROTEIN_LOCAL_TERMS = 7
"""Elementwise derivatives the protein forward stores for its backward (see protein_kernel.c)."""


class ProteinState:
    """What the protein backward needs from the forward."""

    def __init__(self, local: torch.Tensor, theta_stride: int) -> None:
        self.local, self.theta_stride = local, theta_stride


def protein_forward(y: torch.Tensor, mask: torch.Tensor, log_back: torch.Tensor, back_scale: torch.Tensor,
                    back_mean: torch.Tensor, fore_scale: torch.Tensor, mix_logits: torch.Tensor,
                    theta: torch.Tensor, prior_mean: torch.Tensor, prior_log_scale: torch.Tensor,
                    with_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor, ProteinState | None]:
    """Per-cell protein negative log-likelihood and background KL, and the backward's state (None without
    ``with_grad``). Call only where ``float32_cpu`` holds for every tensor but the mask.

    Args:
        y: ``[B, T]`` counts (any value where unmeasured, as every other ``[B, T]`` input).
        mask: ``[B, T]`` bool, True where measured.
        log_back, back_scale, back_mean, fore_scale, mix_logits, prior_mean, prior_log_scale: ``[B, T]``.
        theta: ``[T]`` (one per protein) or ``[B, T]``.
        with_grad: store the elementwise derivatives for ``protein_backward``.
    """
    n, t = y.shape
    on = mask.to(torch.float32)  # the kernel selects measured entries by it: unmeasured ones may hold NaN or inf
    y = y.detach().contiguous()
    args = [a.detach().contiguous() for a in (log_back, back_scale, back_mean, fore_scale, mix_logits, theta,
                                              prior_mean, prior_log_scale)]
    theta_stride = 0 if theta.dim() == 1 else t
    nll, kl = torch.empty(n), torch.empty(n)
    local = torch.empty(PROTEIN_LOCAL_TERMS, n, t) if with_grad else None
    lb, s, m, a, pi, th, pm, pls = args
    _nb.protein_forward(y.data_ptr(), on.data_ptr(), lb.data_ptr(), s.data_ptr(), m.data_ptr(), a.data_ptr(),
                        pi.data_ptr(), th.data_ptr(), theta_stride, pm.data_ptr(), pls.data_ptr(), n, t,
                        nll.data_ptr(), kl.data_ptr(), 0 if local is None else local.data_ptr())
    return nll, kl, (ProteinState(local, theta_stride) if with_grad else None)


def protein_backward(grad_nll: torch.Tensor, grad_kl: torch.Tensor, state: ProteinState,
                     needs: tuple[bool, ...]) -> list[torch.Tensor | None]:
    """Gradients with respect to (log_back, back_scale, back_mean, fore_scale, mix_logits, theta, prior_mean,
    prior_log_scale), None where ``needs`` says not needed; theta's has theta's shape."""
    _, n, t = state.local.shape
    grad_nll = grad_nll.detach().to(torch.float32).contiguous()
    grad_kl = grad_kl.detach().to(torch.float32).contiguous()
    lb, s, m, a, pi, th, pm, pls = (
        (torch.empty(t) if i == 5 and state.theta_stride == 0 else torch.empty(n, t)) if need else None
        for i, need in enumerate(needs)
    )
    _nb.protein_backward(grad_nll.data_ptr(), grad_kl.data_ptr(), state.local.data_ptr(), state.theta_stride, n, t,
                         *(0 if g is None else g.data_ptr() for g in (lb, a, pi, th, s, m, pm, pls)))
    return [lb, s, m, a, pi, th, pm, pls]


def encoder_input(rna: torch.Tensor, protein: torch.Tensor, measured: torch.Tensor, scale: bool,
                  log_transform: bool) -> torch.Tensor:
    """``[B, G + T]``: ``[f(rna / (1 + row mean)), f(protein / (1 + row sum / measured))]`` with f = log1p (or the
    identity), the divisions only with ``scale``. ``protein`` must be 0 where unmeasured; ``measured``: ``[B]``
    float32, >= 1. Call only where ``float32_cpu`` holds for the inputs."""
    rna, protein, measured = (t.detach().contiguous() for t in (rna, protein, measured))
    (n, g), t = rna.shape, protein.shape[1]
    out = torch.empty(n, g + t)
    _nb.encoder_input(rna.data_ptr(), protein.data_ptr(), measured.data_ptr(), n, g, t, int(scale), int(log_transform),
                      out.data_ptr())
    return out


def dropout_forward(x: torch.Tensor, threshold: int, scale: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x * keep * scale, keep * scale)`` with keep drawn from ``seed`` (64 bits; see layer_kernel.c): an element
    is kept when its 16-bit uniform is >= ``threshold``. Call only where ``float32_cpu(x)`` holds."""
    x = x.detach().contiguous()
    if x.numel() >= 1 << 32:
        raise ValueError(f"native dropout takes < 2^32 elements, got {x.numel()}")
    out, keep_scale = torch.empty_like(x), torch.empty_like(x)
    _nb.dropout_forward(x.data_ptr(), x.numel(), threshold, scale, seed & (2**64 - 1), out.data_ptr(),
                        keep_scale.data_ptr())
    return out, keep_scale
