import pytest

from streamtotal.config import DataConfig, RunConfig, TrainConfig
from streamtotal.errors import ConfigError
from streamtotal.model.config import ModelConfig


def test_toml_round_trip(tmp_path):
    cfg = RunConfig(data=DataConfig(stores=("a.zarr", "b.zarr"), batch_key="batch"),
                    train=TrainConfig(max_epochs=7, lr=1e-3, early_stopping_patience=0))
    path = tmp_path / "run.toml"
    path.write_text(cfg.to_toml())
    assert RunConfig.from_toml(path) == cfg


def test_unknown_key_names_section_and_valid_keys(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[train]\nlearning_rate = 0.1\n")
    with pytest.raises(ConfigError, match=r"\[train\].*learning_rate.*valid keys"):
        RunConfig.from_toml(path)


def test_wrong_type_and_bad_value_are_refused(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[train]\nbatch_size = 'big'\n")
    with pytest.raises(ConfigError, match="batch_size"):
        RunConfig.from_toml(path)
    with pytest.raises(ConfigError, match="kl_warmup_fraction"):
        TrainConfig(kl_warmup_fraction=1.5)


def test_overrides_apply_on_top_and_ignore_none():
    cfg = RunConfig(train=TrainConfig(lr=0.5)).with_overrides({"train": {"lr": None, "batch_size": 128}})
    assert cfg.train.lr == 0.5 and cfg.train.batch_size == 128


def test_epoch_rule_follows_scvi_tools():
    assert TrainConfig().epochs_for(20000) == 400
    assert TrainConfig().epochs_for(1_000_000) == 8
    assert TrainConfig(max_epochs=3).epochs_for(10) == 3


def test_learning_rate_follows_the_documented_global_batch_rule():
    totalvi, totalanvi = ModelConfig(), ModelConfig(label_classifier=True)
    assert TrainConfig(lr=4e-3).effective_lr(8, totalvi) == 4e-3
    assert TrainConfig(lr=4e-3, lr_scaling="sqrt", batch_size=256).effective_lr(4, totalvi) == pytest.approx(8e-3)
    assert TrainConfig(lr=4e-3, lr_scaling="linear", batch_size=512).effective_lr(2, totalvi) == pytest.approx(16e-3)
    # totalANVI's reference batch is its default 128 cells: 2 processes x 128 = twice that.
    assert TrainConfig(lr_scaling="linear").effective_lr(2, totalanvi) == pytest.approx(2e-3)


def test_unset_batch_size_and_lr_follow_the_model_like_the_reference_implementation():
    assert TrainConfig().resolved_for(ModelConfig()) == TrainConfig(batch_size=256, lr=4e-3, kl_warmup_fraction=0.15)
    assert TrainConfig().resolved_for(ModelConfig(label_classifier=True)) == TrainConfig(
        batch_size=128, lr=1e-3, kl_warmup_fraction=0.75)
    # Set values win whatever the model (a warm-up of 0 is set, not unset).
    assert TrainConfig(batch_size=64, lr=0.5, kl_warmup_fraction=0.0).resolved_for(
        ModelConfig(label_classifier=True)) == TrainConfig(batch_size=64, lr=0.5, kl_warmup_fraction=0.0)
    # A totalANVI flag given after a totalVI base config still gets totalANVI's defaults: nothing is resolved early.
    cfg = RunConfig(data=DataConfig(labels_key="cell_type")).with_overrides({"model": {"label_classifier": True}})
    assert cfg.train.resolved_for(cfg.model).lr == 1e-3
    with pytest.raises(ConfigError, match="lr_scaling"):
        RunConfig.from_dict({"train": {"lr_scaling": "cubic"}})
