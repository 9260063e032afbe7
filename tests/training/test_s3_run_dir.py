"""Run directories on object storage: a real S3-compatible server (moto) on 127.0.0.1."""

import pytest
import torch

from loaders.object_store import ObjectPath
from streamtotal.config import DataConfig, RunConfig, TrainConfig
from streamtotal.model.config import ModelConfig
from streamtotal.training.checkpoint import list_checkpoints
from streamtotal.training.metrics_log import read_metrics
from streamtotal.training.run_dir import load_trained
from streamtotal.training.trainer import Trainer


@pytest.fixture
def s3_env(s3_server, monkeypatch, tmp_path):
    """botocore's usual environment pointing at the test server, a fresh bucket, and the working directory in
    tmp_path (so a run directory wrongly written locally would show up there as ``s3:/...``)."""
    s3_server.set_environment(monkeypatch)
    monkeypatch.chdir(tmp_path)
    return s3_server.new_bucket("runs", tmp_path)


def _config(store, **train):
    defaults = dict(max_epochs=2, batch_size=64, chunk_size=16, io_chunks=4, checkpoint_every_steps=3, seed=5,
                    progress=False, log_every_steps=2)
    defaults.update(train)
    return RunConfig(data=DataConfig(stores=(str(store),), batch_key="batch", labels_key="cell_type"),
                     model=ModelConfig(n_latent=4, n_hidden=32), train=TrainConfig(**defaults))


def test_a_run_on_s3_resumes_exactly_and_loads_back(small_store, s3_env, s3_server, tmp_path, one_torch_thread):
    full = Trainer(_config(small_store), tmp_path / "full")
    full.fit()

    url = f"s3://{s3_env}/runs/resumed"
    killed_at = full.steps_per_epoch + 2  # mid second epoch, past the last checkpoint (every 3 steps)
    Trainer(_config(small_store), url).fit(stop_after_steps=killed_at)
    checkpoints = list_checkpoints(url)
    assert checkpoints and all(isinstance(c, ObjectPath) for c in checkpoints)
    assert int(checkpoints[-1].stem.split("-")[1]) < killed_at  # the kill lost the steps since then
    fs = s3_server.filesystem()
    assert not any(".tmp" in name for name in fs.ls(f"{s3_env}/runs/resumed", refresh=True))

    resumed = Trainer(_config(small_store), url, resume=True)
    assert resumed.step < killed_at
    resumed.fit()
    assert resumed.step == full.step
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), f"{name} differs after resuming from S3"
    train_steps = [r["step"] for r in read_metrics(f"{url}/metrics.jsonl") if r["kind"] == "train"]
    assert train_steps == [r["step"] for r in read_metrics(tmp_path / "full" / "metrics.jsonl")
                           if r["kind"] == "train"]

    names = {name.rsplit("/", 1)[1] for name in fs.ls(f"{s3_env}/runs/resumed", refresh=True)}
    assert {"config.toml", "registry.json", "metrics.jsonl", "model.pt"} <= names
    trained = load_trained(url)
    assert trained.source == ObjectPath(f"{url}/model.pt")
    for (name, a), b in zip(full.model.state_dict().items(), trained.model.state_dict().values()):
        assert torch.equal(a, b), f"{name} of the model loaded from S3"
    assert not (tmp_path / "s3:").exists(), "nothing may be redirected to a local folder"


def test_train_from_a_run_on_s3_starts_from_its_weights_and_config(small_store, s3_env, tmp_path, one_torch_thread):
    from streamtotal.cli.main import main

    url = f"s3://{s3_env}/runs/reference"
    reference = Trainer(_config(small_store, max_epochs=1), url)
    reference.fit()
    assert main(["train", str(small_store), "--out", str(tmp_path / "next"), "--from", url, "--epochs", "1",
                 "--batch-size", "64", "--no-progress"]) == 0
    config = (tmp_path / "next" / "config.toml").read_text()
    assert f'init_from = "{url}"' in config and "n_latent = 4" in config  # the --from run's [model], read from S3
    assert not (tmp_path / "s3:").exists()


def test_a_run_dir_in_a_missing_bucket_is_refused_before_training(small_store, s3_env):
    from loaders.errors import ObjectStoreError

    with pytest.raises(ObjectStoreError, match="no-such-bucket"):
        Trainer(_config(small_store), "s3://no-such-bucket/run")
