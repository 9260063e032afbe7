"""Small simulated AnnData, MuData and a Zarr store for the Python API tests (tiny models, a few epochs)."""

import pytest

from streamtotal.simulate import CiteSimulator, SimulationConfig
from streamtotal.simulate_writer import write_simulation

SMALL = SimulationConfig(n_cells=360, n_genes=30, n_proteins=6, n_cell_types=3, n_batches=3, n_missing_proteins=1,
                         block_cells=360, seed=5)
"""Three contiguous batches (the last lacks one protein): batches 0-1 are the reference, batch 2 a query."""

TINY = dict(n_latent=4, n_hidden=16)
"""Architecture keywords of every test model."""

FAST = dict(batch_size=64, progress=False)
"""Training keywords of every test run."""


@pytest.fixture(autouse=True)
def single_torch_thread(one_torch_thread):
    """Every test here runs on one torch thread (``one_torch_thread`` in tests/conftest.py)."""


@pytest.fixture(scope="session")
def simulation():
    return CiteSimulator(SMALL)


@pytest.fixture
def adata(simulation):
    """A fresh in-memory AnnData of the whole simulation (tests may set it up and modify it)."""
    return simulation.to_anndata()


@pytest.fixture(scope="session")
def store(tmp_path_factory, simulation):
    """A real Zarr store of the simulation (read-only: copy it before writing into it)."""
    path = tmp_path_factory.mktemp("api-stores") / "small.zarr"
    write_simulation(simulation, path, progress=False)
    return path
