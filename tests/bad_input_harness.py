"""Helpers to drive the command line as a real process with bad input and check that it fails cleanly.

A clean failure (the README's promise): exit status 2, one message on stderr that names what is at fault, no
traceback, and every output written before byte-identical afterwards. Importable from any test file
(``pythonpath = ["tests"]`` in pyproject.toml): ``from bad_input_harness import run_cli, tree_digest, ...``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CliResult:
    """What one run of ``python -m streamtotal`` did.

    Attributes:
        args: the arguments after ``streamtotal``.
        returncode: the exit status.
        stdout: standard output, decoded.
        stderr: standard error, decoded.
    """

    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


def cli_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a CLI run: this one, one torch thread (tiny models gain nothing from more on a shared
    machine), no progress bars, plus ``extra``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    env.update(extra or {})
    return env


def run_cli(*args: str | os.PathLike, cwd: str | os.PathLike | None = None,
            env: dict[str, str] | None = None) -> CliResult:
    """Runs ``sys.executable -m streamtotal ARGS`` to completion.

    Args:
        args: the command line after ``streamtotal``.
        cwd: working directory (default: this process's).
        env: extra environment variables.

    Returns:
        The exit status and the decoded output.
    """
    argv = tuple(str(a) for a in args)
    done = subprocess.run([sys.executable, "-m", "streamtotal", *argv], cwd=cwd, env=cli_env(env),
                          capture_output=True, text=True)
    return CliResult(argv, done.returncode, done.stdout, done.stderr)


def tree_digest(*roots: str | os.PathLike) -> dict[str, str]:
    """A digest of every file and folder under ``roots``: ``{path: sha256 of the bytes}`` for files,
    ``{path: "dir"}`` for folders, ``{path: "link -> target"}`` for symbolic links, ``{root: "absent"}`` for a
    root that does not exist. Two digests are equal exactly when nothing was added, removed or rewritten."""
    digest: dict[str, str] = {}
    for root in map(Path, roots):
        if not root.exists() and not root.is_symlink():
            digest[str(root)] = "absent"
            continue
        paths = [root, *sorted(root.rglob("*"))] if root.is_dir() and not root.is_symlink() else [root]
        for path in paths:
            if path.is_symlink():
                digest[str(path)] = f"link -> {os.readlink(path)}"
            elif path.is_dir():
                digest[str(path)] = "dir"
            else:
                digest[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digest


def assert_clean_failure(result: CliResult, *names: str) -> None:
    """Asserts exit status 2, every one of ``names`` in the error message, and no traceback.

    Args:
        result: a CLI run.
        names: what the message must name (a path, a flag, a key, a value); looked for in the
            ``streamtotal COMMAND: error: ...`` message itself, not in warnings printed before it.
    """
    shown = f"streamtotal {' '.join(result.args)}\n--- exit {result.returncode}; stderr:\n{result.stderr}"
    assert result.returncode == 2, shown
    assert "Traceback" not in result.stderr, shown
    prefix = f"streamtotal {result.args[0]}: error: "
    assert prefix in result.stderr, shown
    message = result.stderr[result.stderr.index(prefix):]
    for name in names:
        assert str(name) in message, f"{name!r} not named in the message\n{shown}"


def assert_fails_cleanly(args: tuple, names: tuple, unchanged: tuple, **kwargs) -> CliResult:
    """Runs the CLI with ``args``; asserts a clean failure naming ``names`` and that every path in ``unchanged``
    (earlier outputs: stores, run directories) is byte-identical before and after.

    Args:
        args: the command line after ``streamtotal``.
        names: what the message must name.
        unchanged: files and folders the failure must not touch.
        kwargs: passed to :func:`run_cli`.

    Returns:
        The run, for further checks.
    """
    before = tree_digest(*unchanged)
    result = run_cli(*args, **kwargs)
    assert_clean_failure(result, *names)
    after = tree_digest(*unchanged)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"the failed command changed earlier outputs: {changed[:20]}"
    return result


def unwritable_folder(path: Path) -> Path | None:
    """Creates ``path`` as a folder this process cannot write into, or returns None where that is not possible.

    As root neither permissions nor ``chmod`` stop a write; the immutable attribute (``chattr +i``) does, where
    the file system and the container allow it. Undo with :func:`make_writable` before the folder is removed.
    """
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        chattr = shutil.which("chattr")
        if chattr is None or subprocess.run([chattr, "+i", str(path)], capture_output=True).returncode != 0:
            return None
    else:
        path.chmod(0o555)
    if os.access(path, os.W_OK):
        make_writable(path)
        return None
    return path


def make_writable(path: Path) -> None:
    """Undoes :func:`unwritable_folder`."""
    if os.geteuid() == 0 and shutil.which("chattr"):
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)
    path.chmod(0o755)
