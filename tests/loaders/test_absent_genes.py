"""Genes a study did not measure: flagged in ``CiteBatch.rna_mask`` (``absent_genes="mask"``), or read as zeros."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from loaders.array_source import ArraySource
from loaders.collection import Collection
from loaders.errors import ConfigError
from loaders.registry import Registry
from loaders.stream import Stream, StreamConfig

GENES_A = [f"g{i}" for i in range(10)]
GENES_B = ["x1"] + [f"g{i}" for i in range(9, 1, -1)]  # lacks g0, g1; adds x1
PROTEINS = ["CD3", "CD4", "CD8"]


def _source(name, genes, n, seed):
    rng = np.random.default_rng(seed)
    rna = sp.csr_matrix((rng.poisson(2.0, (n, len(genes))) + 1).astype(np.float32))  # no true zero anywhere
    protein = rng.poisson(30, (n, len(PROTEINS))).astype(np.float32) + 1
    return ArraySource(name, rna, protein, genes, PROTEINS)


@pytest.fixture
def studies():
    return _source("A", GENES_A, 30, 1), _source("B", GENES_B, 20, 2)


def test_outer_join_flags_each_study_s_absent_genes(studies):
    col = Collection(list(studies), gene_join="outer")
    genes = list(col.registry.gene_names)
    assert genes == GENES_A + ["x1"]
    expected = np.ones((2, len(genes)), dtype=bool)
    expected[0, genes.index("x1")] = False
    expected[1, [genes.index("g0"), genes.index("g1")]] = False
    np.testing.assert_array_equal(col.study_gene_masks, expected)

    batch = col.read(np.arange(50))
    assert batch.rna_mask.dtype == torch.bool and batch.rna_mask.shape == batch.rna.shape
    np.testing.assert_array_equal(batch.rna_mask.numpy(), expected[[0] * 30 + [1] * 20])
    # The flags mark exactly the zero-filled entries: every measured count here is >= 1.
    assert torch.equal(batch.rna > 0, batch.rna_mask)


def test_fully_measured_batches_and_zero_mode_carry_no_mask(studies):
    a, b = studies
    assert Collection([a, a.__class__("A2", a.read(np.arange(30)).rna, a.read(np.arange(30)).protein, GENES_A,
                                      PROTEINS)]).read(np.arange(60)).rna_mask is None  # inner join: nothing absent
    col = Collection([a, b], gene_join="outer", absent_genes="zero")
    assert col.read(np.arange(50)).rna_mask is None
    # Study A lacks only x1; with "mask", a batch of A's cells alone still carries its mask.
    masked = Collection([a, b], gene_join="outer")
    assert masked.read(np.arange(5)).rna_mask is not None
    with pytest.raises(ConfigError, match="absent_genes must be one of"):
        Collection([a, b], gene_join="outer", absent_genes="impute")


def test_query_on_a_registry_flags_the_reference_genes_it_lacks(studies):
    a, b = studies
    reference = Collection([a]).registry
    query = Collection([b], registry=Registry.from_dict(reference.to_dict()), min_gene_overlap=0.5,
                       allow_new_batches=True)
    batch = query.read(np.arange(20))
    lacks = [GENES_A.index("g0"), GENES_A.index("g1")]
    assert not batch.rna_mask[:, lacks].any() and batch.rna_mask.sum() == 20 * 8
    # A query holding every reference gene has no mask.
    assert Collection([a], registry=reference).read(np.arange(30)).rna_mask is None


def test_stream_batches_carry_the_mask_of_their_cells_and_resume_exactly(studies):
    col = Collection(list(studies), gene_join="outer")
    config = StreamConfig(batch_size=8, chunk_size=4, io_chunks=2, seed=3, prefetch_batches=1)
    stream = Stream(col, np.arange(col.n_obs), config)
    stream.set_epoch(1)
    batches = list(stream)
    for b in batches:
        study = col.study_codes(b.cell_id.numpy())
        np.testing.assert_array_equal(b.rna_mask.numpy(), col.study_gene_masks[study])
    stream.set_start_batch(3)
    resumed = list(stream)
    assert len(resumed) == len(batches) - 3
    for a, b in zip(batches[3:], resumed):
        assert torch.equal(a.cell_id, b.cell_id) and torch.equal(a.rna_mask, b.rna_mask)
