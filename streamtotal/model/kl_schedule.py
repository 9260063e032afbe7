"""The KL warm-up schedule, as a fraction of the planned number of steps.

scvi-tools TOTALVI warms up over ``0.75 * n_obs`` *steps*; its step count does not grow with the data the
way the number of cells does, so on a 1M-cell run the weight is still ~0.04 when training ends (DESIGN.md
section 3). Tying the warm-up to the planned total steps makes it finish at the same point of every run,
whatever the data size, batch size, number of epochs or number of processes.
"""

from __future__ import annotations

import math

from streamtotal.errors import ConfigError

TOTALVI_WARMUP_FRACTION = 0.15
"""totalVI's default warm-up length as a fraction of the planned steps (``TrainConfig.kl_warmup_fraction`` unset).
For reference, scvi-tools' rule on the data sizes it was tuned for (<= 20k cells, 400 epochs, batch 256) ends at
~48% of training, and at 40k cells it never ends; a long warm-up keeps the objective away from the ELBO for most
of the run: with this one the ELBO scvi-tools ends at is reached in about a quarter of the epochs
(benchmarks/time_to_quality.py)."""

TOTALANVI_WARMUP_FRACTION = 0.75
"""totalANVI's default: its label classifier transferred labels best with the long warm-up
(benchmarks/label_transfer.py)."""


def kl_weight(
    step: int,
    total_steps: int,
    warmup_fraction: float = TOTALVI_WARMUP_FRACTION,
    max_weight: float = 1.0,
    min_weight: float = 0.0,
) -> float:
    """The KL weight for optimiser step ``step`` (0-based): linear from ``min_weight`` to ``max_weight``.

    The weight reaches ``max_weight`` at step ``floor(warmup_fraction * total_steps)`` and stays there. Rounding
    down means that even a run of a handful of steps finishes its warm-up by the planned fraction (a one-step
    run has none), so with any fraction below 1 the last steps always train the full ELBO.

    Args:
        step: number of optimiser steps already taken (0 for the first step).
        total_steps: planned number of steps of the whole run (epochs x steps per epoch), >= 1.
        warmup_fraction: fraction of ``total_steps`` the warm-up lasts, in [0, 1]; 0 = no warm-up.
        max_weight: final weight (> 0).
        min_weight: weight at step 0, in [0, max_weight].

    Returns:
        The weight, a Python float.

    Raises:
        ConfigError: an argument out of range.
    """
    if total_steps < 1 or step < 0:
        raise ConfigError(f"kl_weight needs total_steps >= 1 and step >= 0; got step={step}, total={total_steps}")
    if not 0.0 <= warmup_fraction <= 1.0:
        raise ConfigError(f"KL warm-up fraction must be in [0, 1], got {warmup_fraction}")
    if not 0.0 <= min_weight <= max_weight or max_weight <= 0.0:
        raise ConfigError(f"KL weights need 0 <= min_weight <= max_weight and max_weight > 0; "
                          f"got {min_weight}, {max_weight}")
    warmup_steps = math.floor(warmup_fraction * total_steps)
    if step >= warmup_steps:
        return float(max_weight)
    return float(min_weight + (max_weight - min_weight) * step / warmup_steps)
