"""Objects whose unpickling would run code, for the tests that plant them in checkpoints and model files.

Both are harmless (they create a marker file) and would only act if a loader unpickled with
``weights_only=False``; the tests assert the marker never appears.
"""

import os


class ShellPayload:
    """Unpickled with weights_only=False, runs ``touch MARKER`` (the issue's attack, harmless here)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class OpenPayload:
    """Unpickled with weights_only=False, creates MARKER through a builtin (not a blocklisted module)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")
