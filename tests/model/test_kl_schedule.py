"""The KL warm-up always finishes at its planned fraction of the run, whatever the run length."""

from __future__ import annotations

import math

import pytest

from streamtotal.errors import ConfigError
from streamtotal.model.kl_schedule import TOTALVI_WARMUP_FRACTION, kl_weight


@pytest.mark.parametrize("total_steps", [1, 2, 3, 4, 10, 997, 10**6, 10**9, 10**12])
@pytest.mark.parametrize("fraction", [0.1, 0.5, TOTALVI_WARMUP_FRACTION, 1.0])
def test_reaches_max_weight_at_the_planned_fraction(total_steps, fraction):
    end = math.floor(fraction * total_steps)  # the warm-up's last step is at or before the planned fraction
    assert kl_weight(end, total_steps, fraction, max_weight=0.8) == 0.8
    assert kl_weight(10 * total_steps, total_steps, fraction, max_weight=0.8) == 0.8  # stays there
    if end > 0:
        assert kl_weight(end - 1, total_steps, fraction, max_weight=0.8) < 0.8
        assert kl_weight(0, total_steps, fraction) == 0.0
    if fraction < 1.0:
        assert kl_weight(total_steps - 1, total_steps, fraction) == 1.0  # the run ends on the full ELBO


def test_is_linear_and_monotone_during_warmup():
    weights = [kl_weight(s, 1000, 0.5) for s in range(1000)]
    assert all(a <= b for a, b in zip(weights, weights[1:]))
    assert weights[250] == pytest.approx(0.5)
    assert kl_weight(100, 1000, 0.5, max_weight=2.0, min_weight=1.0) == pytest.approx(1.2)


def test_on_a_million_cell_run_the_weight_is_full_at_the_end():
    # 1M cells, batch 256, scvi-tools' epoch rule (8 epochs) -> ~31k steps; scvi-tools would warm up over 750k
    total = 8 * math.ceil(1_000_000 / 256)
    assert kl_weight(total - 1, total) == 1.0
    assert kl_weight(total // 10, total) == pytest.approx((total // 10) / math.floor(0.15 * total))
    assert kl_weight(total // 2, total, 0.75) == pytest.approx((total // 2) / math.floor(0.75 * total))


def test_no_warmup_gives_max_weight_from_the_first_step():
    assert kl_weight(0, 100, 0.0) == 1.0


@pytest.mark.parametrize(
    "kwargs",
    [dict(step=-1, total_steps=10), dict(step=0, total_steps=0), dict(step=0, total_steps=10, warmup_fraction=1.5),
     dict(step=0, total_steps=10, max_weight=0.0), dict(step=0, total_steps=10, min_weight=2.0)],
)
def test_rejects_invalid_arguments(kwargs):
    with pytest.raises(ConfigError):
        kl_weight(**kwargs)
