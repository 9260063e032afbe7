"""The NB's count terms for integer counts and one dispersion per gene, by table lookup instead of lgamma/digamma.

The RNA likelihood needs, for every cell b and gene g,

    C(x, theta) = lgamma(x + theta) - lgamma(theta) - lgamma(x + 1)      (forward: the log-likelihood)
    D(x, theta) = digamma(x + theta) - digamma(theta)                     (backward: d/dtheta)

Computed per element these are the costliest part of a CPU step: ``lgamma`` and a digamma series on every one of
the B x G entries (~20 passes over [256, 2000] tensors). But raw counts are integers, mostly small, and theta has
one value per gene, so for x < W both are sums over k < x of log(theta + k) - log(k + 1) and 1 / (theta + k): a
[G, W] table per step (in float64, more accurate than lgamma's cancellation at large theta) and one gather per
element. Counts >= W (a few percent of the entries) are computed exactly at their positions.

``CountTerms.build`` returns None where the trick does not apply (non-integer or negative values, theta per cell,
or a GPU, where the fused elementwise kernels are already cheap); the caller then uses lgamma/digamma.
"""

from __future__ import annotations

import torch

TABLE_WIDTH = 32
"""Counts 0 .. TABLE_WIDTH - 1 are looked up; larger ones are computed where they occur."""
_MAX_EXACT_INT = 1 << 24
"""Above this, float32 cannot represent every integer, so the integer check would not mean what it says."""
_offsets: dict[int, torch.Tensor] = {}


def integer_counts(x: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    """``(x as int32, max x)`` when every entry of CPU tensor ``x`` is an integer in [0, 2^24); else None."""
    if x.device.type != "cpu" or not x.numel():
        return None
    as_int = x.to(torch.int32)
    low, top = (int(v) for v in torch.aminmax(as_int))
    if low < 0 or top >= _MAX_EXACT_INT or not torch.equal(as_int.to(x.dtype), x):
        return None
    return as_int, top


def _gene_offsets(n_genes: int) -> torch.Tensor:
    """``g * TABLE_WIDTH`` for every gene: added to a capped count it indexes the flattened [G, W] table."""
    offsets = _offsets.get(n_genes)
    if offsets is None:
        offsets = _offsets[n_genes] = torch.arange(n_genes, dtype=torch.int32) * TABLE_WIDTH
    return offsets


def count_tables(theta: torch.Tensor, with_digamma: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The ``[G, TABLE_WIDTH]`` float64 tables of C(k, theta_g) and (optionally) D(k, theta_g) for k < TABLE_WIDTH.

    For integer k both are sums over j < k: C = sum log(theta + j) - lgamma(k + 1), D = sum 1 / (theta + j).

    Args:
        theta: ``[G]`` inverse dispersions, > 0 (not differentiated here).
        with_digamma: also build D (the backward needs it).
    """
    width, g = TABLE_WIDTH, theta.shape[0]
    k = torch.arange(width - 1, dtype=torch.float64)
    shifted = theta.detach().double().unsqueeze(1) + k  # theta + k, k < W - 1
    log_table = torch.zeros(g, width, dtype=torch.float64)
    torch.cumsum(shifted.log(), dim=1, out=log_table[:, 1:])
    log_table -= torch.lgamma(torch.arange(width, dtype=torch.float64) + 1.0)
    digamma_table = None
    if with_digamma:
        digamma_table = torch.zeros(g, width, dtype=torch.float64)
        torch.cumsum(shifted.reciprocal(), dim=1, out=digamma_table[:, 1:])
    return log_table, digamma_table


class CountTerms:
    """C and D of one minibatch (see the module docstring). Build with ``CountTerms.build``."""

    def __init__(self, index: torch.Tensor, digamma_table: torch.Tensor, big: torch.Tensor,
                 big_digamma: torch.Tensor | None, log_coefficient: torch.Tensor) -> None:
        self._index = index
        self._digamma_table = digamma_table
        self._big = big
        self._big_digamma = big_digamma
        self.log_coefficient = log_coefficient
        """``[B]``: sum over genes of C(x, theta) per cell."""

    @classmethod
    def build(cls, x: torch.Tensor, theta: torch.Tensor, with_digamma: bool = True) -> "CountTerms | None":
        """Tables for counts ``x`` ([B, G]) and per-gene ``theta`` ([G]); None where the lookup does not apply.

        Args:
            x: ``[B, G]`` counts.
            theta: ``[G]`` inverse dispersions, > 0 (not differentiated here).
            with_digamma: also prepare D for ``digamma_difference`` (the backward needs it).
        """
        if theta.dim() != 1 or x.dim() != 2:
            return None
        x = x.contiguous()  # positions below are row-major flat offsets
        found = integer_counts(x)
        if found is None:
            return None
        as_int, top = found
        dtype, (n, g) = x.dtype, x.shape
        width = TABLE_WIDTH
        log_table, digamma_table = count_tables(theta, with_digamma)
        if digamma_table is not None:
            digamma_table = digamma_table.to(dtype).view(-1)

        index = as_int.clamp_(max=width - 1).add_(_gene_offsets(g)).view(-1)
        log_coefficient = log_table.to(dtype).view(-1).index_select(0, index).view(n, g).sum(1)

        big, big_digamma = torch.empty(0, dtype=torch.int64), None
        if top >= width:
            big = (x >= width).view(-1).nonzero().squeeze(1)
            xb = x.view(-1)[big].double()
            gene = big % g
            tb = theta.detach().double()[gene]
            exact = torch.lgamma(xb + tb) - torch.lgamma(tb) - torch.lgamma(xb + 1.0)
            log_coefficient.index_add_(0, big // g, (exact - log_table[gene, width - 1]).to(dtype))
            if with_digamma:
                big_digamma = (torch.digamma(xb + tb) - torch.digamma(tb)).to(dtype)
        return cls(index, digamma_table, big, big_digamma, log_coefficient)

    def digamma_difference(self) -> torch.Tensor:
        """``[B, G]``: D(x, theta) = digamma(x + theta) - digamma(theta) per element."""
        n = self.log_coefficient.shape[0]
        out = self._digamma_table.index_select(0, self._index)
        if self._big_digamma is not None:
            out.index_copy_(0, self._big, self._big_digamma)
        return out.view(n, -1)
