"""Shared settings of the model tests."""

import pytest


@pytest.fixture(autouse=True)
def single_torch_thread(one_torch_thread):
    """Every test here runs on one torch thread (``one_torch_thread`` in tests/conftest.py)."""
