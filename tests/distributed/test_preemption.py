"""Graceful stops and restarts in real processes: SIGTERM checkpoints and exits; torchrun --max-restarts recovers."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from streamtotal.cli.simulate_cmd import write_simulation
from streamtotal.simulate import CiteSimulator, SimulationConfig
from streamtotal.training.checkpoint import latest_checkpoint
from streamtotal.training.metrics_log import read_metrics


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("preempt") / "s.zarr"
    write_simulation(CiteSimulator(SimulationConfig(n_cells=900, n_genes=40, n_proteins=6, n_batches=2, seed=4)),
                     path, progress=False)
    return path


def _config(tmp_path, epochs, name="run.toml"):
    path = tmp_path / name
    path.write_text(f"[model]\nn_latent = 3\nn_hidden = 16\n[train]\nmax_epochs = {epochs}\nbatch_size = 64\n"
                    "log_every_steps = 1\ncheckpoint_every_steps = 1000\nthreads = 1\nprogress = false\n")
    return path


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_stop_signal_checkpoints_the_current_step_then_resume_finishes(store, tmp_path, sig):
    run, config = tmp_path / "run", _config(tmp_path, epochs=40)
    cmd = [sys.executable, "-m", "streamtotal", "train", str(store), "--out", str(run), "--batch-key", "batch",
           "--config", str(config)]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(read_metrics(run / "metrics.jsonl")) < 3:
        time.sleep(0.05)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, out
    assert "checkpointed step" in out
    ckpt = torch.load(latest_checkpoint(run), weights_only=True)
    logged = max(r["step"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train")
    assert ckpt["step"] >= logged >= 3  # nothing since the last periodic checkpoint (none: every 1000) is lost
    total = ckpt["loader"]["fingerprint"]["n_ids"]
    assert ckpt["step"] < 40 * -(-total // 64)

    # Resuming with another schedule is refused (it would change the KL warm-up mid-run); the scheduler's
    # restart of the same command with --resume finishes the run.
    config_short = _config(tmp_path, epochs=ckpt["epoch"] + 1, name="short.toml")
    done = subprocess.run(cmd[:-2] + ["--config", str(config_short), "--resume"], env=_env(), capture_output=True,
                          text=True, timeout=180)
    assert done.returncode != 0 and "max_epochs" in done.stderr  # a changed schedule is refused, not mixed in
    done = subprocess.run(cmd + ["--resume"], env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (run / "model.pt").is_file()


def test_torchrun_max_restarts_recovers_from_an_injected_failure(store, tmp_path):
    run, config = tmp_path / "run", _config(tmp_path, epochs=2)
    config.write_text(config.read_text().replace("checkpoint_every_steps = 1000", "checkpoint_every_steps = 3"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=1",
           "-m", "streamtotal", "train", str(store), "--out", str(run), "--batch-key", "batch", "--config",
           str(config), "--resume"]
    proc = subprocess.run(cmd, env={**_env(), "STREAMTOTAL_FAIL_AT_STEP": "5"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "injected failure after step 5" in proc.stdout + proc.stderr
    ckpt = torch.load(latest_checkpoint(run), weights_only=True)
    steps_per_epoch = -(-(810 // 2 + 1) // 64)  # 810 training cells over 2 ranks
    assert ckpt["step"] == 2 * steps_per_epoch and (run / "model.pt").is_file()
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == list(range(1, 2 * steps_per_epoch + 1)), "the restarted attempt continued from step 3, once"
