"""Tests of loaders.collection: alignment by name, masks, covariates, registry queries, reads."""

import json

import numpy as np
import pytest
import scipy.sparse as sp

from loaders.array_source import ArraySource
from loaders.collection import Collection
from loaders.errors import AlignmentError, AlignmentWarning, InvalidCountsError, InvalidIdsError, StoreFormatError
from loaders.registry import Registry


def make_source(name, genes, proteins, n=30, seed=0, obs=None, **kw):
    rng = np.random.default_rng(seed)
    rna = sp.random(n, len(genes), density=0.5, format="csr", random_state=seed, dtype=np.float32)
    rna.data = np.ceil(rna.data * 20)
    protein = rng.poisson(30, size=(n, len(proteins))).astype(np.float32) + 1  # never a true zero
    return ArraySource(name, rna, protein, genes, proteins, obs=obs, **kw)


def dense(src):
    rows = src.read(np.arange(src.n_obs))
    return rows.rna.toarray(), rows.protein


GENES_A = [f"g{i}" for i in range(10)]
GENES_B = ["x1"] + [f"g{i}" for i in range(9, 1, -1)]  # g9..g2 reversed plus an extra gene
PROT_A = ["CD3", "CD4", "CD8", "CD19", "CD56"]
PROT_B = ["CD8", "CD3", "CD4", "CD27"]                 # lacks CD19 and CD56, has CD27


@pytest.fixture
def two_studies():
    a = make_source("A", GENES_A, PROT_A, n=30, seed=1, obs={"batch": np.repeat(["r1", "r2"], 15),
                                                            "ct": np.array(["T", "B", "unlabeled"] * 10)})
    b = make_source("B", GENES_B, PROT_B, n=20, seed=2, obs={"batch": np.repeat(["r1"], 20)})
    return a, b


def test_inner_alignment_by_name(two_studies):
    a, b = two_studies
    with pytest.warns(AlignmentWarning, match="study 'B' has no obs column 'ct'"):
        col = Collection([a, b], batch_key="batch", labels_key="ct")
    reg = col.registry
    assert reg.gene_names == tuple(f"g{i}" for i in range(2, 10))            # first study's order
    assert reg.protein_names == ("CD3", "CD4", "CD8", "CD19", "CD56", "CD27")  # union, first appearance
    assert reg.batch_categories == ("A/r1", "A/r2", "B/r1")                  # prefixed: never collide
    assert reg.label_categories == ("B", "T") and reg.unlabeled_category == "unlabeled"
    assert np.array_equal(reg.study_protein_masks, [[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 1]])
    assert col.n_obs == 50

    ids = np.array([0, 7, 29, 30, 41, 49])
    batch = col.read(ids)
    assert np.array_equal(batch.cell_id.numpy(), ids)
    assert batch.rna.dtype.is_floating_point and batch.rna.shape == (6, 8)
    a_rna, a_prot = dense(a)
    b_rna, b_prot = dense(b)
    for row, gid in enumerate(ids):
        src, genes, prots, rna, prot, local = (
            (a, GENES_A, PROT_A, a_rna, a_prot, gid) if gid < 30 else (b, GENES_B, PROT_B, b_rna, b_prot, gid - 30)
        )
        for g, name in enumerate(reg.gene_names):
            assert batch.rna[row, g] == rna[local, genes.index(name)]
        for t, name in enumerate(reg.protein_names):
            measured = name in prots
            assert bool(batch.protein_mask[row, t]) == measured
            assert batch.protein[row, t] == (prot[local, prots.index(name)] if measured else 0)
    assert batch.batch.tolist() == [0, 0, 1, 2, 2, 2]
    assert batch.label.tolist() == [1, 0, -1, -1, -1, -1]  # row 0 "T", 7 "B", 29 "unlabeled", B has no "ct"


def test_outer_join_zero_fills(two_studies):
    a, b = two_studies
    col = Collection([a, b], gene_join="outer")
    assert col.registry.gene_names == tuple(GENES_A) + ("x1",)
    batch = col.read(np.arange(50))
    x1 = col.registry.gene_names.index("x1")
    assert (batch.rna[:30, x1] == 0).all() and (batch.rna[30:, x1] > 0).any()
    assert (batch.rna[30:, :2] == 0).all()  # g0, g1 not measured in B
    assert batch.batch.tolist() == [0] * 30 + [1] * 20  # no batch_key: one batch per study
    assert (batch.label == -1).all()


def test_refuses_study_without_shared_genes(two_studies):
    a, _ = two_studies
    c = make_source("C", ["h1", "h2"], PROT_A)
    with pytest.raises(AlignmentError, match=r"study 'C' shares no genes.*0 of 10"):
        Collection([a, c])


def test_refuses_study_below_overlap(two_studies):
    a, _ = two_studies
    c = make_source("C", ["g0", "g1", "g2", "z"], PROT_A)
    with pytest.raises(AlignmentError, match=r"study 'C' shares 3 of 10 genes.*\(30\.0%\).*min_gene_overlap=50\.0%"):
        Collection([a, c])
    assert Collection([a, c], min_gene_overlap=0.3).registry.gene_names == ("g0", "g1", "g2")


def test_outer_join_refuses_a_study_sharing_no_gene_even_at_half_the_union(two_studies):
    a, _ = two_studies
    disjoint = make_source("D", [f"h{i}" for i in range(10)], PROT_A)  # measures 50% of the union: passed before
    with pytest.raises(AlignmentError, match=r"study 'D' shares no genes with the other studies.*0 of 10"):
        Collection([a, disjoint], gene_join="outer")


def test_outer_join_measures_sharing_against_the_smaller_gene_list(two_studies):
    a, _ = two_studies
    panel = make_source("P", ["g0", "g1", "g2", "g3", "g4", "g5"], PROT_A)  # inside A: fully shared, 60% of union
    assert Collection([a, panel], gene_join="outer").registry.gene_names == tuple(GENES_A)
    partly = make_source("Q", ["g0", "g1", "g2", "z0", "z1", "z2", "z3", "z4"], PROT_A)  # 3 of its 8 shared
    with pytest.raises(AlignmentError, match=r"study 'Q' shares 3 of 8 genes with the other studies.*\(37\.5%\)"):
        Collection([a, partly], gene_join="outer")
    assert len(Collection([a, partly], gene_join="outer", min_gene_overlap=0.35).registry.gene_names) == 15


def test_protein_panels_within_a_study():
    panels = np.array([[True, True, True], [True, False, True]])
    src = make_source("P", GENES_A, ["CD3", "CD4", "CD8"], n=10, protein_panels=panels,
                      protein_panel_codes=np.arange(10) % 2)
    batch = Collection([src]).read(np.arange(10))
    assert batch.protein_mask[:, 1].tolist() == [True, False] * 5
    assert (batch.protein[1::2, 1] == 0).all() and (batch.protein[0::2, 1] > 0).all()


def test_align_onto_registry(two_studies):
    a, b = two_studies
    reg = Collection([a, b], batch_key="batch").registry
    genes = ["g3", "g2", "new1"] + [f"g{i}" for i in range(5, 10)]  # lacks g4, has an extra gene
    q = make_source("Q", genes, ["CD3", "CD19", "CD99"], n=12, seed=5, obs={"batch": np.repeat(["s"], 12)})
    with pytest.raises(AlignmentError, match=r"batch values \['Q/s'\].*allow_new_batches=True"):
        with pytest.warns(AlignmentWarning):
            Collection([q], registry=reg)
    with pytest.warns(AlignmentWarning, match=r"study 'Q': dropping 1 proteins not in the registry: \['CD99'\]"):
        col = Collection([q], registry=reg, allow_new_batches=True)
    assert col.registry.gene_names == reg.gene_names and col.registry.protein_names == reg.protein_names
    assert col.registry.batch_categories == reg.batch_categories + ("Q/s",)
    assert col.registry.study_names == ("A", "B", "Q")
    batch = col.read(np.arange(12))
    q_rna, q_prot = dense(q)
    g4 = reg.gene_names.index("g4")
    assert (batch.rna[:, g4] == 0).all()
    for name in ("g2", "g3", "g9"):
        assert np.array_equal(batch.rna[:, reg.gene_names.index(name)].numpy(), q_rna[:, genes.index(name)])
    assert batch.protein_mask[0].tolist() == [True, False, False, True, False, False]
    assert np.array_equal(batch.protein[:, reg.protein_names.index("CD19")].numpy(), q_prot[:, 1])
    assert (batch.batch == len(reg.batch_categories)).all()


def test_registry_query_reuses_training_categories(two_studies):
    a, b = two_studies
    train = Collection([a, b], batch_key="batch")
    # Reading one training study alone onto the registry keeps its (prefixed) batch codes.
    again = Collection([b], registry=train.registry)
    assert again.registry == train.registry
    assert np.array_equal(again.batch_codes, train.batch_codes[30:])


def test_registry_query_refuses_low_gene_overlap(two_studies):
    a, b = two_studies
    reg = Collection([a, b]).registry
    q = make_source("Q", ["g2", "g3", "zz"], PROT_A)
    with pytest.raises(AlignmentError, match=r"study 'Q' shares 2 of 8 genes with the registry's genes \(25\.0%\)"):
        Collection([q], registry=reg)


def test_unknown_labels_on_registry_and_missing_label_column(two_studies):
    a, b = two_studies
    with pytest.warns(AlignmentWarning, match="study 'B' has no obs column 'ct'"):
        reg = Collection([a, b], labels_key="ct").registry
    q = make_source("A", GENES_A, PROT_A, n=3, obs={"ct": np.array(["T", "NK", "unlabeled"])})
    with pytest.raises(AlignmentError, match=r"labels \['NK'\]"):
        Collection([q], registry=reg, labels_key="ct")


def test_a_labels_key_no_study_has_is_refused(two_studies):
    a, b = two_studies
    with pytest.raises(StoreFormatError, match=r"labels key 'celltype': no study has this obs column \(studies "
                                               r"\['A', 'B'\]\); their columns are \['batch', 'ct'\]"):
        Collection([a, b], labels_key="celltype")


def test_read_refuses_bad_ids_and_bad_counts(two_studies):
    a, b = two_studies
    col = Collection([a, b])
    with pytest.raises(InvalidIdsError, match="sorted"):
        col.read(np.array([5, 2]))
    with pytest.raises(InvalidIdsError, match=r"\[0, 50\)"):
        col.read(np.array([49, 50]))
    b._protein[3, 1] = np.inf  # storage went bad after the source was built
    with pytest.raises(InvalidCountsError, match=r"study 'B'.*cell 33 \(local id 3\), column 'CD3'"):
        col.read(np.array([1, 33]))


def test_read_aligned_keeps_rna_sparse(two_studies):
    a, b = two_studies
    col = Collection([a, b])
    rows = col.read_aligned(np.array([3, 31]))
    assert sp.issparse(rows.rna) and rows.rna.shape == (2, 8)
    assert np.array_equal(rows.to_citebatch().rna.numpy(), col.read(np.array([3, 31])).rna.numpy())
    assert col.read(np.array([], dtype=np.int64)).rna.shape == (0, 8)


def test_registry_round_trip_through_collection(two_studies):
    with pytest.warns(AlignmentWarning):
        reg = Collection(list(two_studies), batch_key="batch", labels_key="ct").registry
    back = Registry.from_dict(json.loads(json.dumps(reg.to_dict())))
    assert back == reg
    assert (back.n_genes, back.n_proteins, back.n_batch, back.n_labels) == (8, 6, 3, 2)


def test_duplicate_study_names_refused(two_studies):
    a, _ = two_studies
    with pytest.raises(AlignmentError, match="study names must be unique"):
        Collection([a, a])


def test_batch_and_label_columns_of_any_kind():
    obs = {"run": np.array([2, 1, 2, 1]), "ct": np.array(["T", None, "", "unlabeled"], dtype=object)}
    col = Collection([make_source("S", GENES_A, PROT_A, n=4, obs=obs)], batch_key="run", labels_key="ct")
    assert col.registry.batch_categories == ("1", "2")  # one study: no prefix; numbers read as their text
    assert col.batch_codes.tolist() == [1, 0, 1, 0]
    assert col.registry.label_categories == ("T",) and col.label_codes.tolist() == [0, -1, -1, -1]
    bad = make_source("S", GENES_A, PROT_A, n=4, obs={"run": np.array(["a", None, "b", "a"], dtype=object)})
    with pytest.raises(AlignmentError, match=r"study 'S': obs column 'run' is missing at cell 1 \(1 cells"):
        Collection([bad], batch_key="run")
    with pytest.raises(StoreFormatError, match=r"study 'S': no obs column 'donor'; columns are \['run'\]"):
        Collection([bad], batch_key="donor")


def test_obs_frame_joins_the_studies_columns_and_names(two_studies):
    a, b = two_studies
    obs = Collection([a, b]).obs_frame()
    assert obs.shape[0] == 50 and list(obs.columns) == ["batch", "ct", "study"]
    assert list(obs["study"][[0, 30]]) == ["A", "B"] and obs["ct"].iloc[31] == ""  # B has no ct column
    assert str(obs["batch"].dtype) == "category"
    # Both studies name their cells "0", "1", ...: the names are made unique with the study.
    assert list(obs.index[[0, 30]]) == ["A:0", "B:0"]
    named = make_source("C", GENES_A, PROT_A, n=3, obs={"_study": np.array(["C"] * 3)},
                        obs_names=["x", "y", "z"])
    obs = Collection([named]).obs_frame()
    assert list(obs.index) == ["x", "y", "z"] and list(obs.columns) == ["study"]  # "_" columns left out
