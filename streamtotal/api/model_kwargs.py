"""scvi-tools' ``TOTALVI(adata, **kwargs)`` arguments mapped onto streamtotal's ``ModelConfig``.

The names and defaults are scvi-tools 1.4's (``TOTALVI.__init__`` and the ``TOTALVAE`` keywords it forwards).
What streamtotal does not implement is refused with a ``ConfigError`` saying so, never silently ignored.
"""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Any

from streamtotal.errors import ConfigError
from streamtotal.model.config import ModelConfig

_SCVI_TO_CONFIG = {
    "n_hidden": "n_hidden",
    "n_layers_encoder": "n_layers_encoder",
    "n_layers_decoder": "n_layers_decoder",
    "dropout_rate_encoder": "dropout_rate_encoder",
    "dropout_rate_decoder": "dropout_rate_decoder",
    "use_batch_norm": "use_batch_norm",
    "use_layer_norm": "use_layer_norm",
    "encode_covariates": "encode_covariates",
    "deeply_inject_covariates": "deeply_inject_covariates",
    "log_variational": "log_variational",
    "protein_dispersion": "protein_dispersion",
    "gene_dispersion": "gene_dispersion",
    "n_latent": "n_latent",
}
"""scvi-tools keyword -> ModelConfig field, where the meaning is the same."""

_UNSUPPORTED_VALUES = {
    "gene_likelihood": ("nb", "streamtotal's RNA likelihood is the negative binomial (scvi-tools' default 'nb')"),
    "latent_distribution": ("normal", "streamtotal's latent is Gaussian (scvi-tools' default 'normal')"),
}


def model_config(n_proteins: int, *, n_latent: int = 20, gene_dispersion: str = "gene",
                 protein_dispersion: str = "protein", gene_likelihood: str = "nb",
                 latent_distribution: str = "normal", empirical_protein_background_prior: bool | None = None,
                 base: ModelConfig | None = None, **model_kwargs: Any) -> ModelConfig:
    """The ModelConfig for scvi-tools' constructor arguments.

    Args:
        n_proteins: proteins of the data (scvi-tools turns the empirical background prior on above 10).
        n_latent, gene_dispersion, protein_dispersion, gene_likelihood, latent_distribution,
            empirical_protein_background_prior: as scvi-tools' ``TOTALVI``.
        base: start from this config instead of the defaults.
        **model_kwargs: scvi-tools' ``TOTALVAE`` keywords (``n_hidden``, ``n_layers_encoder``, ``dropout_rate_*``,
            ``use_batch_norm``, ``use_layer_norm``, ``encode_covariates``, ``deeply_inject_covariates``,
            ``log_variational``, ``use_observed_lib_size``) or any ``ModelConfig`` field by name.

    Returns:
        The config.

    Raises:
        ConfigError: a value streamtotal does not implement (e.g. ``gene_likelihood="zinb"``,
            ``gene_dispersion="gene-cell"``) or an unknown keyword.
    """
    for name, value in (("gene_likelihood", gene_likelihood), ("latent_distribution", latent_distribution)):
        supported, why = _UNSUPPORTED_VALUES[name]
        if value != supported:
            raise ConfigError(f"{name}={value!r} is not supported: {why}")
    for name, value, allowed in (("gene_dispersion", gene_dispersion, ("gene", "gene-batch")),
                                 ("protein_dispersion", protein_dispersion, ("protein", "protein-batch"))):
        if value not in allowed:
            raise ConfigError(f"{name}={value!r} is not supported; streamtotal implements {list(allowed)}")
    values: dict[str, Any] = {"n_latent": n_latent, "gene_dispersion": gene_dispersion,
                              "protein_dispersion": protein_dispersion}
    values["empirical_protein_background_prior"] = (n_proteins > 10 if empirical_protein_background_prior is None
                                                    else bool(empirical_protein_background_prior))
    own = {f.name for f in fields(ModelConfig)}
    for key, value in model_kwargs.items():
        if key == "use_observed_lib_size":
            values["latent_library"] = not value
        elif key in _SCVI_TO_CONFIG:
            values[_SCVI_TO_CONFIG[key]] = value
        elif key in own:
            values[key] = value
        else:
            raise ConfigError(f"unknown model argument {key!r}; streamtotal's TOTALVI takes scvi-tools' "
                              f"{sorted(_SCVI_TO_CONFIG)} and use_observed_lib_size, or a ModelConfig field "
                              f"({sorted(own)})")
    return replace(base or ModelConfig(), **values)


def summary(config: ModelConfig) -> str:
    """scvi-tools' one-line model summary (``_model_summary_string``) for ``__repr__``."""
    return (f"n_latent: {config.n_latent}, gene_dispersion: {config.gene_dispersion}, protein_dispersion: "
            f"{config.protein_dispersion}, gene_likelihood: nb, latent_distribution: normal")
