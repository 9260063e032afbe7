"""A run interrupted in the API resumes with ``streamtotal train --resume`` and the other way round, to the same
model as an uninterrupted run (exact resume: same run directory format, same config)."""

import os

import numpy as np
import pytest
from bad_input_harness import run_cli

from streamtotal import TOTALVI

from .conftest import TINY

FAIL_ENV = "STREAMTOTAL_FAIL_AT_STEP"
# The same run from both faces: the CLI flags below give the config these API arguments give.
API_MODEL = dict(TINY, empirical_protein_background_prior=True)
API_TRAIN = dict(max_epochs=2, batch_size=64, progress=False, checkpoint_every_steps=2, seed=3)
CLI_FLAGS = ["--batch-key", "batch", "--n-latent", "4", "--n-hidden", "16", "--epochs", "2", "--batch-size", "64",
             "--checkpoint-every", "2", "--seed", "3", "--no-progress"]


def _cli(*args, fail_at: int | None = None):
    assert FAIL_ENV not in os.environ
    return run_cli(*args, env=None if fail_at is None else {FAIL_ENV: str(fail_at)})


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, store):
    import torch

    torch.set_num_threads(1)
    model = TOTALVI(str(store), batch_key="batch", **API_MODEL)
    model.train(run_dir=tmp_path_factory.mktemp("api-resume") / "clean", **API_TRAIN)
    return model.get_latent_representation()


def test_api_run_resumes_with_the_cli(store, tmp_path, monkeypatch, uninterrupted):
    run = tmp_path / "run"
    model = TOTALVI(str(store), batch_key="batch", **API_MODEL)
    monkeypatch.setenv(FAIL_ENV, "5")
    with pytest.raises(RuntimeError, match="injected failure after step 5"):
        model.train(run_dir=run, **API_TRAIN)
    monkeypatch.delenv(FAIL_ENV)
    assert not model.is_trained and not (run / "model.pt").exists()
    assert sorted(run.glob("ckpt-*")), "the interrupted run left no checkpoint: nothing would be resumed"
    proc = _cli("train", "--config", run / "config.toml", "--out", run, "--resume", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = TOTALVI.load(run)
    np.testing.assert_allclose(resumed.get_latent_representation(), uninterrupted, atol=1e-5)


def test_cli_run_resumes_in_the_api(store, tmp_path, uninterrupted):
    run = tmp_path / "run"
    proc = _cli("train", store, "--out", run, *CLI_FLAGS, fail_at=5)
    assert proc.returncode != 0 and "injected failure after step 5" in proc.stderr
    assert sorted(run.glob("ckpt-*")) and not (run / "model.pt").exists()
    model = TOTALVI(str(store), batch_key="batch", **API_MODEL)
    model.train(run_dir=run, resume=True, **API_TRAIN)
    np.testing.assert_allclose(model.get_latent_representation(), uninterrupted, atol=1e-5)
    assert list(model.history["elbo_validation"].index) == [0, 1]
