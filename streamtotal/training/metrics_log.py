"""``metrics.jsonl``: one JSON object per line, appended by rank 0 as training goes.

On resume, lines logged after the checkpoint being resumed from are dropped (atomically), so a killed and
resumed run has one clean history instead of duplicated steps.

On object storage (``s3://``), which cannot append, the records are kept in memory and the whole object is
rewritten (one PUT) by ``flush``: the trainer flushes before every checkpoint and at the end, and ``write`` every
``REMOTE_FLUSH_SECONDS``. A killed job loses at most the records after its last checkpoint, which a resume drops
anyway.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from loaders.object_store import ObjectPath, as_path
from streamtotal.training.checkpoint import atomic_write_bytes

REMOTE_FLUSH_SECONDS = 60.0
"""On object storage, the longest a record waits in memory between checkpoints (each flush rewrites the file)."""


class MetricsLog:
    """Appends metric records to ``<run_dir>/metrics.jsonl``.

    Args:
        path: the JSONL file.
        enabled: False on non-zero ranks, which log nothing.
    """

    def __init__(self, path: Path | ObjectPath, enabled: bool = True) -> None:
        self.path = as_path(path)
        self.enabled = enabled
        self._remote = isinstance(self.path, ObjectPath)
        self._lines: list[str] | None = None  # object storage: every line of the file, read once
        self._dirty = False
        self._flushed_at = time.monotonic()

    def _remote_lines(self) -> list[str]:
        if self._lines is None:
            self._lines = self.path.read_text().splitlines() if self.path.is_file() else []
        return self._lines

    def write(self, record: dict[str, Any]) -> None:
        """Appends one record (a flat dict of numbers and strings)."""
        if not self.enabled:
            return
        if self._remote:
            self._remote_lines().append(json.dumps(record))
            self._dirty = True
            if time.monotonic() - self._flushed_at > REMOTE_FLUSH_SECONDS:
                self.flush()
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drops every record whose ``step`` is greater than ``step`` (called when resuming)."""
        if not self.enabled or not self.path.exists():
            return
        lines = self._remote_lines() if self._remote else self.path.read_text().splitlines()
        kept = [line for line in lines if line and json.loads(line).get("step", 0) <= step]
        if self._remote:
            self._lines, self._dirty = kept, True
            self.flush()
            return
        atomic_write_bytes(self.path, lambda f: f.write(("\n".join(kept) + ("\n" if kept else "")).encode()))

    def flush(self) -> None:
        """Object storage: writes the records kept in memory (one PUT of the whole file). Local files are
        appended to as records come, so there is nothing to do."""
        if self.enabled and self._remote and self._dirty:
            self.path.write_text("".join(line + "\n" for line in self._remote_lines()))
            self._dirty, self._flushed_at = False, time.monotonic()


def read_metrics(path: Path | ObjectPath | str) -> list[dict[str, Any]]:
    """Reads every record of a ``metrics.jsonl`` file (local or ``s3://``)."""
    path = as_path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
