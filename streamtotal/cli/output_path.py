"""Checks that a command can write where its output flag points, before it reads or computes anything.

Without it, a run directory under a read-only folder or a file fails at its first write: after the data were
opened (or a whole embedding written back into the store) and with an OS traceback instead of the flag's name.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from streamtotal.errors import ConfigError


def is_local(path: str | os.PathLike) -> bool:
    """False for a URI (``s3://``, ``gs://``, ``tiledb://``, ...): object stores are checked by their own writers."""
    return "://" not in str(path)


def check_output_path(path: str | os.PathLike | None, flag: str, *, kind: Literal["dir", "file"],
                      object_storage: bool = False) -> None:
    """Refuses an output location this process cannot create or write.

    Args:
        path: the flag's value; None (flag not given) is not checked.
        flag: the flag, for the message (``"--out"``).
        kind: ``"dir"``: a directory the command writes files into (a run directory), created when absent;
            an existing one must be a writable directory. ``"file"``: a file or store written whole under a
            temporary name beside it and renamed into place, so the folder that holds it must be writable.
        object_storage: the command writes this output to object storage itself (``train --out``, ``ingest
            --out``), checked there; otherwise a URI is refused here rather than written to a local folder
            named after it (``./s3:/...``).

    Raises:
        ConfigError: naming the flag, the path and the folder at fault (a file where a folder is needed, or not
            writable: permissions, a read-only file system, an immutable folder).
    """
    if path is None:
        return
    if not is_local(path):
        if not object_storage:
            raise ConfigError(f"{flag} {path}: this output cannot be written to object storage; write it to a local "
                              "path, then upload it (e.g. aws s3 sync)")
        return
    target = Path(path)
    if kind == "dir" and target.exists():
        if not target.is_dir():
            raise ConfigError(f"{flag} {path}: exists and is not a directory; give a directory (it is created "
                              "if absent)")
        _check_writable(target, flag, path)
        return
    folder = _nearest_existing(target.parent)
    if not folder.is_dir():
        raise ConfigError(f"{flag} {path}: cannot create it, {folder} is a file, not a directory")
    _check_writable(folder, flag, path)


def _nearest_existing(path: Path) -> Path:
    # A relative path's chain ends at "." (the working directory), which exists.
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_writable(folder: Path, flag: str, path: str | os.PathLike) -> None:
    # os.access asks the kernel, so it also answers for root, read-only mounts and immutable folders.
    if not os.access(folder, os.W_OK | os.X_OK):
        where = "" if folder == Path(path) else f" in {folder}"
        raise ConfigError(f"{flag} {path}: cannot write{where} (no write permission, a read-only file system or "
                          "an immutable folder); choose a location this user can write")
