"""Tests of loaders.count_validation: every kind of bad count is refused with study, cell and column named."""

import numpy as np
import pytest
import scipy.sparse as sp

from loaders.count_validation import all_valid_counts, validate_counts
from loaders.errors import InvalidCountsError

CELLS = [f"cell{i}" for i in range(4)]
GENES = ["CD3E", "MS4A1", "NKG7"]


def _block(value, row=2, col=1, sparse=True):
    dense = np.array([[1, 0, 2], [0, 3, 0], [4, 0, 0], [0, 0, 5]], dtype=np.float32)
    dense[row, col] = value
    return sp.csr_matrix(dense) if sparse else dense


@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize(
    "value, word",
    [(np.nan, "NaN"), (np.inf, "infinite"), (-np.inf, "infinite"), (-1.0, "negative"), (2.5, "not an integer")],
)
def test_refuses_bad_value_naming_study_cell_and_gene(sparse, value, word):
    with pytest.raises(InvalidCountsError) as err:
        validate_counts(
            _block(value, sparse=sparse), study="pbmc", modality="rna", cell_names=CELLS,
            feature_names=GENES, row_offset=100, source_path="/data/pbmc.h5ad",
        )
    msg = str(err.value)
    for part in ("'pbmc'", "/data/pbmc.h5ad", "'cell2'", "index 102", "gene 'MS4A1'", word):
        assert part in msg, (part, msg)


def test_non_integer_allowed_when_not_required_but_nan_and_negative_still_refused():
    validate_counts(_block(2.5), study="s", modality="rna", require_integer=False)
    for bad in (np.nan, -3.0):
        with pytest.raises(InvalidCountsError):
            validate_counts(_block(bad), study="s", modality="rna", require_integer=False)


def test_non_integer_message_says_how_to_allow_it():
    with pytest.raises(InvalidCountsError, match="allow_non_integer=True"):
        validate_counts(_block(0.5), study="s", modality="rna")


def test_first_offending_entry_is_reported_and_all_counted():
    block = _block(-1.0, row=3, col=2, sparse=False)
    block[1, 0] = np.nan
    block = sp.csr_matrix(block)
    with pytest.raises(InvalidCountsError) as err:
        validate_counts(block, study="s", modality="protein", feature_names=["A", "B", "C"], cell_names=CELLS)
    msg = str(err.value)
    assert "'cell1'" in msg and "protein 'A'" in msg and "NaN" in msg and "2 entries" in msg


def test_row_ids_and_callable_cell_names_for_scattered_reads():
    names = {7: "x7", 40: "x40", 41: "x41", 90: "x90"}
    with pytest.raises(InvalidCountsError) as err:
        validate_counts(
            _block(np.nan), study="s", modality="rna", cell_names=names.__getitem__,
            row_ids=np.array([7, 40, 41, 90]), feature_names=GENES,
        )
    assert "'x41' (index 41)" in str(err.value)


def test_valid_blocks_pass():
    validate_counts(_block(7.0), study="s", modality="rna")
    validate_counts(_block(7.0, sparse=False), study="s", modality="protein")
    validate_counts(np.arange(6, dtype=np.int32).reshape(2, 3), study="s", modality="rna")
    validate_counts(sp.csr_matrix((3, 4), dtype=np.float32), study="s", modality="rna")
    validate_counts(np.zeros((0, 3), np.float32), study="s", modality="protein")


def test_other_sparse_formats_are_located_correctly():
    block = sp.coo_matrix(_block(-2.0, row=0, col=2))
    with pytest.raises(InvalidCountsError, match="'cell0'.*gene 'NKG7'"):
        validate_counts(block, study="s", modality="rna", cell_names=CELLS, feature_names=GENES)


@pytest.mark.parametrize("values, expected", [
    (np.array([0, 3, 7], dtype=np.int32), True),
    (np.array([0, -3, 7], dtype=np.int32), False),  # signed integers can be negative
    (np.array([0, 3, 7], dtype=np.uint16), True),
    (np.array([0.0, 2.5], dtype=np.float32), True),
    (np.array([0.0, np.nan], dtype=np.float32), False),
    (np.array([np.inf, 1.0]), False),
    (np.array([-np.inf, 1.0]), False),
    (np.array([-0.5, 1.0]), False),
    (np.zeros(0, dtype=np.float32), True),
])
def test_all_valid_counts_by_reductions(values, expected):
    assert all_valid_counts(values) is expected
    assert all_valid_counts(np.array([1.5], dtype=np.float32), require_integer=True) is False
