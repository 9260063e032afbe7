"""No side effects in a notebook: library code neither prints nor changes process-wide settings (the glibc
allocator tuning is the CLI's, or the caller's on request), and the CLI still shows the library's reports (on
stderr) and still tunes the allocator for training."""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from streamtotal.cli.main import main
from streamtotal.config import DataConfig, RunConfig, TrainConfig
from streamtotal.model.config import ModelConfig
from streamtotal.training.trainer import Trainer

PROBE = Path(__file__).with_name("allocator_probe.py")
glibc_only = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="observes glibc's malloc")


def _probe(mode: str, store: Path, run_dir: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(PROBE), mode, str(store), str(run_dir)], env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@glibc_only
def test_building_a_trainer_leaves_the_allocator_alone(small_store, tmp_path):
    result = _probe("library", small_store, tmp_path / "run")
    assert result["baseline_mmapped"]  # the probe's pinned threshold: a 4 MiB block is mmapped
    assert result["mmapped_after"], "Trainer changed glibc's mmap threshold (retain_freed_memory in library code)"


@glibc_only
def test_cli_train_still_tunes_the_allocator(small_store, tmp_path):
    result = _probe("cli", small_store, tmp_path / "run")
    assert result["baseline_mmapped"]
    assert not result["mmapped_after"], "streamtotal train no longer keeps freed memory in the heap"
    assert (tmp_path / "run" / "model.pt").is_file()


def test_building_a_trainer_prints_nothing(small_store, tmp_path, capsys, one_torch_thread):
    config = RunConfig(data=DataConfig(stores=(str(small_store),), batch_key="batch"),
                       model=ModelConfig(n_latent=4, n_hidden=16),
                       train=TrainConfig(max_epochs=1, batch_size=64, progress=False, device="cpu"))
    Trainer(config, tmp_path / "run")
    assert capsys.readouterr().out == ""


def test_cli_shows_library_log_records_on_stderr(capsys):
    """The CLI's handler writes the library's INFO and WARNING records to (the current) stderr, keeping stdout for
    the command's own output; a logger outside ``streamtotal`` is not touched."""
    assert main(["config"]) == 0  # any command: the handler is installed before it runs
    capsys.readouterr()
    logging.getLogger("streamtotal.surgery.map_query").info("streamtotal map: new batches ['q']")
    logging.getLogger("streamtotal.loaders.publish_journal").warning("store.zarr: completing the publication")
    logging.getLogger("somebody_else").info("not ours")
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "streamtotal map: new batches ['q']\nstore.zarr: completing the publication\n"
    assert logging.getLogger("somebody_else").level == logging.NOTSET
