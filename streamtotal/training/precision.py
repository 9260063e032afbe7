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


def cpu_has_bf16_instructions() -> bool:
    """Whether this CPU multiplies bfloat16 natively (x86 ``avx512_bf16`` or ``amx_bf16``; Linux ``/proc/cpuinfo``).

    Elsewhere (other systems, CPUs without them) False: there bf16 matmuls are emulated and gain little or lose.
    """
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """Maps ``train.precision`` to "fp32" or "bf16" for ``device``.

    "auto" is bf16 on a CUDA device that supports it (Ampere and newer) and on a CPU with bf16 instructions
    (``cpu_has_bf16_instructions``), and fp32 elsewhere. Where bf16 is native it trains faster to the same ELBO
    (benchmarks/train_throughput.py: 2,579.5 vs 2,575.8 on held-out cells; benchmarks/pbmc_quality.py for
    biology); where it is emulated it would be slower.

    Raises:
        ConfigError: "bf16" on a CUDA device without bf16 support.
    """
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        return "bf16" if device.type == "cpu" and cpu_has_bf16_instructions() else "fp32"
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
