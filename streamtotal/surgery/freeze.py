"""The surgery recipe: which weights a query run may train, and freezing that really freezes.

scvi-tools' scArches freezes with ``requires_grad=False`` plus gradient hooks, but leaves frozen tensors in the
optimiser with weight decay on, so "frozen" reference weights still shrink every step; and query training
can run with modules in whatever mode a previous ``eval()`` left them (DESIGN.md section 3). Here:

* a wholly frozen tensor gets ``requires_grad=False`` and is not given to the optimiser at all;
* a partly trainable tensor (the rows of the new batches in a per-batch tensor, e.g. a layer's covariate
  weights) sits in a param group with ``weight_decay=0``; a gradient hook zeroes the gradient of the
  reference rows and adds the weight-decay term (``wd * w``, what Adam's L2 decay adds) to the new rows only.
  Adam then leaves the reference rows bit-identical (zero moments give a zero update);
* modes are a property of each module: a frozen batch norm becomes ``FrozenBatchNorm1d``, which stays in eval
  mode (running statistics fixed) whatever ``train()`` calls reach it; dropout stays as in reference training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from streamtotal.errors import ConfigError
from streamtotal.model.layers import Dropout
from streamtotal.model.totalvi import LABEL_MODULES

UNFROZEN_CHOICES = ("covariates", "covariates+batchnorm", "all")


@dataclass(frozen=True)
class SurgeryConfig:
    """What query training may change. Defaults follow scArches (Lotfollahi et al. 2022) for totalVI."""

    unfrozen: Literal["covariates", "covariates+batchnorm", "all"] = "covariates"
    """What is trained. "covariates" (default, scArches): only the weights of the NEW batches, i.e. their rows
    in every layer's covariate weights (encoder, library encoder, decoder, heads), their per-batch dispersions
    (gene-batch / protein-batch) and their protein background prior; everything learned on the reference
    (weights, biases, batch-norm affine parameters and running statistics, label classifier, reference-batch
    rows) stays bit-identical. "covariates+batchnorm": also the encoder's and decoder's batch-norm layers (affine
    parameters trained, running statistics updated; scvi-tools' default unfreezes the decoder's). "all":
    fine-tune every weight (no longer a frozen reference; the reference latent space can drift)."""
    new_batch_init: Literal["random", "zeros", "mean"] = "random"
    """Initial covariate weights (and per-batch dispersions) of the new batches. "random" (scArches): the
    layer's own initialisation, uniform in +-1/sqrt(fan_in); "zeros": no batch shift at first; "mean": the mean
    of the reference batches' rows (start from an average reference batch). The new batches' protein background
    prior is always estimated from the query data (empirically, as the reference's was)."""
    dropout: bool = True
    """Keep dropout on during query training, as in reference training (scvi-tools' ``freeze_dropout=False``)."""

    def __post_init__(self) -> None:
        if self.unfrozen not in UNFROZEN_CHOICES:
            raise ConfigError(f"surgery.unfrozen must be one of {UNFROZEN_CHOICES}; got {self.unfrozen!r}")
        if self.new_batch_init not in ("random", "zeros", "mean"):
            raise ConfigError(f"surgery.new_batch_init must be random, zeros or mean; got {self.new_batch_init!r}")


class FrozenBatchNorm1d(nn.BatchNorm1d):
    """A batch norm pinned to eval mode: normalises with its fixed running statistics and never updates them."""

    def train(self, mode: bool = True) -> "FrozenBatchNorm1d":
        return super().train(False)


@dataclass
class Freezing:
    """The result of ``freeze``: which tensors train, and the optimiser's param groups.

    Attributes:
        trainable: names of wholly trainable parameters.
        partial: ``{name: n_frozen_rows}``: parameters whose first rows (the reference batches) are frozen.
        frozen: names of wholly frozen parameters.
        frozen_batchnorms: names of the batch-norm modules pinned to eval mode.
    """

    trainable: list[str] = field(default_factory=list)
    partial: dict[str, int] = field(default_factory=dict)
    frozen: list[str] = field(default_factory=list)
    frozen_batchnorms: list[str] = field(default_factory=list)
    weight_decay: float = 0.0
    _params: dict[str, nn.Parameter] = field(default_factory=dict, repr=False)

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Adam param groups: wholly trainable tensors with ``weight_decay``; partly trainable ones with none
        (their hook applies the decay to the new rows only). Frozen tensors are not included."""
        self.weight_decay = float(weight_decay)
        groups = []
        if self.trainable:
            groups.append({"params": [self._params[n] for n in self.trainable], "weight_decay": self.weight_decay})
        if self.partial:
            groups.append({"params": [self._params[n] for n in self.partial], "weight_decay": 0.0})
        if not groups:
            raise ConfigError("the surgery recipe leaves nothing to train (the query has no new batches?): embed or "
                              "predict the query with the reference run directly, or pass --unfrozen all")
        return groups

    def summary(self) -> dict:
        """JSON-safe description (for the run's alignment/surgery report)."""
        return {"trainable": self.trainable, "partial_rows_frozen": self.partial, "n_frozen": len(self.frozen),
                "frozen_batchnorms": self.frozen_batchnorms}


def _row_hook(freezing: Freezing, param: nn.Parameter, n_frozen: int):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad[:n_frozen] = 0.0
        if freezing.weight_decay:
            grad[n_frozen:] += freezing.weight_decay * param.detach()[n_frozen:]
        return grad

    return hook


def _is_norm_param(name: str, module_names: dict[str, nn.Module]) -> bool:
    owner = name.rsplit(".", 1)[0]
    return isinstance(module_names.get(owner), nn.BatchNorm1d)


def freeze(model: nn.Module, batch_rows: set[str], n_reference_batches: int, config: SurgeryConfig) -> Freezing:
    """Freezes ``model`` in place for query training per ``config``.

    Args:
        model: the expanded query model (``expand.expand_reference``).
        batch_rows: names of the parameters whose rows are indexed by batch (``expand.batch_indexed``).
        n_reference_batches: rows ``[:n]`` of those belong to the reference batches.
        config: the recipe.

    Returns:
        The Freezing (call ``param_groups`` for the optimiser).
    """
    result = Freezing()
    modules = dict(model.named_modules())
    unfreeze_bn = config.unfrozen in ("covariates+batchnorm", "all")
    for name, param in model.named_parameters():
        result._params[name] = param
        if config.unfrozen == "all":
            wholly = True
        elif name in batch_rows:
            param.requires_grad_(True)
            result.partial[name] = n_reference_batches
            param.register_hook(_row_hook(result, param, n_reference_batches))
            continue
        else:
            wholly = unfreeze_bn and _is_norm_param(name, modules) and not name.startswith(LABEL_MODULES)
        param.requires_grad_(wholly)
        (result.trainable if wholly else result.frozen).append(name)
    for name, module in modules.items():
        if isinstance(module, nn.BatchNorm1d):
            keep_training = config.unfrozen == "all" or (unfreeze_bn and not name.startswith(LABEL_MODULES))
            if not keep_training:
                module.__class__ = FrozenBatchNorm1d  # same state dict; mode pinned to eval
                module.eval()
                result.frozen_batchnorms.append(name)
        elif isinstance(module, Dropout) and not config.dropout:
            module.p = 0.0
    return result
