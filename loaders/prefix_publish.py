"""Publishing a zarr store written under a temporary prefix of object storage, so it is only seen complete.

Object storage cannot rename a prefix. A store is therefore written under a hidden temporary prefix beside its
target (``s3://b/.x.zarr.tmp-<id>/``) and published by server-side copies (no data passes through this machine)
in this order:

1. the old store, when replacing one: its root metadata first (``.zgroup``; from then on no reader opens it),
   then the rest;
2. every object of the new store except its root metadata;
3. the root metadata, ``.zgroup`` / ``zarr.json`` last: zarr opens a group only once it is there;
4. the temporary prefix is deleted.

A job killed during 2-3 leaves objects under the target but no root group, which zarr refuses to open ("cannot
open a zarr group there"), and the complete new store under the temporary prefix. Replacing a store on object
storage thus has a window (1-3) in which neither the old nor the new one is visible, never one in which a mix is.
"""

from __future__ import annotations

from loaders.errors import StoreExistsError
from loaders.object_store import ObjectPath

ROOT_METADATA = (".zattrs", ".zmetadata", ".zgroup", "zarr.json")
"""Root metadata objects of a zarr v2 / v3 group, in the order they are published (the group marker last)."""


def publish_prefix(tmp: ObjectPath, target: ObjectPath, *, overwrite: bool) -> None:
    """Copies the store under ``tmp`` to ``target`` (root metadata last) and deletes ``tmp``.

    Args:
        tmp: the complete store, under its temporary prefix.
        target: where it is published.
        overwrite: replace what ``target`` holds; otherwise an occupied target is refused.

    Raises:
        StoreExistsError: ``target`` holds objects and ``overwrite`` is False.
        ObjectStoreError: object storage refused or could not be reached.
    """
    fs = target.fs
    with target._errors("publish"):
        fs.invalidate_cache(tmp.key)
        names = sorted(path[len(tmp.key) + 1:] for path in fs.find(tmp.key))
        body = [n for n in names if n not in ROOT_METADATA]
        roots = [n for n in ROOT_METADATA if n in names]
        if target.exists():
            if not overwrite:
                raise StoreExistsError(f"{target} appeared while writing; pass overwrite=True to replace it.")
            for name in reversed(ROOT_METADATA):  # hide the old store before touching the rest of it
                (target / name).unlink(missing_ok=True)
            fs.rm(target.key, recursive=True)
        if body:
            fs.copy([f"{tmp.key}/{n}" for n in body], [f"{target.key}/{n}" for n in body])
        for name in roots:
            fs.copy(f"{tmp.key}/{name}", f"{target.key}/{name}")
        fs.rm(tmp.key, recursive=True)
        fs.invalidate_cache(target.key)
