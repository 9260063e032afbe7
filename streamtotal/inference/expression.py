"""Streaming the totalVI posterior over a store: latent, denoised RNA and protein, foreground probability, imputation.

A ``StorePosterior`` opens a store aligned onto a trained run's registry and streams it (or a subset of cell
ids) in order, batch by batch, through ``posterior.py``. Results come back as numpy for a subset, or are
written back into the store's ``obsm`` chunk by chunk (``write_back``):

    obsm/denoised_rna              [n_cells, G'] float32  (G' = selected genes; 4 * n_cells * G' bytes: 1M cells x
                                                            2,000 genes = 8 GB on disk before compression)
    obsm/denoised_protein          [n_cells, T'] float32
    obsm/protein_foreground_prob   [n_cells, T'] float32
    obsm/denoised_protein_std      [n_cells, T'] float32  (``protein_std``: the spread of the denoised protein over
                                                            ``n_samples >= 2`` posterior draws, its uncertainty;
                                                            also where the cell's study did not measure a protein)

Each array's attrs hold ``feature_names`` (its columns) and ``streamtotal`` (quantity, options, model file), so a
reader knows what the columns are. Writing goes through ``write_back.WriteBack``: hidden temporary arrays,
chunk-aligned write units of ``batch_size`` cells recorded in a progress ledger, renamed over the keys only when
every unit is written. A job killed half-way leaves the previous result intact, and rerunning the same command
(same model, options and batch size) computes only the units not written yet; other options start over.

Determinism: random estimates (``n_samples > 1``, ``sample_protein_mixing``) and write-backs take one forward
pass per block of ``batch_size`` consecutive store rows, with draws from a ``torch.Generator`` per quantity and
block seeded from ``(seed, block)`` (``cell_stream.block_generator``). A result is a function of (model, cells,
seed, batch_size, device); over every cell, the in-memory, written-back and resumed results agree exactly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from loaders.citebatch import CiteBatch
from loaders.store_results import read_obsm
from loaders.atomic_files import write_file_atomically
from streamtotal.data import open_collection
from streamtotal.errors import ConfigError
from streamtotal.inference import posterior
from streamtotal.inference.cell_stream import block_generator, stream_blocks, stream_cells
from streamtotal.inference.write_back import ObsmTarget, WriteBack
from streamtotal.inference.write_ledger import file_sha256
from streamtotal.inference.selection import batch_codes, cell_ids as check_cell_ids, feature_indices
from streamtotal.training.run_dir import TrainedModel, load_trained
from streamtotal.device import resolve_device

QUANTITIES = ("rna", "protein", "foreground", "protein_std")
"""What ``compute`` / ``streamtotal denoise --what`` can produce."""

DEFAULT_KEYS = {"rna": "denoised_rna", "protein": "denoised_protein", "foreground": "protein_foreground_prob"}
"""obsm key each quantity is written to by default."""
PROTEIN_STD_KEY = "denoised_protein_std"
"""obsm key of the ``protein_std`` quantity (asked for explicitly, so not among ``DEFAULT_KEYS``)."""


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
        chunks_skipped: write units found complete from an interrupted run (resumed, not recomputed).
        chunks_computed: write units computed by this call.
    """

    n_cells: int
    values: dict[str, np.ndarray]
    feature_names: dict[str, list[str]]
    written: dict[str, str]
    chunks_skipped: int = 0
    chunks_computed: int = 0


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
        fn = _bind(posterior.latent, self.model, give_mean=give_mean, n_samples=n_samples)
        return self._run({"latent": fn}, check_cell_ids(cell_ids, self.n_obs), seed=seed, random=not give_mean,
                         keep=True, desc="latent")["latent"]

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
        kwargs = self._protein_kwargs(opts, tb, proteins)
        # One call per batch, not two: both outputs come from the same draws.
        cache: dict = {}

        def both(b: CiteBatch, gen: torch.Generator, i: int):
            if cache.get("batch") is not b:
                cache["batch"] = b
                cache["out"] = posterior.impute_proteins(self.model, b, generator=gen, **kwargs)
            return cache["out"][i]

        fns = {"values": lambda b, g: both(b, g, 0), "measured": lambda b, g: both(b, g, 1)}
        out = self._run(fns, check_cell_ids(cell_ids, self.n_obs), seed=opts.seed, random=_is_random(opts),
                        keep=True, desc="impute")
        return out["values"], out["measured"].astype(bool)

    # ------------------------------------------------------------------ several at once, written back

    def compute(self, what: Sequence[str], cell_ids: Sequence[int] | None = None,
                options: ExpressionOptions | None = None, *, write_back: bool = False,
                keys: dict[str, str] | None = None, keep: bool = True, **overrides) -> ComputeResult:
        """Computes several quantities in one pass over the cells; keeps them in memory and/or writes them back.

        Args:
            what: quantities among ``QUANTITIES`` ("rna", "protein", "foreground", "protein_std": the denoised
                protein's standard deviation over ``n_samples >= 2`` posterior draws).
            cell_ids: global cell ids (any order; results follow it); None = every cell.
            options: the estimation options; keyword ``overrides`` replace its fields.
            write_back: write each quantity into ``obsm/<key>`` of the store (needs every cell and
                ``return_mean`` or ``n_samples=1``), resumably: a rerun after an interruption with the same
                options and ``batch_size`` computes only the chunks not written yet.
            keys: obsm key per quantity (default ``DEFAULT_KEYS``).
            keep: return the values in memory (turn off for atlas-sized write-back; with write-back they are
                read back from the store, so chunks written before an interruption are included).

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
        keys = {**DEFAULT_KEYS, "protein_std": PROTEIN_STD_KEY, **(keys or {})}
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
                 "protein_std": _names(self.registry.protein_names, proteins),
                 "foreground": _names(self.registry.protein_names, proteins)}
        fns: dict[str, Callable[[CiteBatch, torch.Generator], torch.Tensor]] = {}
        for quantity in what:  # each gets its own generator per block: each equals its single-quantity call
            if quantity == "rna":
                fns["rna"] = _bind(posterior.normalized_rna, self.model, library_size=opts.library_size,
                                   transform_batch=tb, n_samples=opts.n_samples, return_mean=opts.return_mean,
                                   genes=_tensor(genes, self.device))
            elif quantity == "protein":
                fns["protein"] = _bind(posterior.denoised_protein, self.model,
                                       **self._protein_kwargs(opts, tb, proteins))
            elif quantity == "protein_std":
                fns["protein_std"] = self._protein_std(opts, tb, proteins)
            else:
                fns["foreground"] = _bind(posterior.protein_foreground_probability, self.model, transform_batch=tb,
                                          n_samples=opts.n_samples, return_mean=opts.return_mean,
                                          proteins=_tensor(proteins, self.device))
        writer = None
        if write_back:
            writer = WriteBack(
                self.store, self.n_obs, self.batch_size,
                {"method": "denoise", "model_sha256": file_sha256(self.trained.source),
                 "options": _json_safe(asdict(opts)), "quantities": what},
                obsm=[ObsmTarget(keys[q], len(names[q]), attrs=self._description(q, names[q], opts)) for q in what])
            ids = writer.pending_ids()
        values = self._run(fns, ids, seed=opts.seed, random=_is_random(opts), keep=keep and writer is None,
                           write_back=writer, keys=keys, desc="denoise " + "+".join(what))
        written = {}
        if writer is not None:
            writer.commit()
            written = {q: keys[q] for q in what}
            if keep:  # read back: chunks written before an interruption were not computed by this call
                values = {q: read_obsm(self.store, keys[q]) for q in what}
        return ComputeResult(n_cells=self.n_obs if write_back else int(ids.size), values=values,
                             feature_names={q: names[q] for q in what}, written=written,
                             chunks_skipped=writer.skipped if writer else 0,
                             chunks_computed=writer.computed if writer else 0)

    def export_h5ad(self, path: str | Path, result: ComputeResult) -> Path:
        """Writes the store's obs and the in-memory results as an h5ad (``obsm[key]`` DataFrames named by feature).

        Needs a ``compute`` result over every cell with ``keep=True`` and averaged values.
        """
        import anndata as ad
        import pandas as pd

        obs = self.collection.obs_frame()
        if result.n_cells != len(obs) or not result.values:
            raise ConfigError("export_h5ad needs a compute(...) result over every cell, kept in memory")
        obsm = {DEFAULT_KEYS[q]: pd.DataFrame(v, index=obs.index, columns=result.feature_names[q])
                for q, v in result.values.items()}
        return write_file_atomically(path, ad.AnnData(obs=obs, obsm=obsm).write_h5ad)

    # ------------------------------------------------------------------ internals

    def _options(self, options: ExpressionOptions | None, overrides: dict) -> ExpressionOptions:
        opts = options if options is not None else ExpressionOptions()
        return replace(opts, **overrides) if overrides else opts

    def _protein_index(self, opts: ExpressionOptions) -> np.ndarray | None:
        return feature_indices(opts.proteins, self.registry.protein_names, "protein")

    def _protein_std(self, opts, tb, proteins) -> Callable[[CiteBatch, torch.Generator], torch.Tensor]:
        """The standard deviation of the denoised protein over the ``n_samples`` posterior draws. Its generator is
        seeded as the "protein" quantity's, so it is the spread of exactly the draws whose mean that one gives."""
        if opts.n_samples < 2:
            raise ConfigError(f"protein_std is a spread over posterior draws: use n_samples >= 2 (--n-samples); got "
                              f"{opts.n_samples}")
        kwargs = {**self._protein_kwargs(opts, tb, proteins), "return_mean": False}
        return lambda batch, generator: posterior.denoised_protein(self.model, batch, generator=generator,
                                                                   **kwargs).std(dim=0)

    def _protein_kwargs(self, opts, tb, proteins) -> dict:
        return dict(transform_batch=tb, n_samples=opts.n_samples, return_mean=opts.return_mean,
                    include_protein_background=opts.include_protein_background,
                    sample_protein_mixing=opts.sample_protein_mixing, scale_protein=opts.scale_protein,
                    proteins=_tensor(proteins, self.device))

    def _run(self, fns: dict[str, Callable[[CiteBatch, torch.Generator], torch.Tensor]], ids: np.ndarray, *,
             seed: int, random: bool, keep: bool, write_back: WriteBack | None = None,
             keys: dict[str, str] | None = None, desc: str = "") -> dict[str, np.ndarray]:
        """Streams ``ids``; places each result row at its requested position and/or writes it.

        Random results and write-backs go block by block, each quantity with its own generator per block seeded
        from ``(seed, block)``. Deterministic results of a subset go in full batches instead: a sparse sample
        of a large store (``evaluate``) would otherwise take one small forward pass per block it touches.
        """
        kept: dict[str, np.ndarray] = {}
        seen = 0
        if random or write_back is not None:
            batches = stream_blocks(self.collection, ids, block_rows=self.batch_size, device=self.device, desc=desc,
                                    progress=self.progress)
        else:
            batches = ((None, batch, rows) for batch, rows in stream_cells(
                self.collection, ids, batch_size=self.batch_size, device=self.device, desc=desc,
                progress=self.progress))
        for block, batch, rows in batches:
            out = {}
            for name, fn in fns.items():
                value = fn(batch, None if block is None else block_generator(seed, block, self.device))
                out[name] = value.cpu().numpy() if value.dtype == torch.bool else value.float().cpu().numpy()
            if write_back is not None:
                write_back.write_unit(block, obsm={keys[name]: value for name, value in out.items()})
            if keep:
                for name, value in out.items():
                    if name not in kept:
                        kept[name] = np.zeros((*value.shape[:-2], ids.size, value.shape[-1]), dtype=value.dtype)
                    kept[name][..., rows, :] = value
            seen += len(rows)
        assert seen == ids.size, f"streamed {seen} cells for {ids.size} ids"
        return kept

    def _description(self, quantity: str, names: list[str], opts: ExpressionOptions) -> dict:
        """The attrs of a written array: its column names and how they were made."""
        return {"feature_names": names,
                "streamtotal": {"quantity": quantity, "options": _json_safe(asdict(opts)),
                                "model": str(self.trained.source)}}


def _is_random(opts: ExpressionOptions) -> bool:
    """Whether the options draw random numbers (else results do not depend on how cells are batched)."""
    return opts.n_samples > 1 or opts.sample_protein_mixing


def _bind(fn, model, **kwargs) -> Callable[[CiteBatch, torch.Generator], torch.Tensor]:
    return lambda batch, generator: fn(model, batch, generator=generator, **kwargs)


def _tensor(index: np.ndarray | None, device: torch.device) -> torch.Tensor | None:
    return None if index is None else torch.as_tensor(index, device=device)


def _names(all_names: Sequence[str], index: np.ndarray | None) -> list[str]:
    return list(all_names) if index is None else [all_names[i] for i in index]


def _json_safe(options: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}
