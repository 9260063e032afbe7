"""The command line's logging handler.

Library code reports through the ``streamtotal`` logger (and its children) and never prints, so a notebook that
imports it gets no output it did not ask for. The command line shows those reports, INFO and above, as bare
lines on stderr: stdout stays the command's own output (several commands print one JSON object there for
scripts to parse).
"""

from __future__ import annotations

import logging
import sys

LIBRARY_LOGGER = "streamtotal"
"""The logger every module of streamtotal and loaders logs under (``logging.getLogger(__name__)``)."""


class _CurrentStderr(logging.StreamHandler):
    """A handler writing to whatever ``sys.stderr`` is when a record arrives, not when it was made: output
    capture (pytest, ``pipe_safe_output``) replaces the stream after the handler is installed."""

    @property
    def stream(self):  # noqa: D102 - the current sys.stderr
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass  # StreamHandler.__init__ assigns one; this handler always resolves the current stream instead


def configure_cli_logging() -> None:
    """Shows the library's INFO records and above on stderr, as bare messages (installed once per process).

    Records still propagate to the root logger, so handlers a caller installed there see them too.
    """
    logger = logging.getLogger(LIBRARY_LOGGER)
    if any(isinstance(h, _CurrentStderr) for h in logger.handlers):
        return
    handler = _CurrentStderr()
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
