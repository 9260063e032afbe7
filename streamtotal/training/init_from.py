"""``streamtotal train --from RUN_DIR``: start a run from the weights of a trained one.

The typical use is totalVI -> totalANVI: train totalVI unsupervised, then continue with the label classifier
switched on (``--totalanvi --labels-key cell_type --from RUN_DIR``). Every weight the two models share (encoder,
decoder, dispersions, background and library priors, batch-norm statistics) is copied exactly; weights only the
new model has (the label classifier) keep their random initialisation. A source run's own label classifier is
not copied (new labels, new head).
"""

from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path

from loaders.registry import Registry
from streamtotal.errors import ConfigError
from streamtotal.model.config import ModelConfig
from streamtotal.model.totalvi import LABEL_MODULES, TotalVAE

LABEL_FIELDS = ("label_classifier", "classification_ratio", "label_classifier_n_hidden", "label_classifier_n_layers",
                "label_classifier_dropout", "label_prior")
"""Model-config fields that may differ between a run and the run it starts from."""


def _without_labels(config: ModelConfig) -> ModelConfig:
    return replace(config, **{name: getattr(ModelConfig(), name) for name in LABEL_FIELDS})


def check_init_compatible(source_model: ModelConfig, source_registry: Registry, model: ModelConfig,
                          registry: Registry, source: str | Path) -> None:
    """Raises ConfigError unless a run of (``model``, ``registry``) can start from the ``source`` run's weights."""
    for name, what in (("gene_names", "genes"), ("protein_names", "proteins"), ("batch_categories", "batches")):
        a, b = getattr(source_registry, name), getattr(registry, name)
        if tuple(a) != tuple(b):
            raise ConfigError(
                f"--from {source}: the run was trained on other {what} ({len(a)}) than these data have ({len(b)}); "
                "start from a run trained on the same stores (new batches need query mapping)"
            )
    a, b = _without_labels(source_model), _without_labels(model)
    if a != b:
        diff = {f.name: (getattr(a, f.name), getattr(b, f.name)) for f in fields(ModelConfig)
                if getattr(a, f.name) != getattr(b, f.name)}
        raise ConfigError(
            f"--from {source}: the [model] config differs from that run's in {sorted(diff)} "
            f"(theirs, this: {diff}); use the run's own [model] settings (the CLI does when no --config is given)"
        )


def initialise_from(model: TotalVAE, registry: Registry, source: str | Path) -> None:
    """Copies into ``model`` every weight it shares with the trained run in ``source``.

    Raises:
        RunDirError: ``source`` holds no trained model.
        ConfigError: other genes, proteins or batches, or another architecture.
    """
    from streamtotal.training.run_dir import load_trained

    trained = load_trained(source)
    check_init_compatible(trained.config.model, trained.registry, model.config, registry, source)
    state = {k: v for k, v in trained.model.state_dict().items() if not k.startswith(LABEL_MODULES)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    stray = [k for k in missing if not k.startswith(LABEL_MODULES)]
    if stray or unexpected:  # cannot happen with equal configs; guard against a silent partial copy
        raise ConfigError(f"--from {source}: weights do not match (missing {stray}, unexpected {unexpected})")
