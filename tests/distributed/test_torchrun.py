"""Real torchrun processes (gloo on CPU): stream shares, and DDP training with rank-0-only writes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from loaders.store_writer import ZarrStoreWriter
from streamtotal.cli.simulate_cmd import write_simulation
from streamtotal.config import DataConfig, RunConfig, TrainConfig
from streamtotal.model.config import ModelConfig
from streamtotal.simulate import CiteSimulator, SimulationConfig
from streamtotal.surgery.expand import batch_indexed, reference_parts
from streamtotal.training.run_dir import load_trained
from streamtotal.training.trainer import Trainer

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("ddp") / "s.zarr"
    sim = CiteSimulator(SimulationConfig(n_cells=1001, n_genes=40, n_proteins=6, n_batches=2, seed=3))
    write_simulation(sim, path, progress=False)
    return path


def _torchrun(args, cwd, nproc=2, timeout=240):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_two_ranks_stream_disjoint_equal_shares_and_resume_exactly(store, tmp_path):
    _torchrun([str(HERE / "stream_shares_worker.py"), str(store), str(tmp_path)], cwd=tmp_path)
    r0, r1 = np.load(tmp_path / "rank0.npz"), np.load(tmp_path / "rank1.npz")
    for epoch in (0, 1):
        a, b = r0[f"epoch{epoch}"], r1[f"epoch{epoch}"]
        assert r0[f"n_batches{epoch}"][0] == r1[f"n_batches{epoch}"][0]  # equal steps: DDP cannot hang
        assert not set(a) & set(b)
        assert np.array_equal(np.sort(np.concatenate([a, b])), np.arange(1001))  # the whole epoch, once
    assert not np.array_equal(r0["epoch0"], r0["epoch1"])  # the order depends on the epoch
    for r in (r0, r1):  # resumed mid-epoch: exactly the cells not yet seen, each once
        seen = np.concatenate([r["before_kill"], r["after_resume"]])
        assert len(seen) == len(set(seen))
    all_seen = np.concatenate([r0["before_kill"], r0["after_resume"], r1["before_kill"], r1["after_resume"]])
    assert np.array_equal(np.sort(all_seen), np.arange(1001))


def test_ddp_training_on_two_gloo_ranks_writes_once_from_rank_zero(store, tmp_path):
    run = tmp_path / "run"
    _torchrun(["-m", "streamtotal", "train", str(store), "--out", str(run), "--batch-key", "batch", "--epochs", "2",
               "--batch-size", "64", "--n-latent", "3", "--n-hidden", "16", "--checkpoint-every", "4",
               "--no-progress", "--threads", "1"], cwd=tmp_path)
    assert (run / "model.pt").is_file()
    ckpt = torch.load(sorted(run.glob("ckpt-*.pt"))[-1], weights_only=True)
    assert ckpt["world_size"] == 2
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if r["kind"] == "train"]
    assert steps == sorted(set(steps)), "only rank 0 logs: every step once"
    val = [r for r in records if r["kind"] == "validation"]
    assert len(val) == 2 and all(r["val_n_cells"] == 100 for r in val)  # all-reduced over both ranks' shares
    # 901 training cells over 2 ranks: ceil(451 / 64) = 8 steps per epoch on every rank
    assert ckpt["step"] == 16
    assert not list(tmp_path.glob("**/.ckpt-*.tmp")), "no temporary checkpoint left behind"


def test_resuming_on_another_world_size_is_refused_clearly(store, tmp_path):
    run = tmp_path / "run"
    _torchrun(["-m", "streamtotal", "train", str(store), "--out", str(run), "--batch-key", "batch", "--epochs", "1",
               "--batch-size", "64", "--n-latent", "3", "--n-hidden", "16", "--no-progress", "--threads", "1"],
              cwd=tmp_path)
    proc = subprocess.run([sys.executable, "-m", "streamtotal", "train", str(store), "--out", str(run), "--batch-key",
                           "batch", "--epochs", "1", "--batch-size", "64", "--n-latent", "3", "--n-hidden", "16",
                           "--no-progress", "--threads", "1", "--resume"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "2 process(es) and this job has 1" in proc.stderr


def _query_store(path):
    """A simulated study whose two batches are new to the reference ("query_0", "query_1")."""
    sim = CiteSimulator(SimulationConfig(n_cells=500, n_genes=40, n_proteins=6, n_batches=2, seed=4))
    writer = ZarrStoreWriter(path, list(sim.gene_names), list(sim.protein_names), panel_key="batch",
                             source_file="test")
    for rna, protein, obs in sim.blocks():
        obs = obs.copy()
        obs["batch"] = obs["batch"].astype(str).str.replace("batch", "query").astype("category")
        writer.append(rna.tocsr(), protein, obs)
    writer.close()
    return path


def test_query_mapping_under_torchrun_trains_new_batches_with_the_reference_frozen(store, tmp_path):
    reference = tmp_path / "ref"
    Trainer(RunConfig(data=DataConfig(stores=(str(store),), batch_key="batch"),
                      model=ModelConfig(n_latent=3, n_hidden=16),
                      train=TrainConfig(max_epochs=1, batch_size=64, progress=False, threads=1)), reference).fit()
    query, out = _query_store(tmp_path / "query.zarr"), tmp_path / "q"
    proc = _torchrun(["-m", "streamtotal", "map", str(reference), str(query), "--out", str(out), "--epochs", "2",
                      "--batch-size", "64", "--checkpoint-every", "3", "--new-batch-init", "zeros", "--no-progress",
                      "--threads", "1"], cwd=tmp_path)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1 and lines[0]["new_batches"] == ["query_0", "query_1"]  # rank 0 alone reports
    ckpt = torch.load(sorted(out.glob("ckpt-*.pt"))[-1], weights_only=True)
    assert ckpt["world_size"] == 2
    # 450 training cells over 2 ranks: ceil(225 / 64) = 4 steps per epoch on every rank
    assert ckpt["step"] == 8
    mapped, ref_state = load_trained(out).model, load_trained(reference).model.state_dict()
    rows = batch_indexed(mapped)
    for name, value in reference_parts(mapped, rows, 2).items():
        assert torch.equal(value, ref_state[name]), f"frozen {name} moved under DDP"
    for name in rows:  # the new batches' rows started at zero and trained
        assert mapped.state_dict()[name][2:].abs().sum() > 0, f"new rows of {name} did not train"
