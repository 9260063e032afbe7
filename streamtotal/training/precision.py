"""Training precision (float32 or bfloat16 autocast) and the optional torch.compile of the model.

bfloat16 autocast runs the linear layers (the matmuls: most of a GPU step's time) in bf16 with float32
accumulation; the model casts every head's output back to float32 and computes all densities, KL terms and the
loss in float32 (see streamtotal/model/totalvi.py), and weights, gradients and Adam state stay float32, so no
loss scaling is needed (bf16 has float32's exponent range). fp16 is not offered: it would need a GradScaler and
gains nothing over bf16 on hardware that has both.
"""

from __future__ import annotations

import contextlib
import shutil

import torch

from streamtotal.errors import ConfigError


def resolve_precision(precision: str, device: torch.device) -> str:
    """Maps ``train.precision`` to "fp32" or "bf16" for ``device``.

    "auto" is bf16 on a CUDA device that supports it (Ampere and newer) and fp32 elsewhere: on CPU, bf16 matmuls
    are only faster where the CPU has bf16 instructions, so CPU users opt in explicitly.

    Raises:
        ConfigError: "bf16" on a CUDA device without bf16 support.
    """
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"train.precision = 'bf16' but {torch.cuda.get_device_name(device)} has no bfloat16 "
                          "support; use 'fp32' (or 'auto')")
    return precision


def autocast(precision: str, device: torch.device):
    """The context a training forward pass runs in: bf16 autocast, or nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def compile_model(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``torch.compile(module)`` (inductor), with a clear error where it cannot work.

    Shapes are marked dynamic because the last minibatches of an epoch may differ by a cell; recompiling for each
    size would cost more than it saves.

    Raises:
        ConfigError: on CPU without a C++ compiler (inductor generates and compiles C++ there).
    """
    if device.type == "cpu" and not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
        raise ConfigError("train.compile = true on CPU needs a C++ compiler (g++ or clang++) for torch.compile's "
                          "inductor backend; install one or set train.compile = false")
    return torch.compile(module, dynamic=True)
