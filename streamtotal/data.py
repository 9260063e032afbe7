"""Opening stores as Sources and Collections from a run's ``[data]`` config.

This is the only place that picks a backend from a path; everything else sees Sources and Collections.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from loaders.collection import Collection
from loaders.h5ad_source import H5adSource
from loaders.lamin_sources import is_lamin_uri, lamin_sources
from loaders.registry import Registry
from loaders.zarr_source import ZarrSource
from streamtotal.config import DataConfig
from streamtotal.errors import ConfigError


def is_soma_experiment(path: str) -> bool:
    """True for a TileDB-SOMA Experiment: a ``.soma`` URI, or a local directory that is a TileDB group."""
    text = str(path).rstrip("/")
    return text.endswith(".soma") or (Path(text) / "__tiledb_group.tdb").is_file()


def open_source(path: str, *, protein_key: str = "protein_expression", data: DataConfig | None = None):
    """Opens one store as a Source: ``.h5ad`` files through the backed h5ad reader, TileDB-SOMA Experiments
    (``*.soma`` or a TileDB group directory) through SomaSource, anything else as Zarr.

    Args:
        path: a local path or a URL (``s3://`` works for Zarr and SOMA; credentials and endpoint come from the
            usual AWS environment variables).
        protein_key: obsm key of the protein counts.
        data: the ``[data]`` config, for the SOMA options (measurements, X layer, value filter).

    Returns:
        A Source named after the store.

    Raises:
        ConfigError: ``path`` is a ``lamin://`` URI, which names several studies (see ``open_sources``).
    """
    if is_lamin_uri(path):
        raise ConfigError(f"{path} names a LaminDB collection (several studies): open it with open_sources")
    name = Path(str(path).rstrip("/")).name
    for suffix in (".zarr", ".h5ad", ".soma"):
        name = name.removesuffix(suffix)
    if is_soma_experiment(path):
        from loaders.s3_env import tiledb_s3_config_from_env
        from loaders.soma_source import SomaSource

        data = data or DataConfig()
        return SomaSource(path, name=name, rna_measurement=data.soma_rna_measurement,
                          protein_measurement=data.soma_protein_measurement, x_layer=data.soma_x_layer,
                          value_filter=data.soma_value_filter, context=tiledb_s3_config_from_env() or None)
    if str(path).endswith(".h5ad"):
        return H5adSource(path, name=name, protein_key=protein_key)
    return ZarrSource(path, name=name, protein_key=protein_key)


def _soma_study_sources(uri: str, data: DataConfig) -> list:
    """A SOMA Experiment holding several ingested studies opens as one Source per study (named after it), so each
    study lists only the genes it measured and studies become covariates like separate stores."""
    whole = open_source(uri, data=data)
    if "_study" not in whole.obs_columns:
        return [whole]
    studies = list(dict.fromkeys(str(v) for v in whole.obs_column("_study").tolist()))
    if len(studies) < 2:
        return [whole]
    whole.close()
    user_filter = data.soma_value_filter
    sources = []
    for study in studies:
        if "'" in study:
            raise ConfigError(f"{uri}: study name {study!r} holds a quote; rename it to stream the studies apart")
        condition = f"_study == '{study}'" + (f" and ({user_filter})" if user_filter else "")
        source = open_source(uri, data=replace(data, soma_value_filter=condition))
        source.name = study
        sources.append(source)
    return sources


def open_sources(stores, *, protein_key: str = "protein_expression", data: DataConfig | None = None) -> tuple[list, dict]:
    """Opens stores as Sources; a ``lamin://`` URI expands to one Source per artifact of its collection.

    Args:
        stores: local paths, fsspec URLs or ``lamin://INSTANCE/COLLECTION_KEY`` URIs.
        protein_key: obsm key of the protein counts.
        data: the ``[data]`` config (SOMA options).

    Returns:
        ``(sources, provenance)``: provenance is ``{"lamindb": [record per lamin:// store]}`` (see
        ``loaders.lamin_sources``), or ``{}`` when no store came from LaminDB.
    """
    sources, lamin_records = [], []
    for store in stores:
        if is_lamin_uri(store):
            found, provenance = lamin_sources(store, protein_key=protein_key)
            sources += found
            lamin_records.append(provenance["lamindb"])
        elif is_soma_experiment(store):
            sources += _soma_study_sources(store, data or DataConfig())
        else:
            sources.append(open_source(store, protein_key=protein_key, data=data))
    return sources, ({"lamindb": lamin_records} if lamin_records else {})


def open_collection(data: DataConfig, *, registry: Registry | None = None, allow_new_batches: bool = False) -> Collection:
    """Opens every store of ``data`` and aligns them into one Collection.

    LaminDB stores (``lamin://``) contribute one study per artifact, and their collection and artifact uids
    are recorded in the registry's ``extra["lamindb"]`` (so in the run's ``registry.json``).

    Args:
        data: the ``[data]`` config.
        registry: align onto this trained model's registry instead of building a new one.
        allow_new_batches: with ``registry``, accept batch values the registry lacks (query mapping).

    Raises:
        ConfigError: no stores were given.
    """
    if not data.stores:
        raise ConfigError("no stores given: pass one or more STORE paths, or set [data] stores in the config")
    sources, provenance = open_sources(data.stores, protein_key=data.protein_key, data=data)
    kwargs = dict(batch_key=data.batch_key, labels_key=data.labels_key, unlabeled_category=data.unlabeled_category,
                  gene_join=data.gene_join, min_gene_overlap=data.min_gene_overlap, provenance=provenance,
                  absent_genes=data.absent_genes)
    if registry is not None:
        return Collection(sources, registry=registry, allow_new_batches=allow_new_batches, **kwargs)
    return Collection(sources, **kwargs)
