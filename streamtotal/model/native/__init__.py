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
operations. ``STREAMTOTAL_NATIVE=0`` turns it off. The kernels are torch custom operators (ops.py,
``torch.ops.streamtotal.*``), so a ``torch.compile``d model calls them as it does eagerly."""

from __future__ import annotations

import os

import torch  # first: the extension then shares torch's OpenMP runtime (and its thread count)

from streamtotal.model.count_terms import TABLE_WIDTH
from streamtotal.model.native.ops import kernels as _cpu_kernels  # None where not built: the torch path is used

MIN_WIDTH = 31
"""The kernels continue the tables with asymptotic series from count TABLE_WIDTH - 1, exact only from 30 on."""
assert TABLE_WIDTH >= MIN_WIDTH


def available() -> bool:
    """Whether the compiled kernels are installed and not turned off (``STREAMTOTAL_NATIVE=0``). Under
    ``torch.compile`` too: the kernels are custom operators (ops.py), which the compiled graph calls. A compiled
    graph keeps the answer it was traced with (dynamo does not guard on the environment): set the switch before
    the first compiled call, or ``torch._dynamo.reset()`` after changing it."""
    return _cpu_kernels is not None and os.environ.get("STREAMTOTAL_NATIVE", "1") != "0"


def describe() -> str:
    """Which path computes the likelihoods and layers, in words: for ``streamtotal info`` and the run log."""
    if _cpu_kernels is None:
        return "torch operations (the compiled kernels were not built: no C compiler or OpenMP at install)"
    if os.environ.get("STREAMTOTAL_NATIVE", "1") == "0":
        return "torch operations (compiled kernels turned off by STREAMTOTAL_NATIVE=0)"
    return (f"compiled CPU kernels ({_cpu_kernels.__name__}, as torch.ops.streamtotal operators, eager and under "
            "torch.compile) for CPU float32; torch operations on GPUs and in other precisions")


def float32_cpu(*tensors: torch.Tensor) -> bool:
    """Whether the kernels can take these tensors: compiled kernels available and all CPU float32."""
    return available() and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)


def applies(x: torch.Tensor, logits: torch.Tensor, log_library: torch.Tensor, log_theta: torch.Tensor) -> bool:
    """Whether the kernels can compute this call: CPU float32 tensors, ``[B, G]`` counts and logits, ``[B]``
    library, and one dispersion per gene (``[G]``)."""
    return (float32_cpu(x, logits, log_library, log_theta) and x.dim() == 2 and log_theta.dim() == 1
            and logits.shape == x.shape and log_library.shape == x.shape[:1] and log_theta.shape == x.shape[1:])


def nb_log_likelihood(x: torch.Tensor, logits: torch.Tensor, log_library: torch.Tensor,
                      log_theta: torch.Tensor) -> torch.Tensor:
    """Per-cell log NB(x; exp(log_library) * softmax(logits), exp(log_theta)) by the kernel (``[B]``),
    differentiable in logits, log_library and log_theta. Call only where ``applies`` is True."""
    with_theta_grad = torch.is_grad_enabled() and log_theta.requires_grad  # else skip the digamma table
    return torch.ops.streamtotal.nb_log_likelihood(x, logits, log_library, log_theta, with_theta_grad)[0]


def protein_terms(y: torch.Tensor, mask: torch.Tensor, *params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cell protein negative log-likelihood and background KL by the kernel, differentiable in ``params``
    (log_back, back_scale, back_mean, fore_scale, mix_logits, theta, prior_mean, prior_log_scale; see
    protein_terms.py). Call only where ``float32_cpu`` holds for every tensor but the mask."""
    with_grad = torch.is_grad_enabled() and any(p.requires_grad for p in params)  # else store no derivatives
    nll, kl, _ = torch.ops.streamtotal.protein_terms(y, mask, *params, with_grad)
    return nll, kl


def encoder_input(rna: torch.Tensor, protein: torch.Tensor, measured: torch.Tensor, scale: bool,
                  log_transform: bool) -> torch.Tensor:
    """``[B, G + T]``: ``[f(rna / (1 + row mean)), f(protein / (1 + row sum / measured))]`` with f = log1p (or the
    identity), the divisions only with ``scale``. ``protein`` must be 0 where unmeasured; ``measured``: ``[B]``
    float32, >= 1. Call only where ``float32_cpu`` holds for the inputs."""
    return torch.ops.streamtotal.encoder_input(rna, protein, measured, bool(scale), bool(log_transform))


def dropout(x: torch.Tensor, threshold: int, scale: float) -> torch.Tensor:
    """``x * keep * scale`` with keep drawn by the kernel (see layer_kernel.c): an element is kept when its 16-bit
    uniform is >= ``threshold``; the backward multiplies by the same mask. Call only where ``float32_cpu(x)``
    holds."""
    # The kernel's random stream is a hash of this seed, drawn from torch's generator: seeded runs repeat, and a
    # checkpoint (which saves torch's RNG state) resumes the same masks. It stays a tensor so that a compiled graph
    # draws it too, rather than baking one trace-time value in (randint: dynamo cannot trace the in-place random_).
    seed = torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64)
    return torch.ops.streamtotal.dropout(x, seed, threshold, scale)[0]
