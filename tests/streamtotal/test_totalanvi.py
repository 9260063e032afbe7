"""totalANVI end to end: train from scratch and --from a totalVI run, exact resume, label prediction written back."""

from __future__ import annotations

import shutil

import anndata as ad
import numpy as np
import pytest
import torch

from streamtotal.cli.main import build_parser, main
from streamtotal.cli.train_cmd import config_from_args
from streamtotal.config import DataConfig, RunConfig, TrainConfig
from streamtotal.errors import ConfigError
from streamtotal.inference.labels import predict_labels
from streamtotal.model.config import ModelConfig
from streamtotal.training.checkpoint import list_checkpoints
from streamtotal.training.trainer import Trainer


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _config(store, totalanvi=True, **train):
    defaults = dict(max_epochs=2, batch_size=64, lr=4e-3, chunk_size=16, io_chunks=4, checkpoint_every_steps=3, seed=5,
                    progress=False, log_every_steps=2)
    defaults.update(train)
    return RunConfig(data=DataConfig(stores=(str(store),), batch_key="batch", labels_key="cell_type"),
                     model=ModelConfig(n_latent=4, n_hidden=32, label_classifier=totalanvi),
                     train=TrainConfig(**defaults))


@pytest.fixture(scope="module")
def totalanvi_run(small_store, tmp_path_factory):
    run = tmp_path_factory.mktemp("totalanvi") / "run"
    summary = Trainer(_config(small_store, max_epochs=10, checkpoint_every_steps=1000), run).fit()
    return run, summary


def test_trains_from_scratch_and_predicts_held_out_labels(totalanvi_run, small_store, tmp_path):
    run, summary = totalanvi_run
    assert summary.validation["n_labelled"] > 0 and summary.validation["label_accuracy"] > 0.8
    store = tmp_path / "query.zarr"
    shutil.copytree(small_store, store)  # the session store must not be modified
    result = predict_labels(run, store, progress=False, keep=True, batch_size=256)
    adata = ad.read_zarr(store)
    truth = adata.obs["true_cell_type"].astype(str).to_numpy()
    held_out = adata.obs["cell_type"].astype(str).to_numpy() == "unlabeled"  # never seen with a label
    predicted = adata.obs["streamtotal_label"].astype(str).to_numpy()
    assert held_out.sum() > 30
    assert (predicted[held_out] == truth[held_out]).mean() > 0.8  # chance: ~1/3
    probs = adata.obsm["streamtotal_label_probs"]
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(adata.obs["streamtotal_label_uncertainty"], 1.0 - probs.max(1), atol=1e-6)
    entropy = adata.obs["streamtotal_label_entropy"].to_numpy()
    assert np.all(entropy >= -1e-6) and np.all(entropy <= np.log(3) + 1e-5)
    names = list(adata.obs["streamtotal_label"].cat.categories)
    assert names == result.label_names == ["type_0", "type_1", "type_2"]
    np.testing.assert_array_equal(np.asarray(names)[probs.argmax(1)], predicted)
    np.testing.assert_array_equal(result.predicted, predicted)
    np.testing.assert_allclose(adata.obsm["streamtotal_latent"], result.latent)
    assert adata.obsm["streamtotal_latent"].shape == (adata.n_obs, 4)
    assert sum(result.counts.values()) == adata.n_obs


def test_interrupted_prediction_write_back_resumes_only_the_missing_chunks(totalanvi_run, small_store, tmp_path,
                                                                           monkeypatch):
    from streamtotal.inference.write_back import FAIL_ENV, InjectedFailure

    run, _ = totalanvi_run
    clean, store = tmp_path / "clean.zarr", tmp_path / "interrupted.zarr"
    shutil.copytree(small_store, clean)
    shutil.copytree(small_store, store)
    expected = predict_labels(run, clean, progress=False, keep=True, batch_size=100)
    monkeypatch.setenv(FAIL_ENV, "3")  # 700 cells = 7 units of 100; die after the third
    with pytest.raises(InjectedFailure):
        predict_labels(run, store, progress=False, batch_size=100)
    assert "streamtotal_label" not in ad.read_zarr(store).obs  # nothing published by the killed job
    monkeypatch.setenv(FAIL_ENV, "5")  # a rerun that recomputed all 7 units would die again
    resumed = predict_labels(run, store, progress=False, keep=True, batch_size=100)
    got, want = ad.read_zarr(store), ad.read_zarr(clean)
    np.testing.assert_array_equal(got.obs["streamtotal_label"].to_numpy(), want.obs["streamtotal_label"].to_numpy())
    np.testing.assert_array_equal(got.obsm["streamtotal_label_probs"], want.obsm["streamtotal_label_probs"])
    np.testing.assert_array_equal(got.obsm["streamtotal_latent"], want.obsm["streamtotal_latent"])
    np.testing.assert_array_equal(resumed.probabilities, expected.probabilities)  # kept values read back
    assert resumed.counts == expected.counts


def test_predict_cli_no_write_back_exports_h5ad(totalanvi_run, small_store, tmp_path):
    run, _ = totalanvi_run
    out = tmp_path / "pred.h5ad"
    assert main(["predict", str(run), str(small_store), "--no-write-back", "--export-h5ad", str(out),
                 "--no-progress"]) == 0
    adata = ad.read_h5ad(out)
    assert "streamtotal_label" in adata.obs and list(adata.obsm["streamtotal_label_probs"].columns) == [
        "type_0", "type_1", "type_2"]
    assert "streamtotal_label" not in ad.read_zarr(small_store).obs  # nothing written back


def test_from_totalvi_run_copies_shared_weights_and_totalvi_runs_cannot_predict(small_store, tmp_path):
    source = tmp_path / "totalvi"
    Trainer(_config(small_store, totalanvi=False, max_epochs=1, checkpoint_every_steps=1000), source).fit()
    with pytest.raises(ConfigError, match="--totalanvi"):
        predict_labels(source, small_store, write_back=False, progress=False)

    args = build_parser().parse_args(["train", "--out", str(tmp_path / "anvi"), "--totalanvi", "--labels-key",
                                      "cell_type", "--from", str(source), "--classification-ratio", "10",
                                      "--epochs", "1", "--no-progress", "--batch-size", "64"])
    config = config_from_args(args)  # the --from run's [data] and [model] are the starting point
    assert config.data.stores == (str(small_store),) and config.model.n_latent == 4
    assert config.model.label_classifier and config.model.classification_ratio == 10.0
    trainer = Trainer(config, tmp_path / "anvi")
    src = torch.load(source / "model.pt", weights_only=True)["model"]
    new = trainer.model.state_dict()
    assert set(new) - set(src) and all(k.startswith("label_classifier.") for k in set(new) - set(src))
    for key, value in src.items():
        assert torch.equal(new[key], value), key
    assert f'init_from = "{source.resolve()}"' in (tmp_path / "anvi" / "config.toml").read_text()
    trainer.fit()  # and it trains

    wrong = _config(small_store, max_epochs=1, init_from=str(source))
    wrong = RunConfig(data=wrong.data, model=ModelConfig(n_latent=6, n_hidden=32, label_classifier=True),
                      train=wrong.train)
    with pytest.raises(ConfigError, match="n_latent"):
        Trainer(wrong, tmp_path / "wrong")


def test_resume_of_a_totalanvi_run_is_exact(small_store, tmp_path):
    full = Trainer(_config(small_store), tmp_path / "full")
    full.fit()
    killed_at = full.steps_per_epoch + 2
    Trainer(_config(small_store), tmp_path / "resumed").fit(stop_after_steps=killed_at)
    assert int(list_checkpoints(tmp_path / "resumed")[-1].stem.split("-")[1]) < killed_at
    resumed = Trainer(_config(small_store), tmp_path / "resumed", resume=True)
    resumed.fit()
    assert resumed.step == full.step
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), f"{name} differs after resume"
    assert any(k.startswith("label_classifier.") for k in full.model.state_dict())


def test_m2_label_prior_trains_from_the_cli_and_predicts_held_out_labels(small_store, tmp_path):
    args = build_parser().parse_args(["train", str(small_store), "--out", str(tmp_path / "run"), "--totalanvi",
                                      "--labels-key", "cell_type", "--batch-key", "batch", "--label-prior", "m2"])
    assert config_from_args(args).model.label_prior == "m2"
    config = _config(small_store, max_epochs=10, checkpoint_every_steps=1000)
    config = RunConfig(data=config.data, model=ModelConfig(n_latent=4, n_hidden=32, label_classifier=True,
                                                           label_prior="m2"), train=config.train)
    summary = Trainer(config, tmp_path / "run").fit()
    assert np.isfinite(summary.validation["neg_elbo"])
    assert summary.validation["n_labelled"] > 0 and summary.validation["label_accuracy"] > 0.8
    store = tmp_path / "query.zarr"
    shutil.copytree(small_store, store)
    predict_labels(tmp_path / "run", store, progress=False, batch_size=256)
    adata = ad.read_zarr(store)
    held_out = adata.obs["cell_type"].astype(str).to_numpy() == "unlabeled"
    truth = adata.obs["true_cell_type"].astype(str).to_numpy()
    assert (adata.obs["streamtotal_label"].astype(str).to_numpy()[held_out] == truth[held_out]).mean() > 0.8


def test_unset_batch_size_and_lr_take_totalanvi_defaults_and_a_resume_keeps_the_checkpoints(small_store, tmp_path):
    fresh = Trainer(_config(small_store, batch_size=None, lr=None), tmp_path / "defaults")
    assert (fresh.config.train.batch_size, fresh.config.train.lr) == (128, 1e-3)
    assert fresh.optimizer.param_groups[0]["lr"] == 1e-3
    saved = RunConfig.from_toml(tmp_path / "defaults" / "config.toml").train
    assert (saved.batch_size, saved.lr) == (128, 1e-3)
    # A run trained with other values (e.g. before these defaults) resumes with them when the flags are unset.
    Trainer(_config(small_store), tmp_path / "old").fit(stop_after_steps=4)
    resumed = Trainer(_config(small_store, batch_size=None, lr=None), tmp_path / "old", resume=True)
    assert (resumed.config.train.batch_size, resumed.config.train.lr) == (64, 4e-3)
    resumed.fit()
