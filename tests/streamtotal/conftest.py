import pytest

from streamtotal.cli.simulate_cmd import write_simulation
from streamtotal.simulate import CiteSimulator, SimulationConfig

SMALL = SimulationConfig(n_cells=700, n_genes=60, n_proteins=8, n_cell_types=3, n_batches=2, n_missing_proteins=2,
                         block_cells=300, seed=1)


@pytest.fixture(scope="session")
def small_sim():
    return CiteSimulator(SMALL)


@pytest.fixture(scope="session")
def small_store(tmp_path_factory, small_sim):
    """A real streamtotal Zarr store of a small simulation (written once per session; tests must not modify it)."""
    path = tmp_path_factory.mktemp("stores") / "small.zarr"
    write_simulation(small_sim, path, progress=False)
    return path
