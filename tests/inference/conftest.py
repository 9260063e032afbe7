"""A small simulated store and a tiny model trained on it, shared by the inference tests (built once)."""

import pytest
import torch

from streamtotal.cli.simulate_cmd import write_simulation
from streamtotal.config import DataConfig, RunConfig, TrainConfig
from streamtotal.model.config import ModelConfig
from streamtotal.simulate import CiteSimulator, SimulationConfig
from streamtotal.training.run_dir import load_trained
from streamtotal.training.trainer import Trainer

SMALL = SimulationConfig(n_cells=500, n_genes=40, n_proteins=6, n_cell_types=3, n_batches=2, n_missing_proteins=2,
                         block_cells=250, seed=3)


@pytest.fixture(autouse=True)
def single_torch_thread(one_torch_thread):
    """Every test here runs on one torch thread (``one_torch_thread`` in tests/conftest.py)."""


@pytest.fixture(scope="session")
def small_store(tmp_path_factory):
    """A real Zarr store of a small two-batch simulation whose last batch lacks two proteins (read-only)."""
    path = tmp_path_factory.mktemp("stores") / "small.zarr"
    write_simulation(CiteSimulator(SMALL), path, progress=False)
    return path


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, small_store):
    """A run directory with a tiny model trained for one epoch on ``small_store``."""
    run = tmp_path_factory.mktemp("runs") / "run"
    config = RunConfig(
        data=DataConfig(stores=(str(small_store),), batch_key="batch"),
        model=ModelConfig(n_latent=4, n_hidden=32),
        train=TrainConfig(max_epochs=1, batch_size=128, chunk_size=16, io_chunks=4, seed=1, progress=False,
                          checkpoint_every_steps=1000),
    )
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Trainer(config, run).fit()
    finally:
        torch.set_num_threads(previous)
    return run


@pytest.fixture(scope="session")
def trained(trained_run):
    """The trained model (eval mode, CPU)."""
    return load_trained(trained_run)
