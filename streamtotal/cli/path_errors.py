"""Which operating-system errors are the user's environment (a path that cannot be written, a full disk), reported
as bad input, and which are the program's (kept as tracebacks, to be seen and fixed)."""

from __future__ import annotations

import errno

_HINTS = {
    errno.EACCES: "no permission; choose a location this user can read and write",
    errno.EPERM: "not permitted (an immutable or protected folder?); choose another location",
    errno.EROFS: "the file system is read-only; choose another location",
    errno.ENOTDIR: "a part of the path is a file where a folder is needed",
    errno.EISDIR: "a folder is where a file is needed",
    errno.EEXIST: "something already exists there",
    errno.ENOENT: "it does not exist",
    errno.ENOSPC: "the disk is full; free space or choose another location",
    errno.EDQUOT: "the disk quota is exhausted; free space or choose another location",
    errno.ENAMETOOLONG: "the path is too long",
    errno.ELOOP: "the path has a loop of symbolic links",
}
"""The errnos that describe a path or its file system, with what to do about each."""


def path_error_message(error: OSError) -> str | None:
    """The message for an OS error about a named path, or None when the error names no path or is of another kind
    (a socket, a broken pipe, ...): those stay tracebacks.

    Args:
        error: the error a command raised.

    Returns:
        ``"PATH: STRERROR (what to do)"``, or None.
    """
    hint = _HINTS.get(error.errno)
    if hint is None or error.filename is None:
        return None
    where = str(error.filename) if error.filename2 is None else f"{error.filename} -> {error.filename2}"
    return f"{where}: {error.strerror} ({hint})"
