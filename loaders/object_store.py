"""Local paths and object-storage URLs (``s3://``) behind the few operations streamtotal's writers need.

Readers go through zarr and TileDB, which speak fsspec / S3 themselves. This module serves what is *written*
(stores from ``ingest``, run directories from ``train``) and turns object storage's failures into our errors:
the backend not installed (naming the extra to install), an endpoint that cannot be reached, missing
credentials, a missing bucket.

Object storage has no rename and no append, so "atomic" means here:

- a file (checkpoint, model, config) is written by ``ObjectPath.write_bytes``: one PUT of the finished bytes
  (a multipart upload above 100 MB, which S3 likewise only shows once complete), never a partial object under
  its final key;
- a directory of objects (a zarr store) is written under a temporary prefix and published by
  ``prefix_publish.publish_prefix``, its root metadata last.

Credentials, region and endpoint come from botocore's usual chain (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL``, profiles, instance roles), as for
reading stores; ``AWS_MAX_ATTEMPTS`` bounds botocore's retries (an unreachable endpoint fails after them).
"""

from __future__ import annotations

import io
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator

from loaders.errors import ObjectStoreError

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")

_BACKENDS = {"s3": ("s3fs", "s3"), "s3a": ("s3fs", "s3"), "gs": ("gcsfs", None), "gcs": ("gcsfs", None),
             "az": ("adlfs", None), "abfs": ("adlfs", None)}
"""URL scheme -> (fsspec backend package, streamtotal extra that installs it, None when there is none)."""

_UNREACHABLE = {"EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError", "ServerDisconnectedError",
                "ClientConnectionError", "ConnectionRefusedError"}
"""Names of the exceptions (botocore, aiohttp, builtins) that mean the endpoint could not be reached. Matched by
name so this module imports neither botocore nor aiohttp (they come with the optional backend)."""


def url_scheme(path: Any) -> str | None:
    """The scheme of a URL (``"s3"`` for ``s3://b/k``), or None for a local path (``file://`` counts as local)."""
    if isinstance(path, ObjectPath):
        return path.scheme
    match = _SCHEME.match(str(path)) if isinstance(path, str) else None
    scheme = match.group(1).lower() if match else None
    return None if scheme == "file" else scheme


def is_url(path: Any) -> bool:
    """True for an object-storage URL (``s3://...``) or an ``ObjectPath``; False for a local path."""
    return url_scheme(path) is not None


def endpoint_of(storage_options: dict | None = None) -> str:
    """The S3 endpoint requests go to, for messages: the storage options', else ``AWS_ENDPOINT_URL_S3`` /
    ``AWS_ENDPOINT_URL``, else AWS's own."""
    options = storage_options or {}
    endpoint = options.get("endpoint_url") or (options.get("client_kwargs") or {}).get("endpoint_url")
    return endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or \
        "the AWS S3 endpoint"


def missing_backend_message(url: str) -> str:
    """What to install to use ``url``'s scheme."""
    scheme = url_scheme(url) or "?"
    package, extra = _BACKENDS.get(scheme, (f"the fsspec backend of {scheme}://", None))
    install = f"pip install 'streamtotal[{extra}]'" if extra else f"pip install {package}"
    return f"{url}: {scheme}:// needs {package}, which is not installed: {install}"


def _chain(err: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


@contextmanager
def translated_errors(url: str, storage_options: dict | None = None, *, doing: str = "access") -> Iterator[None]:
    """Turns object storage's failures inside the block into ``ObjectStoreError`` naming ``url`` and what to do.

    Local paths pass through untouched. Errors that are not about reaching or using the store (a missing object,
    a malformed store) go up as they are, for the caller's own message.

    Args:
        url: the object the block works on (named in messages).
        storage_options: fsspec options in use (for the endpoint named in messages).
        doing: what the block does ("read", "write", ...), for messages.

    Raises:
        ObjectStoreError: the backend is not installed, the endpoint cannot be reached, credentials are missing
            or refused, or the bucket does not exist.
    """
    if not is_url(url):
        yield
        return
    try:
        yield
    except ObjectStoreError:
        raise
    except ImportError as err:
        package = _BACKENDS.get(url_scheme(url) or "", ("fsspec", None))[0]
        if package in str(err) or getattr(err, "name", None) in (package, "fsspec"):
            raise ObjectStoreError(missing_backend_message(url)) from err
        raise
    except Exception as err:
        names = {type(e).__name__ for e in _chain(err)}
        if names & _UNREACHABLE:
            raise ObjectStoreError(
                f"{url}: cannot reach {endpoint_of(storage_options)} to {doing} it; check the endpoint "
                "(AWS_ENDPOINT_URL), the network and that the server is up"
            ) from err
        if "NoCredentialsError" in names or "PartialCredentialsError" in names:
            raise ObjectStoreError(
                f"{url}: no S3 credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, "
                "or run with an instance role)"
            ) from err
        if isinstance(err, PermissionError):
            raise ObjectStoreError(f"{url}: access denied to {doing} it ({err}); check the credentials' "
                                   "permissions on the bucket") from err
        if isinstance(err, FileNotFoundError) and "bucket does not exist" in str(err).lower():
            raise ObjectStoreError(f"{url}: the bucket does not exist at {endpoint_of(storage_options)}; "
                                   "create it first") from err
        raise


def filesystem(url: str, storage_options: dict | None = None):
    """The fsspec filesystem of ``url`` and the path inside it.

    Args:
        url: an object-storage URL (``s3://bucket/key``).
        storage_options: fsspec options (credentials, ``client_kwargs={"endpoint_url": ...}``); None: botocore's
            usual environment.

    Returns:
        ``(fs, path)``.

    Raises:
        ObjectStoreError: the scheme's backend (s3fs for ``s3://``) is not installed.
    """
    with translated_errors(url, storage_options):
        import fsspec

        return fsspec.core.url_to_fs(url, **(storage_options or {}))


class ObjectPath:
    """A file or folder on object storage with the few ``pathlib.Path`` methods run directories and writers use,
    so that code written for local paths works on ``s3://`` unchanged where object storage allows it.

    Folders are key prefixes: ``mkdir`` only checks that the bucket exists. ``write_bytes`` is one PUT (never a
    partial object under the key). Every call translates failures into ``ObjectStoreError`` (see
    ``translated_errors``). Deliberately not ``os.PathLike``: code that would open it as a local file fails
    instead of writing to a local folder named ``s3:``.

    Args:
        url: ``scheme://bucket/key``.
        storage_options: fsspec options; None for botocore's usual environment.
    """

    def __init__(self, url: str, storage_options: dict | None = None, *, _fs=None) -> None:
        scheme = url_scheme(url)
        if scheme is None:
            raise ValueError(f"{url!r} is not an object-storage URL")
        self.scheme = scheme
        self.url = url.rstrip("/")
        self.storage_options = storage_options
        self._fs = _fs

    # ------------------------------------------------------------------ path arithmetic
    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"ObjectPath({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObjectPath) and other.url == self.url

    def __lt__(self, other: ObjectPath) -> bool:
        return self.url < other.url

    def __hash__(self) -> int:
        return hash(self.url)

    def __truediv__(self, name: str) -> ObjectPath:
        return ObjectPath(f"{self.url}/{name}", self.storage_options, _fs=self._fs)

    @property
    def name(self) -> str:
        return PurePosixPath(self.key).name

    @property
    def stem(self) -> str:
        return PurePosixPath(self.key).stem

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.key).suffix

    @property
    def parent(self) -> ObjectPath:
        head = self.url.rsplit("/", 1)[0]
        return self if head.endswith(":/") else ObjectPath(head, self.storage_options, _fs=self._fs)

    def resolve(self) -> ObjectPath:
        """A URL is already absolute."""
        return self

    @property
    def fs(self):
        """The fsspec filesystem (created on first use)."""
        if self._fs is None:
            self._fs = filesystem(self.url, self.storage_options)[0]
        return self._fs

    @property
    def key(self) -> str:
        """``bucket/key``: the path inside the filesystem."""
        return self.url.split("://", 1)[1]

    @property
    def bucket(self) -> str:
        return self.key.split("/", 1)[0]

    @contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        with translated_errors(self.url, self.storage_options, doing=doing):
            yield

    # ------------------------------------------------------------------ queries
    def _type(self) -> str | None:
        """``"file"``, ``"directory"`` (a prefix holding objects) or None. Through ``info``, which raises what it
        meets, unlike fsspec's ``exists`` / ``isfile``: those answer False for an unreachable endpoint."""
        with self._errors("read"):
            self.fs.invalidate_cache(self.key)
            try:
                return self.fs.info(self.key)["type"]
            except FileNotFoundError:
                return None

    def exists(self) -> bool:
        """True when an object has this key or this prefix holds objects."""
        return self._type() is not None

    def is_file(self) -> bool:
        return self._type() == "file"

    def is_dir(self) -> bool:
        return self._type() == "directory"

    def iterdir(self) -> list[ObjectPath]:
        """The objects and sub-prefixes directly under this prefix (none when it holds nothing)."""
        with self._errors("list"):
            try:
                found = self.fs.ls(self.key, detail=False, refresh=True)
            except FileNotFoundError:
                return []
        return [self / PurePosixPath(p).name for p in found if p.rstrip("/") != self.key]

    def read_bytes(self) -> bytes:
        with self._errors("read"):
            return self.fs.cat_file(self.key)

    def read_text(self) -> str:
        return self.read_bytes().decode()

    # ------------------------------------------------------------------ writes
    def mkdir(self, parents: bool = True, exist_ok: bool = True) -> None:
        """Checks that the bucket exists and can be reached; prefixes need no creating.

        Raises:
            ObjectStoreError: unreachable endpoint, no credentials, or no such bucket.
        """
        with self._errors("write"):
            if not self._bucket_exists():
                raise ObjectStoreError(f"{self.url}: bucket {self.bucket!r} does not exist at "
                                       f"{endpoint_of(self.storage_options)}; create it first")

    def _bucket_exists(self) -> bool:
        if hasattr(self.fs, "call_s3"):  # s3fs: its exists() of a bare bucket answers False when unreachable
            try:
                self.fs.call_s3("head_bucket", Bucket=self.bucket)
                return True
            except FileNotFoundError:
                return False
        return bool(self.fs.exists(self.bucket))

    def write_bytes(self, data: bytes) -> None:
        """Writes the object in one PUT: readers see the old object or the whole new one, never a part."""
        with self._errors("write"):
            self.fs.pipe_file(self.key, data if isinstance(data, bytes) else bytes(data))

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def unlink(self, missing_ok: bool = False) -> None:
        with self._errors("delete"):
            try:
                self.fs.rm_file(self.key)
            except FileNotFoundError:
                if not missing_ok:
                    raise

    def remove_tree(self) -> None:
        """Deletes every object under this prefix (nothing when there is none)."""
        with self._errors("delete"):
            try:
                self.fs.rm(self.key, recursive=True)
            except FileNotFoundError:
                pass


def as_path(path: str | os.PathLike | ObjectPath, storage_options: dict | None = None) -> Path | ObjectPath:
    """``path`` as a ``pathlib.Path`` (local) or an ``ObjectPath`` (a URL such as ``s3://bucket/run``).

    Never turns a URL into a local path: ``Path("s3://b/k")`` would be the local folder ``s3:/b/k``.
    """
    if isinstance(path, (Path, ObjectPath)):
        return path
    text = os.fspath(path)
    return ObjectPath(text, storage_options) if is_url(text) else Path(text)


def readable(path: Path | ObjectPath) -> Path | io.BytesIO:
    """What ``torch.load`` / ``open`` readers take: the local path itself, or the object's bytes in memory."""
    return io.BytesIO(path.read_bytes()) if isinstance(path, ObjectPath) else path


def write_object_atomically(path: ObjectPath, write: Callable[[io.BytesIO], Any]) -> None:
    """Calls ``write(buffer)`` on an in-memory buffer and PUTs the finished bytes (``ObjectPath.write_bytes``).

    The whole object is held in memory once (a checkpoint: the model and optimiser state, tens of MB).
    """
    buffer = io.BytesIO()
    write(buffer)
    path.write_bytes(buffer.getvalue())


def zarr_store(path: Path | ObjectPath):
    """What ``zarr.open_group`` takes to write at ``path``: the local path, or an fsspec store with the path's
    storage options (zarr runs its own asynchronous filesystem instance on its event loop)."""
    if not isinstance(path, ObjectPath):
        return str(path)
    from zarr.storage import FsspecStore

    with path._errors("write"):
        return FsspecStore.from_url(path.url, storage_options=path.storage_options, read_only=False)


def remove_tree(path: Path | ObjectPath) -> None:
    """Deletes a local directory tree or every object under a prefix; nothing when absent."""
    if isinstance(path, ObjectPath):
        path.remove_tree()
    else:
        shutil.rmtree(path, ignore_errors=True)


def refuse_url(path: Any, what: str, instead: str = "write it locally, then upload it (e.g. aws s3 sync)") -> None:
    """Raises when ``path`` is an object-storage URL: for outputs that cannot be written there.

    Args:
        path: the output the user asked for.
        what: what would be written (named in the message).
        instead: what to do instead.

    Raises:
        ObjectStoreError: ``path`` is a URL.
    """
    if is_url(path):
        raise ObjectStoreError(f"{path}: {what} cannot be written to object storage; {instead}")
