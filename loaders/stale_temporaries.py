"""Temporary store directories of killed writers: telling them from live ones, and removing them.

A store is written to ``.NAME.tmp-XXXX`` beside its target and renamed into place at the end; a writer that is
killed (kill -9, a lost node) leaves that directory behind. How one is told from a live writer's: every writer
holds an exclusive ``flock`` on its temporary directory for as long as it writes. The kernel drops the lock when the
process dies, however it dies, so a temporary whose lock can be taken is abandoned, and one whose lock cannot is
still being written. (An age rule cannot tell a killed run from a slow concurrent one; a pid file cannot tell a
reused pid, nor a pid on another host of a shared filesystem. Linux NFS clients support flock; a filesystem that
refuses locks leaves its temporaries in place rather than risk a live writer's.)
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
from pathlib import Path

logger = logging.getLogger("streamtotal.loaders.stale_temporaries")


def temporary_prefix(target: Path) -> str:
    """The name prefix of ``target``'s temporary directories (``.NAME.tmp-``)."""
    return f".{target.name}.tmp-"


def hold_writer_lock(directory: Path) -> int | None:
    """Marks ``directory`` as being written by this process until ``release_writer_lock``.

    Args:
        directory: a temporary directory this process just created.

    Returns:
        The descriptor holding the lock, or None where the filesystem has no locks (the directory is then never
        removed by ``remove_stale_temporaries``).
    """
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        logger.debug("no lock on %s (%s): it will not be recognised as abandoned if this run is killed", directory, err)
        return None
    return fd


def release_writer_lock(fd: int | None) -> None:
    """Releases a lock of ``hold_writer_lock`` (closing its descriptor); nothing for None."""
    if fd is not None:
        os.close(fd)


def remove_stale_temporaries(target: Path) -> list[Path]:
    """Removes the temporary directories of ``target`` (and only of ``target``) whose writer is gone.

    Args:
        target: the store the temporaries were written for (called once it is in place, so this run's own
            temporary is gone by then).

    Returns:
        The directories removed.
    """
    removed = []
    prefix = temporary_prefix(target)
    try:
        candidates = sorted(p for p in target.parent.iterdir() if p.name.startswith(prefix))
    except OSError:
        return removed
    for path in candidates:
        if path.is_symlink() or not path.is_dir():
            continue
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue  # removed meanwhile, or not ours to read
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    logger.debug("cannot lock %s (%s): left in place", path, err)
                continue  # a live writer holds it (or locks are unsupported: cannot tell, so keep it)
            # Held by us now: a writer that is still starting cannot take it, and the directory goes.
            shutil.rmtree(path, ignore_errors=True)
        finally:
            os.close(fd)
        if not path.exists():
            removed.append(path)
            logger.info("removed %s, left behind by an interrupted write of %s", path, target)
    return removed
