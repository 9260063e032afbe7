"""scvi-tools' constructor and ``train`` arguments mapped onto ModelConfig / TrainConfig, and metrics.jsonl
mapped onto ``model.history`` (pure functions: no training)."""

import json

import pytest

from streamtotal.api.history import history_from_metrics
from streamtotal.api.model_kwargs import model_config
from streamtotal.api.train_options import device_name, train_config
from streamtotal.config import TrainConfig
from streamtotal.errors import ConfigError
from streamtotal.model.config import ModelConfig


def test_model_kwargs():
    config = model_config(12, n_latent=8, gene_dispersion="gene-batch", n_hidden=64, n_layers_encoder=1,
                          use_observed_lib_size=False, dropout_rate_decoder=0.0)
    assert (config.n_latent, config.gene_dispersion, config.n_hidden, config.n_layers_encoder) == (8, "gene-batch",
                                                                                                  64, 1)
    assert config.latent_library and config.dropout_rate_decoder == 0.0
    # scvi-tools' rule for the empirical background prior: on above 10 proteins, unless set.
    assert model_config(12).empirical_protein_background_prior
    assert not model_config(10).empirical_protein_background_prior
    assert model_config(10, empirical_protein_background_prior=True).empirical_protein_background_prior
    assert model_config(5, foreground_activation="relu").foreground_activation == "relu"


def test_train_options():
    model = ModelConfig()
    tc, device, out_model = train_config(model, n_cells=10_000, max_epochs=20, early_stopping=False,
                                         plan_kwargs={"lr": 1e-3, "weight_decay": 0.0, "n_epochs_kl_warmup": 5},
                                         adversarial_classifier=True, accelerator="cpu", seed=4)
    assert isinstance(tc, TrainConfig) and device == "cpu" and out_model.adversarial_classifier
    assert (tc.max_epochs, tc.lr, tc.weight_decay, tc.seed, tc.early_stopping_patience) == (20, 1e-3, 0.0, 4, 0)
    assert tc.validation_fraction == 0.1  # exactly the CLI's default, so a run resumes from either side
    assert tc.kl_warmup_fraction == pytest.approx(5 / 20)
    tc, _, _ = train_config(model, n_cells=1000, train_size=0.8)
    assert tc.validation_fraction == 0.2 and tc.early_stopping_patience == 45
    assert tc.log_every_steps == 3  # 800 training cells / 256 per batch: one record per epoch at least
    with pytest.raises(ConfigError, match="a test set is not supported"):
        train_config(model, n_cells=1000, train_size=0.8, validation_size=0.1)
    with pytest.raises(ConfigError, match="datasplitter_kwargs"):
        train_config(model, n_cells=1000, datasplitter_kwargs={"drop_last": True})


def test_device_names():
    assert device_name("auto", "auto") == "auto" and device_name("cpu", 4) == "cpu"
    assert device_name("gpu", 1) == "cuda" and device_name("gpu", [2]) == "cuda:2"
    with pytest.raises(ConfigError, match="accelerator='tpu'"):
        device_name("tpu")


def test_history_from_metrics(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [
        {"kind": "train", "step": 2, "epoch": 0, "loss": 10.0, "rna_nll": 6.0, "protein_nll": 2.0, "kl_z": 1.0,
         "kl_background": 0.5, "kl_weight": 0.1, "lr": 0.004},
        {"kind": "train", "step": 4, "epoch": 0, "loss": 8.0, "rna_nll": 4.0, "protein_nll": 2.0, "kl_z": 1.0,
         "kl_background": 0.5, "kl_weight": 0.2, "lr": 0.004},
        {"kind": "validation", "step": 4, "epoch": 0, "val_neg_elbo": 9.0, "val_rna_nll": 5.0,
         "val_protein_nll": 2.5, "val_kl_z": 1.0, "val_kl_background": 0.5},
        {"kind": "train", "step": 6, "epoch": 1, "loss": 6.0, "rna_nll": 3.0, "protein_nll": 1.0, "kl_z": 1.0,
         "kl_background": 0.5, "kl_weight": 0.3, "lr": 0.004},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    history = history_from_metrics(path)
    assert history["elbo_train"]["elbo_train"].tolist() == [8.5, 5.5]
    assert history["reconstruction_loss_train"]["reconstruction_loss_train"].tolist() == [7.0, 4.0]
    assert history["kl_weight"]["kl_weight"].tolist() == [0.2, 0.3]
    assert history["elbo_validation"].index.tolist() == [0]
    assert history["elbo_validation"]["elbo_validation"].tolist() == [9.0]
    assert history["reconstruction_loss_validation"]["reconstruction_loss_validation"].tolist() == [7.5]
    assert history_from_metrics(tmp_path / "absent.jsonl") == {}
