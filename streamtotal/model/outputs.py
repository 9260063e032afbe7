"""What TotalVAE's inference, generative and loss steps return."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class InferenceOutputs:
    """q(z | x, y, s) and the library size of a minibatch.

    Attributes:
        qz_mean: ``[B, n_latent]`` posterior mean of z.
        qz_var: ``[B, n_latent]`` posterior variance of z.
        z: ``[B, n_latent]`` a reparameterised sample of z (or ``qz_mean`` when sampling is off).
        log_library: ``[B]`` log RNA library size: observed (log total count) or a sample of q(l).
        ql_mean: ``[B]`` posterior mean of log l when the library is latent, else None.
        ql_var: ``[B]`` posterior variance of log l when the library is latent, else None.
    """

    qz_mean: torch.Tensor
    qz_var: torch.Tensor
    z: torch.Tensor
    log_library: torch.Tensor
    ql_mean: torch.Tensor | None = None
    ql_var: torch.Tensor | None = None


@dataclass
class GenerativeOutputs:
    """The decoder's parameters of p(x, y | z, l, s); derived quantities are computed on demand.

    Attributes:
        rna_logits: ``[B, G]`` logits of the RNA expression proportions rho (rho = softmax(rna_logits)).
        log_library: ``[B]`` log library size the RNA means are scaled by.
        rna_log_theta: ``[G]`` or ``[B, G]`` log RNA inverse dispersion.
        back_mean: ``[B, T]`` mean of q(log beta | z, s), the posterior of the log protein background.
        back_scale: ``[B, T]`` standard deviation of q(log beta | z, s).
        log_back: ``[B, T]`` the sample of log beta used by the likelihood.
        fore_scale: ``[B, T]`` foreground multiplier alpha >= 1 (foreground mean = beta * alpha).
        mix_logits: ``[B, T]`` logits of pi, the probability that a count is background.
        protein_theta: ``[T]`` or ``[B, T]`` protein inverse dispersion.
    """

    rna_logits: torch.Tensor
    log_library: torch.Tensor
    rna_log_theta: torch.Tensor
    back_mean: torch.Tensor
    back_scale: torch.Tensor
    log_back: torch.Tensor
    fore_scale: torch.Tensor
    mix_logits: torch.Tensor
    protein_theta: torch.Tensor

    @property
    def rna_scale(self) -> torch.Tensor:
        """``[B, G]`` normalised expression rho (rows sum to 1)."""
        return torch.softmax(self.rna_logits, dim=-1)

    @property
    def rna_rate(self) -> torch.Tensor:
        """``[B, G]`` NB means l * rho."""
        return torch.softmax(self.rna_logits, dim=-1) * self.log_library.exp().unsqueeze(-1)

    @property
    def protein_rate_back(self) -> torch.Tensor:
        """``[B, T]`` background NB means beta."""
        return self.log_back.exp()

    @property
    def protein_rate_fore(self) -> torch.Tensor:
        """``[B, T]`` foreground NB means beta * alpha."""
        return self.log_back.exp() * self.fore_scale

    @property
    def protein_foreground_prob(self) -> torch.Tensor:
        """``[B, T]`` probability that a protein count is foreground, 1 - pi."""
        return torch.sigmoid(-self.mix_logits)

    @property
    def denoised_protein(self) -> torch.Tensor:
        """``[B, T]`` expected foreground counts (1 - pi) * beta * alpha: the protein signal without background."""
        return self.protein_foreground_prob * self.protein_rate_fore


@dataclass
class LossOutput:
    """Per-cell terms of the objective of one minibatch.

    All per-cell tensors are ``[B]`` and at weight 1. ``neg_elbo = rna_nll + protein_nll + kl_z +
    kl_background + kl_library``; ``loss`` is the scalar that is optimised:
    ``mean(rna_nll + w_p * protein_nll + kl_weight * (kl_z + kl_background) + kl_library)`` with ``w_p`` the
    config's protein_reconstruction_weight, so ``loss == neg_elbo.mean()`` at kl_weight = 1 and w_p = 1.

    Attributes:
        loss: scalar training loss.
        neg_elbo: per-cell negative ELBO (one-sample estimate).
        rna_nll: per-cell RNA negative log-likelihood.
        protein_nll: per-cell protein negative log-likelihood over measured proteins only.
        kl_z: per-cell KL(q(z) || N(0, I)).
        kl_background: per-cell KL(q(log beta) || p(log beta | s)) over measured proteins only.
        kl_library: per-cell KL(q(log l) || p(log l | s)); zeros when the library is observed.
        kl_weight: the warm-up weight this loss was computed with.
        z: ``[B, n_latent]`` the latent sample the decoder used (for an adversarial classifier step).
        inference: the inference outputs.
        generative: the generative outputs.
        classification_loss: totalANVI only (else None): ``[B]`` per-cell cross-entropy of the label
            classifier, 0 for unlabelled cells; ``loss`` then also holds ``classification_ratio`` times its mean
            over labelled cells (``neg_elbo`` does not).
        label_logits: totalANVI only: ``[B, n_labels]`` classifier logits (on the posterior mean of z).
        classification_accuracy: totalANVI only: scalar fraction of labelled cells classified right (NaN when
            the minibatch has none).
    """

    loss: torch.Tensor
    neg_elbo: torch.Tensor
    rna_nll: torch.Tensor
    protein_nll: torch.Tensor
    kl_z: torch.Tensor
    kl_background: torch.Tensor
    kl_library: torch.Tensor
    kl_weight: float
    z: torch.Tensor
    inference: InferenceOutputs
    generative: GenerativeOutputs
    classification_loss: torch.Tensor | None = None
    label_logits: torch.Tensor | None = None
    classification_accuracy: torch.Tensor | None = None
