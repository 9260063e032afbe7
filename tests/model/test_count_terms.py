"""The table lookup of the NB count terms against lgamma / digamma computed directly."""

import numpy as np
import pytest
import torch

from streamtotal.model.count_terms import TABLE_WIDTH, CountTerms


def _counts(seed: int, high: float) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    x = rng.negative_binomial(0.5, 0.5 / (0.5 + rng.uniform(0.1, high, size=(17, 23))))
    x[0, :] = 0  # a cell without counts
    x[1, 0] = TABLE_WIDTH - 1  # the last tabled count
    if high > 100:
        x[1, 1] = TABLE_WIDTH  # the first computed one
    else:
        x = np.minimum(x, TABLE_WIDTH - 1)  # all from the table
    return torch.tensor(x, dtype=torch.float32)


@pytest.mark.parametrize("high", [3.0, 400.0])
def test_table_and_exact_counts_match_lgamma_and_digamma(high):
    x = _counts(0, high)
    theta = torch.tensor(np.random.default_rng(1).lognormal(0.0, 1.5, size=23), dtype=torch.float32)
    terms = CountTerms.build(x, theta)
    xd, td = x.double(), theta.double()
    expected_c = (torch.lgamma(xd + td) - torch.lgamma(td) - torch.lgamma(xd + 1.0)).sum(1)
    expected_d = torch.digamma(xd + td) - torch.digamma(td)
    torch.testing.assert_close(terms.log_coefficient.double(), expected_c, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(terms.digamma_difference().double(), expected_d, rtol=1e-6, atol=1e-6)
    assert bool((x >= TABLE_WIDTH).any()) == (high > 100)  # both paths: table only, table + computed


def test_lookup_is_declined_where_it_does_not_apply():
    x, theta = _counts(2, 10.0), torch.ones(23)
    assert CountTerms.build(x + 0.5, theta) is None  # not counts
    assert CountTerms.build(-x - 1.0, theta) is None  # negative
    assert CountTerms.build(x, torch.ones(17, 23)) is None  # theta per cell


def test_column_major_counts_give_the_same_terms():
    x, theta = _counts(3, 400.0), torch.rand(23) + 0.5
    column_major = x.t().contiguous().t()
    a, b = CountTerms.build(x, theta), CountTerms.build(column_major, theta)
    assert torch.equal(a.log_coefficient, b.log_coefficient)
    assert torch.equal(a.digamma_difference(), b.digamma_difference())
