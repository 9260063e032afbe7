"""``SomaSource``: one study in a TileDB-SOMA Experiment (local path or ``s3://`` / ``tiledb://`` URI).

RNA and protein are two measurements of the same cells (soma_joinid), so one read of sorted ids is one
coordinate read (the ids' joinids as points) of each measurement's X; TileDB decodes each data tile
holding them once, and rows are cut out per run of one cell's entries, not per entry. Cells are the obs
rows matching an optional ``value_filter`` (local id i = the i-th matching soma_joinid in increasing
order); their joinids, the var names and (once asked for) obs columns are held in memory.

Speed (benchmarks/soma_read_speed.py, 20k cells x 2,000 genes at 10% + 100 proteins, 64 random 64-cell
runs per read, 2 shared cores): ~38k cells/s, against ~26k for tiledbsoma's ExperimentAxisQuery and
~130k for ZarrSource on the same data; ~90% of the time is inside TileDB's query. Ingest to zarr for
the fastest training; read SOMA where the data already lives there.
"""

from __future__ import annotations

import os
from pathlib import PurePosixPath
from typing import Any

import numpy as np
import pyarrow as pa
import scipy.sparse as sp
import tiledbsoma

from loaders.errors import StoreFormatError
from loaders.soma_obs import arrow_column_values
from loaders.soma_layout import (
    DEFAULT_PROTEIN_MEASUREMENT,
    DEFAULT_RNA_MEASUREMENT,
    DEFAULT_X_LAYER,
    METADATA_KEY,
    OBS_ID_COLUMN,
    STUDY_OBS_COLUMN,
    VAR_ID_COLUMN,
    SomaMetadata,
)
from loaders.reopen_lock import reopen_lock
from loaders.source import SourceRows
from loaders.store_layout import PANEL_OBS_COLUMN
from loaders.study_source import StudySource

JOINID = "soma_joinid"


def soma_study_name(uri: str) -> str:
    """Returns the last path element of ``uri`` without a ``.soma``/``.tiledb`` suffix."""
    name = PurePosixPath(str(uri).rstrip("/")).name
    for suffix in (".soma", ".tiledbsoma", ".tiledb"):
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def soma_context(context) -> tiledbsoma.SOMATileDBContext | None:
    """Returns a SOMA context from None, a TileDB config dict (e.g. ``vfs.s3.*`` keys) or a context."""
    if context is None or isinstance(context, tiledbsoma.SOMATileDBContext):
        return context
    if isinstance(context, dict):
        return tiledbsoma.SOMATileDBContext(tiledb_config=dict(context))
    raise TypeError(f"context must be None, a dict of TileDB config keys or a SOMATileDBContext, got {type(context)}")


READ_CONFIG_DEFAULTS = {"sm.mem.malloc_trim": "false"}
"""TileDB settings SomaSource reads with unless the caller's context sets them. TileDB trims the heap
(``malloc_trim``) after every query by default; for the thousands of similar-sized reads of a stream that costs
about a third of the read time (64 random 64-cell runs of a 100k x 2,000 store: ~25k -> ~36k cells/s), and
the memory it would return is taken again by the next read."""


_INHERITED_ACROSS_FORK: list = []
"""TileDB contexts and array handles a forked child inherited from its parent, kept so they are never destroyed in
the child (see ``SomaSource._ensure_open``); a child holds one entry per Source it re-opened."""


S3_READ_CONFIG_DEFAULTS = {"sm.io_concurrency_level": "32", "vfs.s3.max_parallel_ops": "32",
                           "sm.mem.malloc_trim": "true"}
"""TileDB settings for Experiments on S3, unless the caller's context sets them (they win over
``READ_CONFIG_DEFAULTS``). TileDB sizes its I/O thread pool and its parallel S3 operations to the cores (2 on a small
VM), so a read of tiles scattered over a store waited one round trip (10-50 ms on S3) per pair of tiles; I/O threads
mostly wait on the network, so many cost little CPU. With that many threads, memory freed after a read stays in
their malloc arenas unless the heap is trimmed: untrimmed, a shuffled epoch of 100,000 x 2,000 cells from S3 peaked
at 1.7-2.4 GiB, trimmed at 0.84-0.96 GiB at the same speed (the trim costs little beside a read over the network)."""


def read_context(context, uri: str = "") -> tiledbsoma.SOMATileDBContext:
    """The context reads use: ``context`` (None, a TileDB config dict or a context) over ``READ_CONFIG_DEFAULTS``
    (and ``S3_READ_CONFIG_DEFAULTS`` where ``uri`` is on S3)."""
    given = soma_context(context)  # validates the type
    config = dict(given.tiledb_config) if given is not None else {}
    defaults = {**READ_CONFIG_DEFAULTS, **(S3_READ_CONFIG_DEFAULTS if str(uri).startswith("s3://") else {})}
    return tiledbsoma.SOMATileDBContext(tiledb_config={**defaults, **config})


class SomaSource(StudySource):
    """A Source over a TileDB-SOMA Experiment with an RNA and a protein measurement."""

    def __init__(
        self,
        uri: str | os.PathLike,
        *,
        name: str | None = None,
        rna_measurement: str = DEFAULT_RNA_MEASUREMENT,
        protein_measurement: str = DEFAULT_PROTEIN_MEASUREMENT,
        x_layer: str = DEFAULT_X_LAYER,
        protein_x_layer: str | None = None,
        value_filter: str | None = None,
        var_column: str = VAR_ID_COLUMN,
        obs_id_column: str = OBS_ID_COLUMN,
        context: dict | tiledbsoma.SOMATileDBContext | None = None,
        validate: bool = True,
    ) -> None:
        """Args:
            uri: Experiment path or URI (``s3://...`` with ``vfs.s3.*`` keys in ``context``).
            name: study name (default: the URI's last element without ``.soma``).
            rna_measurement, protein_measurement: measurement names under ``ms``.
            x_layer: X layer of the RNA measurement (raw counts).
            protein_x_layer: X layer of the protein measurement (default: ``x_layer``).
            value_filter: obs filter in TileDB-SOMA syntax (e.g. ``"tissue == 'blood'"``); the Source's
                cells are the matching rows, in soma_joinid order.
            var_column: var column holding gene and protein names (``var_id`` as ``tiledbsoma.io``
                and our ingest write it; Census uses ``feature_name``).
            obs_id_column: obs column of cell names (used by ``obs_names`` and error messages).
            context: TileDB config dict (pickled with the Source, so workers can re-open) or a
                ``SOMATileDBContext`` (pickled as its config).
            validate: check every read for NaN, infinite and negative counts.

        Raises:
            StoreFormatError: no Experiment at ``uri``; a missing measurement, X layer, var column or
                obs column (the message lists what exists); a bad or empty ``value_filter``; panels that
                do not fit the proteins.
        """
        uri = os.fspath(uri)
        config = context.tiledb_config if isinstance(context, tiledbsoma.SOMATileDBContext) else context
        self._init_args = dict(
            uri=uri, name=name, rna_measurement=rna_measurement, protein_measurement=protein_measurement,
            x_layer=x_layer, protein_x_layer=protein_x_layer, value_filter=value_filter, var_column=var_column,
            obs_id_column=obs_id_column, context=dict(config) if config else None, validate=validate,
        )
        self.uri = uri
        self.name = name or soma_study_name(uri)
        self.value_filter = value_filter
        self._where = f"study {self.name!r} ({uri}" + (f", value_filter {value_filter!r})" if value_filter else ")")
        self._validate = validate
        self._context = read_context(context, self.uri)
        self._pid = -1
        self._open()
        try:
            self._load_axes()
        except BaseException:
            self.close()
            raise
        self._obs_cache: dict[str, np.ndarray] = {}
        self._obs_names: np.ndarray | None = None
        self._panel_codes: np.ndarray | None = None

    # ---------------------------------------------------------------- opening

    def _open(self) -> None:
        # TileDB handles (and their thread pools) must not cross a fork: a worker re-opens on first use.
        a = self._init_args
        try:
            self._exp = tiledbsoma.Experiment.open(self.uri, context=self._context)
        except (tiledbsoma.DoesNotExistError, tiledbsoma.SOMAError, TypeError) as err:
            raise StoreFormatError(f"{self._where}: cannot open a TileDB-SOMA Experiment there ({err}).") from err
        try:
            self._rna_ms = self._measurement(a["rna_measurement"], "rna_measurement")
            self._prot_ms = self._measurement(a["protein_measurement"], "protein_measurement")
            self._rna_x = self._layer(self._rna_ms, a["rna_measurement"], a["x_layer"], "x_layer")
            self._prot_x = self._layer(
                self._prot_ms, a["protein_measurement"], a["protein_x_layer"] or a["x_layer"], "protein_x_layer"
            )
        except BaseException:
            self._exp.close()
            raise
        self._pid = os.getpid()

    def _measurement(self, key: str, arg: str):
        ms = self._exp.ms if "ms" in self._exp else {}
        if key not in ms:
            raise StoreFormatError(
                f"{self._where}: no measurement {key!r} ({arg}); measurements are {sorted(ms.keys())}. Pass "
                f"{arg}=<one of them>."
            )
        return ms[key]

    def _layer(self, ms, ms_name: str, layer: str, arg: str):
        layers = ms.X if "X" in ms else {}
        if layer not in layers:
            raise StoreFormatError(
                f"{self._where}: measurement {ms_name!r} has no X layer {layer!r} ({arg}); layers are "
                f"{sorted(layers.keys())}. Pass {arg}=<the raw-count layer>."
            )
        array = layers[layer]
        if not isinstance(array, tiledbsoma.SparseNDArray):
            raise StoreFormatError(
                f"{self._where}: {ms_name}/X/{layer} is a {type(array).__name__}; SomaSource reads SparseNDArray "
                "layers only."
            )
        return array

    def _ensure_open(self) -> None:
        if self._pid == os.getpid():
            return
        with reopen_lock():  # reader threads of a worker may all find the handles stale at once
            if self._pid == os.getpid():
                return
            # A forked child must not use the parent's TileDB context: its thread pools did not survive
            # the fork, and a read through it waits forever. The parent's context and handles are kept
            # alive, never destroyed here: their destructors would use thread pools that do not exist in
            # this process (an abort).
            _INHERITED_ACROSS_FORK.append(
                (self._context, getattr(self, "_exp", None), getattr(self, "_rna_ms", None),
                 getattr(self, "_prot_ms", None), getattr(self, "_rna_x", None), getattr(self, "_prot_x", None)))
            self._context = read_context(self._init_args["context"], self.uri)
            self._open()

    def _load_axes(self) -> None:
        a = self._init_args
        self._joinids = self._matching_joinids()
        self.n_obs = int(self._joinids.size)
        self.gene_names, self._gene_lookup = self._var_names(self._rna_ms, a["rna_measurement"])
        self._restrict_to_measured_genes()
        self.protein_names, self._protein_lookup = self._var_names(self._prot_ms, a["protein_measurement"])
        names = self._exp.obs.schema.names
        self.obs_columns = [c for c in names if c not in (JOINID, PANEL_OBS_COLUMN, a["obs_id_column"])]
        self.protein_panels = self._stored_panels()

    def _restrict_to_measured_genes(self) -> None:
        """When every cell of this Source comes from one ingested study that recorded its genes, list only those:
        the others read as zero but were not measured, and the Collection's gene alignment must see that."""
        if STUDY_OBS_COLUMN not in self._exp.obs.schema.names:
            return
        try:
            meta = SomaMetadata.from_json(self._exp.metadata[METADATA_KEY], self._where)
        except KeyError:
            return
        studies = {s["name"]: s for s in meta.studies}
        values = set(self._obs_table_column(STUDY_OBS_COLUMN).tolist())
        if len(values) != 1 or "genes_measured" not in studies.get(next(iter(values)), {}):
            return
        mask = np.array([c == "1" for c in studies[next(iter(values))]["genes_measured"]], dtype=bool)
        if mask.size == 0:
            return
        n_full = self.gene_names.size
        lookup = np.arange(n_full) if self._gene_lookup is None else self._gene_lookup  # joinid -> column
        joinids = np.flatnonzero(lookup >= 0)
        measured_joinids = joinids[(joinids < mask.size) & mask[np.minimum(joinids, max(mask.size - 1, 0))]]
        keep = np.sort(lookup[measured_joinids])  # columns kept, in var order
        if keep.size == n_full:
            return
        kept_column = np.full(n_full, -1, dtype=np.int64)
        kept_column[keep] = np.arange(keep.size)
        # joinid -> kept column; -1 for genes this study did not measure (an entry there is an inconsistency).
        self._gene_lookup = np.where(lookup >= 0, kept_column[np.maximum(lookup, 0)], -1).astype(np.int32)
        self.gene_names = self.gene_names[keep]

    def _matching_joinids(self) -> np.ndarray:
        try:
            table = self._exp.obs.read(column_names=[JOINID], value_filter=self.value_filter).concat()
        except (tiledbsoma.SOMAError, ValueError, pa.ArrowException) as err:
            raise StoreFormatError(
                f"{self._where}: cannot apply value_filter {self.value_filter!r} ({err}); obs columns are "
                f"{self._exp.obs.schema.names}."
            ) from err
        joinids = np.sort(table.column(JOINID).to_numpy())
        if joinids.size == 0:
            what = " match the value_filter." if self.value_filter else "."
            raise StoreFormatError(f"{self._where}: no cells{what}")
        return joinids

    def _var_names(self, ms, ms_name: str) -> tuple[np.ndarray, np.ndarray | None]:
        """Returns names in var soma_joinid order and an int32 joinid -> column lookup (None: identity); int32 so
        that a read's column indices come out of one ``take`` in the dtype CSR uses."""
        column = self._init_args["var_column"]
        schema_names = ms.var.schema.names
        if column not in schema_names:
            raise StoreFormatError(
                f"{self._where}: measurement {ms_name!r} var has no column {column!r} (var_column); columns are "
                f"{schema_names}."
            )
        table = ms.var.read(column_names=[JOINID, column]).concat()
        joinids = table.column(JOINID).to_numpy()
        order = np.argsort(joinids, kind="stable")
        joinids = joinids[order]
        names = arrow_column_values(table.column(column))[order]
        if len(set(names.tolist())) != names.size:
            raise StoreFormatError(f"{self._where}: measurement {ms_name!r} var column {column!r} repeats names.")
        if joinids.size == 0 or (joinids[0] == 0 and joinids[-1] == joinids.size - 1):
            return names, None
        lookup = np.full(int(joinids[-1]) + 1, -1, dtype=np.int32)
        lookup[joinids] = np.arange(joinids.size)
        return names, lookup

    def _stored_panels(self) -> np.ndarray:
        """Panels from our ingest's metadata (with codes in obs); else one all-True panel."""
        n_prot = len(self.protein_names)
        self._panels_stored = False
        text = self._exp.metadata.get(METADATA_KEY)
        if text is None or PANEL_OBS_COLUMN not in self._exp.obs.schema.names:
            return np.ones((1, n_prot), dtype=bool)
        meta = SomaMetadata.from_json(text, self._where)
        if meta.protein_measurement != self._init_args["protein_measurement"]:
            return np.ones((1, n_prot), dtype=bool)
        if meta.protein_panels.shape[1] != n_prot:
            raise StoreFormatError(
                f"{self._where}: metadata {METADATA_KEY!r} holds panels over {meta.protein_panels.shape[1]} "
                f"proteins but measurement {meta.protein_measurement!r} has {n_prot}; the Experiment was "
                "changed outside streamtotal's ingest (or an append was interrupted): re-run the append."
            )
        self._panels_stored = True
        return meta.protein_panels

    # ---------------------------------------------------------------- pickling, repr, close

    @property
    def location(self) -> str:
        """The Experiment's URI (``Source.location``)."""
        return str(self.uri)

    def __repr__(self) -> str:
        return (
            f"SomaSource({self.uri!r}, name={self.name!r}, n_obs={self.n_obs}, genes={len(self.gene_names)}, "
            f"proteins={len(self.protein_names)}"
            + (f", value_filter={self.value_filter!r})" if self.value_filter else ")")
        )

    def close(self) -> None:
        """Closes the Experiment (reads re-open it)."""
        if self._pid == os.getpid():
            self._exp.close()
        self._pid = -1

    # ---------------------------------------------------------------- obs

    @property
    def soma_joinids(self) -> np.ndarray:
        """``[n_obs] int64`` soma_joinid of each cell (local id i -> ``soma_joinids[i]``)."""
        return self._joinids

    def _obs_table_column(self, key: str) -> np.ndarray:
        self._ensure_open()
        table = self._exp.obs.read(column_names=[JOINID, key], value_filter=self.value_filter).concat()
        order = np.argsort(table.column(JOINID).to_numpy(), kind="stable")
        values = arrow_column_values(table.column(key))[order]
        if values.size != self.n_obs:
            raise StoreFormatError(
                f"{self._where}: obs changed while open ({values.size} matching rows, {self.n_obs} expected); "
                "re-create the Source."
            )
        return values

    def obs_column(self, key: str) -> np.ndarray:
        """Returns obs column ``key`` for every cell (strings as object arrays, missing as ``""``).

        Raises:
            StoreFormatError: no such column (the message lists the columns).
        """
        if key not in self._obs_cache:
            if key not in self.obs_columns:
                raise StoreFormatError(f"{self._where}: no obs column {key!r}; columns are {self.obs_columns}.")
            self._obs_cache[key] = self._obs_table_column(key)
        return self._obs_cache[key]

    def obs_names(self) -> np.ndarray:
        """Returns the ``[n_obs]`` cell names (obs ``obs_id_column``; joinids as str where it is absent)."""
        if self._obs_names is None:
            self._ensure_open()
            key = self._init_args["obs_id_column"]
            if key in self._exp.obs.schema.names:
                self._obs_names = self._obs_table_column(key)
            else:
                self._obs_names = np.asarray([str(j) for j in self._joinids], dtype=object)
        return self._obs_names

    def _stored_panel_codes(self) -> np.ndarray | None:
        """obs's panel code column (``StudySource.protein_panel_codes``), None where the Experiment has none."""
        return self._obs_table_column(PANEL_OBS_COLUMN) if self._panels_stored else None

    # ---------------------------------------------------------------- reads

    def _read_rows(self, ids: np.ndarray) -> SourceRows:
        """RNA and protein rows of checked ``ids`` (``StudySource.read``): one coordinate read per measurement;
        X entries outside the var of their measurement are refused (StoreFormatError)."""
        n_genes, n_prot = len(self.gene_names), len(self.protein_names)
        self._ensure_open()
        joinids = self._joinids[ids]
        coords = (pa.array(joinids),)
        rna = self._csr(self._rna_x.read(coords).tables().concat(), joinids, n_genes, self._gene_lookup, "RNA")
        protein = self._dense(self._prot_x.read(coords).tables().concat(), joinids, n_prot, self._protein_lookup)
        return SourceRows(rna=rna, protein=protein)

    def _coo(self, table: pa.Table, joinids: np.ndarray, n_cols: int, lookup, what: str):
        """Returns ``(run_rows, run_lengths, cols, data)``: entries grouped in runs of one cell each.

        Results come cell by cell (TileDB's global order within a fragment), so output rows are found
        per run of equal soma_dim_0 rather than per entry (a binary search per entry cost more than
        the read itself). ``cols`` are int32 column indices, checked to lie in ``[0, n_cols)``.
        """
        dim0 = table.column("soma_dim_0").to_numpy()
        dim1 = table.column("soma_dim_1").to_numpy()
        # A copy: Arrow's buffers are read-only, and callers shuffle and scale rows in place.
        data = np.array(table.column("soma_data").to_numpy(), dtype=np.float32)
        if dim0.size == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int32), data
        bounds = np.flatnonzero(dim0[1:] != dim0[:-1]) + 1
        run_starts = np.concatenate([[0], bounds])
        run_lengths = np.diff(np.append(run_starts, dim0.size))
        run_rows = np.searchsorted(joinids, dim0[run_starts])
        # One pass per check on 3-4 M entries a read: max only (soma joinids are never negative), and the
        # var lookup's own bounds check via take(mode="raise").
        if lookup is None:
            if int(dim1.max()) >= n_cols:
                self._raise_stray(what)
            cols = dim1.astype(np.int32)
        else:
            try:
                cols = lookup.take(dim1)
            except IndexError:
                self._raise_stray(what)
            if int(cols.min()) < 0:
                self._raise_stray(what)
        return run_rows, run_lengths, cols, data

    def _raise_stray(self, what: str) -> None:
        raise StoreFormatError(
            f"{self._where}: {what} X holds entries at var soma_joinids that its var does not list; the "
            "Experiment is inconsistent (changed outside streamtotal's ingest?)."
        )

    def _csr(self, table, joinids, n_cols, lookup, what) -> sp.csr_matrix:
        """CSR rows of ``joinids``. Columns within a row keep TileDB's order (sorted for one fragment, possibly
        not after a remapping lookup); CSR allows that, and SOMA arrays hold no duplicate coordinates."""
        run_rows, run_lengths, cols, data = self._coo(table, joinids, n_cols, lookup, what)
        n = joinids.size
        if run_rows.size > 1 and not bool((run_rows[1:] > run_rows[:-1]).all()):
            # Several fragments hold the same cells (e.g. rows appended out of order): group entries by row.
            rows = np.repeat(run_rows, run_lengths)
            order = np.argsort(rows, kind="stable")
            cols, data = cols[order], data[order]
            run_rows, run_lengths = np.unique(rows[order], return_counts=True)
        counts = np.zeros(n, dtype=np.int64)
        counts[run_rows] = run_lengths
        indptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(counts, out=indptr[1:])
        index_dtype = np.int32 if indptr[-1] < np.iinfo(np.int32).max else np.int64
        return sp.csr_matrix((data, cols, indptr.astype(index_dtype)), shape=(n, n_cols))

    def _dense(self, table, joinids, n_cols, lookup) -> np.ndarray:
        run_rows, run_lengths, cols, data = self._coo(table, joinids, n_cols, lookup, "protein")
        out = np.zeros((joinids.size, n_cols), dtype=np.float32)
        out[np.repeat(run_rows, run_lengths), cols] = data
        return out

    def _cell_name(self, index: int) -> str:
        return str(self.obs_names()[index])


def open_soma_sources(uri: str | os.PathLike, study_column: str, **kwargs: Any) -> list[SomaSource]:
    """Returns one ``SomaSource`` per value of ``study_column`` (e.g. ``_study``), named by the value.

    Args:
        uri: the Experiment.
        study_column: obs column splitting the cells into studies.
        kwargs: passed to every ``SomaSource`` (not ``name`` or ``value_filter``).

    Raises:
        StoreFormatError: as ``SomaSource``; a study value containing a quote.
    """
    whole = SomaSource(uri, **kwargs)
    values = [str(v) for v in dict.fromkeys(whole.obs_column(study_column).tolist())]
    whole.close()
    for value in values:
        if "'" in value or '"' in value:
            raise StoreFormatError(
                f"{uri}: study value {value!r} of {study_column!r} holds a quote; cannot filter on it."
            )
    return [SomaSource(uri, name=v, value_filter=f"{study_column} == '{v}'", **kwargs) for v in values]
