"""totalANVI's label-conditional prior on z (``model.label_prior = "m2"``): scANVI's M1+M2 stacking.

With the prior off, z ~ N(0, I) and the KL term of the ELBO is KL(q(z | x) || N(0, I)). With it, z is generated
from a cell type y and a second latent z2 (Kingma et al. 2014; Xu et al. 2021, as scvi-tools' TOTALANVI):

    y ~ Cat(1/K),  z2 ~ N(0, I),  z | z2, y ~ N(mu(z2, y), sigma^2(z2, y)),   q(z2 | z, y) = N(m(z, y), v(z, y)),

and the z term of the ELBO (one sample z ~ q(z | x), one z2 per label) becomes

    kl_z = log q(z | x) + sum_y w_y [KL(q(z2 | z, y) || N(0, I)) - log p(z | z2, y)] + KL(w || Cat(1/K)),

with w the one-hot label of a labelled cell (its KL(w || .) is then the constant log K, kept so that the term is
the same function for every cell) and the classifier's probabilities p(y | z) for an unlabelled one. Cells of a
type are thereby drawn to their own region of z, and the classifier on unlabelled cells is trained by the ELBO too.
(scvi-tools weights even labelled cells by the classifier's probabilities; the true label is M2's choice.)
The importance-sampled marginal likelihood (inference/predictive.py) needs log p(z) itself: ``log_prior`` estimates
it with one z2 per label and sums the labels exactly.

The networks read z and the label as scvi-tools' do: an encoder of ``n_layers_encoder`` hidden layers with the
label injected as a covariate and dropout 0.05, a decoder of ``n_layers_decoder`` hidden layers without dropout,
then linear heads for mean and log variance. They carry no batch covariate, so query surgery leaves them frozen.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from streamtotal.model.config import ModelConfig
from streamtotal.model.layers import FCStack

_LOG_2PI = math.log(2.0 * math.pi)
VAR_EPS = 1e-4
"""Added to the variances of q(z2 | z, y) and p(z | z2, y) so they never reach 0 (as for q(z | x))."""


def gaussian_log_density(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """Sum over the last axis of log N(x; mean, var) (diagonal)."""
    return -0.5 * ((x - mean).square() / var + var.log() + _LOG_2PI).sum(-1)


class LabelConditionalPrior(nn.Module):
    """p(z | z2, y) and q(z2 | z, y) over ``n_labels`` labels; ``kl_z`` gives the z term of the ELBO.

    Args:
        config: the model config (sizes and norms follow the encoder and decoder).
        n_labels: label categories K (without the unlabeled one), >= 2.
    """

    def __init__(self, config: ModelConfig, n_labels: int) -> None:
        super().__init__()
        c = config
        self.n_labels = n_labels
        enc_bn, enc_ln = c.norms("encoder")
        dec_bn, dec_ln = c.norms("decoder")
        self.z2_encoder = FCStack(c.n_latent, c.n_hidden, c.n_layers_encoder, n_labels, 0.05, enc_bn, enc_ln)
        self.z2_head = nn.Linear(c.n_hidden, 2 * c.n_latent)  # mean, log variance
        self.z_decoder = FCStack(c.n_latent, c.n_hidden, c.n_layers_decoder, n_labels, 0.0, dec_bn, dec_ln)
        self.z_head = nn.Linear(c.n_hidden, 2 * c.n_latent)  # mean, log variance

    def kl_z(
        self, z: torch.Tensor, qz_mean: torch.Tensor, qz_var: torch.Tensor, label_probs: torch.Tensor,
        labels: torch.Tensor, generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Per-cell z term of the ELBO under the label-conditional prior (replaces KL(q(z) || N(0, I))).

        Args:
            z: ``[B, L]`` a sample of q(z | x).
            qz_mean, qz_var: ``[B, L]`` its mean and variance.
            label_probs: ``[B, K]`` the classifier's p(y | z), used for unlabelled cells.
            labels: ``[B]`` int64 label codes; < 0 = unlabelled.
            generator: random source of the z2 draws (None: torch's global one).

        Returns:
            ``[B]`` float32.
        """
        k = self.n_labels
        m2, v2, _, log_p_z = self._per_label(z, generator)
        kl_z2 = 0.5 * (v2 + m2.square() - 1.0 - v2.log()).sum(-1)
        per_label = kl_z2 - log_p_z  # [B, K]
        labelled = labels >= 0
        weights = torch.where(labelled.unsqueeze(1), F.one_hot(labels.clamp(min=0), k).to(label_probs.dtype),
                              label_probs.float())
        kl_label = (weights * (weights.clamp(min=1e-12).log() + math.log(k))).sum(-1)
        log_q = gaussian_log_density(z.float(), qz_mean.float(), qz_var.float())
        return log_q + (weights * per_label).sum(-1) + kl_label

    def log_prior(self, z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """log p(z) = log (1/K) sum_y integral p(z | z2, y) N(z2; 0, I) dz2, importance-sampled with one z2 per label.

        Per label the integral is estimated by one draw z2 ~ q(z2 | z, y) as p(z | z2, y) N(z2; 0, I) / q(z2 | z, y),
        an unbiased estimate; the labels are summed exactly. In an importance weight p(x, z) / q(z | x), the
        estimate in place of p(z) keeps the weight's expectation (the proposal is then q(z | x) q(z2 | z, y)), so the
        marginal likelihood estimated with it is that of the model with its own prior.

        Args:
            z: ``[N, L]`` latents.
            generator: random source of the z2 draws (None: torch's global one).

        Returns:
            ``[N]`` float32 estimates of log p(z).
        """
        m2, v2, z2, log_p_z = self._per_label(z, generator)
        log_p_z2 = gaussian_log_density(z2, torch.zeros_like(z2), torch.ones_like(z2))
        log_w = log_p_z + log_p_z2 - gaussian_log_density(z2, m2, v2)  # [N, K]
        return torch.logsumexp(log_w, dim=-1) - math.log(self.n_labels)

    def _per_label(
        self, z: torch.Tensor, generator: torch.Generator | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every cell under every label: q(z2 | z, y)'s mean and variance and a draw z2 (each ``[B, K, L]``), and
        log p(z | z2, y) (``[B, K]``)."""
        n_cells, k = z.shape[0], self.n_labels
        z = z.float()
        # Label-major while computing: rows [y * B, (y + 1) * B) hold label y.
        z_rep = z.repeat(k, 1)
        y_rep = torch.arange(k, device=z.device).repeat_interleave(n_cells)
        m2, log_v2 = self.z2_head(self.z2_encoder(z_rep, y_rep)).float().chunk(2, dim=-1)
        v2 = log_v2.exp() + VAR_EPS
        z2 = m2 + v2.sqrt() * torch.randn(m2.shape, generator=generator, device=m2.device, dtype=m2.dtype)
        p_mean, p_log_var = self.z_head(self.z_decoder(z2, y_rep)).float().chunk(2, dim=-1)
        log_p_z = gaussian_log_density(z_rep, p_mean, p_log_var.exp() + VAR_EPS)
        return tuple(t.view(k, n_cells, *t.shape[1:]).transpose(0, 1) for t in (m2, v2, z2, log_p_z))
