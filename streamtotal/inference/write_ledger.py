"""The progress ledger of a resumable write-back: which write units a temporary store element already holds.

The ledger lives in the ``.zattrs`` of the temporary element itself (``obsm/.tmp-<key>``, ``obs/.tmp-<name>``)
under ``LEDGER_KEY``, so it travels with the data it describes and disappears with it: the publication drops
it (``publish_journal.publish_group(..., drop_attrs=[LEDGER_KEY])``) so a published result carries no ledger,
and a deleted temporary element takes its ledger along. Each update
rewrites ``.zattrs`` through a temporary file and an atomic rename, so a job killed at any instant leaves either
the old or the new ledger, never a torn one. A unit is recorded only after its rows were written, so the
ledger never claims rows that are not there (a unit written but not yet recorded is simply recomputed).

    {"fingerprint": "<sha256 of what produced the values>", "unit_rows": 1024, "done": [[0, 7], [9, 12]]}

``done`` lists half-open ranges of unit indexes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

from loaders.atomic_files import atomic_write_text
from loaders.object_store import ObjectPath

LEDGER_KEY = "streamtotal_write_progress"


def fingerprint(description: dict) -> str:
    """A stable hash of a JSON-able description (model file hash, options, cells, targets, unit size)."""
    text = json.dumps(description, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes (the model or checkpoint a result came from, local or on object storage),
    read 1 MiB at a time."""
    if isinstance(path, ObjectPath):
        return hashlib.sha256(path.read_bytes()).hexdigest()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def to_ranges(units: Iterable[int]) -> list[list[int]]:
    """Sorted unit indexes -> half-open ``[start, stop)`` ranges (a compact ledger for millions of cells)."""
    ranges: list[list[int]] = []
    for u in sorted(set(int(u) for u in units)):
        if ranges and ranges[-1][1] == u:
            ranges[-1][1] = u + 1
        else:
            ranges.append([u, u + 1])
    return ranges


def from_ranges(ranges: Iterable[Iterable[int]]) -> set[int]:
    """``[start, stop)`` ranges -> the set of unit indexes."""
    return {u for start, stop in ranges for u in range(int(start), int(stop))}


def _read_attrs(element_dir: Path) -> dict:
    path = element_dir / ".zattrs"
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_attrs(element_dir: Path, attrs: dict) -> None:
    atomic_write_text(element_dir / ".zattrs", json.dumps(attrs, indent=2))


def read_done(element_dir: Path, expected_fingerprint: str, unit_rows: int) -> set[int] | None:
    """Units recorded in the element's ledger, or None when there is no ledger or it belongs to another job."""
    ledger = _read_attrs(element_dir).get(LEDGER_KEY)
    if not isinstance(ledger, dict) or ledger.get("fingerprint") != expected_fingerprint:
        return None
    if ledger.get("unit_rows") != unit_rows:
        return None
    return from_ranges(ledger.get("done", []))


def write_done(element_dir: Path, expected_fingerprint: str, unit_rows: int, done: Iterable[int]) -> None:
    """Records ``done`` (every unit completed so far) in the element's ledger, atomically."""
    attrs = _read_attrs(element_dir)
    attrs[LEDGER_KEY] = {"fingerprint": expected_fingerprint, "unit_rows": int(unit_rows), "done": to_ranges(done)}
    _write_attrs(element_dir, attrs)


def update_attrs(element_dir: Path, extra: dict) -> None:
    """Merges ``extra`` into the element's attrs (descriptions such as ``feature_names``), atomically."""
    attrs = _read_attrs(element_dir)
    attrs.update(extra)
    _write_attrs(element_dir, attrs)

