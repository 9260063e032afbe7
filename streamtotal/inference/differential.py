"""Differential expression of RNA and proteins between two groups of cells, streamed: the Bayesian "change" mode.

For each comparison (group 1 vs group 2, or vs the rest of the cells): sample up to ``cells_per_group`` cells of
each group (a group may be millions of cells; only the sampled cells are read), draw ``draws_per_cell``
posterior samples of each cell's normalised expression, pair the samples of the two groups at random, and
summarise the log2 fold changes per feature (``de_statistics``). One DataFrame per comparison, one row per
feature, sorted by Bayes factor.

Choices (scvi-tools' TOTALVI.differential_expression defaults, written from its documented behaviour):

* RNA quantity: rho, the decoder's expression proportions (library size 1), drawn at z ~ q(z | x, y, s) and
  decoded with each cell's own batch; LFC = log2(rho1 + ``rna_pseudocount``) - log2(rho2 + ``rna_pseudocount``),
  pseudocount 1e-5 (on the proportion scale).
* Protein quantity: the denoised foreground (1 - pi) * beta * alpha (no background, pi not sampled, not scaled),
  with z and log beta drawn from the posterior; pseudocount 0.1 (on the count scale; scvi-tools'
  ``protein_prior_count``). Proteins a study did not measure are the model's imputation there.
* ``delta`` = 0.25; P(DE) = max(P(LFC >= delta), P(LFC <= -delta)) (scvi-tools' default ``test_mode="three"``;
  "two" sums the two). ``lfc_mean`` / ``lfc_median`` / ``lfc_std`` are computed with a 1000x smaller
  pseudocount, as scvi-tools does, so the pseudocount does not shrink the reported fold changes.
* FDR calls over all features of the comparison (RNA and proteins together), at the posterior expected FDR.
* ``batch_correction`` (scvi-tools' meaning): each group's samples are decoded under the batches ``batchid1`` /
  ``batchid2`` (default every batch of the model) instead of each cell's own, an equal share of the group's samples
  per batch (sample row r under the r-th batch, cyclically; at least one sample per batch), and pooled. When
  both groups use the same batches, samples are paired within a batch (``n_pairs`` split evenly over the
  batches), so the fold changes compare the groups under one batch; otherwise they are paired across the pools
  (a warning when the two sets overlap, as scvi-tools). Without it each cell is decoded in its own batch.
* Raw statistics (mean count, fraction non-zero, mean count per 10k of the cell's total) over the sampled
  cells, or over every cell of each group with ``stats_all_cells``; protein statistics use only the cells whose
  study measured the protein (per 10k of the cell's measured protein total).

Memory: ``2 * cells_per_group * draws_per_cell * (G' + T')`` float32 samples (with batch correction and more
batches than a group's samples, one sample per batch instead), plus one block of LFC pairs.
Deterministic given ``seed`` (and the batch size and device).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from streamtotal.errors import ConfigError, SelectionError
from streamtotal.inference import de_statistics as st
from streamtotal.inference.cell_stream import stream_cells
from streamtotal.inference.expression import StorePosterior
from streamtotal.inference.posterior import decode, draw_posterior
from streamtotal.inference.selection import cell_ids as check_cell_ids, feature_indices
from streamtotal.training.run_dir import TrainedModel

logger = logging.getLogger(__name__)

MODALITIES = {"rna": ("rna",), "protein": ("protein",), "both": ("rna", "protein")}
_LFC_BLOCK = 256  # features per block of paired LFCs (memory: n_pairs * block floats)
_SUMMARY_PSEUDOCOUNT_FACTOR = 1e-3  # scvi-tools describes the LFC distribution with a 1000x smaller pseudocount
_PER_10K = 1e4


@dataclass(frozen=True)
class DEOptions:
    """How a differential-expression comparison is made."""

    modality: str = "both"
    """"rna", "protein" or "both"."""
    delta: float = 0.25
    """|LFC| (log2) above which a feature counts as changed (scvi-tools' totalVI default)."""
    test_mode: str = "three"
    """How P(DE) is read from the LFC samples: "three" = the more likely direction, max(P(LFC >= delta),
    P(LFC <= -delta)) (scvi-tools' default); "two" = their sum, P(|LFC| >= delta)."""
    fdr_target: float = 0.05
    """Posterior expected FDR of the called set (``is_de_fdr``)."""
    cells_per_group: int = 1000
    """Cells sampled (without replacement) from each group; a smaller group is used whole."""
    draws_per_cell: int = 5
    """Posterior draws per sampled cell (samples per group = cells x draws)."""
    n_pairs: int | None = None
    """Paired samples the LFC distribution is estimated from; None = the larger group's sample count."""
    rna_pseudocount: float = 1e-5
    """Added to rho before the log (proportion scale)."""
    protein_pseudocount: float = 0.1
    """Added to the denoised protein before the log (count scale)."""
    genes: tuple[str, ...] | None = None
    """Genes to test (None = all)."""
    proteins: tuple[str, ...] | None = None
    """Proteins to test (None = all)."""
    stats_all_cells: bool = False
    """Raw statistics over every cell of each group (one extra streamed pass) instead of the sampled cells."""
    seed: int = 0
    """Seed of the cell sampling, posterior draws and pairing."""
    batch_correction: bool = False
    """Decode each group's samples under the batches ``batchid1`` / ``batchid2`` and pool them (scvi-tools'
    ``batch_correction``); False = each cell decoded in its own batch."""
    batchid1: tuple[str, ...] | None = None
    """Batch names group 1's samples are decoded under (needs ``batch_correction``); None = every batch."""
    batchid2: tuple[str, ...] | None = None
    """Batch names group 2's samples are decoded under (needs ``batch_correction``); None = every batch."""

    def __post_init__(self) -> None:
        for name in ("genes", "proteins", "batchid1", "batchid2"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, (value,))
            elif value is not None:
                object.__setattr__(self, name, tuple(str(v) for v in value))
        if self.modality not in MODALITIES:
            raise ConfigError(f"modality must be one of {sorted(MODALITIES)}; got {self.modality!r}")
        for name in ("cells_per_group", "draws_per_cell"):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1; got {value!r}")
        if self.n_pairs is not None and (isinstance(self.n_pairs, bool) or self.n_pairs < 1):
            raise ConfigError(f"n_pairs must be >= 1 or None; got {self.n_pairs!r}")
        if not self.delta >= 0:
            raise ConfigError(f"delta must be >= 0; got {self.delta!r}")
        if self.test_mode not in st.TEST_MODES:
            raise ConfigError(f"test_mode must be one of {list(st.TEST_MODES)}; got {self.test_mode!r}")
        if not 0 < self.fdr_target < 1:
            raise ConfigError(f"fdr_target must be in (0, 1); got {self.fdr_target!r}")
        if not (self.rna_pseudocount > 0 and self.protein_pseudocount > 0):
            raise ConfigError("rna_pseudocount and protein_pseudocount must be > 0 (log of a zero expression)")
        for name in ("batchid1", "batchid2"):
            value = getattr(self, name)
            if value is not None and not self.batch_correction:
                raise ConfigError(f"{name}={list(value)} needs batch_correction=True (without it each cell is "
                                  "decoded in its own batch)")
            if value is not None and not value:
                raise ConfigError(f"{name} is an empty list; pass None to use every batch of the model")


@dataclass
class GroupSample:
    """Posterior samples and raw statistics of one group.

    Attributes:
        cell_ids: ``[n]`` the sampled cells (sorted).
        n_group: cells in the whole group.
        expression: modality -> ``[n * draws_per_cell, F]`` float32 samples; rows ``i * draws .. (i + 1) * draws
            - 1`` belong to ``cell_ids[i]``.
        raw: modality -> {"raw_mean", "nonzero_frac", "raw_norm_mean"} ``[F]`` float64.
        batch: ``[n * draws]`` the decoder batch code of each sample row (batch correction), or None when each
            cell was decoded in its own batch.
    """

    cell_ids: np.ndarray
    n_group: int
    expression: dict[str, np.ndarray]
    raw: dict[str, dict[str, np.ndarray]]
    batch: np.ndarray | None = None


class _RawStats:
    """Streaming sums of counts, non-zeros and per-10k counts (proteins: over measured cells only)."""

    def __init__(self, gidx, pidx) -> None:
        self.gidx, self.pidx = gidx, pidx
        self.sums: dict[str, np.ndarray] = {}

    def add(self, batch) -> None:
        rna = batch.rna.double()
        rna_norm = rna / rna.sum(1, keepdim=True).clamp(min=1.0) * _PER_10K
        mask = batch.protein_mask
        protein = torch.where(mask, batch.protein.double(), 0.0)
        protein_norm = protein / protein.sum(1, keepdim=True).clamp(min=1.0) * _PER_10K
        parts = {"rna": (rna, rna_norm, torch.ones_like(rna[:1]).expand_as(rna), self.gidx),
                 "protein": (protein, protein_norm, mask.double(), self.pidx)}
        for m, (x, xn, n, idx) in parts.items():
            if idx is not None:
                x, xn, n = x[:, idx], xn[:, idx], n[:, idx]
            values = [x.sum(0), (x > 0).double().sum(0), xn.sum(0), n.sum(0)]
            stacked = torch.stack(values).cpu().numpy()
            self.sums[m] = stacked if m not in self.sums else self.sums[m] + stacked

    def result(self) -> dict[str, dict[str, np.ndarray]]:
        out = {}
        for m, (total, nonzero, norm, n) in self.sums.items():
            with np.errstate(invalid="ignore", divide="ignore"):
                out[m] = {"raw_mean": total / n, "nonzero_frac": nonzero / n, "raw_norm_mean": norm / n}
        return out


def _seed(seed: int, *path: int) -> int:
    return int(np.random.SeedSequence([int(seed), *path]).generate_state(1, dtype=np.uint64)[0] >> 1)


class DifferentialExpression:
    """Differential expression of a trained model over a store.

    Args:
        run: a ``StorePosterior``, a training run directory, or a ``TrainedModel``.
        store: the store (needed unless ``run`` is a ``StorePosterior``).
        batch_size: cells per forward pass (memory: ``draws_per_cell * batch_size * (G + 4T)`` floats).
        device: "auto", "cpu" or "cuda[:N]".
        progress: show tqdm progress bars.
    """

    def __init__(self, run: StorePosterior | str | Path | TrainedModel, store: str | Path | None = None, *,
                 batch_size: int = 1024, device: str = "auto", progress: bool = True) -> None:
        if isinstance(run, StorePosterior):
            self.post = run
        else:
            if store is None:
                raise ConfigError("DifferentialExpression needs a store when given a run directory or model")
            self.post = StorePosterior(run, store, batch_size=batch_size, device=device, progress=progress)
        self.registry = self.post.registry
        self._obs: dict[str, np.ndarray] = {}

    # ------------------------------------------------------------------ groups

    def obs_values(self, groupby: str) -> np.ndarray:
        """``[n_obs]`` str values of an obs column over every study (``"study"`` = each cell's study name).

        Raises:
            SelectionError: a study lacks the column (the message lists the columns that exist).
        """
        if groupby not in self._obs:
            parts = []
            for source in self.post.collection.sources:
                if groupby == "study" and "study" not in source.obs_columns:
                    parts.append(np.full(source.n_obs, source.name, dtype=object))
                    continue
                if groupby not in source.obs_columns:
                    shown = sorted(c for c in source.obs_columns if not c.startswith("_"))
                    raise SelectionError(f"obs column {groupby!r} is not in study {source.name!r} of "
                                         f"{self.post.store}; its columns are {shown} (or 'study')")
                parts.append(np.asarray(source.obs_column(groupby)).astype(str).astype(object))
            self._obs[groupby] = np.concatenate(parts).astype(str)
        return self._obs[groupby]

    def group_ids(self, groupby: str, value: str) -> np.ndarray:
        """Global ids of the cells whose ``groupby`` value is ``value``.

        Raises:
            SelectionError: unknown column, or a value no cell has (the message lists the values that exist).
        """
        values = self.obs_values(groupby)
        ids = np.flatnonzero(values == str(value))
        if ids.size == 0:
            present, counts = np.unique(values, return_counts=True)
            listed = ", ".join(f"{str(v)!r} ({int(c)})" for v, c in list(zip(present, counts))[:30])
            raise SelectionError(f"no cell has {groupby} == {value!r}; values (cells): {listed}"
                                 f"{' ...' if present.size > 30 else ''}")
        return ids.astype(np.int64)

    # ------------------------------------------------------------------ comparisons

    def compare_groups(self, groupby: str, group1: str, group2: str | None = None,
                       options: DEOptions | None = None, **overrides) -> pd.DataFrame:
        """``groupby == group1`` vs ``groupby == group2`` (or vs every other cell when ``group2`` is None).

        Returns:
            The comparison's DataFrame (see ``compare_cells``).

        Raises:
            SelectionError: unknown column or values, identical groups, or an empty rest.
        """
        if group2 is not None and str(group1) == str(group2):
            raise SelectionError(f"group1 and group2 are both {group1!r}; compare two different groups")
        ids1 = self.group_ids(groupby, group1)
        ids2 = self.group_ids(groupby, group2) if group2 is not None else None
        return self.compare_cells(ids1, ids2, options, names=(str(group1), "rest" if group2 is None else str(group2)),
                                  **overrides)

    def one_vs_rest(self, groupby: str, options: DEOptions | None = None, *,
                    groups: Sequence[str] | None = None, **overrides) -> dict[str, pd.DataFrame]:
        """Every group (or those in ``groups``) of an obs column against all other cells.

        Each comparison uses the same ``seed``, so it equals ``compare_groups(groupby, g)``.

        Returns:
            group value -> DataFrame, in sorted group order.

        Raises:
            SelectionError: unknown column or values, or a column with a single value.
        """
        values = self.obs_values(groupby)
        present = np.unique(values)
        if present.size < 2:
            raise SelectionError(f"obs column {groupby!r} has one value ({present.tolist()}); nothing to compare")
        wanted = [str(g) for g in (present if groups is None else groups)]
        return {g: self.compare_groups(groupby, g, None, options, **overrides) for g in wanted}

    def compare_cells(self, cells1: Sequence[int] | np.ndarray, cells2: Sequence[int] | np.ndarray | None = None,
                      options: DEOptions | None = None, *, names: tuple[str, str] = ("group1", "group2"),
                      **overrides) -> pd.DataFrame:
        """Cells ``cells1`` vs ``cells2`` (global ids), or vs every other cell when ``cells2`` is None.

        Returns:
            One row per feature (index = feature name), sorted by ``bayes_factor`` (descending): ``modality``,
            ``proba_de``, ``proba_not_de``, ``bayes_factor``, ``is_de_fdr``, ``lfc_mean``, ``lfc_median``,
            ``lfc_std``, ``norm_mean1/2`` (mean of the model's normalised samples), ``raw_mean1/2``,
            ``nonzero_frac1/2``, ``raw_norm_mean1/2``, ``group1``, ``group2``. ``attrs`` hold the options, the
            group sizes and the numbers of sampled cells.

        Raises:
            SelectionError: an empty group, bad ids, or an empty rest.
            ConfigError: bad options.
        """
        opts = self._options(options, overrides)
        ids1 = self._cells(cells1, names[0])
        if cells2 is None:
            rest = np.ones(self.post.n_obs, dtype=bool)
            rest[ids1] = False
            ids2 = np.flatnonzero(rest).astype(np.int64)
            if ids2.size == 0:
                raise SelectionError(f"{names[0]} holds every cell of the store; there is no rest to compare with")
        else:
            ids2 = self._cells(cells2, names[1])
        tb1, tb2 = self.transform_codes(opts, "batchid1"), self.transform_codes(opts, "batchid2")
        rng = np.random.default_rng(_seed(opts.seed, 0))
        sample1 = self.sample_group(_subsample(ids1, opts.cells_per_group, rng), opts, _seed(opts.seed, 1),
                                    n_group=ids1.size, all_ids=ids1 if opts.stats_all_cells else None,
                                    transform_batch=tb1)
        sample2 = self.sample_group(_subsample(ids2, opts.cells_per_group, rng), opts, _seed(opts.seed, 2),
                                    n_group=ids2.size, all_ids=ids2 if opts.stats_all_cells else None,
                                    transform_batch=tb2)
        return self.frame(sample1, sample2, opts, names)

    # ------------------------------------------------------------------ pieces (public for tests and reuse)

    def transform_codes(self, options: DEOptions, which: str) -> np.ndarray | None:
        """Decoder batch codes of one group's samples: ``options.batchid1`` (``which="batchid1"``) or ``batchid2``.

        Returns:
            ``[k]`` int64 codes in the given order (every batch of the model when the name list is None), or None
            without ``batch_correction``.

        Raises:
            SelectionError: a name that is not one of the model's batches.
        """
        if not options.batch_correction:
            return None
        categories = list(self.registry.batch_categories)
        names = getattr(options, which)
        if names is None:
            return np.arange(len(categories), dtype=np.int64)
        unknown = [n for n in names if n not in categories]
        if unknown:
            raise SelectionError(f"{which} {unknown} not among the model's batches {categories[:20]}"
                                 f"{' ...' if len(categories) > 20 else ''} (several studies: batches are named "
                                 "'study/value')")
        return np.array([categories.index(n) for n in names], dtype=np.int64)

    @torch.no_grad()
    def sample_group(self, ids: np.ndarray, options: DEOptions, seed: int, *, n_group: int | None = None,
                     all_ids: np.ndarray | None = None, transform_batch: np.ndarray | None = None) -> GroupSample:
        """Posterior samples of normalised expression of the cells ``ids`` (read in sorted order).

        The draws come from ``draw_posterior(model, batch, draws, sample=True, generator)`` on each streamed
        batch, with one ``torch.Generator`` seeded with ``seed``.

        Args:
            ids: the (sampled) cells.
            options: the options (modality, features, draws per cell).
            seed: seed of the torch generator.
            n_group: size of the whole group (recorded); default ``len(ids)``.
            all_ids: compute the raw statistics over these cells instead of ``ids``.
            transform_batch: ``[k]`` decoder batch codes (batch correction): sample row ``r`` (cell ``r //
                draws``, draw ``r % draws``) is decoded under ``transform_batch[r % k]``; draws per cell are
                raised to ``ceil(k / len(ids))`` when needed so that every batch gets a sample. None = each
                cell's own batch.

        Returns:
            The group's samples and raw statistics.
        """
        post, model = self.post, self.post.model
        ids = np.sort(np.asarray(ids, dtype=np.int64))
        draws_n = options.draws_per_cell
        codes = None
        if transform_batch is not None:
            codes = torch.as_tensor(np.asarray(transform_batch, dtype=np.int64), device=post.device)
            draws_n = max(draws_n, -(-codes.numel() // max(ids.size, 1)))
        gidx, pidx = self._features(options)
        sizes = {"rna": self.registry.n_genes if gidx is None else gidx.size,
                 "protein": self.registry.n_proteins if pidx is None else pidx.size}
        modalities = MODALITIES[options.modality]
        expression = {m: np.zeros((ids.size, draws_n, sizes[m]), dtype=np.float32) for m in modalities}
        index = {"rna": _tensor(gidx, post.device), "protein": _tensor(pidx, post.device)}
        stats = _RawStats(index["rna"], index["protein"])
        gen = torch.Generator(device=post.device).manual_seed(int(seed))
        for batch, rows in stream_cells(post.collection, ids, batch_size=post.batch_size, device=post.device,
                                        desc="DE samples", progress=post.progress):
            draws = draw_posterior(model, batch, draws_n, sample=True, generator=gen)
            decoder_batch = batch.batch
            if codes is not None:  # [draws, B]: the decoder batch of sample row rows[c] * draws_n + d
                rows_t = torch.as_tensor(np.asarray(rows), dtype=torch.int64, device=post.device)
                sample_rows = rows_t[None, :] * draws_n + torch.arange(draws_n, device=post.device)[:, None]
                decoder_batch = codes[sample_rows % codes.numel()]
            out = decode(model, draws, decoder_batch)
            values = {"rna": out.rna_scale, "protein": out.denoised_protein}
            for m in modalities:
                v = values[m] if index[m] is None else values[m].index_select(-1, index[m])
                expression[m][rows] = v.reshape(draws_n, len(batch), -1).transpose(0, 1).float().cpu().numpy()
            if all_ids is None:
                stats.add(batch)
        if all_ids is not None:
            for batch, _ in stream_cells(post.collection, all_ids, batch_size=post.batch_size, device=post.device,
                                         desc="DE raw stats", progress=post.progress):
                stats.add(batch)
        flat = {m: e.reshape(ids.size * draws_n, -1) for m, e in expression.items()}
        sample_batch = None
        if codes is not None:
            sample_batch = np.asarray(transform_batch, dtype=np.int64)[np.arange(ids.size * draws_n) % codes.numel()]
        return GroupSample(ids, int(ids.size if n_group is None else n_group), flat, stats.result(), sample_batch)

    def frame(self, sample1: GroupSample, sample2: GroupSample, options: DEOptions,
              names: tuple[str, str] = ("group1", "group2"), *,
              pairs: tuple[np.ndarray, np.ndarray] | None = None) -> pd.DataFrame:
        """The comparison's DataFrame from two groups' samples.

        Args:
            sample1, sample2: from ``sample_group``.
            options: the options.
            names: the groups' names (columns ``group1`` / ``group2``).
            pairs: ``(i, j)`` sample indexes to pair; default ``pair_samples`` with ``seed``-derived randomness.

        Returns:
            As ``compare_cells``.
        """
        gidx, pidx = self._features(options)
        feature_names = {"rna": _names(self.registry.gene_names, gidx),
                         "protein": _names(self.registry.protein_names, pidx)}
        pseudo = {"rna": options.rna_pseudocount, "protein": options.protein_pseudocount}
        if pairs is None:
            pairs = pair_samples(sample1, sample2, np.random.default_rng(_seed(options.seed, 3)), options.n_pairs)
        i, j = pairs
        parts = []
        for m in MODALITIES[options.modality]:
            e1, e2 = sample1.expression[m], sample2.expression[m]
            blocks = []
            for start in range(0, e1.shape[1], _LFC_BLOCK):
                cols = slice(start, start + _LFC_BLOCK)
                lfc = st.lfc_samples(e1[:, cols], e2[:, cols], i, j, pseudo[m])
                summary = st.lfc_samples(e1[:, cols], e2[:, cols], i, j, pseudo[m] * _SUMMARY_PSEUDOCOUNT_FACTOR)
                blocks.append(pd.DataFrame(st.change_statistics(lfc, options.delta, test_mode=options.test_mode,
                                                                summary_lfc=summary)))
            part = pd.concat(blocks, ignore_index=True)
            part.index = pd.Index(feature_names[m], name="feature")
            part.insert(0, "modality", m)
            part["norm_mean1"], part["norm_mean2"] = e1.mean(0, dtype=np.float64), e2.mean(0, dtype=np.float64)
            for key in ("raw_mean", "nonzero_frac", "raw_norm_mean"):
                part[f"{key}1"], part[f"{key}2"] = sample1.raw[m][key], sample2.raw[m][key]
            parts.append(part)
        df = pd.concat(parts)
        df.insert(4, "is_de_fdr", st.fdr_calls(df["proba_de"].to_numpy(), options.fdr_target))
        df["group1"], df["group2"] = names
        order = np.lexsort((-df["lfc_mean"].abs().to_numpy(), -df["bayes_factor"].to_numpy()))
        df = df.iloc[order]
        df.attrs.update({"delta": options.delta, "fdr_target": options.fdr_target, "seed": options.seed,
                         "n_group1": sample1.n_group, "n_group2": sample2.n_group,
                         "n_sampled1": int(sample1.cell_ids.size), "n_sampled2": int(sample2.cell_ids.size),
                         "draws_per_cell": options.draws_per_cell, "n_pairs": int(i.size),
                         "test_mode": options.test_mode, "rna_pseudocount": options.rna_pseudocount,
                         "protein_pseudocount": options.protein_pseudocount,
                         "batch_correction": options.batch_correction,
                         "batchid1": _batch_names(self.registry, sample1.batch),
                         "batchid2": _batch_names(self.registry, sample2.batch)})
        return df

    # ------------------------------------------------------------------ internals

    def _options(self, options: DEOptions | None, overrides: dict) -> DEOptions:
        opts = options if options is not None else DEOptions()
        return replace(opts, **overrides) if overrides else opts

    def _features(self, options: DEOptions):
        return (feature_indices(options.genes, self.registry.gene_names, "gene"),
                feature_indices(options.proteins, self.registry.protein_names, "protein"))

    def _cells(self, cells, name: str) -> np.ndarray:
        if cells is None or np.asarray(cells).size == 0:
            raise SelectionError(f"{name} has no cells; pass a non-empty array of cell ids")
        return check_cell_ids(cells, self.post.n_obs)


def pair_samples(sample1: GroupSample, sample2: GroupSample, rng: np.random.Generator,
                 n_pairs: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of sample rows of two groups (scvi-tools' pairing).

    When both groups were decoded under the same set of batches (batch correction), samples are paired within
    each batch (in sorted code order, ``n_pairs // k`` pairs per batch, at least one; None = the larger of the
    two groups' sample counts in that batch), so every fold change compares the groups under one batch.
    Otherwise (own batches, or two different batch sets) samples are paired across all rows (``pair_indices``);
    overlapping but different batch sets get a warning (the comparison then mixes batch effects, as in scvi-tools).

    Args:
        sample1, sample2: from ``sample_group``.
        rng: random source.
        n_pairs: pairs to make in all; None = ``pair_indices``' default (per batch).

    Returns:
        ``(i, j)`` int64 arrays: sample row ``i[k]`` of group 1 is paired with row ``j[k]`` of group 2.
    """
    n1 = next(iter(sample1.expression.values())).shape[0]
    n2 = next(iter(sample2.expression.values())).shape[0]
    b1, b2 = sample1.batch, sample2.batch
    if b1 is None or b2 is None or set(b1.tolist()) != set(b2.tolist()):
        if b1 is not None and b2 is not None and set(b1.tolist()) & set(b2.tolist()):
            logger.warning("batchid1 and batchid2 are different but overlap: samples are paired across batches, "
                           "so batch correction is not trustworthy here (give the same batches, or disjoint ones)")
        return st.pair_indices(n1, n2, rng, n_pairs)
    batches = np.unique(b1)
    per_batch = None if n_pairs is None else max(1, int(n_pairs) // batches.size)
    i_parts, j_parts = [], []
    for code in batches:
        rows1, rows2 = np.flatnonzero(b1 == code), np.flatnonzero(b2 == code)
        i, j = st.pair_indices(rows1.size, rows2.size, rng, per_batch)
        i_parts.append(rows1[i])
        j_parts.append(rows2[j])
    return np.concatenate(i_parts), np.concatenate(j_parts)


def _batch_names(registry, batch: np.ndarray | None) -> list[str] | None:
    """The decoder batches a group's samples used (in code order), or None for each cell's own batch."""
    return None if batch is None else [registry.batch_categories[int(c)] for c in np.unique(batch)]


def _subsample(ids: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Up to ``n`` of ``ids`` without replacement (all of them when fewer), sorted."""
    chosen = ids if ids.size <= n else rng.choice(ids, size=n, replace=False)
    return np.sort(chosen)


def _tensor(index: np.ndarray | None, device) -> torch.Tensor | None:
    return None if index is None else torch.as_tensor(index, device=device)


def _names(all_names: Sequence[str], index: np.ndarray | None) -> list[str]:
    return list(all_names) if index is None else [all_names[k] for k in index]
