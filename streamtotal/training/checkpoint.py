"""Atomic checkpoints in a run directory.

A checkpoint is written to a temporary file in the same directory, flushed to disk and renamed over its final
name, so a job killed mid-write leaves the previous checkpoint intact and never a half-written one. The newest
checkpoint is found by name (``ckpt-<step>.pt``, step zero-padded), not by a pointer file that could go stale.
In a run directory on object storage (``s3://``), which cannot rename, a checkpoint is serialised in memory and
written in one PUT: the object appears only complete (see ``loaders.object_store``).
"""

from __future__ import annotations

import logging
import re
import threading
from pathlib import Path
from typing import Any

import torch

from loaders.atomic_files import atomic_write_bytes  # re-exported: run_dir, metrics_log, surgery, interop use it
from loaders.object_store import as_path, readable
from streamtotal.errors import CheckpointError
from streamtotal.safe_load import UnreadableFileError, UnsafeFileError, load_weights_only

logger = logging.getLogger("streamtotal.checkpoint")

_NAME = re.compile(r"^ckpt-(\d{10})\.pt$")


def checkpoint_path(run_dir: Path, step: int) -> Path:
    """The path of the checkpoint of optimiser step ``step`` in ``run_dir``."""
    return as_path(run_dir) / f"ckpt-{step:010d}.pt"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints in ``run_dir`` (a local directory or an ``s3://`` prefix), oldest first."""
    run_dir = as_path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.iterdir() if _NAME.match(p.name))


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint in ``run_dir``, or None when there is none."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


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


def snapshot(state: Any) -> Any:
    """A copy of ``state`` (nested dicts, lists, tuples) whose tensors are detached clones: safe to serialise while
    training goes on mutating the originals (``state_dict()`` returns the live parameter and optimiser tensors)."""
    if isinstance(state, torch.Tensor):
        return state.detach().clone()
    if isinstance(state, dict):
        return {k: snapshot(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(snapshot(v) for v in state)
    return state


class CheckpointWriter:
    """Writes checkpoints on a background thread, one at a time, so training does not wait for serialisation and
    fsync (tens of milliseconds for a checkpoint of the default model, most of it CPU time).

    The state is snapshotted (``snapshot``) by the caller's thread before ``submit`` returns, so the file holds
    exactly the state at submission. Writes stay atomic (``save_checkpoint``). A write's error is raised by the
    next ``submit`` or by ``wait``; call ``wait`` before relying on the file (end of training, preemption).
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, run_dir: Path, step: int, state: dict[str, Any], keep: int = 2) -> None:
        """Waits for the previous write, then starts writing ``state`` as the checkpoint of ``step``.

        Raises:
            BaseException: the previous write's error.
        """
        self.wait()
        frozen = snapshot(state)

        def write() -> None:
            # At normal priority, unlike the readers: serialising holds the GIL in stretches, and a lowest-priority
            # thread holding it while the OS runs torch's threads stalled the next training steps (a 3-epoch fit
            # took ~5% longer).
            try:
                save_checkpoint(run_dir, step, frozen, keep=keep)
            except BaseException as exc:  # re-raised on the training thread by wait()
                self._error = exc

        self._thread = threading.Thread(target=write, name="streamtotal-checkpoint", daemon=False)
        self._thread.start()

    def wait(self, raise_error: bool = True) -> None:
        """Blocks until the write in progress (if any) is on disk.

        Args:
            raise_error: False drops the write's error (when another error is already on its way up).

        Raises:
            BaseException: that write's error (once).
        """
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            if raise_error:
                raise error


class DamagedCheckpointError(CheckpointError):
    """A checkpoint file is truncated, garbage, or not a streamtotal checkpoint: an older one may stand in for it.
    (A file holding objects that would run code is a plain CheckpointError: it is refused, never skipped.)"""


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Loads a checkpoint onto the CPU, running no code it may hold (``weights_only=True``, see safe_load).

    Args:
        path: the checkpoint file.

    Returns:
        The checkpoint's state dict.

    Raises:
        DamagedCheckpointError: the file is missing, truncated, garbage or not a streamtotal checkpoint.
        CheckpointError: the file holds objects whose loading would run code (nothing was loaded).
    """
    path = as_path(path)
    if not path.is_file():
        raise DamagedCheckpointError(f"checkpoint {path} does not exist")
    try:
        state = load_weights_only(readable(path))
    except UnsafeFileError as e:
        raise CheckpointError(
            f"checkpoint {path} holds objects that would run code when loaded ({', '.join(e.names)}); it is not "
            "loaded. streamtotal writes only tensors, numbers and strings: this file was replaced or tampered with"
        ) from e
    except UnreadableFileError as e:
        raise DamagedCheckpointError(f"checkpoint {path} cannot be read, it is truncated or damaged ({e.reason})") from e
    if not isinstance(state, dict) or state.get("format") != "streamtotal-checkpoint":
        raise DamagedCheckpointError(f"{path} is not a streamtotal checkpoint")
    return state


def load_latest_checkpoint(run_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """Loads the newest checkpoint of ``run_dir`` that can be read, falling back past damaged ones (a job killed
    while the file system lost data, a disk filling up): that is what keeping two checkpoints is for.

    Args:
        run_dir: the run directory.

    Returns:
        ``(path, state)`` of the checkpoint loaded, or None when the directory holds none.

    Raises:
        CheckpointError: no checkpoint can be read (the message lists each with its fault), or one holds objects
            that would run code (never skipped: that file was not written by streamtotal).
    """
    faults = []
    for path in reversed(list_checkpoints(run_dir)):
        try:
            state = load_checkpoint(path)
        except DamagedCheckpointError as e:
            faults.append(str(e))
            logger.warning("skipping a damaged checkpoint: %s; trying the one before", e)
            continue
        if faults:
            logger.warning("resuming from %s, older than the damaged checkpoint(s) after it", path)
        return path, state
    if faults:
        raise CheckpointError(f"no checkpoint in {run_dir} can be read:\n  " + "\n  ".join(faults))
    return None
