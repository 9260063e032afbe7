"""A run trained on ``small_store`` (tests/conftest.py; built once), and a runner of the real command line."""

import os
import subprocess
import sys

import pytest

from streamtotal.config import DataConfig, RunConfig, TrainConfig
from streamtotal.model.config import ModelConfig
from streamtotal.training.trainer import Trainer


@pytest.fixture(autouse=True)
def single_torch_thread(one_torch_thread):
    """Every test here runs on one torch thread (``one_torch_thread`` in tests/conftest.py)."""


def _run_config(store, **changes) -> RunConfig:
    train = dict(max_epochs=2, batch_size=64, chunk_size=16, io_chunks=4, checkpoint_every_steps=3, seed=5,
                 progress=False, log_every_steps=2)
    train.update(changes)
    return RunConfig(data=DataConfig(stores=(str(store),), batch_key="batch"),
                     model=ModelConfig(n_latent=4, n_hidden=32), train=TrainConfig(**train))


@pytest.fixture(scope="session")
def run_config():
    """``run_config(store, **train_changes)``: the config of ``trained_run`` (10 steps an epoch, a checkpoint every
    3 steps, two epochs), with changes to [train]."""
    return _run_config


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, small_store):
    """A finished two-epoch run of ``run_config`` on ``small_store``: model.pt and its two newest checkpoints
    (read-only: tests copy it before changing it)."""
    import torch

    run = tmp_path_factory.mktemp("runs") / "run"
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Trainer(_run_config(small_store), run).fit()
    finally:
        torch.set_num_threads(previous)
    return run


@pytest.fixture(scope="session")
def cli():
    """Runs ``python -m streamtotal ARGS...`` as a real process; returns the CompletedProcess (text output)."""

    def run(*args, cwd=None):
        return subprocess.run([sys.executable, "-m", "streamtotal", *map(str, args)], cwd=cwd,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)

    return run
