"""Fully connected layers with the one-hot batch covariate injected into every layer.

Injecting a one-hot code by concatenation (as scvi-tools does) and adding a learned per-category row to the
layer's output are the same function: ``[x, onehot(s)] @ W.T == x @ W_x.T + W_s[s]``. We do the latter, which
skips building a ``[B, n_in + n_batch]`` copy of the input for every layer (2 MB per step for the encoder's
first layer) and turns the covariate matmul into a row gather. Initialisation matches ``nn.Linear`` on the
concatenated input (uniform in +-1/sqrt(n_in + n_cov)), so the networks start from the same distribution as
scvi-tools'.

``FCStack`` can also hold several independent stacks side by side (``n_parallel``): the decoder's four hidden
networks (RNA, protein background, protein foreground, mixing) all read ``z``, so their first layers are one
``[n_latent -> 4 * n_hidden]`` matmul. Batch norm is per feature and layer norm is applied per stack, so this
is exactly four separate networks, in one kernel call instead of four.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from streamtotal.model import native

BN_MOMENTUM = 0.01
"""Batch-norm momentum of scvi-tools (from the original TensorFlow implementation)."""
BN_EPS = 1e-3
"""Batch-norm epsilon of scvi-tools."""


class CovariateLinear(nn.Module):
    """``y = x @ W.T + b + C[s]``: a linear layer that also reads a categorical covariate ``s``.

    Args:
        n_in: input features.
        n_out: output features.
        n_cov: number of covariate categories; 0 or 1 means no covariate (one category carries no
            information, as in scvi-tools).
        n_parallel: number of independent blocks; input and output are ``n_parallel`` concatenated blocks of
            ``n_in`` and ``n_out`` features, and block ``p`` of the output only reads block ``p`` of the input.
    """

    def __init__(self, n_in: int, n_out: int, n_cov: int = 0, n_parallel: int = 1) -> None:
        super().__init__()
        self.n_in, self.n_out, self.n_parallel = n_in, n_out, n_parallel
        self.n_cov = n_cov if n_cov > 1 else 0
        bound = 1.0 / math.sqrt(n_in + self.n_cov)
        if n_parallel == 1:
            self.weight = nn.Parameter(torch.empty(n_out, n_in).uniform_(-bound, bound))
        else:
            self.weight = nn.Parameter(torch.empty(n_parallel, n_in, n_out).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(n_parallel * n_out).uniform_(-bound, bound))
        self.cov_weight = (
            nn.Parameter(torch.empty(self.n_cov, n_parallel * n_out).uniform_(-bound, bound)) if self.n_cov else None
        )

    def forward(self, x: torch.Tensor, cov: torch.Tensor | None = None) -> torch.Tensor:
        """Applies the layer.

        Args:
            x: ``[B, n_parallel * n_in]`` input.
            cov: ``[B]`` int64 covariate codes; required when the layer has a covariate, ignored otherwise.

        Returns:
            ``[B, n_parallel * n_out]`` output.
        """
        if self.n_parallel == 1:
            out = F.linear(x, self.weight, self.bias)
        else:
            blocks = x.view(x.shape[0], self.n_parallel, self.n_in).transpose(0, 1)
            out = torch.bmm(blocks, self.weight).transpose(0, 1).reshape(x.shape[0], -1) + self.bias
        if self.cov_weight is not None:
            # index_select, not cov_weight[cov]: its backward is an index_add, ~15x faster on CPU than the
            # accumulating index_put that advanced indexing uses.
            out = out + torch.index_select(self.cov_weight, 0, cov)
        return out


class Dropout(nn.Module):
    """Inverted dropout with a cheaper random mask on CPU (same distribution as ``nn.Dropout`` up to 2^-16).

    On CPU, ``nn.Dropout`` draws one Bernoulli per element (~8 ns each, ~2 ms on a [256, 1024] activation:
    more than the layer's matmul). Here an element is kept when a 16-bit uniform is at or above
    ``round(p * 2^16)``, and kept values are scaled by the exact inverse of the keep probability, so the layer is
    unbiased. With the compiled kernels (float32) the uniforms come from a counter-based hash in one pass over the
    activation; otherwise each 64-bit word from torch's generator gives four of them. Elsewhere (CUDA)
    ``F.dropout``'s fused kernel is used.

    Args:
        p: drop probability in [0, 1).
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p
        self._threshold = round(p * 65536)  # an element is kept when its uniform on [0, 65535] is >= this
        self._scale = 65536.0 / (65536 - self._threshold)  # 1 / P(keep)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Drops (training mode) or passes ``x`` through (eval mode)."""
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, True)
        if native.float32_cpu(x):
            return native.dropout(x, self._threshold, self._scale)
        n = x.numel()
        words = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), None)
        # int16 lanes are uniform on [-32768, 32767]: shift the threshold into that range
        keep = words.view(torch.int16)[:n].view(x.shape) >= self._threshold - 32768
        return x * keep.to(x.dtype).mul_(self._scale)


class FCStack(nn.Module):
    """``n_layers`` of [CovariateLinear -> BatchNorm -> LayerNorm -> ReLU -> Dropout], as scvi-tools' FCLayers.

    Args:
        n_in: input features (of each parallel stack).
        n_hidden: features of every layer's output (of each parallel stack).
        n_layers: number of layers, >= 1.
        n_cov: covariate categories (0/1 = none).
        dropout_rate: dropout after every layer (0 = none).
        use_batch_norm: batch norm (momentum 0.01, eps 1e-3, as scvi-tools) after every linear map.
        use_layer_norm: layer norm without affine parameters (as scvi-tools) after every linear map.
        inject_covariates: inject the covariate into every layer (scvi-tools' default); False = first only.
        n_parallel: independent stacks computed side by side; the first layer reads the same ``x`` for all
            of them, later layers are block diagonal. Output is their ``[B, n_parallel * n_hidden]``
            concatenation.
    """

    def __init__(
        self,
        n_in: int,
        n_hidden: int,
        n_layers: int,
        n_cov: int = 0,
        dropout_rate: float = 0.0,
        use_batch_norm: bool = True,
        use_layer_norm: bool = False,
        inject_covariates: bool = True,
        n_parallel: int = 1,
    ) -> None:
        super().__init__()
        self.n_hidden, self.n_parallel = n_hidden, n_parallel
        width = n_parallel * n_hidden
        self.linears = nn.ModuleList(
            [CovariateLinear(n_in, width, n_cov)]
            + [
                CovariateLinear(n_hidden, n_hidden, n_cov if inject_covariates else 0, n_parallel)
                for _ in range(n_layers - 1)
            ]
        )
        self.norms = nn.ModuleList(
            [nn.BatchNorm1d(width, momentum=BN_MOMENTUM, eps=BN_EPS) if use_batch_norm else nn.Identity()
             for _ in range(n_layers)]
        )
        self.use_layer_norm = use_layer_norm
        self.dropout = Dropout(dropout_rate)

    def forward(self, x: torch.Tensor, cov: torch.Tensor | None = None) -> torch.Tensor:
        """Applies the stack.

        Args:
            x: ``[B, n_in]`` input.
            cov: ``[B]`` int64 covariate codes (None when the stack has no covariate).

        Returns:
            ``[B, n_parallel * n_hidden]`` activations.
        """
        for linear, norm in zip(self.linears, self.norms):
            x = norm(linear(x, cov))
            if self.use_layer_norm:
                shape = x.shape
                x = F.layer_norm(x.view(shape[0], self.n_parallel, self.n_hidden), (self.n_hidden,)).view(shape)
            x = self.dropout(F.relu(x))
        return x
