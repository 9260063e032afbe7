"""Atomic checkpoints in a run directory.

A checkpoint is written to a temporary file in the same directory, flushed to disk and renamed over its final
name, so a job killed mid-write leaves the previous checkpoint intact and never a half-written one. The newest
checkpoint is found by name (``ckpt-<step>.pt``, step zero-padded), not by a pointer file that could go stale.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from streamtotal.errors import CheckpointError

_NAME = re.compile(r"^ckpt-(\d{10})\.pt$")


def checkpoint_path(run_dir: Path, step: int) -> Path:
    """The path of the checkpoint of optimiser step ``step`` in ``run_dir``."""
    return Path(run_dir) / f"ckpt-{step:010d}.pt"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints in ``run_dir``, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.iterdir() if _NAME.match(p.name))


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint in ``run_dir``, or None when there is none."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def atomic_write_bytes(path: Path, write: Any) -> None:
    """Calls ``write(file)`` on a temp file beside ``path``, fsyncs it, and renames it to ``path``.

    Args:
        path: the final path.
        write: a function taking a binary file object.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(run_dir: Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Writes ``state`` as the checkpoint of ``step`` atomically, then deletes all but the newest ``keep``.

    Args:
        run_dir: the run directory.
        step: the optimiser step the state belongs to.
        state: a dict of tensors, numbers, strings (anything ``torch.save`` takes).
        keep: how many checkpoints to keep.

    Returns:
        The path written.
    """
    path = checkpoint_path(run_dir, step)
    atomic_write_bytes(path, lambda f: torch.save(state, f))
    for old in list_checkpoints(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Loads a checkpoint onto the CPU.

    Raises:
        CheckpointError: the file is missing or is not a streamtotal checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises several types for corrupt files
        raise CheckpointError(f"checkpoint {path} cannot be read ({e}); delete it to resume from the one before") from e
    if not isinstance(state, dict) or state.get("format") != "streamtotal-checkpoint":
        raise CheckpointError(f"{path} is not a streamtotal checkpoint")
    return state
