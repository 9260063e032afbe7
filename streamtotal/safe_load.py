"""Loading ``torch.save`` files that a user hands us without running any code they hold.

A ``torch.save`` file is a pickle: loaded with ``weights_only=False`` it can call any function (``os.system``)
through an object's ``__reduce__``. Every file is therefore loaded with ``weights_only=True``, whose unpickler
builds only tensors, containers and the globals explicitly allow-listed for the call. The file's globals are
read first without executing anything (``torch.serialization.get_unsafe_globals_in_checkpoint``), so a file
holding anything else is refused before loading, naming what it holds.

Allowed beyond torch's own set:

- numpy arrays, dtypes and scalars (``_reconstruct``, ``ndarray``, ``dtype``, ``scalar``): they only build data,
  and nested objects of an object array go through the same restricted unpickler. scvi-tools stores gene and
  category names as numpy arrays; checkpoints written before version 2 hold numpy's RNG state as one.
- ``collections.defaultdict``, built as a plain dict (scvi-tools' ``field_registries``): a plain dict reads the
  same and leaves no default factory behind to call later.
- ``builtins`` ``dict``, ``bytes``, ``slice``: constructors of plain values.
- On request (``inert_modules``), any global of a named package (scvi-tools' training history is pandas
  DataFrames that nothing reads) is replaced by an inert stand-in: it takes any arguments and state and keeps
  none, so no code of that package runs. Callers must not read such values (``is_inert`` tells).
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import IO, Any, Union

import numpy as np
import torch

Source = Union[str, "os.PathLike[str]", IO[bytes]]


class UnreadableFileError(Exception):
    """The file is missing, truncated, or not a ``torch.save`` file. Callers turn it into their own error type.

    Attributes:
        reason: what went wrong, as torch or the file system said it.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class UnsafeFileError(Exception):
    """The file holds objects whose loading would run code that is not allow-listed. Nothing of it was loaded.

    Attributes:
        names: the offending globals (``module.name``), sorted.
    """

    def __init__(self, names: list[str]) -> None:
        super().__init__(", ".join(names))
        self.names = names


class _Inert:
    """Stands in for a global of an ``inert_modules`` package: accepts any constructor arguments and pickle state,
    keeps nothing, runs nothing."""

    def __new__(cls, *args: Any, **kwargs: Any) -> "_Inert":
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __repr__(self) -> str:
        return "<not loaded>"


def is_inert(value: Any) -> bool:
    """True when ``value`` is the stand-in of an object of an ``inert_modules`` package (never loaded)."""
    return isinstance(value, _Inert)


def _plain_dict(default_factory: Any = None) -> dict:
    """A ``defaultdict`` as a plain dict: its items follow (SETITEMS); the factory is dropped, never called."""
    return {}


def _numpy_globals() -> dict[str, Any]:
    """numpy's reconstructors under the names both numpy 1 (``numpy.core``) and numpy 2 (``numpy._core``) pickle."""
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    found: dict[str, Any] = {"numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype}
    for package in ("numpy.core", "numpy._core"):
        found[f"{package}.multiarray._reconstruct"] = multiarray._reconstruct
        found[f"{package}.multiarray.scalar"] = multiarray.scalar
    # numpy >= 1.25 may name a dtype by its class (numpy.dtypes.Float64DType); those classes only describe data.
    dtypes = getattr(np, "dtypes", None)
    for name in dir(dtypes) if dtypes is not None else ():
        cls = getattr(dtypes, name)
        if isinstance(cls, type) and issubclass(cls, np.dtype):
            found[f"numpy.dtypes.{name}"] = cls
    return found


def _allowed_globals() -> dict[str, Any]:
    """Allow-listed globals by the name the file gives (torch maps Python 2's ``__builtin__`` to ``builtins``)."""
    return {**_numpy_globals(), "collections.defaultdict": _plain_dict, "builtins.dict": dict,
            "builtins.bytes": bytes, "builtins.slice": slice}


# Messages of torch's restricted unpickler that mean "this global or call is not allowed", as opposed to a
# damaged file ("Unsupported operand", zip errors).
_REFUSALS = ("GLOBAL", "unrecognized function", "Can only create new object", "Can only build")

# How the lines of torch's weights_only error message begin that explain torch's defaults rather than this file.
_BOILERPLATE = ("Weights only load failed", "Check the documentation", "Please file an issue", "(1)", "(2)")


def load_weights_only(source: Source, *, inert_modules: tuple[str, ...] = ()) -> Any:
    """Loads a ``torch.save`` file onto the CPU with ``weights_only=True`` and this module's allow-list.

    Args:
        source: a path, or a binary file object positioned at the start of the file.
        inert_modules: top-level packages (e.g. ``("pandas",)``) whose objects are replaced by inert stand-ins.

    Returns:
        The loaded object.

    Raises:
        UnsafeFileError: the file holds globals outside the allow-list (nothing was loaded, nothing ran).
        UnreadableFileError: the file is missing, truncated or not a ``torch.save`` file.
    """
    if isinstance(source, (str, os.PathLike)):
        if not Path(source).is_file():
            raise UnreadableFileError("no such file")
        opened = lambda: source  # noqa: E731
    else:
        data = source.read()  # scanned, then loaded: read twice
        opened = lambda: io.BytesIO(data)  # noqa: E731
    allowed = _allowed_globals()
    scan_error: Exception | None = None
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(opened())
    except Exception as e:  # torch raises RuntimeError/ValueError for files it cannot parse
        # A legacy (non-zip) file cannot be scanned; the restricted load below still guards it.
        found, scan_error = None, e
    # All of the allow-list, not only the names the file gives: numpy's BUILD of a dtype checks the dtype's class
    # (numpy.dtypes.ObjectDType), which the file never names.
    safe: list[Any] = [(value, name) for name, value in allowed.items()]
    if found is not None:
        unsafe = []
        for name in found:
            if name in allowed:
                continue
            if name.split(".", 1)[0] in inert_modules:
                safe.append((_Inert, name))
            else:
                unsafe.append(name)
        if unsafe:
            raise UnsafeFileError(sorted(unsafe))
    try:
        with torch.serialization.safe_globals(safe):
            return torch.load(opened(), map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and storage errors of torch: several types
        detail = _torch_reason(str(e))
        if any(refusal in detail for refusal in _REFUSALS):
            raise UnsafeFileError([detail]) from e
        if scan_error is not None and isinstance(e, pickle.UnpicklingError):  # neither a zip nor a legacy pickle
            raise UnreadableFileError(f"not a torch.save file ({detail})") from e
        raise UnreadableFileError(f"{type(e).__name__}: {detail or 'the file ends early'}") from e


def _torch_reason(message: str) -> str:
    """torch's (multi-line) error message without its lines about torch's defaults."""
    lines = [line.strip().removeprefix("WeightsUnpickler error:").strip() for line in message.splitlines()]
    kept = [line for line in lines if line and not line.startswith(_BOILERPLATE)]
    return "; ".join(kept)
