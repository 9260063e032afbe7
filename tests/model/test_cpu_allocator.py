"""Tests of streamtotal.model.cpu_allocator (glibc malloc tuning for CPU training; its speed effect is measured by
benchmarks/train_throughput.py, not here)."""

import platform

import pytest

from streamtotal.model.cpu_allocator import retain_freed_memory


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_glibc_accepts_every_setting():
    assert retain_freed_memory()
    assert retain_freed_memory()
