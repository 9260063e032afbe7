"""The optional adversarial batch classifier on z (scvi-tools' AdversarialTrainingPlan, as a module).

The trainer alternates two steps: the VAE step adds ``fool_loss`` (the encoder is rewarded when the
classifier spreads its belief over the *other* batches), then the classifier step minimises
``classifier_loss`` on a detached z. scvi-tools turns the classifier on automatically when some proteins are
missing in some batches; here it is a config switch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from streamtotal.model.layers import FCStack


class BatchClassifier(nn.Module):
    """MLP from z to batch logits (scvi-tools: 2 hidden layers of 32, dropout 0.1, batch norm).

    Args:
        n_latent: input dimension.
        n_batch: number of batches (classes), >= 2.
        n_hidden: hidden units.
        n_layers: hidden layers.
        dropout_rate: dropout after each hidden layer.
    """

    def __init__(self, n_latent: int, n_batch: int, n_hidden: int = 32, n_layers: int = 2,
                 dropout_rate: float = 0.1) -> None:
        super().__init__()
        self.n_batch = n_batch
        self.hidden = FCStack(n_latent, n_hidden, n_layers, dropout_rate=dropout_rate)
        self.out = nn.Linear(n_hidden, n_batch)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """``[B, n_batch]`` logits."""
        return self.out(self.hidden(z))

    def classifier_loss(self, z: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of predicting the true batch (the classifier's own objective).

        Args:
            z: ``[B, n_latent]`` latents; detach them so the encoder is not trained by this loss.
            batch: ``[B]`` batch codes.

        Returns:
            Scalar loss.
        """
        return F.cross_entropy(self(z), batch)

    def fool_loss(self, z: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy against the uniform distribution over the batches a cell is NOT from.

        Args:
            z: ``[B, n_latent]`` latents (with gradient to the encoder).
            batch: ``[B]`` batch codes.

        Returns:
            Scalar loss, minimised by the encoder.
        """
        log_p = F.log_softmax(self(z), dim=-1)
        others = log_p.sum(-1) - log_p.gather(1, batch.unsqueeze(1)).squeeze(1)
        return -(others / (self.n_batch - 1)).mean()
