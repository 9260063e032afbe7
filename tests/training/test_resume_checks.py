"""Resuming: past a damaged newest checkpoint to the one before, still exactly; a changed config is refused
naming each key that differs, in every section; numpy's RNG state round-trips through a weights_only load."""

import io
import logging
from dataclasses import replace

import numpy as np
import pytest
import torch

from streamtotal.config import RunConfig
from streamtotal.errors import CheckpointError
from streamtotal.model.config import ModelConfig
from streamtotal.safe_load import load_weights_only
from streamtotal.training.checkpoint import list_checkpoints, load_checkpoint, load_latest_checkpoint
from streamtotal.training.config_diff import config_differences
from streamtotal.training.run_dir import load_trained
from streamtotal.training.trainer import Trainer


def test_resume_falls_back_past_a_truncated_newest_checkpoint_and_stays_exact(small_store, trained_run, run_config,
                                                                              tmp_path, caplog):
    run = tmp_path / "run"
    Trainer(run_config(small_store), run).fit(stop_after_steps=14)  # killed 2 steps after the checkpoint of step 12
    older, newest = list_checkpoints(run)
    assert [load_checkpoint(p)["step"] for p in (older, newest)] == [10, 12]
    newest.write_bytes(newest.read_bytes()[:-300])
    with caplog.at_level(logging.WARNING, logger="streamtotal"):
        resumed = Trainer(run_config(small_store), run, resume=True)
    assert resumed.step == 10  # the older checkpoint's step, not 12
    assert any(str(newest) in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    resumed.fit()
    full = load_trained(trained_run).model.state_dict()
    for name, value in resumed.model.state_dict().items():
        assert torch.equal(value, full[name]), f"{name} differs from the uninterrupted run"


def test_a_checkpoint_that_would_run_code_is_never_skipped(tmp_path):
    good = {"format": "streamtotal-checkpoint", "step": 3}
    torch.save(good, tmp_path / "ckpt-0000000003.pt")
    torch.save({**good, "step": 4, "x": [print]}, tmp_path / "ckpt-0000000004.pt")  # builtins.print: not allowed
    with pytest.raises(CheckpointError, match=r"ckpt-0000000004.pt holds objects that would run code .*print"):
        load_latest_checkpoint(tmp_path)
    (tmp_path / "ckpt-0000000004.pt").write_bytes(b"")
    path, state = load_latest_checkpoint(tmp_path)
    assert path.name == "ckpt-0000000003.pt" and state["step"] == 3
    (tmp_path / "ckpt-0000000003.pt").write_bytes(b"PK\x03\x04 half a zip")
    with pytest.raises(CheckpointError, match=r"no checkpoint in .* can be read:\n.*0004.pt.*\n.*0003.pt"):
        load_latest_checkpoint(tmp_path)
    assert load_latest_checkpoint(tmp_path / "empty") is None


def test_resume_with_a_changed_config_names_every_differing_key(small_store, trained_run, run_config, tmp_path):
    config = run_config(small_store, lr=1e-2, progress=True)  # progress may change on resume; lr may not
    config = RunConfig(data=replace(config.data, min_gene_overlap=0.4), model=ModelConfig(n_latent=5, n_hidden=32),
                       train=config.train)
    with pytest.raises(CheckpointError) as err:
        Trainer(config, trained_run, resume=True)
    message = str(err.value)
    assert "data.min_gene_overlap: 0.5 in the checkpoint, 0.4 now" in message
    assert "model.n_latent: 4 in the checkpoint, 5 now" in message
    assert "train.lr: 0.004 in the checkpoint, 0.01 now" in message
    assert "progress" not in message and str(trained_run / "config.toml") in message


def test_config_differences_are_listed_by_section_and_key():
    saved = {"data": {"batch_key": "batch", "stores": ["a"]}, "model": {"n_latent": 10}, "train": {"seed": 0,
                                                                                                   "device": "cpu"}}
    now = {"data": {"batch_key": "donor", "stores": ["a"]}, "model": {"n_latent": 20, "new": 1},
           "train": {"seed": 0, "device": "cuda"}}
    assert config_differences(saved, now, ignore={"train": {"device"}}) == [
        "data.batch_key: 'batch' in the checkpoint, 'donor' now",
        "model.n_latent: 10 in the checkpoint, 20 now",
        "model.new: unset in the checkpoint, 1 now",
    ]
    assert config_differences(saved, saved) == []


def test_checkpoints_hold_only_weights_only_types_and_restore_numpy_rng_exactly(small_store, run_config, tmp_path):
    trainer = Trainer(run_config(small_store, max_epochs=1), tmp_path / "run")
    trainer.fit(stop_after_steps=4)
    newest = list_checkpoints(tmp_path / "run")[-1]
    assert torch.serialization.get_unsafe_globals_in_checkpoint(newest) == []  # no numpy, nothing allow-listed
    state = load_weights_only(newest)
    assert state["version"] == 2 and state["rng"]["numpy"]["key"].dtype == torch.int64

    np.random.seed(123)
    np.random.standard_normal()  # leaves a cached gaussian in the state, which must survive too
    expected = np.random.get_state()
    buffer = io.BytesIO()
    torch.save(trainer._state()["rng"], buffer)
    saved = load_weights_only(io.BytesIO(buffer.getvalue()))
    for old_layout in (False, True):  # version 1 checkpoints held get_state()'s tuple
        np.random.seed(9)
        trainer._restore({**state, "rng": {**saved, "numpy": expected if old_layout else saved["numpy"]}})
        got = np.random.get_state()
        assert got[0] == expected[0] and np.array_equal(got[1], expected[1]) and got[2:] == expected[2:]
        assert got[1].dtype == np.uint32
