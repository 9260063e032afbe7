"""Exception types of streamtotal. Each message says what was wrong, where, and what to do."""


class StreamtotalError(Exception):
    """Base class of every error raised by ``streamtotal``."""


class ConfigError(StreamtotalError):
    """A configuration value (file, flag or dataclass field) is invalid."""


class CheckpointError(StreamtotalError):
    """A checkpoint is missing, unreadable, or does not match the run it is loaded into."""


class RunDirError(StreamtotalError):
    """A run directory is missing what a command needs (no checkpoint, no config), or is in use."""


class ModelInputError(StreamtotalError):
    """Tensors handed to the model or its prior estimators do not fit it (wrong shape, nothing to estimate from)."""


class SelectionError(StreamtotalError):
    """A requested gene, protein, batch or cell is not among the model's (or the store's)."""


class InteropError(StreamtotalError):
    """A model saved by another tool (scvi-tools) cannot be imported faithfully, or its files are not what they
    should be."""
