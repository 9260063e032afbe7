"""Tests of streamtotal.device: which device names exist, and refusing a GPU this torch build or machine lacks."""

import pytest
import torch

from streamtotal.config import TrainConfig
from streamtotal.device import check_device_name, resolve_device
from streamtotal.errors import ConfigError


@pytest.mark.parametrize("name", ["auto", "cpu", "cuda", "cuda:0", "cuda:12", "mps"])
def test_accepted_names(name):
    check_device_name(name)
    assert TrainConfig(device=name).device == name


@pytest.mark.parametrize("name", ["banana", "CPU", "cuda:", "cuda:x", "cuda:-1", "cpu:0", "meta", "", None, 0])
def test_other_names_are_refused_naming_the_value_and_the_forms(name):
    with pytest.raises(ConfigError, match=rf"train\.device \(--device\) must be 'auto', 'cpu', .*; got {name!r}"):
        TrainConfig(device=name)


def test_auto_and_cpu():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


def test_a_gpu_that_is_not_there_is_refused_before_any_tensor_moves():
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ConfigError, match=rf"device 'cuda:{count}': "):
        resolve_device(f"cuda:{count}")
    if torch.version.cuda is None and torch.version.hip is None:
        with pytest.raises(ConfigError, match=r"device 'cuda': this torch build \(.*\) has no CUDA support"):
            resolve_device("cuda")


def test_a_malformed_name_is_refused_by_resolve_too():
    with pytest.raises(ConfigError, match=r"got 'banana'"):
        resolve_device("banana")
