"""Training through the Python API leaves the caller's global random generators as it found them.

The Trainer seeds Python's, numpy's and torch's global generators from ``train.seed`` (the data order, dropout
and validation split must be a function of the seed for exact resume). In a notebook those generators are the
user's too: without this, ``model.train()`` would silently reseed them.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch


@contextmanager
def preserved_global_rng() -> Iterator[None]:
    """Restores Python's, numpy's and torch's (CPU and CUDA) global generator states on exit, however it exits."""
    py, npy, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
