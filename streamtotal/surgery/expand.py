"""Architecture surgery: a query model with the reference's weights and new rows for the query's new batches.

Every batch covariate enters the model as a row gathered from a ``[n_batch, out]`` tensor (``CovariateLinear``
is ``x @ W.T + b + C[s]``, equivalent to concatenating a one-hot; layers.py), so the "new columns of the
one-hot weights" of scArches are new rows here: the reference's rows are copied unchanged and rows are appended
for the new batches. The same holds for the other per-batch tensors (per-batch dispersions, the protein
background prior, the library prior). A reference trained on a single batch has no covariate weights at all,
which is the same function as a zero row; that zero row is what the query model gets for it.
"""

from __future__ import annotations

import torch
from torch import nn

from loaders.registry import Registry
from streamtotal.errors import ConfigError
from streamtotal.model.config import ModelConfig
from streamtotal.model.layers import CovariateLinear
from streamtotal.model.totalvi import LABEL_MODULES, TotalVAE
from streamtotal.training.run_dir import TrainedModel

_PER_BATCH = ("rna_log_theta", "protein_log_theta", "background_prior_mean", "background_prior_log_scale",
              "library_log_mean", "library_log_var")


def batch_indexed(model: TotalVAE) -> set[str]:
    """Names of the parameters and buffers whose dim 0 is the batch (covariate weights and per-batch tensors)."""
    # A label network's covariate is the label, not the batch.
    names = {f"{m}.cov_weight" for m, mod in model.named_modules()
             if isinstance(mod, CovariateLinear) and mod.cov_weight is not None and not m.startswith(LABEL_MODULES)}
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    names |= {n for n in _PER_BATCH if n in tensors and tensors[n].dim() >= 1 and tensors[n].shape[0] == model.n_batch
              and (n not in ("rna_log_theta", "protein_log_theta") or tensors[n].dim() == 2)}
    return names


def query_model_config(reference: ModelConfig) -> ModelConfig:
    """The query's architecture: the reference's, without the adversarial batch classifier.

    The adversary is a training aid of the reference (it holds no part of the mapping); a reference-trained one
    cannot classify the new batches, and with the reference frozen there is little left for it to push.
    """
    from dataclasses import replace

    return replace(reference, adversarial_classifier=False)


def expand_reference(
    reference: TrainedModel,
    registry: Registry,
    *,
    new_batch_init: str = "random",
    protein_prior: tuple[torch.Tensor, torch.Tensor] | None = None,
    library_prior: tuple[torch.Tensor, torch.Tensor] | None = None,
    seed: int = 0,
) -> tuple[TotalVAE, set[str]]:
    """Builds the query model: the reference's weights, plus rows for the batches ``registry`` adds.

    Args:
        reference: the loaded reference run.
        registry: the query's registry, aligned onto the reference's (same genes, proteins and labels; its
            first batch categories are the reference's).
        new_batch_init: "random" (the layers' own init, as scArches), "zeros" or "mean" (mean of the reference
            rows) for the new batches' covariate weights and per-batch dispersions.
        protein_prior: ``(mean, scale)`` ``[T, n_batch]`` background prior estimated on the query (its new-batch
            columns are used); None = the fixed initial values.
        library_prior: ``(mean, var)`` per batch, estimated on the query (latent library only).
        seed: seed of the new rows' random initialisation (a resumed run rebuilds the same model).

    Returns:
        ``(model, batch_rows)``: the model (train mode, CPU) and the names of its batch-indexed tensors.

    Raises:
        ConfigError: the registries do not fit together, or the reference's weights do not fit the model.
    """
    ref = reference.registry
    for attr in ("gene_names", "protein_names", "label_categories"):
        if tuple(getattr(ref, attr)) != tuple(getattr(registry, attr)):
            raise ConfigError(f"the query registry's {attr} differ from the reference's; align the query onto it")
    n_ref = ref.n_batch
    if tuple(registry.batch_categories[:n_ref]) != tuple(ref.batch_categories):
        raise ConfigError("the query registry's batch categories must start with the reference's, in order")
    config = query_model_config(reference.config.model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TotalVAE(config, registry.n_genes, registry.n_proteins, registry.n_batch,
                        protein_prior=protein_prior, library_prior=library_prior, n_labels=registry.n_labels)
    rows = batch_indexed(model)
    source = {k: v for k, v in reference.model.state_dict().items() if not k.startswith("batch_classifier.")}
    targets = dict(model.named_parameters()) | dict(model.named_buffers())
    unused = set(source) - set(targets)
    if unused:
        raise ConfigError(f"reference weights {sorted(unused)[:5]} have no place in the query model")
    with torch.no_grad():
        for name, target in targets.items():
            src = source.get(name)
            if name in rows:
                if src is None:
                    if not (name.endswith("cov_weight") and n_ref == 1):
                        raise ConfigError(f"the reference has no {name}")
                    target[:n_ref].zero_()  # a one-batch reference has no covariate: a zero row is the same map
                elif src.shape[1:] != target.shape[1:] or src.shape[0] != n_ref:
                    raise ConfigError(f"reference {name} has shape {list(src.shape)}; expected {n_ref} batch rows")
                else:
                    target[:n_ref].copy_(src)
                if name.endswith("cov_weight") or name in ("rna_log_theta", "protein_log_theta"):
                    if new_batch_init == "zeros" and name.endswith("cov_weight"):
                        target[n_ref:].zero_()
                    elif new_batch_init == "mean":
                        target[n_ref:] = target[:n_ref].mean(dim=0, keepdim=True)
            elif src is None or src.shape != target.shape:
                raise ConfigError(f"reference {name} is missing or has another shape than the query model's")
            else:
                target.copy_(src)
    model.train()
    return model, rows


def reference_parts(model: nn.Module, batch_rows: set[str], n_reference_batches: int) -> dict[str, torch.Tensor]:
    """Copies of everything the reference contributed to ``model`` (reference rows only of batch-indexed tensors):
    what a "covariates" surgery must leave bit-identical."""
    out = {}
    for name, value in model.state_dict().items():
        out[name] = (value[:n_reference_batches] if name in batch_rows else value).detach().clone()
    return out
