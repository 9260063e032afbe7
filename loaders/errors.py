"""Exception types of the data layer.

Every message says what was wrong, where (study, field, cell or column) and what to do, because the
people who read them are running a job on a cluster and cannot attach a debugger.
"""


class LoaderError(Exception):
    """Base class of every error raised by ``loaders``."""


class StoreFormatError(LoaderError):
    """A store exists but does not have the layout or fields a Source needs."""


class InvalidCountsError(LoaderError):
    """Counts are NaN, infinite, negative or non-integer where integers are required."""


class AlignmentError(LoaderError):
    """Studies cannot be aligned: too few shared genes, no shared proteins, clashing names."""


class PlanError(LoaderError):
    """A plan cannot be built from the given sizes (e.g. fewer cells than ranks x workers)."""


class ResumeError(LoaderError):
    """A saved loader state does not match the loader it is being loaded into."""


class RegistryError(LoaderError):
    """A registry (saved with a model) is malformed: duplicate names, wrong mask shape, missing keys."""


class ConfigError(LoaderError):
    """A loader configuration value is out of range (e.g. a non-positive batch size)."""


class InvalidIdsError(LoaderError):
    """Cell ids passed to a read are not sorted, not unique, not integers or out of range."""


class AlignmentWarning(UserWarning):
    """Alignment dropped or masked something the user may not expect (e.g. proteins not in a registry)."""


class StoreExistsError(LoaderError, FileExistsError):
    """A store already exists where a new one would be written (pass ``overwrite=True`` to replace it)."""


class LaminError(LoaderError):
    """A LaminDB target cannot be resolved: lamindb missing, unknown instance, collection, artifact or suffix."""


class ObjectStoreError(LoaderError):
    """Object storage (``s3://``) cannot be used: its fsspec backend is not installed, the endpoint cannot be
    reached, credentials are missing or refused, the bucket does not exist, or the operation (a write-back, a
    report folder) is not supported there."""
