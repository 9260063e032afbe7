"""``ingest`` / ``train`` / ``embed`` with object storage, as real processes against a real S3-compatible server
(moto) on 127.0.0.1, and the errors a missing s3fs or an unreachable endpoint give."""

import os
import socket
import subprocess
import sys

import pytest
import torch

from streamtotal.cli.main import main
from streamtotal.training.run_dir import load_trained


def _s3_env(s3_server, **extra) -> dict:
    return {**os.environ, "AWS_ACCESS_KEY_ID": s3_server.key, "AWS_SECRET_ACCESS_KEY": s3_server.secret,
            "AWS_DEFAULT_REGION": s3_server.region, "AWS_ENDPOINT_URL": s3_server.endpoint_url, **extra}


def _cli(args, env, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streamtotal", *map(str, args)], env=env, cwd=cwd,
                          capture_output=True, text=True)


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _refused(proc: subprocess.CompletedProcess, *phrases: str) -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for phrase in phrases:
        assert phrase in proc.stderr, proc.stderr


@pytest.fixture
def sim_h5ad(tmp_path):
    path = tmp_path / "sim.h5ad"
    assert main(["simulate", str(path), "--cells", "400", "--genes", "40", "--proteins", "6", "--batches", "2",
                 "--missing-proteins", "1"]) == 0
    return path


def test_ingest_train_kill_resume_and_embed_with_everything_on_s3(sim_h5ad, s3_server, tmp_path, monkeypatch):
    bucket = s3_server.new_bucket("cli", tmp_path)
    fs = s3_server.filesystem()
    env, cwd = _s3_env(s3_server), tmp_path
    store = f"s3://{bucket}/sim.zarr"
    _ok(_cli(["ingest", sim_h5ad, "--out", store, "--batch-key", "batch", "--no-progress"], env, cwd))

    train = ["train", store, "--batch-key", "batch", "--epochs", "2", "--batch-size", "64", "--n-latent", "3",
             "--n-hidden", "16", "--checkpoint-every", "3", "--seed", "2", "--threads", "1", "--no-progress"]
    _ok(_cli([*train, "--out", f"s3://{bucket}/full"], env, cwd))
    # 360 training cells / 64 = 6 steps an epoch: checkpoints at 3 and 6, then a crash after step 8.
    crashed = _cli([*train, "--out", f"s3://{bucket}/resumed"], {**env, "STREAMTOTAL_FAIL_AT_STEP": "8"}, cwd)
    assert crashed.returncode != 0 and "injected failure" in crashed.stderr
    names = {p.rsplit("/", 1)[1] for p in fs.ls(f"{bucket}/resumed", refresh=True)}
    assert "model.pt" not in names and "ckpt-0000000006.pt" in names
    _ok(_cli([*train, "--out", f"s3://{bucket}/resumed", "--resume"], env, cwd))

    names = {p.rsplit("/", 1)[1] for p in fs.ls(f"{bucket}/resumed", refresh=True)}
    assert {"config.toml", "registry.json", "metrics.jsonl", "model.pt"} <= names
    assert any(n.startswith("ckpt-") for n in names) and not any("tmp" in n for n in names)
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL"):
        monkeypatch.setenv(key, env[key])
    full, resumed = load_trained(f"s3://{bucket}/full"), load_trained(f"s3://{bucket}/resumed")
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), f"{name} differs after resuming from S3"

    exported = tmp_path / "latent.h5ad"
    _ok(_cli(["embed", f"s3://{bucket}/full", store, "--no-write-back", "--export-h5ad", exported,
              "--no-progress"], env, cwd))
    assert exported.is_file()
    # Writing results back into a store on object storage is not supported: refused, never redirected.
    _refused(_cli(["embed", f"s3://{bucket}/full", store, "--no-progress"], env, cwd), store, "object storage")
    _refused(_cli(["embed", f"s3://{bucket}/full", store, "--no-write-back", "--export-h5ad",
                   f"s3://{bucket}/latent.h5ad", "--no-progress"], env, cwd), "--export-h5ad", "object storage")
    assert not (tmp_path / "s3:").exists(), "nothing may be redirected to a local folder named s3:"


def test_s3_without_s3fs_names_the_extra_to_install(sim_h5ad, small_store, tmp_path):
    hide = tmp_path / "no_s3fs"
    hide.mkdir()
    (hide / "s3fs.py").write_text("raise ImportError(\"No module named 's3fs' (hidden by a test)\", name='s3fs')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(hide), os.environ.get("PYTHONPATH")]))}
    for args in (["ingest", sim_h5ad, "--out", "s3://bucket/sim.zarr", "--no-progress"],
                 ["train", small_store, "--out", "s3://bucket/run", "--no-progress"],
                 ["train", "s3://bucket/sim.zarr", "--out", tmp_path / "run", "--no-progress"]):
        _refused(_cli(args, env, tmp_path), "s3fs", "pip install 'streamtotal[s3]'")
    assert not (tmp_path / "s3:").exists() and not (tmp_path / "run" / "model.pt").exists()


def test_an_unreachable_endpoint_is_named(sim_h5ad, small_store, tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": closed, "AWS_MAX_ATTEMPTS": "1"}
    for args in (["ingest", sim_h5ad, "--out", "s3://bucket/sim.zarr", "--no-progress"],
                 ["train", small_store, "--out", "s3://bucket/run", "--no-progress"],
                 ["train", "s3://bucket/sim.zarr", "--out", tmp_path / "run", "--no-progress"],
                 ["embed", "s3://bucket/run", small_store, "--no-write-back", "--no-progress"]):
        _refused(_cli(args, env, tmp_path), f"cannot reach {closed}")
