"""Write-to-a-temporary-then-rename, for files and for directories: an output is complete or absent, never half-written.

A file is written to a uniquely named temporary beside its target (same directory, so the rename never crosses a
filesystem), flushed and fsynced, then renamed over the target with ``os.replace``: a reader sees the old file or
the new one, and a process killed mid-write leaves only a hidden ``.NAME.tmp-<random>`` behind. On object storage
(``s3://``), which cannot rename, the finished bytes go up in one PUT (``object_store.write_object_atomically``).

A directory is built under a hidden temporary name beside its target and renamed into place; an existing target is
first renamed aside and removed after, so the target's name always holds one complete version. (Stores on object
storage are published by ``prefix_publish`` and groups of store elements by ``publish_journal``: other mechanisms.)
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any, BinaryIO, Callable, TypeVar

from loaders.object_store import ObjectPath, as_path, write_object_atomically

P = TypeVar("P", Path, ObjectPath)


def temporary_sibling(target: P, kind: str = "tmp") -> P:
    """The path ``.NAME.<kind>-<random>`` beside ``target`` (not created): where a writer stages ``target``.

    Args:
        target: the final path (local or an ``ObjectPath``).
        kind: ``"tmp"`` for what is being written (the names ``stale_temporaries`` knows), ``"old"`` for a
            replaced version about to be removed.

    Returns:
        A path in the same directory as ``target``, of the same type.
    """
    return target.parent / f".{target.name}.{kind}-{uuid.uuid4().hex[:12]}"


def atomic_write_bytes(path: str | os.PathLike | ObjectPath, write: Callable[[BinaryIO], Any]) -> None:
    """Calls ``write(file)`` on a temporary file beside ``path``, fsyncs it, and renames it to ``path``.

    Args:
        path: the final path (its parent is created), or an ``s3://`` URL / ``ObjectPath`` (one PUT).
        write: a function taking a binary file object.

    Raises:
        ObjectStoreError: an ``s3://`` path without s3fs, an unreachable endpoint, missing credentials or bucket.
        Whatever ``write`` raises (the temporary is removed, ``path`` is left as it was).
    """
    path = as_path(path)
    if isinstance(path, ObjectPath):  # no rename there: one PUT of the finished bytes is the atomic step
        write_object_atomically(path, write)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        with open(tmp, "xb") as f:  # the usual permissions (umask), unlike mkstemp's owner-only 0600
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike | ObjectPath, text: str) -> None:
    """Writes ``text`` (UTF-8) to ``path`` atomically (``atomic_write_bytes``).

    Args:
        path: the final path, or an ``s3://`` URL.
        text: the whole content.
    """
    atomic_write_bytes(path, lambda f: f.write(text.encode("utf-8")))


def write_file_atomically(path: str | os.PathLike, write_to: Callable[[Path], Any]) -> Path:
    """Calls ``write_to(tmp)`` with a temporary path beside ``path``, then renames it to ``path``.

    For writers that take a file name rather than a file object (``DataFrame.to_csv``, ``AnnData.write_h5ad``).

    Args:
        path: the final local path (its parent is created).
        write_to: writes the whole file at the path it is given (which does not exist yet).

    Returns:
        ``path`` as a ``Path``.

    Raises:
        Whatever ``write_to`` raises (the temporary is removed, ``path`` is left as it was).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        write_to(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def replace_directory(staged: Path, target: Path) -> None:
    """Renames the complete directory ``staged`` to ``target``; an existing ``target`` is moved aside first and
    removed after (a symlink or file there is replaced, never followed).

    The caller decides whether an existing ``target`` may be replaced (check, and raise its own error, first).

    Args:
        staged: a directory beside ``target`` (same filesystem), complete.
        target: the final path.
    """
    old = None
    if target.exists() or target.is_symlink():
        old = temporary_sibling(target, "old")
        os.replace(target, old)
    os.replace(staged, target)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def write_directory_atomically(target: str | os.PathLike, write_to: Callable[[Path], Any]) -> Path:
    """Calls ``write_to(tmp)`` with a new empty directory beside ``target``, then puts it in place
    (``replace_directory``); on any error the temporary directory is removed and ``target`` is left as it was.

    Args:
        target: the final local directory (its parent is created).
        write_to: fills the directory it is given; it may raise to refuse (e.g. ``target`` appeared meanwhile and
            may not be replaced).

    Returns:
        ``target`` as a ``Path``.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(target)
    tmp.mkdir()  # the usual permissions (umask), unlike mkdtemp's owner-only 0700
    try:
        write_to(tmp)
        replace_directory(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
