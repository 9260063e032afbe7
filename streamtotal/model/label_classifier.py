"""totalANVI's label classifier: a cell-type classifier on the latent space, trained jointly with totalVI.

Semi-supervised (DESIGN.md section 2): every cell contributes its ELBO; cells with a label (code >= 0) also
contribute the cross-entropy of the classifier, read on the posterior mean of q(z | x, y, s) as scvi-tools'
``classify(use_posterior_mean=True)``; cells of the "unlabeled" category (code -1) contribute nothing to it.
The gradient of the classification loss flows into the encoder, so labels shape the latent space. The
training loss is

    loss = totalVI loss + classification_ratio * mean over labelled cells of CE(classifier(E[z]), label)

and ``neg_elbo`` stays the pure negative ELBO. A minibatch without labelled cells adds 0.

By default z keeps totalVI's N(0, I) prior (DESIGN.md: "a classifier on z trained jointly"); ``model.label_prior =
"m2"`` adds scvi-tools' M2 label-conditional prior (z | z2, y, label_prior.py), under which unlabelled cells also
train the classifier through the ELBO. The labelled
cells are those of the streamed minibatch (scvi-tools draws a separate labelled minibatch every step), so the
classification term's weight per step is the same whatever the labelled fraction, but its noise grows as the
fraction shrinks.

Architecture as scvi-tools' ``Classifier`` for totalANVI: ``n_layers`` hidden layers (default the encoder's,
with its batch/layer-norm choice and dropout) and a linear output of logits; 0 layers = a linear classifier.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from streamtotal.errors import ConfigError
from streamtotal.model.config import ModelConfig
from streamtotal.model.layers import FCStack
from streamtotal.model.outputs import LossOutput


class LabelClassifier(nn.Module):
    """Logits over ``n_labels`` cell types from a latent ``z``.

    Args:
        config: the model config (``label_classifier_*`` fields; unset ones follow the encoder).
        n_labels: label categories (without the unlabeled one), >= 2.

    Raises:
        ConfigError: fewer than two label categories.
    """

    def __init__(self, config: ModelConfig, n_labels: int) -> None:
        super().__init__()
        if n_labels < 2:
            raise ConfigError(
                f"model.label_classifier (totalANVI) needs at least two label categories, got {n_labels}: set "
                "data.labels_key (--labels-key) to an obs column with two or more cell types besides "
                "data.unlabeled_category"
            )
        self.n_labels = n_labels
        n_hidden = config.label_classifier_n_hidden or config.n_hidden
        n_layers = config.label_classifier_n_layers
        n_layers = config.n_layers_encoder if n_layers is None else n_layers
        dropout = (config.dropout_rate_encoder if config.label_classifier_dropout is None
                   else config.label_classifier_dropout)
        bn, ln = config.norms("encoder")
        self.hidden = FCStack(config.n_latent, n_hidden, n_layers, 0, dropout, bn, ln) if n_layers else None
        self.head = nn.Linear(n_hidden if n_layers else config.n_latent, n_labels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """``[B, n_labels]`` float32 logits of ``[B, n_latent]`` latents."""
        h = self.hidden(z) if self.hidden is not None else z
        return self.head(h).float()


def classification_terms(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-cell cross-entropy (0 for unlabelled cells), its mean over labelled cells, and the accuracy.

    Args:
        logits: ``[B, n_labels]``.
        labels: ``[B]`` int64 codes; < 0 = unlabelled.

    Returns:
        ``(per_cell_ce [B], mean_ce scalar (0 without labelled cells), accuracy scalar (NaN without labelled
        cells))``.
    """
    labelled = labels >= 0
    # Unlabelled cells are given class 0 only so that cross_entropy is defined; torch.where gives them no
    # gradient.
    ce = F.cross_entropy(logits, labels.clamp(min=0), reduction="none")
    ce = torch.where(labelled, ce, torch.zeros_like(ce))
    n_labelled = labelled.sum()
    mean_ce = ce.sum() / n_labelled.clamp(min=1)
    correct = (logits.argmax(dim=1) == labels) & labelled
    accuracy = correct.sum().float() / n_labelled.float()
    return ce, mean_ce, accuracy.detach()


def add_classification_loss(out: LossOutput, classifier: LabelClassifier, labels: torch.Tensor,
                            ratio: float) -> LossOutput:
    """Adds totalANVI's classification term to a totalVI LossOutput (in place; returns it).

    The classifier reads ``out.inference.qz_mean``; ``out.loss`` gains ``ratio * mean CE over labelled cells``
    and ``classification_loss`` / ``label_logits`` / ``classification_accuracy`` are filled in.
    """
    logits = classifier(out.inference.qz_mean)
    ce, mean_ce, accuracy = classification_terms(logits, labels)
    out.loss = out.loss + ratio * mean_ce
    out.classification_loss = ce
    out.label_logits = logits
    out.classification_accuracy = accuracy
    return out
