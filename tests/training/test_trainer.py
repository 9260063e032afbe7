import json

import pytest
import torch

from streamtotal.config import DataConfig, RunConfig, TrainConfig
from streamtotal.errors import CheckpointError, RunDirError
from streamtotal.model.config import ModelConfig
from streamtotal.training.checkpoint import list_checkpoints
from streamtotal.training.metrics_log import read_metrics
from streamtotal.training.trainer import Trainer


def _config(store, **train):
    defaults = dict(max_epochs=2, batch_size=64, chunk_size=16, io_chunks=4, checkpoint_every_steps=3, seed=5,
                    progress=False, log_every_steps=2)
    defaults.update(train)
    return RunConfig(data=DataConfig(stores=(str(store),), batch_key="batch", labels_key="cell_type"),
                     model=ModelConfig(n_latent=4, n_hidden=32), train=TrainConfig(**defaults))


def test_resume_after_a_kill_reproduces_the_uninterrupted_run_exactly(small_store, tmp_path):
    full = Trainer(_config(small_store), tmp_path / "full")
    full.fit()
    steps_per_epoch = full.steps_per_epoch
    assert steps_per_epoch >= 6

    killed_at = steps_per_epoch + 2  # mid second epoch, 2 steps past the last checkpoint boundary (every 3)
    interrupted = Trainer(_config(small_store), tmp_path / "resumed")
    interrupted.fit(stop_after_steps=killed_at)
    newest = list_checkpoints(tmp_path / "resumed")[-1]
    assert int(newest.stem.split("-")[1]) < killed_at  # the kill lost steps since the last checkpoint

    resumed = Trainer(_config(small_store), tmp_path / "resumed", resume=True)
    assert resumed.step < killed_at
    resumed.fit()
    assert resumed.step == full.step
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), f"{name} differs after resume"
    steps = [r["step"] for r in read_metrics(tmp_path / "resumed" / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == sorted(set(steps)), "resumed metrics must not repeat steps"
    assert steps == [r["step"] for r in read_metrics(tmp_path / "full" / "metrics.jsonl") if r["kind"] == "train"]


def test_existing_run_needs_resume_and_same_settings(small_store, tmp_path):
    Trainer(_config(small_store, max_epochs=1), tmp_path / "run").fit()
    with pytest.raises(RunDirError, match="--resume"):
        Trainer(_config(small_store, max_epochs=1), tmp_path / "run")
    with pytest.raises(CheckpointError, match="lr"):
        Trainer(_config(small_store, max_epochs=1, lr=1e-2), tmp_path / "run", resume=True)


def test_training_improves_validation_elbo_and_finishes_warmup(small_store, tmp_path):
    trainer = Trainer(_config(small_store, max_epochs=6, checkpoint_every_steps=1000), tmp_path / "run")
    summary = trainer.fit()
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    val = [r["val_neg_elbo"] for r in records if r["kind"] == "validation"]
    assert len(val) == 6 and val[-1] < val[0]
    kl = [r["kl_weight"] for r in records if r["kind"] == "train"]
    assert kl[0] < 0.5 and kl[-1] == pytest.approx(1.0)
    assert (tmp_path / "run" / "model.pt").is_file()
    assert summary.validation["neg_elbo"] == pytest.approx(val[-1])
    cfg = (tmp_path / "run" / "config.toml").read_text()
    assert "batch_key = \"batch\"" in cfg
    registry = json.loads((tmp_path / "run" / "registry.json").read_text())
    assert registry["batch_categories"] == ["batch_0", "batch_1"]


def test_latent_library_adversary_fixed_prior_and_worker_processes(small_store, tmp_path):
    config = _config(small_store, max_epochs=2, num_workers=2, checkpoint_every_steps=1000)
    model = ModelConfig(n_latent=4, n_hidden=32, latent_library=True, adversarial_classifier=True,
                        empirical_protein_background_prior=False)
    config = RunConfig(data=config.data, model=model, train=config.train)
    trainer = Trainer(config, tmp_path / "run")
    summary = trainer.fit()
    assert summary.steps == 2 * len(trainer.loader)
    assert trainer.last_validation["kl_library"] > 0  # the library is a latent variable now
    for name, value in trainer.model.state_dict().items():
        assert torch.isfinite(value.float()).all(), name
    classifier = dict(trainer.model.named_parameters())
    assert any("classifier" in n for n in classifier), "the adversarial classifier was not built"


def test_parameters_are_contiguous_so_adam_runs_fused(small_store, tmp_path):
    trainer = Trainer(_config(small_store), tmp_path / "run")
    # The empirical background prior arrives as [proteins, batches]: a transposed copy kept column-major strides.
    assert all(p.is_contiguous() for p in trainer.model.parameters())
    assert trainer.optimizer.defaults["fused"]


def test_loaded_optimizer_state_takes_its_parameters_layout():
    from streamtotal.training.trainer import _match_param_layout

    param = torch.nn.Parameter(torch.randn(2, 8))
    optimizer = torch.optim.Adam([param], fused=True)
    column_major = torch.randn(8, 2).t()  # same shape, other strides: what an older checkpoint could hold
    optimizer.state[param] = {"step": torch.tensor(3.0), "exp_avg": column_major.clone(),
                              "exp_avg_sq": column_major.abs().clone()}
    _match_param_layout(optimizer)
    state = optimizer.state[param]
    assert state["exp_avg"].stride() == param.stride() and torch.equal(state["exp_avg"], column_major)
    assert torch.equal(state["exp_avg_sq"], column_major.abs())


def test_prefetch_is_inline_only_when_torch_threads_take_every_core():
    import os

    from streamtotal.training.trainer import resolve_prefetch_batches

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_prefetch_batches(3, cpu) == 3 and resolve_prefetch_batches(0, cuda) == 0  # explicit wins
    assert resolve_prefetch_batches(None, cuda) == 2  # a GPU step leaves the CPU to the readers
    cores = len(os.sched_getaffinity(0))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(cores)
        assert resolve_prefetch_batches(None, cpu) == 0
        if cores > 1:
            torch.set_num_threads(cores - 1)  # a core to spare: read in the background
            assert resolve_prefetch_batches(None, cpu) == 2
    finally:
        torch.set_num_threads(before)
