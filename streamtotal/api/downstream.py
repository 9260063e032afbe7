"""The downstream methods of ``TOTALVI`` (scvi-tools' names, arguments and return types), driving the inference
layer the CLI drives: ``StorePosterior`` (latent, normalised expression, foreground probability),
``DifferentialExpression``, and ``predictive.py`` / ``predictive_store.py``.

Beyond scvi-tools, every method takes ``write_to=KEY``: on a model whose data is one local Zarr store, the
result is streamed over the store and written into it chunk by chunk (resumable, as ``streamtotal embed`` /
``denoise`` / ``sample`` / ``elbo`` do) instead of being returned; the method then returns what it wrote.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd

from streamtotal.api.de_frame import scvi_columns
from streamtotal.errors import ConfigError
from streamtotal.inference import predictive
from streamtotal.inference.differential import DEOptions, DifferentialExpression
from streamtotal.inference.expression import ExpressionOptions

# The CLI's default forward-pass sizes: results depend on the batch size, so the API's defaults are the CLI's.
LATENT_BATCH = 4096
INFERENCE_BATCH = 1024


def _check_mode(**unsupported: Any) -> None:
    for name, (value, default, why) in unsupported.items():
        if value != default:
            raise ConfigError(f"{name}={value!r} is not supported: {why}")


class DownstreamMixin:
    """scvi-tools' TOTALVI downstream API over ``self._posterior(adata, batch_size)`` (see ``TOTALVI``)."""

    # ------------------------------------------------------------------ latent

    def get_latent_representation(self, adata: Any = None, indices: Sequence[int] | None = None,
                                  give_mean: bool = True, mc_samples: int = 5000, batch_size: int | None = None,
                                  return_dist: bool = False, *, write_to: str | None = None) -> np.ndarray | dict:
        """The latent representation of each cell (scvi-tools' ``get_latent_representation``).

        Args:
            adata: data to embed (AnnData / MuData set up like the model's, or a store path); None = the model's.
            indices: cells (positions) to embed; None = all.
            give_mean: the posterior mean (True) or one posterior draw per cell.
            mc_samples: unused (the latent is Gaussian; scvi-tools uses it for the logistic-normal latent).
            batch_size: cells per forward pass (default 4096, as ``streamtotal embed``).
            return_dist: unsupported (scvi-tools returns the Gaussian's parameters).
            write_to: write the latent means into the store's ``obsm[write_to]`` instead (``streamtotal embed``).

        Returns:
            ``[cells, n_latent]`` float32, or with ``write_to`` ``{"latent": "obsm/<write_to>"}``.

        Raises:
            ConfigError: ``return_dist``, or ``write_to`` on data without a local store, or with indices / a draw.
        """
        _check_mode(return_dist=(return_dist, False, "the posterior mean or a draw is returned"))
        size = batch_size or LATENT_BATCH
        self._require_trained()
        if write_to is not None:
            from streamtotal.inference.embed import embed

            if indices is not None or not give_mean:
                raise ConfigError("write_to writes the latent mean of every cell: drop indices= and give_mean=False")
            store = self._store_for_write(adata)
            embed(str(self.run_dir), store, key=write_to, batch_size=size, device=self._device,
                  progress=self._progress)
            return {"latent": f"obsm/{write_to}"}
        post = self._posterior(adata, size)
        return post.latent(_ids(indices), give_mean=give_mean, seed=self._seed)

    # ------------------------------------------------------------------ expression

    def get_normalized_expression(self, adata: Any = None, indices: Sequence[int] | None = None,
                                  n_samples_overall: int | None = None, transform_batch: Any = None,
                                  gene_list: Sequence[str] | None = None, protein_list: Sequence[str] | None = None,
                                  library_size: float | str = 1, n_samples: int = 1,
                                  sample_protein_mixing: bool = False, scale_protein: bool = False,
                                  include_protein_background: bool = False, batch_size: int | None = None,
                                  return_mean: bool = True, return_numpy: bool | None = None, *,
                                  write_to: str | None = None):
        """Normalised RNA and denoised protein expression (scvi-tools' ``get_normalized_expression``).

        Args:
            adata, indices: the cells (see ``get_latent_representation``).
            n_samples_overall: a random subset of this many cells (seeded).
            transform_batch: batch name(s) to decode as (several are averaged); None = each cell's own.
            gene_list, protein_list: features to return (None = all).
            library_size: RNA rows scaled to sum to this, or "latent" for each cell's own library.
            n_samples: posterior draws averaged (1 = the plug-in estimate at the posterior means).
            sample_protein_mixing, scale_protein, include_protein_background: as scvi-tools.
            batch_size: cells per forward pass (default 1024, as ``streamtotal denoise``).
            return_mean: average the draws; False keeps a leading sample axis (numpy).
            return_numpy: arrays instead of DataFrames (forced when a sample axis is kept).
            write_to: write into the store's ``obsm[<write_to>_rna]`` and ``obsm[<write_to>_protein]`` instead.

        Returns:
            ``(rna, protein)``: DataFrames indexed by cell name with feature-name columns, or arrays; with
            ``write_to`` ``{"rna": "obsm/...", "protein": "obsm/..."}``.

        Raises:
            SelectionError: unknown genes, proteins or batches.
            ConfigError: bad options, or ``write_to`` on data without a local store or with a cell subset.
        """
        options = ExpressionOptions(library_size=library_size, transform_batch=_batches(transform_batch),
                                    n_samples=n_samples, return_mean=return_mean,
                                    include_protein_background=include_protein_background,
                                    sample_protein_mixing=sample_protein_mixing, scale_protein=scale_protein,
                                    genes=gene_list, proteins=protein_list, seed=self._seed)
        keys = None if write_to is None else {"rna": f"{write_to}_rna", "protein": f"{write_to}_protein"}
        return self._expression(["rna", "protein"], adata, indices, n_samples_overall, options, batch_size, keys,
                                return_numpy)

    def get_protein_foreground_probability(self, adata: Any = None, indices: Sequence[int] | None = None,
                                           transform_batch: Any = None, protein_list: Sequence[str] | None = None,
                                           n_samples: int = 1, batch_size: int | None = None,
                                           use_z_mean: bool = True, return_mean: bool = True,
                                           return_numpy: bool | None = None, *, write_to: str | None = None):
        """P(foreground) = 1 - pi per cell and protein (scvi-tools' ``get_protein_foreground_probability``).

        Args:
            adata, indices, transform_batch, protein_list, n_samples, batch_size, return_mean, return_numpy: as
                ``get_normalized_expression``.
            use_z_mean: the plug-in estimate at the posterior mean (n_samples=1); False needs n_samples > 1.
            write_to: write into the store's ``obsm[write_to]`` instead.

        Returns:
            A DataFrame (cells x proteins) or array; with ``write_to`` ``{"foreground": "obsm/<write_to>"}``.
        """
        if not use_z_mean and n_samples == 1:
            raise ConfigError("use_z_mean=False draws z: pass n_samples > 1 (draws averaged)")
        options = ExpressionOptions(transform_batch=_batches(transform_batch), n_samples=n_samples,
                                    return_mean=return_mean, proteins=protein_list, seed=self._seed)
        keys = None if write_to is None else {"foreground": write_to}
        result = self._expression(["foreground"], adata, indices, None, options, batch_size, keys, return_numpy)
        return result if keys is not None else result[0]

    def _expression(self, what, adata, indices, n_samples_overall, options, batch_size, keys, return_numpy):
        self._require_trained()
        size = batch_size or INFERENCE_BATCH
        if keys is not None:
            if indices is not None or n_samples_overall is not None:
                raise ConfigError("write_to writes every cell of the store: drop indices= and n_samples_overall=")
            post = self._store_posterior(self._store_for_write(adata), size)
            result = post.compute(what, None, options, write_back=True, keys=keys, keep=False)
            return {q: f"obsm/{k}" for q, k in result.written.items()}
        post = self._posterior(adata, size)
        ids = _ids(indices)
        if n_samples_overall is not None:
            pool = np.arange(post.n_obs) if ids is None else ids
            rng = np.random.default_rng(self._seed)
            ids = np.sort(rng.choice(pool, size=min(int(n_samples_overall), pool.size), replace=False))
        result = post.compute(what, ids, options)
        numpy = bool(return_numpy) or (options.n_samples > 1 and not options.return_mean)
        if numpy:
            return tuple(result.values[q] for q in what)
        cells = self._cell_names(adata, post)
        index = cells if ids is None else cells[ids]
        return tuple(pd.DataFrame(result.values[q], index=index, columns=result.feature_names[q]) for q in what)

    # ------------------------------------------------------------------ differential expression

    def differential_expression(self, adata: Any = None, groupby: str | None = None, group1: Any = None,
                                group2: str | None = None, idx1: Any = None, idx2: Any = None,
                                mode: str = "change", delta: float = 0.25, batch_size: int | None = None,
                                all_stats: bool = True, batch_correction: bool = False, batchid1: Any = None,
                                batchid2: Any = None, fdr_target: float = 0.05, silent: bool = False,
                                protein_prior_count: float = 0.1, scale_protein: bool = False,
                                sample_protein_mixing: bool = False, include_protein_background: bool = False,
                                pseudocounts: float | None = 1e-5, *, test_mode: str = "three",
                                cells_per_group: int = 1000, draws_per_cell: int = 5,
                                write_to: str | None = None) -> pd.DataFrame:
        """Bayesian ("change" mode) differential expression of genes and proteins (scvi-tools' columns).

        Args:
            adata: the data (default the model's).
            groupby: obs column of the groups ("study" = each cell's study).
            group1: a group (or list of groups, pooled) of ``groupby``; None = every group vs the rest.
            group2: the other group; None = the rest of the cells.
            idx1, idx2: cells (positions or a boolean mask) instead of ``groupby`` groups.
            mode: "change" (the only mode).
            delta: |log2 fold change| counted as a change.
            batch_size: cells per forward pass (default 1024, as ``streamtotal de``).
            all_stats: raw statistics (always computed).
            batch_correction: decode each group's samples under the batches ``batchid1`` / ``batchid2`` and pool
                them (scvi-tools' meaning; see ``streamtotal.inference.differential``); False = each cell in its
                own batch.
            batchid1, batchid2: batch names (lists) group 1 / group 2 are decoded under with ``batch_correction``
                (None = every batch of the model; the same set for both pairs samples within a batch).
            fdr_target: posterior expected FDR of the calls (column ``is_de_fdr_<fdr_target>``).
            silent: no progress bars.
            protein_prior_count: pseudocount of the protein fold changes.
            pseudocounts: pseudocount of the RNA fold changes (on the expression-proportion scale); None = scvi-tools'
                default 1e-5 (scvi-tools would estimate one from the data; streamtotal keeps it fixed).
            test_mode: "three" (scvi-tools' default): P(DE) of the more likely direction; "two": of either.
            scale_protein, sample_protein_mixing, include_protein_background: unsupported (the protein quantity
                is the denoised foreground, as scvi-tools' defaults).
            cells_per_group, draws_per_cell: cells sampled per group and posterior draws per cell (``streamtotal
                de``'s ``--cells-per-group`` / ``--draws-per-cell``).
            write_to: a ``.csv`` path (one comparison) or a directory to write the table(s) into, as
                ``streamtotal de --out``; the table is returned as well.

        Returns:
            One row per feature and comparison, sorted by Bayes factor within a comparison.

        Raises:
            ConfigError: an unsupported option, or ``batchid1`` / ``batchid2`` without ``batch_correction``;
            SelectionError: unknown column, groups, cells or batch names.
        """
        _check_mode(mode=(mode, "change", "streamtotal implements the 'change' mode"),
                    scale_protein=(scale_protein, False, "DE uses the unscaled denoised protein"),
                    sample_protein_mixing=(sample_protein_mixing, False, "DE uses the mixing probability"),
                    include_protein_background=(include_protein_background, False,
                                                "DE uses the foreground protein"))
        options = DEOptions(delta=delta, fdr_target=fdr_target, protein_pseudocount=protein_prior_count,
                            rna_pseudocount=1e-5 if pseudocounts is None else pseudocounts, test_mode=test_mode,
                            cells_per_group=cells_per_group, draws_per_cell=draws_per_cell, seed=self._seed,
                            batch_correction=bool(batch_correction), batchid1=batchid1, batchid2=batchid2)
        self._require_trained()
        post = self._posterior(adata, batch_size or INFERENCE_BATCH, progress=not silent)
        de = DifferentialExpression(post)
        if idx1 is not None:
            tables = {"group1": de.compare_cells(_positions(idx1, post.n_obs),
                                                 None if idx2 is None else _positions(idx2, post.n_obs), options,
                                                 names=("group1", "rest" if idx2 is None else "group2"))}
        elif groupby is None:
            raise ConfigError("differential_expression needs groupby= (an obs column) or idx1=")
        elif group1 is None:
            tables = de.one_vs_rest(groupby, options)
        elif isinstance(group1, (list, tuple)):
            ids1 = np.unique(np.concatenate([de.group_ids(groupby, g) for g in group1]))
            ids2 = None if group2 is None else de.group_ids(groupby, group2)
            name = ",".join(str(g) for g in group1)
            tables = {name: de.compare_cells(ids1, ids2, options, names=(name, "rest" if group2 is None else group2))}
        else:
            tables = {str(group1): de.compare_groups(groupby, group1, group2, options)}
        frames = [scvi_columns(df) for df in tables.values()]
        result = pd.concat(frames) if len(frames) > 1 else frames[0]
        if write_to is not None:
            from streamtotal.api.de_files import write_tables

            write_tables(tables, write_to, groupby or "cells")
        return result

    # ------------------------------------------------------------------ predictive and scores

    def posterior_predictive_sample(self, adata: Any = None, indices: Sequence[int] | None = None,
                                    n_samples: int = 1, batch_size: int | None = None,
                                    gene_list: Sequence[str] | None = None,
                                    protein_list: Sequence[str] | None = None, *, write_to: str | None = None):
        """Counts drawn from the posterior predictive (scvi-tools' ``posterior_predictive_sample``).

        Returns:
            ``(rna, protein)`` arrays ``[cells, F]`` (``[n_samples, cells, F]`` for several draws); with
            ``write_to`` one draw per cell is written into ``obsm[<write_to>_rna]`` / ``obsm[<write_to>_protein]``
            and ``{"rna": ..., "protein": ...}`` returned.
        """
        self._require_trained()
        size = batch_size or INFERENCE_BATCH
        if write_to is not None:
            from streamtotal.inference.predictive_store import write_predictive

            if indices is not None or n_samples != 1:
                raise ConfigError("write_to writes one draw for every cell: drop indices= and n_samples=")
            post = self._store_posterior(self._store_for_write(adata), size)
            written = write_predictive(post, genes=gene_list, proteins=protein_list, seed=self._seed,
                                       keys={"rna": f"{write_to}_rna", "protein": f"{write_to}_protein"})
            return dict(written.written)
        return predictive.posterior_predictive_sample(self._posterior(adata, size), _ids(indices), n_samples,
                                                      genes=gene_list, proteins=protein_list, seed=self._seed)

    def get_elbo(self, adata: Any = None, indices: Sequence[int] | None = None, batch_size: int | None = None, *,
                 write_to: str | None = None):
        """The ELBO per cell averaged over the cells (scvi-tools' ``get_elbo``; higher is better).

        With ``write_to`` (a prefix), per-cell ELBO and reconstruction error go into the store's ``obs`` as
        ``streamtotal elbo`` writes them, and the means are returned as a dict.
        """
        return self._score("elbo", adata, indices, batch_size, write_to)

    def get_reconstruction_error(self, adata: Any = None, indices: Sequence[int] | None = None,
                                 batch_size: int | None = None, *, write_to: str | None = None):
        """Mean RNA + protein negative log-likelihood per cell at one posterior draw (scvi-tools' name)."""
        return self._score("reconstruction", adata, indices, batch_size, write_to)

    def get_marginal_ll(self, adata: Any = None, indices: Sequence[int] | None = None, n_mc_samples: int = 1000,
                        batch_size: int | None = None, *, write_to: str | None = None):
        """Importance-sampled log p(x, y | s), averaged over the cells (scvi-tools' ``get_marginal_ll``)."""
        return self._score("marginal_ll", adata, indices, batch_size, write_to, n_mc_samples=n_mc_samples)

    def _score(self, what: str, adata, indices, batch_size, write_to, n_mc_samples: int = 100):
        self._require_trained()
        size = batch_size or INFERENCE_BATCH
        if write_to is not None:
            from streamtotal.inference.predictive_store import score_cells

            if indices is not None:
                raise ConfigError("write_to writes every cell of the store: drop indices=")
            post = self._store_posterior(self._store_for_write(adata), size)
            result = score_cells(post, None, marginal_ll=what == "marginal_ll", n_mc_samples=n_mc_samples,
                                 seed=self._seed, write_back=True, prefix=write_to)
            return {"means": result.means, "written": result.written}
        post = self._posterior(adata, size)
        if what == "marginal_ll":
            return predictive.marginal_ll(post, _ids(indices), n_mc_samples=n_mc_samples, seed=self._seed)
        if what == "elbo":
            return predictive.elbo(post, _ids(indices), seed=self._seed)["elbo"]
        return predictive.reconstruction_error(post, _ids(indices), seed=self._seed)


def _ids(indices: Sequence[int] | None) -> np.ndarray | None:
    return None if indices is None else np.asarray(indices, dtype=np.int64)


def _positions(cells: Any, n_obs: int) -> np.ndarray:
    """Cell positions from integer indices or a boolean mask over every cell."""
    values = np.asarray(cells)
    if values.dtype == bool:
        if values.shape != (n_obs,):
            raise ConfigError(f"a boolean cell mask must have one entry per cell ({n_obs}); got {values.shape}")
        return np.flatnonzero(values).astype(np.int64)
    return values.astype(np.int64)


def _batches(transform_batch: Any) -> Any:
    if transform_batch is None or isinstance(transform_batch, str):
        return transform_batch
    return [str(b) for b in transform_batch]
