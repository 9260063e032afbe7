"""Device names: which ones exist (a check on the text, for configs) and what one means here (a torch device).

Kept apart from the trainer because training, every inference command and config validation share one answer,
and the check has to come before anything is opened or written.
"""

from __future__ import annotations

import re

import torch

from streamtotal.errors import ConfigError

DEVICE_FORMS = "'auto', 'cpu', 'cuda', 'cuda:N' (N = 0, 1, ...) or 'mps'"
"""The device names accepted, as an error message lists them."""

_DEVICE_NAME = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def check_device_name(name: object, where: str = "device") -> None:
    """Refuses a device name that is none of :data:`DEVICE_FORMS`, without asking the hardware (a config written on
    a GPU machine stays readable on a laptop).

    Args:
        name: the value given.
        where: the setting it came from, for the message (e.g. ``"train.device (--device)"``).

    Raises:
        ConfigError: naming the value and the accepted forms.
    """
    if not isinstance(name, str) or _DEVICE_NAME.fullmatch(name) is None:
        raise ConfigError(f"{where} must be {DEVICE_FORMS}; got {name!r}")


def resolve_device(name: str | torch.device) -> torch.device:
    """Maps a device name to a torch device this process can use.

    ``auto`` is CUDA when a GPU is visible, else the CPU. An explicit ``cuda[:N]`` or ``mps`` is checked against
    this torch build and machine here, because torch itself only fails at the first tensor moved there, with an
    assertion rather than a message.

    Args:
        name: one of :data:`DEVICE_FORMS`, or a torch device (returned as it is).

    Returns:
        The torch device.

    Raises:
        ConfigError: the name is malformed, names a backend this torch build lacks, or a GPU index that is not
            visible.
    """
    if isinstance(name, torch.device):
        return name
    check_device_name(name, "device (--device / train.device)")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        _check_cuda(name, device)
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {name!r}: this machine or torch build has no MPS (Apple GPU) backend; use "
                          "--device cpu or auto")
    return device


def _check_cuda(name: str, device: torch.device) -> None:
    if torch.version.cuda is None and torch.version.hip is None:
        raise ConfigError(f"device {name!r}: this torch build ({torch.__version__}) has no CUDA support; install "
                          "a CUDA build of torch, or use --device cpu or auto")
    count = torch.cuda.device_count()
    if count == 0:
        raise ConfigError(f"device {name!r}: no CUDA GPU is visible to this process (check the driver and "
                          "CUDA_VISIBLE_DEVICES); use --device cpu or auto")
    if device.index is not None and device.index >= count:
        raise ConfigError(f"device {name!r}: only {count} CUDA GPU(s) are visible (cuda:0 to cuda:{count - 1}; "
                          "CUDA_VISIBLE_DEVICES renumbers them from 0)")
