"""Run in a fresh process by test_process_settings.py: does building a Trainer (``library``) or running
``streamtotal train`` (``cli``) change glibc's malloc settings?

glibc has no getter for ``mallopt``, so the probe observes its effect: it pins the mmap threshold at 256 KiB,
does the work, then allocates 4 MiB and asks ``mallinfo2`` whether that block came from a fresh ``mmap``
(threshold still 256 KiB) or from the heap (threshold raised to 32 MiB by ``retain_freed_memory``). Prints one
JSON object; nothing else is written to stdout by the probe itself.

Usage: python allocator_probe.py {library,cli} STORE RUN_DIR
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import sys

_M_MMAP_THRESHOLD = -3
BLOCK = 4 * 1024 * 1024


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    libc.mallinfo2.restype = _MallInfo2
    libc.malloc.argtypes, libc.malloc.restype = [ctypes.c_size_t], ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    return libc


def block_is_mmapped(libc: ctypes.CDLL) -> bool:
    """Whether a fresh 4 MiB allocation is served by mmap (i.e. the mmap threshold is below 4 MiB)."""
    before = libc.mallinfo2().hblkhd
    pointer = libc.malloc(BLOCK)
    after = libc.mallinfo2().hblkhd
    libc.free(pointer)
    return after - before >= BLOCK


def main(mode: str, store: str, run_dir: str) -> dict:
    libc = _libc()
    assert libc.mallopt(_M_MMAP_THRESHOLD, 256 * 1024) == 1
    baseline = block_is_mmapped(libc)
    if mode == "library":
        from streamtotal.config import DataConfig, RunConfig, TrainConfig
        from streamtotal.model.config import ModelConfig
        from streamtotal.training.trainer import Trainer

        config = RunConfig(data=DataConfig(stores=(store,), batch_key="batch"),
                           model=ModelConfig(n_latent=4, n_hidden=16),
                           train=TrainConfig(max_epochs=1, batch_size=64, progress=False, device="cpu"))
        Trainer(config, run_dir)
    else:
        from streamtotal.cli.main import main as cli

        status = cli(["train", store, "--out", run_dir, "--batch-key", "batch", "--epochs", "1", "--n-latent", "4",
                      "--n-hidden", "16", "--batch-size", "64", "--device", "cpu", "--no-progress"])
        assert status == 0, status
    return {"baseline_mmapped": baseline, "mmapped_after": block_is_mmapped(libc)}


if __name__ == "__main__":
    result = main(*sys.argv[1:4])
    print(json.dumps(result))
