"""Publishing several new elements of a Zarr store as one group: readers see all of them or none of them.

A command that writes several results (``denoise`` writes ``obsm/denoised_rna``, ``obsm/denoised_protein`` and
``obsm/protein_foreground_prob``) stages each one under a hidden temporary name. Renaming them one by one would
let a job killed between two renames leave one result of the new run beside another of the previous run. So the
renames are made a transaction with a small journal in the store's root:

1. ``begin``: every temporary element is complete; stale ``.old-<name>`` leftovers are removed;
2. commit point: the journal (``.streamtotal-publish.json``: the renames, the obs columns to list, the attrs to
   drop) is written to a temporary file, flushed to disk and renamed into place — one atomic step;
3. roll forward: for each rename, the attrs are dropped from the temporary element, the published element (if
   any) is moved aside to ``.old-<name>`` and the temporary one renamed into place; new obs columns are appended
   to ``obs``'s ``column-order``; the consolidated metadata is rebuilt; the ``.old-`` elements are deleted;
4. the journal is removed.

Every step of 3 is idempotent and is skipped when already done, so a journal found later (the job was killed after
step 2) is simply rolled forward again. A job killed before step 2 leaves every published element untouched (the
temporary elements stay for a resumed run). ``recover`` does this roll-forward and is called before a store is
read (``ZarrSource``) and before a new write-back stages anything, so nobody reads a half-published group.

One publication at a time: the store directory is locked (``flock``) from step 1 to step 4, and ``recover``
takes the same lock, so a reader never rolls forward a journal that a live writer is still applying. A killed
process releases its lock with its file descriptors.

A reader that holds a store open while another process publishes into it can still see both generations; the
guarantee is about interrupted publications, which are what the next open finds.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import zarr

from loaders.errors import StoreFormatError
from loaders.store_layout import ZARR_FORMAT

JOURNAL_NAME = ".streamtotal-publish.json"
JOURNAL_VERSION = 1
# A child of the project's logger (by name only: loaders never imports streamtotal), so the CLI shows it.
logger = logging.getLogger("streamtotal.loaders.publish_journal")


@dataclass(frozen=True)
class Rename:
    """One element published by a group: ``<store>/<parent>/<tmp>`` renamed over ``<store>/<parent>/<final>``."""

    parent: str
    """Group holding the element, relative to the store root (``"obsm"``, ``"obs"``)."""
    tmp: str
    """Name of the staged temporary element (``.tmp-<name>``)."""
    final: str
    """Name the element is published under."""


def consolidate(store_path: str | Path) -> None:
    """Rebuilds a store's consolidated metadata (after elements were added or renamed)."""
    with warnings.catch_warnings():
        # A pending journal beside the groups is not a zarr node; zarr says so while it consolidates.
        warnings.filterwarnings("ignore", message=f"Object at {re.escape(JOURNAL_NAME)}")
        zarr.consolidate_metadata(str(store_path), zarr_format=ZARR_FORMAT)


def publish_group(store_path: str | Path, renames: Sequence[Rename], *, obs_columns: Sequence[str] = (),
                  drop_attrs: Sequence[str] = (), after_rename: Callable[[int], None] | None = None) -> None:
    """Publishes staged elements of a local store together: a kill at any point leaves all old or all new.

    Args:
        store_path: a local Zarr store.
        renames: the elements to publish; each temporary element must exist.
        obs_columns: names of new obs columns among them, appended to ``obs``'s ``column-order``.
        drop_attrs: attribute keys removed from each element before it is published (e.g. a progress ledger).
        after_rename: called with ``k`` after the ``k``-th rename, and with 0 once everything is staged but
            before the journal is written (failure injection for tests of interruptions).

    Raises:
        StoreFormatError: a temporary element is missing, or the store cannot be locked or written.
    """
    store = Path(store_path)
    with _locked(store):
        _roll_forward(store)  # an earlier interrupted publication goes first
        for r in renames:
            if not (store / r.parent / r.tmp).is_dir():
                raise StoreFormatError(f"cannot publish {r.parent}/{r.final} in {store}: its staged element "
                                       f"{r.parent}/{r.tmp} is missing")
            old = store / r.parent / f".old-{r.final}"
            if old.exists():  # left by a crash of an older version of this writer; nothing refers to it
                shutil.rmtree(old)
        journal = {"version": JOURNAL_VERSION, "renames": [[r.parent, r.tmp, r.final] for r in renames],
                   "obs_columns": list(obs_columns), "drop_attrs": list(drop_attrs)}
        if after_rename is not None:
            after_rename(0)
        _write_journal(store, journal)
        _apply(store, journal, after_rename)


def recover(store_path: str | Path) -> bool:
    """Rolls forward a publication that a killed job left half done; a no-op (one ``stat``) otherwise.

    Args:
        store_path: a store path or URL; only local directories can hold a journal.

    Returns:
        True when a pending publication was completed.

    Raises:
        StoreFormatError: a journal is pending but the store cannot be locked or written (read-only), or the
            journal is unreadable.
    """
    store = Path(store_path)
    if "://" in str(store_path) or not (store / JOURNAL_NAME).is_file():
        return False
    with _locked(store):
        return _roll_forward(store)


@contextlib.contextmanager
def _locked(store: Path) -> Iterator[None]:
    try:
        fd = os.open(store, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as err:
        raise StoreFormatError(f"cannot open the store directory {store} to publish into it: {err}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _roll_forward(store: Path) -> bool:
    path = store / JOURNAL_NAME
    if not path.is_file():
        return False
    try:
        journal = json.loads(path.read_text())
        if journal.get("version") != JOURNAL_VERSION or not isinstance(journal.get("renames"), list):
            raise ValueError(f"version {journal.get('version')!r}, expected {JOURNAL_VERSION}")
    except (OSError, ValueError, AttributeError) as err:
        raise StoreFormatError(f"{store}: the publication journal {JOURNAL_NAME} cannot be read ({err}); it names "
                               "results an interrupted command was publishing") from None
    names = [f"{parent}/{final}" for parent, _, final in journal["renames"]]
    logger.warning("%s: completing the publication of %s that an interrupted command left half done", store,
                   ", ".join(names))
    try:
        _apply(store, journal, None)
    except PermissionError as err:
        raise StoreFormatError(
            f"{store} holds a half-done publication of {', '.join(names)} (a command was killed while renaming its "
            f"results) and it cannot be completed here: {err}; open the store once with write access (any "
            "streamtotal command that reads it) to complete it") from None
    return True


def _apply(store: Path, journal: dict, after_rename: Callable[[int], None] | None) -> None:
    """Performs (or finishes) every step after the commit point; each step is skipped when already done."""
    for k, (parent, tmp_name, final_name) in enumerate(journal["renames"], start=1):
        parent_dir = store / parent
        tmp, final, old = parent_dir / tmp_name, parent_dir / final_name, parent_dir / f".old-{final_name}"
        if tmp.exists():
            for key in journal.get("drop_attrs", []):
                _drop_attr(tmp, key)
            if final.exists():
                if old.exists():  # only ever a leftover: a moved-aside element is never beside its temporary one
                    shutil.rmtree(old)
                os.replace(final, old)  # a directory cannot be renamed over a non-empty one
            os.replace(tmp, final)
            _fsync_dir(parent_dir)
        elif not final.exists():
            raise StoreFormatError(f"{store}: {parent}/{final_name} was being published but neither it nor its "
                                   f"staged element {parent}/{tmp_name} exists (removed by hand?); rerun the "
                                   f"command that writes it, after deleting {store / JOURNAL_NAME}")
        if after_rename is not None:
            after_rename(k)
    if journal.get("obs_columns"):
        _append_column_order(store / "obs", journal["obs_columns"])
    consolidate(store)
    for parent, _, final_name in journal["renames"]:
        old = store / parent / f".old-{final_name}"
        if old.exists():
            shutil.rmtree(old)
    (store / JOURNAL_NAME).unlink()
    _fsync_dir(store)


def _write_journal(store: Path, journal: dict) -> None:
    tmp = store / f"{JOURNAL_NAME}.tmp"
    with open(tmp, "w") as f:
        json.dump(journal, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, store / JOURNAL_NAME)
    _fsync_dir(store)


def _rewrite_json(path: Path, value: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2))
    os.replace(tmp, path)


def _drop_attr(element: Path, key: str) -> None:
    path = element / ".zattrs"
    if path.is_file():
        attrs = json.loads(path.read_text())
        if attrs.pop(key, None) is not None:
            _rewrite_json(path, attrs)


def _append_column_order(obs_dir: Path, names: Sequence[str]) -> None:
    path = obs_dir / ".zattrs"
    attrs = json.loads(path.read_text())
    order = list(attrs.get("column-order", []))
    missing = [n for n in names if n not in order]
    if missing:
        attrs["column-order"] = order + missing
        _rewrite_json(path, attrs)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
