"""``metrics.jsonl``: one JSON object per line, appended by rank 0 as training goes.

On resume, lines logged after the checkpoint being resumed from are dropped (atomically), so a killed and
resumed run has one clean history instead of duplicated steps.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from streamtotal.training.checkpoint import atomic_write_bytes


class MetricsLog:
    """Appends metric records to ``<run_dir>/metrics.jsonl``.

    Args:
        path: the JSONL file.
        enabled: False on non-zero ranks, which log nothing.
    """

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled

    def write(self, record: dict[str, Any]) -> None:
        """Appends one record (a flat dict of numbers and strings)."""
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drops every record whose ``step`` is greater than ``step`` (called when resuming)."""
        if not self.enabled or not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
        atomic_write_bytes(self.path, lambda f: f.write(("\n".join(kept) + ("\n" if kept else "")).encode()))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Reads every record of a ``metrics.jsonl`` file."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
