import numpy as np
import pytest

from streamtotal.errors import ConfigError
from streamtotal.simulate import CiteSimulator, SimulationConfig


def test_simulation_is_deterministic_and_block_size_independent():
    a = CiteSimulator(SimulationConfig(n_cells=500, n_genes=50, n_proteins=8, block_cells=500, seed=3)).to_anndata()
    b = CiteSimulator(SimulationConfig(n_cells=500, n_genes=50, n_proteins=8, block_cells=500, seed=3)).to_anndata()
    assert (a.X != b.X).nnz == 0
    np.testing.assert_array_equal(a.obsm["protein_expression"].to_numpy(), b.obsm["protein_expression"].to_numpy())
    c = CiteSimulator(SimulationConfig(n_cells=500, n_genes=50, n_proteins=8, block_cells=500, seed=4)).to_anndata()
    assert (a.X != c.X).nnz > 0


def test_simulation_has_integer_counts_batches_and_missing_panel():
    cfg = SimulationConfig(n_cells=900, n_genes=60, n_proteins=10, n_batches=3, n_missing_proteins=2, block_cells=250)
    sim = CiteSimulator(cfg)
    adata = sim.to_anndata()
    assert adata.shape == (900, 60)
    x = adata.X.data
    assert np.all(x == np.round(x)) and np.all(x >= 0)
    protein = adata.obsm["protein_expression"].to_numpy()
    last = (adata.obs["batch"] == "batch_2").to_numpy()
    all_zero_in_last = (protein[last] == 0).all(axis=0)
    assert all_zero_in_last.sum() == 2
    assert np.array_equal(all_zero_in_last, sim.truth.missing_proteins)
    assert (protein[~last][:, sim.truth.missing_proteins] > 0).any()
    # batches are contiguous runs of cells
    codes = adata.obs["batch"].cat.codes.to_numpy()
    assert np.all(np.diff(codes) >= 0)


def test_marker_proteins_are_higher_on_their_cell_types():
    sim = CiteSimulator(SimulationConfig(n_cells=3000, n_genes=40, n_proteins=6, n_cell_types=3,
                                         n_missing_proteins=0, n_batches=1))
    adata = sim.to_anndata()
    protein = adata.obsm["protein_expression"].to_numpy()
    types = adata.obs["true_cell_type"].cat.codes.to_numpy()
    for t in range(6):
        on = sim.truth.protein_markers[types, t]
        assert np.median(protein[on, t]) > 3 * np.median(protein[~on, t])


def test_bad_config_is_refused_with_the_field_name():
    with pytest.raises(ConfigError, match="n_missing_proteins"):
        SimulationConfig(n_proteins=4, n_missing_proteins=4)
