"""The model's architecture and likelihood options (the ``[model]`` table of a run config)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from streamtotal.errors import ConfigError

NormPlacement = Literal["encoder", "decoder", "both", "none"]


@dataclass(frozen=True)
class ModelConfig:
    """totalVI's architecture. Defaults are scvi-tools 1.4 TOTALVI's, so results are comparable with it."""

    n_latent: int = 20
    """Dimension of the latent space z."""
    n_hidden: int = 256
    """Units of every hidden layer (encoder and decoder)."""
    n_layers_encoder: int = 2
    """Hidden layers of the z encoder (the library encoder, when used, has one, as in scvi-tools)."""
    n_layers_decoder: int = 1
    """Hidden layers of each of the decoder's four networks (RNA, background, foreground, mixing)."""
    dropout_rate_encoder: float = 0.2
    """Dropout after every encoder hidden layer."""
    dropout_rate_decoder: float = 0.2
    """Dropout after every decoder hidden layer (scvi-tools' TOTALVAE passes 0.2; output heads have none)."""
    use_batch_norm: NormPlacement = "both"
    """Where hidden layers use batch norm (momentum 0.01, eps 1e-3)."""
    use_layer_norm: NormPlacement = "none"
    """Where hidden layers use layer norm (no affine parameters)."""
    gene_dispersion: Literal["gene", "gene-batch"] = "gene"
    """RNA inverse dispersion theta: one per gene, or one per gene and batch."""
    protein_dispersion: Literal["protein", "protein-batch"] = "protein"
    """Protein inverse dispersion (shared by background and foreground): per protein, or per protein and batch."""
    log_variational: bool = True
    """Encode log(1 + counts) instead of raw counts (for numerical stability; not a normalisation)."""
    scale_encoder_input: bool = True
    """Divide each cell's RNA and (measured) protein counts by 1 + their mean before the log, as scvi-tools
    1.4 does, so the encoder sees composition rather than depth. False = plain log1p, as in the paper."""
    protein_input_mean: Literal["measured", "all"] = "measured"
    """With ``scale_encoder_input``: the protein mean each cell's protein counts are divided by (1 + mean) is
    taken over its measured proteins ("measured", so a smaller panel does not look like a shallower cell), or
    over every protein of the registry with unmeasured ones counted as 0 ("all", as scvi-tools; set by
    ``streamtotal import-scvi``)."""
    latent_library: bool = False
    """Model the RNA library size as a latent LogNormal with a per-batch prior (needs a library prior);
    False = use the observed total count, as scvi-tools does by default."""
    empirical_protein_background_prior: bool = True
    """Initialise the per-batch protein background prior from the data (lower component of a two-component
    Gaussian mixture on log(y + 1)); False = a fixed initial value (mean 3, scale 1, as scvi-tools). scvi-tools
    switches it on only when there are more than 10 proteins."""
    foreground_activation: Literal["softplus", "relu"] = "softplus"
    """Protein foreground multiplier alpha = 1 + activation(.): "softplus" never has a dead gradient;
    "relu" is scvi-tools' function (set by ``streamtotal import-scvi``, so an imported model computes exactly
    what it computed in scvi-tools)."""
    encode_covariates: bool = True
    """Give the batch to the encoder (in every encoder layer) as well as to the decoder."""
    deeply_inject_covariates: bool = True
    """Inject the batch into every hidden layer, not only the first (scvi-tools' FCLayers default)."""
    protein_reconstruction_weight: float = 1.0
    """Weight of the protein negative log-likelihood in the training loss (the ELBO always uses 1)."""
    adversarial_classifier: bool = False
    """Add a batch classifier on z that the trainer trains adversarially (the encoder learns to fool it).
    Needs at least two batches."""
    adversarial_n_hidden: int = 32
    """Hidden units of the adversarial classifier (scvi-tools: 32)."""
    adversarial_n_layers: int = 2
    """Hidden layers of the adversarial classifier (scvi-tools: 2)."""
    label_classifier: bool = False
    """totalANVI: a cell-type classifier on the posterior mean of z, trained jointly with the ELBO on the cells
    that carry a label (``data.labels_key``; the unlabeled category is ignored), so labels shape the encoder.
    Needs at least two label categories."""
    classification_ratio: float = 50.0
    """totalANVI: weight of the classification loss (mean cross-entropy over the labelled cells of a
    minibatch) added to the training loss; 50 as scvi-tools' scANVI/totalANVI, whose loss has the same
    per-cell scale."""
    label_classifier_n_hidden: int | None = None
    """totalANVI: hidden units of the classifier; None = ``n_hidden`` (as scvi-tools)."""
    label_classifier_n_layers: int | None = None
    """totalANVI: hidden layers of the classifier; None = ``n_layers_encoder`` (as scvi-tools); 0 = linear."""
    label_classifier_dropout: float | None = None
    """totalANVI: dropout of the classifier's hidden layers; None = ``dropout_rate_encoder`` (as scvi-tools)."""
    label_prior: str = "none"
    """totalANVI: the prior of z. "none": N(0, I), as totalVI. "m2": scANVI's label-conditional prior (z given a
    second latent z2 and the label; the M1+M2 model of scvi-tools' TOTALANVI, label_prior.py): cells of a type are
    drawn together in z, and unlabelled cells train the classifier through the ELBO. Costs small networks run once
    per label for every cell (~25% more training time with 7 labels)."""

    def __post_init__(self) -> None:
        for name in ("n_latent", "n_hidden", "n_layers_encoder", "n_layers_decoder", "adversarial_n_hidden",
                     "adversarial_n_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"model.{name} must be an integer >= 1, got {value!r}")
        for name in ("dropout_rate_encoder", "dropout_rate_decoder"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"model.{name} must be in [0, 1), got {getattr(self, name)!r}")
        choices = {
            "use_batch_norm": ("encoder", "decoder", "both", "none"),
            "use_layer_norm": ("encoder", "decoder", "both", "none"),
            "gene_dispersion": ("gene", "gene-batch"),
            "protein_dispersion": ("protein", "protein-batch"),
            "protein_input_mean": ("measured", "all"),
            "foreground_activation": ("softplus", "relu"),
            "label_prior": ("none", "m2"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"model.{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        if not self.protein_reconstruction_weight >= 0.0:
            raise ConfigError(
                f"model.protein_reconstruction_weight must be >= 0, got {self.protein_reconstruction_weight!r}"
            )
        if not self.classification_ratio >= 0.0:
            raise ConfigError(f"model.classification_ratio must be >= 0, got {self.classification_ratio!r}")
        for name, low in (("label_classifier_n_hidden", 1), ("label_classifier_n_layers", 0)):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise ConfigError(f"model.{name} must be an integer >= {low} (or unset), got {value!r}")
        if self.label_classifier_dropout is not None and not 0.0 <= self.label_classifier_dropout < 1.0:
            raise ConfigError(
                f"model.label_classifier_dropout must be in [0, 1), got {self.label_classifier_dropout!r}"
            )

        if self.label_prior != "none" and not self.label_classifier:
            raise ConfigError(f"model.label_prior = {self.label_prior!r} is part of totalANVI: it needs "
                              "model.label_classifier = true (--totalanvi --labels-key KEY)")

    def norms(self, part: Literal["encoder", "decoder"]) -> tuple[bool, bool]:
        """Whether ``part``'s hidden layers use (batch norm, layer norm)."""
        return self.use_batch_norm in (part, "both"), self.use_layer_norm in (part, "both")
