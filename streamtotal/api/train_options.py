"""scvi-tools' ``TOTALVI.train(...)`` arguments mapped onto streamtotal's ``TrainConfig`` (and the model's
adversarial classifier, which scvi-tools switches on in ``train``)."""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Any

from streamtotal.config import TrainConfig
from streamtotal.errors import ConfigError
from streamtotal.model.config import ModelConfig

SCVI_EARLY_STOPPING_PATIENCE = 45
"""scvi-tools' TOTALVI.train early-stopping patience (epochs)."""

_PLAN_KEYS = {"lr": "lr", "weight_decay": "weight_decay", "eps": "eps", "reduce_lr_on_plateau": "reduce_lr_on_plateau",
              "lr_factor": "lr_factor", "lr_patience": "lr_patience"}
"""scvi-tools ``plan_kwargs`` keys with a TrainConfig field of the same meaning."""


def device_name(accelerator: str = "auto", devices: Any = "auto") -> str:
    """The ``train.device`` for Lightning-style ``accelerator`` / ``devices``.

    Raises:
        ConfigError: an unknown accelerator, or several devices (multi-GPU runs go through torchrun and the CLI).
    """
    acc = str(accelerator).lower()
    if acc not in ("auto", "cpu", "gpu", "cuda"):
        raise ConfigError(f"accelerator={accelerator!r} is not supported; use 'auto', 'cpu' or 'gpu'")
    if acc == "cpu":
        return "cpu"
    if devices in ("auto", None, 1, -1):
        return "auto" if acc == "auto" else "cuda"
    if isinstance(devices, (list, tuple)) and len(devices) == 1:
        return f"cuda:{int(devices[0])}"
    raise ConfigError(f"devices={devices!r}: one process trains on one device; for several GPUs run "
                      "`torchrun --nproc-per-node N -m streamtotal train ...` on the saved run directory")


def train_config(model: ModelConfig, *, n_cells: int, max_epochs: int | None = None, lr: float | None = None,
                 accelerator: str = "auto", devices: Any = "auto", train_size: float | None = None,
                 validation_size: float | None = None, shuffle_set_split: bool = True,
                 batch_size: int | None = None, early_stopping: bool = True,
                 check_val_every_n_epoch: int | None = None, reduce_lr_on_plateau: bool = True,
                 n_steps_kl_warmup: int | None = None, n_epochs_kl_warmup: int | None = None,
                 adversarial_classifier: bool | None = None, datasplitter_kwargs: dict | None = None,
                 plan_kwargs: dict | None = None, progress: bool = True,
                 **trainer_kwargs: Any) -> tuple[TrainConfig, str, ModelConfig]:
    """The TrainConfig, device and (adversarial) model config of a ``train(...)`` call.

    Args:
        model: the model's config.
        n_cells: cells of the data (for the epoch rule, when the KL warm-up is given in epochs or steps).
        Others: as ``TOTALVI.train``.

    Returns:
        ``(train config, device name, model config)``.

    Raises:
        ConfigError: an unsupported option or value.
    """
    if datasplitter_kwargs:
        raise ConfigError(f"datasplitter_kwargs {sorted(datasplitter_kwargs)} are not supported: the held-out "
                          "cells are drawn from the seed (train_size=, seed=)")
    if not shuffle_set_split:
        raise ConfigError("shuffle_set_split=False is not supported: the held-out cells are drawn from the seed")
    if check_val_every_n_epoch not in (None, 1):
        raise ConfigError(f"check_val_every_n_epoch={check_val_every_n_epoch!r}: validation runs every epoch")
    train_size = 0.9 if train_size is None else float(train_size)
    validation = round(1.0 - train_size, 12)  # 1 - 0.9 is 0.09999999999999998; the CLI's 0.1 must match on resume
    if validation_size is not None and abs(float(validation_size) - validation) > 1e-9:
        raise ConfigError(f"train_size={train_size} with validation_size={validation_size}: a test set is not "
                          "supported; the held-out fraction is 1 - train_size")
    values: dict[str, Any] = {"max_epochs": max_epochs, "batch_size": batch_size, "lr": lr,
                              "validation_fraction": validation, "reduce_lr_on_plateau": reduce_lr_on_plateau,
                              "early_stopping_patience": SCVI_EARLY_STOPPING_PATIENCE if early_stopping else 0,
                              "device": device_name(accelerator, devices), "progress": bool(progress)}
    plan = dict(plan_kwargs or {})
    n_epochs_kl_warmup = plan.pop("n_epochs_kl_warmup", n_epochs_kl_warmup)
    n_steps_kl_warmup = plan.pop("n_steps_kl_warmup", n_steps_kl_warmup)
    own = {f.name for f in fields(TrainConfig)}
    for key, value in plan.items():
        if key not in _PLAN_KEYS and key not in own:
            raise ConfigError(f"plan_kwargs: {key!r} is not supported; streamtotal takes {sorted(_PLAN_KEYS)} "
                              f"and TrainConfig fields ({sorted(own)})")
        values[_PLAN_KEYS.get(key, key)] = value
    for key, value in trainer_kwargs.items():
        if key not in own:
            raise ConfigError(f"train: unknown argument {key!r}; TrainConfig fields are {sorted(own)}")
        values[key] = value
    config = TrainConfig(**values)
    if "log_every_steps" not in values:
        # model.history has one training value per epoch: log at least once an epoch on small data.
        batch = config.resolved_for(model).batch_size
        steps_per_epoch = max(1, int(n_cells * (1 - validation)) // batch)
        config = replace(config, log_every_steps=max(1, min(config.log_every_steps, steps_per_epoch)))
    if n_epochs_kl_warmup is not None or n_steps_kl_warmup is not None:
        epochs = config.epochs_for(int(n_cells * (1 - validation)))
        if n_epochs_kl_warmup is not None:
            fraction = float(n_epochs_kl_warmup) / epochs
        else:
            batch = config.resolved_for(model).batch_size
            steps = epochs * max(1, -(-int(n_cells * (1 - validation)) // batch))
            fraction = float(n_steps_kl_warmup) / steps
        config = replace(config, kl_warmup_fraction=min(1.0, fraction))
    if adversarial_classifier is not None:
        model = replace(model, adversarial_classifier=bool(adversarial_classifier))
    return config, config.device, model
