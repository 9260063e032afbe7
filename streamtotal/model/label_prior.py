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
        labels: torch.Tensor,
    ) -> torch.Tensor:
        """Per-cell z term of the ELBO under the label-conditional prior (replaces KL(q(z) || N(0, I))).

        Args:
            z: ``[B, L]`` a sample of q(z | x).
            qz_mean, qz_var: ``[B, L]`` its mean and variance.
            label_probs: ``[B, K]`` the classifier's p(y | z), used for unlabelled cells.
            labels: ``[B]`` int64 label codes; < 0 = unlabelled.

        Returns:
            ``[B]`` float32.
        """
        n_cells, k = z.shape[0], self.n_labels
        z = z.float()
        # Every cell under every label, label-major: rows [y * B, (y + 1) * B) hold label y.
        z_rep = z.repeat(k, 1)
        y_rep = torch.arange(k, device=z.device).repeat_interleave(n_cells)
        m2, log_v2 = self.z2_head(self.z2_encoder(z_rep, y_rep)).float().chunk(2, dim=-1)
        v2 = log_v2.exp() + VAR_EPS
        z2 = m2 + v2.sqrt() * torch.randn_like(m2)
        kl_z2 = 0.5 * (v2 + m2.square() - 1.0 - v2.log()).sum(-1)
        p_mean, p_log_var = self.z_head(self.z_decoder(z2, y_rep)).float().chunk(2, dim=-1)
        log_p_z = gaussian_log_density(z_rep, p_mean, p_log_var.exp() + VAR_EPS)
        per_label = (kl_z2 - log_p_z).view(k, n_cells).t()  # [B, K]
        labelled = labels >= 0
        weights = torch.where(labelled.unsqueeze(1), F.one_hot(labels.clamp(min=0), k).to(label_probs.dtype),
                              label_probs.float())
        kl_label = (weights * (weights.clamp(min=1e-12).log() + math.log(k))).sum(-1)
        return gaussian_log_density(z, qz_mean.float(), qz_var.float()) + (weights * per_label).sum(-1) + kl_label
