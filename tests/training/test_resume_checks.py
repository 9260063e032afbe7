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


def test_a_run_started_before_the_warm_up_default_changed_resumes_with_its_own_schedule(small_store, run_config,
                                                                                    tmp_path):
    """Checkpoints record the resolved warm-up. A run trained with 0.75 (the default before it became per model)
    resumed from a config that leaves it unset keeps 0.75: the weights equal an uninterrupted 0.75 run, not a
    0.15 one; a fresh run with it unset trains totalVI's 0.15."""
    old = run_config(small_store, kl_warmup_fraction=0.75)
    whole = tmp_path / "whole"
    Trainer(old, whole).fit()
    run = tmp_path / "run"
    Trainer(old, run).fit(stop_after_steps=7)
    unset = run_config(small_store)
    assert unset.train.kl_warmup_fraction is None
    resumed = Trainer(unset, run, resume=True)
    assert resumed.config.train.kl_warmup_fraction == 0.75
    resumed.fit()
    expected = load_trained(whole).model.state_dict()
    for name, value in resumed.model.state_dict().items():
        assert torch.equal(value, expected[name]), f"{name} differs from the uninterrupted 0.75 run"

    fresh = Trainer(unset, tmp_path / "fresh")
    assert fresh.config.train.kl_warmup_fraction == 0.15
    fresh.fit()
    assert "kl_warmup_fraction = 0.15" in (tmp_path / "fresh" / "config.toml").read_text()
    weights = [row["kl_weight"] for row in _metrics(tmp_path / "fresh") if row.get("kind") == "train"]
    steps = [row["step"] for row in _metrics(tmp_path / "fresh") if row.get("kind") == "train"]
    total = fresh.total_steps
    # kl_weight(step) is logged after the step is taken: linear up to floor(0.15 * total) steps, then 1.
    for step, weight in zip(steps, weights):
        taken = step - 1
        warm = int(0.15 * total)
        assert weight == pytest.approx(min(1.0, taken / warm)), (step, weight)


def _metrics(run) -> list[dict]:
    import json

    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


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
