"""Sources for the h5ad / zarr artifacts of a LaminDB ``Collection`` (or of one ``Artifact``).

A LaminDB collection is a list of files, not a store of its own: each artifact is opened with the Source of
its format (``H5adSource`` for ``.h5ad`` / ``.h5mu``, ``ZarrSource`` for ``.zarr`` directories) and becomes
one study. The collection and artifact uids are returned as provenance for the run's registry, so a model
records exactly which versions of which files it was trained on.

Target grammar (``lamin://`` URIs, as they appear among ``[data] stores``)::

    lamin://INSTANCE/COLLECTION_KEY            every artifact of the collection, in the collection's order
    lamin://INSTANCE/artifact/ARTIFACT_KEY     one artifact
    INSTANCE := NAME                           an instance of the current lamin user (``anonymous`` when
                                               not logged in: every local instance made offline)
              | OWNER%2FNAME                   ``OWNER/NAME`` with its slash percent-encoded

Keys may contain ``/`` (everything after INSTANCE is the key). The latest version with that key is used;
its uid is what the provenance records.

Instances given by URI are queried through ``lamindb.DB``: the process's default instance and the lamin
settings on disk are left as they were. lamindb is imported only when a target is resolved, so ``loaders``
works without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import unquote

from loaders.errors import LaminError
from loaders.h5ad_source import H5adSource
from loaders.source import Source
from loaders.zarr_source import ZarrSource

LAMIN_SCHEME = "lamin://"
H5AD_SUFFIXES = (".h5ad", ".h5mu")
ZARR_SUFFIXES = (".zarr",)  # also matches lamindb's ".anndata.zarr" / ".mudata.zarr"
_INSTALL_HINT = "install it with: pip install 'streamtotal[lamin]'"
_MAX_LISTED = 20


@dataclass(frozen=True)
class LaminTarget:
    """A parsed ``lamin://`` URI.

    Attributes:
        instance: ``NAME`` or ``OWNER/NAME``.
        kind: ``"collection"`` or ``"artifact"``.
        key: the collection's or artifact's key.
    """

    instance: str
    kind: str
    key: str


def is_lamin_uri(target: object) -> bool:
    """True when ``target`` is a string starting with ``lamin://``."""
    return isinstance(target, str) and target.startswith(LAMIN_SCHEME)


def parse_lamin_uri(uri: str) -> LaminTarget:
    """Splits a ``lamin://`` URI into instance, kind and key (see the module docstring for the grammar).

    Raises:
        LaminError: the URI is not ``lamin://INSTANCE/KEY`` or ``lamin://INSTANCE/artifact/KEY``.
    """
    if not is_lamin_uri(uri):
        raise LaminError(f"{uri!r} is not a lamin:// URI (expected lamin://INSTANCE/COLLECTION_KEY)")
    instance, _, rest = uri[len(LAMIN_SCHEME):].partition("/")
    instance = unquote(instance)
    kind, key = "collection", rest
    if rest.startswith("artifact/"):
        kind, key = "artifact", rest[len("artifact/"):]
    if not instance or not key or instance.count("/") > 1:
        raise LaminError(
            f"cannot parse {uri!r}: expected lamin://INSTANCE/COLLECTION_KEY or lamin://INSTANCE/artifact/KEY "
            "(INSTANCE is NAME, or OWNER%2FNAME)"
        )
    return LaminTarget(instance=instance, kind=kind, key=key)


def lamin_sources(
    target: Any,
    *,
    instance: str | None = None,
    protein_key: str = "protein_expression",
    rna_layer: str | None = None,
    validate: bool = True,
    cache: bool = False,
) -> tuple[list[Source], dict]:
    """Opens every artifact of a LaminDB collection (or one artifact) as a Source.

    Args:
        target: a ``lamin://`` URI, a collection key (in ``instance``, or the default instance), or an
            ``ln.Collection`` / ``ln.Artifact`` record.
        instance: ``NAME`` or ``OWNER/NAME`` for a bare collection key; must match a URI's instance.
        protein_key: obsm key of the protein counts (AnnData-layout artifacts).
        rna_layer: read RNA counts from ``layers/<rna_layer>`` instead of ``X``.
        validate: check every read for NaN, infinite and negative counts.
        cache: also copy zarr artifacts of cloud storage to the local cache (by default they are streamed
            from their URL; h5ad artifacts are always cached, as they need random access to one file).

    Returns:
        ``(sources, provenance)``: one Source per artifact in the collection's order, named after the
        artifact's key (or description, or uid), unique; and ``{"lamindb": {"instance", "collection_uid",
        "collection_key", "artifact_uids", "artifact_keys", "study_names"}}`` for the registry's ``extra``
        (collection fields are None for a single artifact).

    Raises:
        LaminError: lamindb is not installed, the instance, collection or artifact does not exist, an
            artifact has a suffix no Source reads, or the collection is empty.
        StoreFormatError: an artifact's file lacks what its Source needs.
    """
    ln = _import_lamindb()
    collection, artifacts, slug = _resolve(ln, target, instance)
    if not artifacts:
        raise LaminError(f"LaminDB collection {collection.key or collection.uid!r} in {slug} has no artifacts")
    for art in artifacts:
        if _reader_for(art) is None:
            raise LaminError(
                f"artifact {_label(art)} (uid {art.uid}) in {slug} has suffix {art.suffix!r}; only "
                f"{list(H5AD_SUFFIXES + ZARR_SUFFIXES)} can be streamed: convert it with `streamtotal ingest`"
            )
    names = _study_names(artifacts)
    sources = []
    for art, name in zip(artifacts, names):
        path, storage_options = _location(art, cache)
        if _reader_for(art) is ZarrSource:
            sources.append(ZarrSource(path, name=name, protein_key=protein_key, rna_layer=rna_layer,
                                      storage_options=storage_options, validate=validate))
        else:
            sources.append(H5adSource(path, name=name, protein_key=protein_key, rna_layer=rna_layer,
                                      validate=validate))
    provenance = {
        "instance": slug,
        "collection_uid": None if collection is None else collection.uid,
        "collection_key": None if collection is None else collection.key,
        "artifact_uids": [a.uid for a in artifacts],
        "artifact_keys": [a.key for a in artifacts],
        "study_names": names,
    }
    return sources, {"lamindb": provenance}


# ---------------------------------------------------------------- resolving records


def _import_lamindb():
    try:
        import lamindb as ln
    except ImportError as e:
        raise LaminError(f"LaminDB targets need the lamindb package ({e}); {_INSTALL_HINT}") from e
    return ln


def _resolve(ln, target: Any, instance: str | None):
    """Returns ``(collection or None, [artifacts], instance slug)``."""
    if isinstance(target, (ln.Collection, ln.Artifact)):
        slug = _record_slug(target)
        if isinstance(target, ln.Artifact):
            return None, [target], slug
        return target, list(target.ordered_artifacts.all()), slug
    if not isinstance(target, str):
        raise LaminError(
            f"a LaminDB target is a lamin:// URI, a key, or an ln.Collection / ln.Artifact; got {target!r}"
        )
    if is_lamin_uri(target):
        parsed = parse_lamin_uri(target)
        if instance is not None and instance != parsed.instance:
            raise LaminError(f"instance={instance!r} contradicts the instance of {target!r}")
    else:
        parsed = LaminTarget(instance=instance, kind="collection", key=target)  # type: ignore[arg-type]
    registries, slug = _registries(ln, parsed.instance)
    if parsed.kind == "artifact":
        return None, [_latest(registries["Artifact"], parsed.key, "artifact", slug)], slug
    collection = _latest(registries["Collection"], parsed.key, "collection", slug)
    return collection, list(collection.ordered_artifacts.all()), slug


def _registries(ln, instance: str | None) -> tuple[dict, str]:
    """Query sets of ``Collection`` and ``Artifact`` of ``instance`` (None: the default instance).

    ``ln.DB`` reads another instance without making it the default (no settings written, Django's default
    connection untouched); for the default instance itself it reuses the default connection.
    """
    import lamindb_setup as ln_setup

    settings = ln_setup.settings
    current = settings.instance.slug if settings.is_configured else None
    if instance is None:
        if current is None:
            raise LaminError("no LaminDB instance given and none connected: use lamin://INSTANCE/KEY")
        return {"Collection": ln.Collection, "Artifact": ln.Artifact}, current
    slug = instance if "/" in instance else f"{settings.user.handle}/{instance}"
    try:
        db = ln.DB(slug)
    except Exception as e:  # InstanceNotFoundError offline; hub or network errors for OWNER/NAME
        raise LaminError(
            f"LaminDB instance {slug!r} not found ({type(e).__name__}: {e}); local instances are looked up "
            f"in {settings.settings_dir}: create it with `lamin init --storage DIR --name NAME`, or log in "
            "(`lamin login`) for instances on LaminHub"
        ) from e
    return {"Collection": db.Collection, "Artifact": db.Artifact}, slug


def _latest(registry, key: str, what: str, slug: str):
    record = registry.filter(key=key).order_by("-created_at").first()
    if record is None:
        keys = sorted({k for k in registry.filter().values_list("key", flat=True) if k})
        shown = keys[:_MAX_LISTED] + (["..."] if len(keys) > _MAX_LISTED else [])
        raise LaminError(f"no {what} with key {key!r} in LaminDB instance {slug}; {what} keys there: {shown}")
    return record


def _record_slug(record) -> str:
    # Records fetched through ln.DB carry their instance in Django's ``_state.db``; others live in the default.
    db = getattr(getattr(record, "_state", None), "db", None)
    if db and db != "default":
        return db
    import lamindb_setup as ln_setup

    return ln_setup.settings.instance.slug


# ---------------------------------------------------------------- artifacts to Sources


def _reader_for(art):
    suffix = (art.suffix or "").lower()
    if suffix.endswith(H5AD_SUFFIXES):
        return H5adSource
    if suffix.endswith(ZARR_SUFFIXES):
        return ZarrSource
    return None


def _label(art) -> str:
    return repr(art.key or art.description or art.uid)


def _stem(art) -> str:
    if art.key:
        name = PurePosixPath(art.key).name
    else:
        name = art.description or art.uid
    for suffix in sorted(H5AD_SUFFIXES + (".anndata.zarr", ".mudata.zarr") + ZARR_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _study_names(artifacts: list) -> list[str]:
    """The key's file name without suffix; where two artifacts share one, both get their uid appended."""
    stems = [_stem(a) for a in artifacts]
    return [s if stems.count(s) == 1 else f"{s}-{a.uid}" for s, a in zip(stems, artifacts)]


def _location(art, cache: bool) -> tuple[str, dict | None]:
    """Local path (cached when needed) or, for zarr in cloud storage, URL + fsspec options."""
    path = art.path
    protocol = getattr(path, "protocol", "") or ""
    if protocol in ("", "file", "local"):
        return str(path), None
    if _reader_for(art) is ZarrSource and not cache:
        return str(path), dict(getattr(path, "storage_options", {}) or {}) or None
    return str(art.cache()), None
