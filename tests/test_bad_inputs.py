"""Bad input through the command line, as a real process: each case exits 2 with one message naming what is at
fault, prints no traceback, and leaves every earlier output (h5ad, store, run directory) byte-identical.

The outputs are built once per session (a 200-cell simulation, its store, a 1-epoch run); each case runs one
``python -m streamtotal`` process. The cases of other layers (checkpoints, S3, chunks, denoise) live with their
tests and use the same helpers (tests/bad_input_harness.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch

from bad_input_harness import assert_fails_cleanly, cli_env, make_writable, unwritable_folder
from loaders.ingest import ingest
from loaders.zarr_source import ZarrSource
from streamtotal.config import DataConfig, RunConfig, TrainConfig
from streamtotal.model.config import ModelConfig
from streamtotal.simulate import CiteSimulator, SimulationConfig
from streamtotal.simulate_writer import write_simulation
from streamtotal.training.trainer import Trainer

TRAIN_FLAGS = ("--epochs", "1", "--batch-size", "32", "--n-latent", "2", "--n-hidden", "8", "--no-progress")


@dataclass(frozen=True)
class Outputs:
    """What a user made before the failing command: the files each case must leave as they were."""

    base: Path
    h5ad: Path
    store: Path
    run: Path
    disjoint_store: Path
    """A second study whose genes share no name with ``store``'s."""
    fractional_h5ad: Path
    """Normalised (non-integer) expression where counts belong."""
    a_file: Path
    """A regular file, to put outputs "under"."""

    @property
    def earlier(self) -> tuple[Path, ...]:
        return (self.h5ad, self.store, self.run, self.disjoint_store, self.fractional_h5ad, self.a_file)


@pytest.fixture(scope="session")
def outputs(tmp_path_factory) -> Outputs:
    base = tmp_path_factory.mktemp("bad_inputs")
    sim = CiteSimulator(SimulationConfig(n_cells=200, n_genes=30, n_proteins=5, n_cell_types=3, n_batches=2,
                                         n_missing_proteins=1, block_cells=200, seed=3))
    h5ad, store, run = base / "sim.h5ad", base / "sim.zarr", base / "run"
    write_simulation(sim, h5ad, progress=False)
    ingest(h5ad, store, batch_key="batch", progress=False)
    torch.manual_seed(0)
    Trainer(RunConfig(data=DataConfig(stores=(str(store),), batch_key="batch"),
                      model=ModelConfig(n_latent=2, n_hidden=8),
                      train=TrainConfig(max_epochs=1, batch_size=32, progress=False, validation_fraction=0.0)),
            run).fit()

    adata = ad.read_h5ad(h5ad)
    renamed = adata.copy()
    renamed.var_names = [f"other_{g}" for g in adata.var_names]
    renamed.write_h5ad(base / "other.h5ad")
    ingest(base / "other.h5ad", base / "other.zarr", progress=False)

    fractional = adata.copy()
    fractional.X = fractional.X.astype(np.float32) * 0.37  # what a log-normalised layer looks like
    fractional.write_h5ad(base / "normalised.h5ad")
    (base / "notes.txt").write_text("a file, not a folder\n")
    return Outputs(base=base, h5ad=h5ad, store=store, run=run, disjoint_store=base / "other.zarr",
                   fractional_h5ad=base / "normalised.h5ad", a_file=base / "notes.txt")


@pytest.fixture(scope="session")
def locked_folder(outputs):
    """A folder nothing can be written into (immutable as root, mode 555 otherwise)."""
    folder = unwritable_folder(outputs.base / "locked")
    if folder is None:
        pytest.skip("cannot make a folder unwritable here (root without a working chattr +i)")
    yield folder
    make_writable(folder)


def _cuda_index_absent() -> str:
    return f"cuda:{torch.cuda.device_count() if torch.cuda.is_available() else 3}"


# Each case: (id, args from the outputs, what the message must name, a path that must not appear).
CASES = [
    ("train --out under a file",
     lambda o: ("train", o.store, "--out", o.a_file / "run", *TRAIN_FLAGS), lambda o: ("--out", "notes.txt"),
     lambda o: None),
    ("train --out is a file",
     lambda o: ("train", o.store, "--out", o.a_file, *TRAIN_FLAGS), lambda o: ("--out", "notes.txt", "not a directory"),
     lambda o: None),
    ("ingest --out under a file",
     lambda o: ("ingest", o.h5ad, "--out", o.a_file / "new.zarr", "--no-progress"),
     lambda o: ("--out", "notes.txt"), lambda o: None),
    ("embed --export-h5ad under a file (checked before writing back)",
     lambda o: ("embed", o.run, o.store, "--export-h5ad", o.a_file / "latent.h5ad", "--no-progress"),
     lambda o: ("--export-h5ad", "notes.txt"), lambda o: None),
    ("train --device banana",
     lambda o: ("train", o.store, "--out", o.base / "run-banana", *TRAIN_FLAGS, "--device", "banana"),
     lambda o: ("--device", "'banana'", "'cuda:N'"), lambda o: o.base / "run-banana"),
    ("train --device on a GPU that is not there",
     lambda o: ("train", o.store, "--out", o.base / "run-gpu", *TRAIN_FLAGS, "--device", _cuda_index_absent()),
     lambda o: (f"'{_cuda_index_absent()}'", "CUDA"), lambda o: o.base / "run-gpu"),
    ("embed --device banana",
     lambda o: ("embed", o.run, o.store, "--device", "banana", "--no-progress"),
     lambda o: ("'banana'",), lambda o: None),
    ("denoise --device on a GPU that is not there",
     lambda o: ("denoise", o.run, o.store, "--device", _cuda_index_absent(), "--no-progress"),
     lambda o: (f"'{_cuda_index_absent()}'",), lambda o: None),
    ("train on a store that does not exist",
     lambda o: ("train", o.base / "nowhere.zarr", "--out", o.base / "run-nowhere", *TRAIN_FLAGS),
     lambda o: ("nowhere.zarr",), lambda o: None),
    ("train --batch-key that is no obs column",
     lambda o: ("train", o.store, "--out", o.base / "run-key", *TRAIN_FLAGS, "--batch-key", "donor_id"),
     lambda o: ("'donor_id'", "'sim'"), lambda o: None),
    ("train --totalanvi --labels-key that is no obs column",
     lambda o: ("train", o.store, "--out", o.base / "run-labels", *TRAIN_FLAGS, "--totalanvi", "--labels-key",
                "celltype"), lambda o: ("'celltype'", "no study has"), lambda o: None),
    ("train --config that does not exist",
     lambda o: ("train", o.store, "--out", o.base / "run-config", "--config", o.base / "run.toml"),
     lambda o: ("run.toml",), lambda o: o.base / "run-config"),
    ("train into a finished run without --resume",
     lambda o: ("train", o.store, "--out", o.run, *TRAIN_FLAGS), lambda o: (str(o.run), "--resume"),
     lambda o: None),
    ("train --gene-join outer with a study sharing no gene",
     lambda o: ("train", o.store, o.disjoint_store, "--out", o.base / "run-outer", *TRAIN_FLAGS, "--gene-join",
                "outer"), lambda o: ("study 'other'", "shares no genes"), lambda o: None),
    ("ingest non-integer counts",
     lambda o: ("ingest", o.fractional_h5ad, "--out", o.base / "normalised.zarr", "--no-progress"),
     lambda o: ("normalised.h5ad", "integer"), lambda o: o.base / "normalised.zarr"),
    ("ingest an input that does not exist",
     lambda o: ("ingest", o.base / "missing.h5ad", "--out", o.base / "missing.zarr", "--no-progress"),
     lambda o: ("missing.h5ad",), lambda o: o.base / "missing.zarr"),
    ("ingest --protein-key that is no obsm key",
     lambda o: ("ingest", o.h5ad, "--out", o.base / "adt.zarr", "--protein-key", "adt", "--no-progress"),
     lambda o: ("obsm/adt", "--protein-key"), lambda o: o.base / "adt.zarr"),
    ("ingest over an existing store without --overwrite",
     lambda o: ("ingest", o.h5ad, "--out", o.store, "--no-progress"), lambda o: ("sim.zarr", "--overwrite"),
     lambda o: None),
    ("embed a folder that is no run directory",
     lambda o: ("embed", o.base, o.store, "--no-progress"), lambda o: (str(o.base),), lambda o: None),
    ("embed into a store that does not exist",
     lambda o: ("embed", o.run, o.base / "absent.zarr", "--no-progress"), lambda o: ("absent.zarr",),
     lambda o: o.base / "absent.zarr"),
]


@pytest.mark.parametrize("args, names, not_created", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_fails_cleanly_and_touches_nothing(outputs, args, names, not_created):
    absent = not_created(outputs)
    if absent is not None:
        assert not absent.exists()
    assert_fails_cleanly(args(outputs), names(outputs), outputs.earlier)
    if absent is not None:
        assert not absent.exists(), f"the failed command left {absent} behind"


@pytest.mark.parametrize("command", ["train", "ingest"])
def test_an_unwritable_output_folder_is_named(outputs, locked_folder, command):
    out = locked_folder / ("run" if command == "train" else "new.zarr")
    args = (("train", outputs.store, "--out", out, *TRAIN_FLAGS) if command == "train"
            else ("ingest", outputs.h5ad, "--out", out, "--no-progress"))
    assert_fails_cleanly(args, ("--out", str(locked_folder), "cannot write"), (*outputs.earlier, locked_folder))


def test_an_os_error_past_the_checks_is_reported_with_its_path(outputs, locked_folder):
    """A write that fails deep inside a command (here: into a locked store, which no flag check covers) is still
    exit 2 and the path, through the command line's mapping of OS errors about a path."""
    store = locked_folder.parent / "locked-store.zarr"
    if not store.exists():
        shutil.copytree(outputs.store, store)
    locked = unwritable_folder(store / "obsm")
    if locked is None:
        pytest.skip("cannot lock the store's obsm folder here")
    try:
        result = assert_fails_cleanly(("embed", outputs.run, store, "--no-progress"), ("locked-store.zarr",),
                                      (*outputs.earlier,))
        assert "obsm" in result.stderr
    finally:
        make_writable(locked)


@pytest.mark.parametrize("buffered", [False, True], ids=["unbuffered", "buffered"])
def test_a_reader_that_leaves_early_does_not_break_the_command(outputs, tmp_path, buffered):
    """``streamtotal ingest ... | head``: the reader is gone before the report is written. The store is still
    complete, the exit quiet (status 0, no error or traceback on stderr). The pipe's read end is closed before the
    command starts, so the write fails every time (an unbuffered stdout fails at print, a buffered one at the
    flush)."""
    out = tmp_path / "piped.zarr"
    read_end, write_end = os.pipe()
    os.close(read_end)
    env = cli_env({"PYTHONUNBUFFERED": "1"} if not buffered else {})
    if buffered:
        env.pop("PYTHONUNBUFFERED", None)
    with open(write_end, "wb") as stdout:
        done = subprocess.run([sys.executable, "-m", "streamtotal", "ingest", str(outputs.h5ad), "--out", str(out),
                               "--batch-key", "batch", "--no-progress"], stdout=stdout, stderr=subprocess.PIPE,
                              env=env, text=True)
    assert done.returncode == 0, done.stderr
    for noise in ("Traceback", "BrokenPipe", "Exception ignored", "error"):
        assert noise not in done.stderr, done.stderr
    assert ZarrSource(out).n_obs == 200
    assert [p.name for p in tmp_path.iterdir()] == ["piped.zarr"]  # published under its name, no temporary left


def test_an_unexpected_exception_keeps_its_traceback(tmp_path):
    """Bugs must stay visible: only our own errors and OS errors about a path become one-line messages."""
    script = ("import sys\n"
              "from streamtotal.cli import main as cli\n"
              "def register(sub):\n"
              "    p = sub.add_parser('explode')\n"
              "    p.set_defaults(run=lambda args: {}['no such key'])\n"
              "cli.COMMANDS = (*cli.COMMANDS, type(sys)('explode_cmd'))\n"
              "cli.COMMANDS[-1].register = register\n"
              "cli.main(['explode'])\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=cli_env())
    assert done.returncode == 1
    assert "Traceback" in done.stderr and "KeyError: 'no such key'" in done.stderr

