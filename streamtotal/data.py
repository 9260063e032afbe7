"""Opening stores as Sources and Collections from a run's ``[data]`` config.

This is the only place that picks a backend from a path; everything else sees Sources and Collections.
"""

from __future__ import annotations

from pathlib import Path

from loaders.collection import Collection
from loaders.h5ad_source import H5adSource
from loaders.registry import Registry
from loaders.zarr_source import ZarrSource
from streamtotal.config import DataConfig
from streamtotal.errors import ConfigError


def open_source(path: str, *, protein_key: str = "protein_expression"):
    """Opens one store as a Source: ``.h5ad`` files through the backed h5ad reader, anything else as Zarr.

    Args:
        path: a local path or an fsspec URL.
        protein_key: obsm key of the protein counts.

    Returns:
        A Source named after the store.
    """
    name = Path(str(path).rstrip("/")).name
    for suffix in (".zarr", ".h5ad"):
        name = name.removesuffix(suffix)
    if str(path).endswith(".h5ad"):
        return H5adSource(path, name=name, protein_key=protein_key)
    return ZarrSource(path, name=name, protein_key=protein_key)


def open_collection(data: DataConfig, *, registry: Registry | None = None, allow_new_batches: bool = False) -> Collection:
    """Opens every store of ``data`` and aligns them into one Collection.

    Args:
        data: the ``[data]`` config.
        registry: align onto this trained model's registry instead of building a new one.
        allow_new_batches: with ``registry``, accept batch values the registry lacks (query mapping).

    Raises:
        ConfigError: no stores were given.
    """
    if not data.stores:
        raise ConfigError("no stores given: pass one or more STORE paths, or set [data] stores in the config")
    sources = [open_source(s, protein_key=data.protein_key) for s in data.stores]
    kwargs = dict(batch_key=data.batch_key, labels_key=data.labels_key, unlabeled_category=data.unlabeled_category,
                  gene_join=data.gene_join, min_gene_overlap=data.min_gene_overlap)
    if registry is not None:
        return Collection(sources, registry=registry, allow_new_batches=allow_new_batches, **kwargs)
    return Collection(sources, **kwargs)
