"""Standard output that outlives its reader: ``streamtotal ingest ... | head -2`` finishes the work, quietly.

Python ignores SIGPIPE, so once the reader of a pipe exits every write raises ``BrokenPipeError`` — in the middle
of a command that prints progress, or in the final report after the work is done, and once more when the
interpreter flushes stdout at exit ("Exception ignored ... BrokenPipeError"). The reader chose to stop reading:
that is no error of the command, so the rest of its output is discarded and the work completes.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator, TextIO


class PipeSafeStream:
    """Wraps a text stream; after the first ``BrokenPipeError`` further output goes to ``os.devnull``.

    Attributes:
        reader_gone: True once a write or flush found the reading end closed.
    """

    def __init__(self, stream: TextIO) -> None:
        """Args:
            stream: the stream to wrap (``sys.stdout`` or ``sys.stderr``).
        """
        self._stream = stream
        self.reader_gone = False

    def write(self, text: str) -> int:
        """Writes ``text``, or drops it once the reader is gone; returns ``len(text)`` either way."""
        if not self.reader_gone:
            try:
                return self._stream.write(text)
            except BrokenPipeError:
                self._discard_from_now_on()
        return len(text)

    def flush(self) -> None:
        """Flushes the stream, or does nothing once the reader is gone."""
        if not self.reader_gone:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._discard_from_now_on()

    def __getattr__(self, name: str):
        return getattr(self._stream, name)

    def _discard_from_now_on(self) -> None:
        self.reader_gone = True
        # Text already buffered is flushed again at exit, and child processes share the descriptor: point it at
        # os.devnull so that those writes succeed and vanish instead of raising again.
        try:
            fd = self._stream.fileno()
        except (OSError, ValueError):  # not backed by a descriptor (an in-memory stream): nothing to redirect
            return
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, fd)
        finally:
            os.close(devnull)


@contextlib.contextmanager
def pipe_safe_output() -> Iterator[PipeSafeStream]:
    """Makes ``sys.stdout`` and ``sys.stderr`` :class:`PipeSafeStream` s for the duration (``2>&1 | head`` closes
    both), flushing them before restoring the originals, so a reader that left is noticed here and not at
    interpreter exit.

    Yields:
        The stdout wrapper, whose ``reader_gone`` says whether the output was cut short.
    """
    originals = sys.stdout, sys.stderr
    guarded = tuple(None if s is None else PipeSafeStream(s) for s in originals)
    sys.stdout, sys.stderr = (g if g is not None else s for g, s in zip(guarded, originals))
    try:
        yield guarded[0]
    finally:
        for g in guarded:
            if g is not None:
                g.flush()
        sys.stdout, sys.stderr = originals
