"""Streaming the totalVI posterior over a store: latent, denoised RNA and protein, foreground probability, imputation.

A ``StorePosterior`` opens a store aligned onto a trained run's registry and streams it (or a subset of cell
ids) in order, batch by batch, through ``posterior.py``. Results come back as numpy for a subset, or are
written back into the store's ``obsm`` chunk by chunk (``write_back``):

    obsm/denoised_rna              [n_cells, G'] float32  (G' = selected genes; 4 * n_cells * G' bytes: 1M cells x
                                                            2,000 genes = 8 GB on disk before compression)
    obsm/denoised_protein          [n_cells, T'] float32
    obsm/protein_foreground_prob   [n_cells, T'] float32

Each array's attrs hold ``feature_names`` (its columns) and ``streamtotal`` (quantity, options, model file), so a
reader knows what the columns are. Writing goes to a hidden temporary array renamed over the key only when
every row is written (``loaders.obsm_writer``): a job killed half-way leaves the previous result intact, and
rerunning recomputes from the start (chunk-level resume of a half-written array is not implemented yet).

Determinism: draws use one ``torch.Generator`` per quantity seeded with ``seed``, consumed batch by batch, so a
result is a function of (model, cells, seed, batch_size, device); the in-memory and written-back results of
the same call agree.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import zarr
from tqdm.auto import tqdm

from loaders.citebatch import CiteBatch
from loaders.obsm_writer import ObsmWriter
from loaders.store_layout import ZARR_FORMAT
from loaders.stream import StreamConfig
from loaders.stream_loader import StreamLoader
from streamtotal.data import open_collection
from streamtotal.errors import ConfigError
from streamtotal.inference import posterior
from streamtotal.inference.embed import collection_obs
from streamtotal.inference.selection import batch_codes, cell_ids as check_cell_ids, feature_indices
from streamtotal.training.run_dir import TrainedModel, load_trained
from streamtotal.training.trainer import resolve_device

QUANTITIES = ("rna", "protein", "foreground")
"""What ``compute`` / ``streamtotal denoise --what`` can produce."""

DEFAULT_KEYS = {"rna": "denoised_rna", "protein": "denoised_protein", "foreground": "protein_foreground_prob"}
"""obsm key each quantity is written to by default."""


@dataclass(frozen=True)
class ExpressionOptions:
    """How normalised expression, denoised protein and foreground probabilities are estimated."""

    library_size: float | str = 1.0
    """RNA: rows scaled to sum to this (1 = rho, 1e4 = counts per 10k), or "latent" for each cell's own library."""

    transform_batch: tuple[str, ...] | None = None
    """Decoder batch name(s) (registry categories); several are averaged. None = each cell's own batch."""

    n_samples: int = 1
    """1 = plug-in estimate at the posterior means (deterministic); more = Monte Carlo posterior draws."""

    return_mean: bool = True
    """Average the draws; False keeps a leading sample axis (in-memory results only)."""

    include_protein_background: bool = False
    """Protein: add the background part pi * beta to the foreground (1 - pi) * beta * alpha."""

    sample_protein_mixing: bool = False
    """Protein: use a Bernoulli(pi) draw instead of pi."""

    scale_protein: bool = False
    """Protein: divide each cell's protein vector (all proteins, before subsetting) by its sum."""

    genes: tuple[str, ...] | None = None
    """Genes to return (in this order); None = all."""

    proteins: tuple[str, ...] | None = None
    """Proteins to return (in this order); None = all."""

    seed: int = 0
    """Seed of every random draw."""

    def __post_init__(self) -> None:
        for name in ("transform_batch", "genes", "proteins"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, (value,))
            elif value is not None:
                object.__setattr__(self, name, tuple(str(v) for v in value))
        if self.library_size != "latent":
            try:
                ok = not isinstance(self.library_size, bool) and float(self.library_size) > 0
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise ConfigError(f"library_size must be a positive number or 'latent'; got {self.library_size!r}")
        if isinstance(self.n_samples, bool) or int(self.n_samples) != self.n_samples or self.n_samples < 1:
            raise ConfigError(f"n_samples must be an integer >= 1; got {self.n_samples!r}")


@dataclass
class ComputeResult:
    """What ``StorePosterior.compute`` produced.

    Attributes:
        n_cells: cells computed.
        values: quantity -> array (cells in the requested order) when kept in memory, else empty.
        feature_names: quantity -> its column names.
        written: quantity -> the obsm key written into the store.
    """

    n_cells: int
    values: dict[str, np.ndarray]
    feature_names: dict[str, list[str]]
    written: dict[str, str]


class StorePosterior:
    """A trained model and a store aligned onto its registry, for streamed posterior quantities.

    Args:
        run: a training run directory, or an already loaded ``TrainedModel``.
        store: the store (local path or URL; write-back needs a local Zarr store). Its batches must be the model's.
        batch_size: cells per forward pass (memory: ``n_samples * batch_size * (G + 4 T)`` floats per quantity).
        device: "auto", "cpu" or "cuda[:N]".
        progress: show tqdm progress bars.

    Raises:
        RunDirError: the run has no model.
        AlignmentError, StoreFormatError: the store cannot be aligned onto the model.
    """

    def __init__(self, run: str | Path | TrainedModel, store: str | Path, *, batch_size: int = 1024,
                 device: str = "auto", progress: bool = True) -> None:
        self.trained = run if isinstance(run, TrainedModel) else load_trained(run)
        self.device = resolve_device(device)
        self.model = self.trained.model.to(self.device).eval()
        self.store = str(store)
        data = replace(self.trained.config.data, stores=(self.store,))
        self.collection = open_collection(data, registry=self.trained.registry)
        self.registry = self.trained.registry
        self.batch_size, self.progress = int(batch_size), progress

    @property
    def n_obs(self) -> int:
        """Cells in the store."""
        return self.collection.n_obs

    # ------------------------------------------------------------------ public quantities

    def latent(self, cell_ids: Sequence[int] | None = None, *, give_mean: bool = True, n_samples: int = 1,
               seed: int = 0) -> np.ndarray:
        """Posterior mean of z (default) or ``n_samples`` draws per cell.

        Returns:
            ``[n, n_latent]``, or ``[n_samples, n, n_latent]`` for several draws.
        """
        fn = _bind(posterior.latent, self.model, give_mean=give_mean, n_samples=n_samples,
                   generator=self._generator(seed))
        return self._run({"latent": fn}, check_cell_ids(cell_ids, self.n_obs), keep=True, desc="latent")["latent"]

    def normalized_rna(self, cell_ids: Sequence[int] | None = None, options: ExpressionOptions | None = None,
                       **overrides) -> np.ndarray:
        """Normalised RNA expression ``library_size * rho`` (see ``ExpressionOptions``; keywords override it).

        Returns:
            ``[n, G']`` (or ``[n_samples, n, G']``), columns in the order of ``options.genes``.

        Raises:
            SelectionError: unknown genes, batches or cells.
        """
        return self.compute(["rna"], cell_ids, options, **overrides).values["rna"]

    def denoised_protein(self, cell_ids: Sequence[int] | None = None, options: ExpressionOptions | None = None,
                         **overrides) -> np.ndarray:
        """Denoised protein ``(1 - pi) beta alpha`` (``+ pi beta`` with background); see ``ExpressionOptions``.

        Returns:
            ``[n, T']`` (or ``[n_samples, n, T']``).

        Raises:
            SelectionError: unknown proteins, batches or cells.
        """
        return self.compute(["protein"], cell_ids, options, **overrides).values["protein"]

    def protein_foreground_probability(self, cell_ids: Sequence[int] | None = None,
                                       options: ExpressionOptions | None = None, **overrides) -> np.ndarray:
        """``1 - pi`` per cell and protein (uses ``transform_batch``, ``n_samples``, ``return_mean``, ``proteins``).

        Returns:
            ``[n, T']`` (or ``[n_samples, n, T']``).
        """
        return self.compute(["foreground"], cell_ids, options, **overrides).values["foreground"]

    def impute_proteins(self, cell_ids: Sequence[int] | None = None, options: ExpressionOptions | None = None,
                        **overrides) -> tuple[np.ndarray, np.ndarray]:
        """Observed protein counts where measured, the model's denoised protein where a study did not measure it.

        Returns:
            ``(values, measured)``: ``[n, T']`` values (or ``[n_samples, n, T']``) and the ``[n, T']`` bool mask
            (True = observed count, False = model value).

        Raises:
            ConfigError: ``scale_protein`` is set.
        """
        opts = self._options(options, overrides)
        proteins, tb = self._protein_index(opts), batch_codes(opts.transform_batch, self.registry)
        gen = self._generator(opts.seed)
        kwargs = self._protein_kwargs(opts, tb, proteins, gen)
        # One call per batch, not two: both outputs come from the same draws.
        cache: dict = {}

        def both(b: CiteBatch, i: int):
            if cache.get("batch") is not b:
                cache["batch"], cache["out"] = b, posterior.impute_proteins(self.model, b, **kwargs)
            return cache["out"][i]

        fns = {"values": lambda b: both(b, 0), "measured": lambda b: both(b, 1)}
        out = self._run(fns, check_cell_ids(cell_ids, self.n_obs), keep=True, desc="impute")
        return out["values"], out["measured"].astype(bool)

    # ------------------------------------------------------------------ several at once, written back

    def compute(self, what: Sequence[str], cell_ids: Sequence[int] | None = None,
                options: ExpressionOptions | None = None, *, write_back: bool = False,
                keys: dict[str, str] | None = None, keep: bool = True, **overrides) -> ComputeResult:
        """Computes several quantities in one pass over the cells; keeps them in memory and/or writes them back.

        Args:
            what: quantities among ``QUANTITIES`` ("rna", "protein", "foreground").
            cell_ids: global cell ids (any order; results follow it); None = every cell.
            options: the estimation options; keyword ``overrides`` replace its fields.
            write_back: write each quantity into ``obsm/<key>`` of the store (needs every cell and
                ``return_mean`` or ``n_samples=1``).
            keys: obsm key per quantity (default ``DEFAULT_KEYS``).
            keep: return the values in memory (turn off for atlas-sized write-back).

        Returns:
            A ComputeResult.

        Raises:
            ConfigError: unknown quantities, or a write-back that cannot be stored.
            SelectionError: unknown genes, proteins, batches or cells.
            StoreFormatError: the store cannot be written to (not a local Zarr store).
        """
        what = list(dict.fromkeys(what))
        unknown = [w for w in what if w not in QUANTITIES]
        if unknown or not what:
            raise ConfigError(f"unknown quantities {unknown or what}; choose among {list(QUANTITIES)}")
        opts = self._options(options, overrides)
        ids = check_cell_ids(cell_ids, self.n_obs)
        keys = {**DEFAULT_KEYS, **(keys or {})}
        if write_back:
            if cell_ids is not None and ids.size != self.n_obs:
                raise ConfigError("write_back covers every cell of the store; pass cell_ids=None")
            if opts.n_samples > 1 and not opts.return_mean:
                raise ConfigError("write_back stores one value per cell: use return_mean=True with n_samples > 1")
        genes = feature_indices(opts.genes, self.registry.gene_names, "gene")
        proteins = self._protein_index(opts)
        tb = batch_codes(opts.transform_batch, self.registry)
        names = {"rna": _names(self.registry.gene_names, genes),
                 "protein": _names(self.registry.protein_names, proteins),
                 "foreground": _names(self.registry.protein_names, proteins)}
        fns: dict[str, Callable[[CiteBatch], torch.Tensor]] = {}
        for quantity in what:
            gen = self._generator(opts.seed)  # one per quantity: each equals its single-quantity call
            if quantity == "rna":
                fns["rna"] = _bind(posterior.normalized_rna, self.model, library_size=opts.library_size,
                                   transform_batch=tb, n_samples=opts.n_samples, return_mean=opts.return_mean,
                                   genes=_tensor(genes, self.device), generator=gen)
            elif quantity == "protein":
                fns["protein"] = _bind(posterior.denoised_protein, self.model,
                                       **self._protein_kwargs(opts, tb, proteins, gen))
            else:
                fns["foreground"] = _bind(posterior.protein_foreground_probability, self.model, transform_batch=tb,
                                          n_samples=opts.n_samples, return_mean=opts.return_mean,
                                          proteins=_tensor(proteins, self.device), generator=gen)
        writers = None
        if write_back:
            writers = {q: ObsmWriter(self.store, keys[q], self.n_obs, len(names[q])) for q in what}
        values = self._run(fns, ids, keep=keep, writers=writers, desc="denoise " + "+".join(what))
        written = {}
        if writers:
            for q, writer in writers.items():
                self._describe(keys[q], q, names[q], opts)
                writer.commit()
                written[q] = keys[q]
        return ComputeResult(n_cells=int(ids.size), values=values, feature_names={q: names[q] for q in what},
                             written=written)

    def export_h5ad(self, path: str | Path, result: ComputeResult) -> Path:
        """Writes the store's obs and the in-memory results as an h5ad (``obsm[key]`` DataFrames named by feature).

        Needs a ``compute`` result over every cell with ``keep=True`` and averaged values.
        """
        import anndata as ad
        import pandas as pd

        obs = collection_obs(self.collection)
        if result.n_cells != len(obs) or not result.values:
            raise ConfigError("export_h5ad needs a compute(...) result over every cell, kept in memory")
        obsm = {DEFAULT_KEYS[q]: pd.DataFrame(v, index=obs.index, columns=result.feature_names[q])
                for q, v in result.values.items()}
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        ad.AnnData(obs=obs, obsm=obsm).write_h5ad(tmp)
        tmp.replace(path)
        return path

    # ------------------------------------------------------------------ internals

    def _options(self, options: ExpressionOptions | None, overrides: dict) -> ExpressionOptions:
        opts = options if options is not None else ExpressionOptions()
        return replace(opts, **overrides) if overrides else opts

    def _protein_index(self, opts: ExpressionOptions) -> np.ndarray | None:
        return feature_indices(opts.proteins, self.registry.protein_names, "protein")

    def _protein_kwargs(self, opts, tb, proteins, gen) -> dict:
        return dict(transform_batch=tb, n_samples=opts.n_samples, return_mean=opts.return_mean,
                    include_protein_background=opts.include_protein_background,
                    sample_protein_mixing=opts.sample_protein_mixing, scale_protein=opts.scale_protein,
                    proteins=_tensor(proteins, self.device), generator=gen)

    def _generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(int(seed))

    def _run(self, fns: dict[str, Callable[[CiteBatch], torch.Tensor]], ids: np.ndarray, *, keep: bool,
             writers: dict[str, ObsmWriter] | None = None, desc: str = "") -> dict[str, np.ndarray]:
        """Streams ``ids`` in store order; places each result row at its requested position and/or writes it."""
        order = np.argsort(ids, kind="stable")
        sorted_ids = ids[order]
        config = StreamConfig(batch_size=self.batch_size, shuffle=False, num_workers=0)
        loader = StreamLoader(self.collection, sorted_ids, config)
        loader.set_epoch(0)
        kept: dict[str, np.ndarray] = {}
        seen = 0
        for batch in tqdm(loader, total=len(loader), desc=desc, unit="batch", disable=not self.progress):
            cells = batch.cell_id.numpy()
            rows = order[np.searchsorted(sorted_ids, cells)]
            on_device = batch.to(self.device)
            for name, fn in fns.items():
                value = fn(on_device)
                value = value.cpu().numpy() if value.dtype == torch.bool else value.float().cpu().numpy()
                if writers is not None:
                    writers[name].write_rows(cells, value)
                if keep:
                    if name not in kept:
                        kept[name] = np.zeros((*value.shape[:-2], ids.size, value.shape[-1]), dtype=value.dtype)
                    kept[name][..., rows, :] = value
            seen += len(cells)
        assert seen == ids.size, f"streamed {seen} cells for {ids.size} ids"
        return kept

    def _describe(self, key: str, quantity: str, names: list[str], opts: ExpressionOptions) -> None:
        """Puts the column names and how they were made into the attrs of the not-yet-committed array."""
        obsm = zarr.open_group(str(Path(self.store) / "obsm"), mode="r+", zarr_format=ZARR_FORMAT,
                               use_consolidated=False)
        obsm[f".tmp-{key}"].attrs.update({
            "feature_names": names,
            "streamtotal": {"quantity": quantity, "options": _json_safe(asdict(opts)),
                            "model": str(self.trained.source)},
        })


def _bind(fn, model, **kwargs) -> Callable[[CiteBatch], torch.Tensor]:
    return lambda batch: fn(model, batch, **kwargs)


def _tensor(index: np.ndarray | None, device: torch.device) -> torch.Tensor | None:
    return None if index is None else torch.as_tensor(index, device=device)


def _names(all_names: Sequence[str], index: np.ndarray | None) -> list[str]:
    return list(all_names) if index is None else [all_names[i] for i in index]


def _json_safe(options: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}
