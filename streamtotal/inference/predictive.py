"""Posterior predictive counts, ELBO / reconstruction error, and the importance-sampled marginal log-likelihood.

Batch-level functions take a model in eval mode and a ``CiteBatch``; the store-level ones take a
``StorePosterior`` and stream only the requested cells (``cell_stream``). Semantics follow the totalVI user guide
(scvi-tools' ``posterior_predictive_sample``, ``get_elbo``, ``get_reconstruction_error``, ``get_marginal_ll``):

* Posterior predictive: z ~ q(z | x, y, s), l observed (or drawn from q(l)), log beta ~ q(log beta | z, s), a
  Bernoulli(pi) background/foreground choice per protein, then NB draws with means l * rho (RNA) and beta or
  beta * alpha (protein). Proteins a study did not measure are drawn too (they are the model's imputation).
* ELBO: a one-draw estimate with analytic KL terms, exactly the model's ``neg_elbo`` (KL weight 1, w_p = 1), the
  z term under the model's own prior (``TotalVAE.with_z_prior``: N(0, I) or the m2 label prior);
  reconstruction error = ``rna_nll + protein_nll`` of that draw (measured proteins only).
* Marginal log-likelihood: log p(x, y | s) ~= logsumexp_k log w_k - log K, log w = log p(x | z, l) +
  log p(y | z, beta) + log p(z) - log q(z) + log p(log beta) - log q(log beta) (+ log p(log l) - log q(log l)
  for a latent library), log p(z) the model's own prior (the m2 label prior's estimated per draw). Densities of
  beta are taken on log beta in both p and q, so the Jacobians cancel; unmeasured proteins enter neither. K draws
  are taken ``chunk_size`` at a time (memory: ``chunk_size * batch_size * (G + T)`` floats) and merged with a
  running logsumexp.

Randomness comes from an explicit ``torch.Generator`` (posterior draws) and a numpy ``Generator`` (Bernoulli and
NB draws of the predictive), both seeded per block of ``batch_size`` consecutive store rows from ``(seed,
block)`` (``cell_stream``); results depend on (model, cells, seed, batch_size), and the store-level functions
here agree exactly with their write-backs (``predictive_store``), interrupted and resumed or not.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Sequence

import numpy as np
import torch

from loaders.citebatch import CiteBatch
from streamtotal.errors import ConfigError
from streamtotal.inference.cell_stream import block_generator, block_rng, stream_blocks
from streamtotal.inference.posterior import _check, decode, draw_posterior
from streamtotal.inference.selection import cell_ids as check_cell_ids, feature_indices
from streamtotal.model.likelihoods import log_nb_mixture_from_log_means
from streamtotal.model.outputs import LossOutput
from streamtotal.model.rna_likelihood import nb_log_likelihood_from_logits
from streamtotal.model.totalvi import MAX_LOG_LIBRARY, TotalVAE

ELBO_TERMS = ("neg_elbo", "rna_nll", "protein_nll", "kl_z", "kl_background", "kl_library")
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def _normal_log_prob(x: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return -((x - mean) / scale).square() / 2.0 - scale.log() - _HALF_LOG_2PI


def _nb_sample(rng: np.random.Generator, mean: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """NB(mean, theta) draws as a gamma-Poisson mixture (float32 counts)."""
    theta = np.broadcast_to(theta, mean.shape)
    rate = rng.gamma(shape=theta, scale=mean / theta)
    return rng.poisson(rate).astype(np.float32)


# ---------------------------------------------------------------------------------------------- one batch


@torch.no_grad()
def sample_counts(
    model: TotalVAE, batch: CiteBatch, n_samples: int = 1, *, generator: torch.Generator | None = None,
    rng: np.random.Generator | None = None, genes: torch.Tensor | None = None,
    proteins: torch.Tensor | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Posterior predictive RNA and protein counts of one batch.

    Args:
        model: the model, in eval mode.
        batch: the minibatch (on the model's device).
        n_samples: draws per cell.
        generator: torch random source of the posterior draws (z, l, log beta).
        rng: numpy random source of the mixing and NB draws (default: a fresh unseeded one).
        genes: gene indexes to return (None = all).
        proteins: protein indexes to return (None = all).

    Returns:
        ``(rna [S, B, G'], protein [S, B, T'])`` float32 counts.

    Raises:
        ConfigError, ModelInputError: as ``draw_posterior``.
    """
    rng = rng if rng is not None else np.random.default_rng()
    draws = draw_posterior(model, batch, n_samples, sample=True, generator=generator)
    gen = decode(model, draws, batch.batch)
    s, b = draws.n_samples, len(batch)

    def pick(t: torch.Tensor, index: torch.Tensor | None) -> np.ndarray:
        t = t if index is None else t.index_select(-1, index)
        return t.double().cpu().numpy()

    rna_mean = pick(gen.rna_rate, genes)
    rna_theta = pick(gen.rna_log_theta.exp(), genes)
    pi = pick(torch.sigmoid(gen.mix_logits), proteins)
    back = pick(gen.protein_rate_back, proteins)
    fore = pick(gen.protein_rate_fore, proteins)
    protein_theta = pick(gen.protein_theta, proteins)
    background = rng.random(pi.shape) < pi
    rna = _nb_sample(rng, rna_mean, rna_theta)
    protein = _nb_sample(rng, np.where(background, back, fore), protein_theta)
    return rna.reshape(s, b, -1), protein.reshape(s, b, -1)


@torch.no_grad()
def elbo_terms(model: TotalVAE, batch: CiteBatch, *, generator: torch.Generator | None = None) -> LossOutput:
    """The model's loss terms (KL weight 1) at one posterior draw taken from ``generator``.

    The draw is ``draw_posterior(model, batch, 1, sample=True, generator=generator)`` decoded with the cells' own
    batches, so the result is reproducible; ``neg_elbo``, ``rna_nll``, ``protein_nll`` and the KL terms are per
    cell, as ``TotalVAE.loss`` returns them.

    Raises:
        ModelInputError: the model is in training mode or the batch does not fit it.
    """
    draws = draw_posterior(model, batch, 1, sample=True, generator=generator)
    inf = model.inference(batch.rna, batch.protein, batch.protein_mask, batch.batch, sample=False,
                          rna_mask=batch.rna_mask)
    inf = replace(inf, z=draws.z[0], log_library=draws.log_library[0])
    out = model.loss(batch, inf, decode(model, draws, batch.batch), kl_weight=1.0)
    # The z term of the model's own prior, as in training (the m2 label prior draws its z2 from ``generator`` last,
    # as training draws them after z, log l and log beta).
    return model.with_z_prior(out, batch.label, 1.0, generator=generator)


@torch.no_grad()
def log_importance_weights(
    model: TotalVAE, batch: CiteBatch, n_samples: int, *, generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``[n_samples, B]`` float32 log importance weights log p(x, y, z, beta (, l)) - log q(z, beta (, l) | x, y).

    log p(z) is the model's prior (``TotalVAE.log_prior_z``): N(0, I), or for an m2 label prior its estimate with
    one z2 per label drawn from ``generator`` right after z (the labels are summed over: the weights are those of
    the counts alone, whether or not a cell is labelled).

    Raises:
        ConfigError, ModelInputError: ``n_samples`` < 1, training mode, or a batch that does not fit.
    """
    _check(model, n_samples)
    model._check_shapes(batch.rna, batch.protein, batch.protein_mask, batch.batch)
    inf = model.inference(batch.rna, batch.protein, batch.protein_mask, batch.batch, sample=False,
                          rna_mask=batch.rna_mask)
    n, k = inf.qz_mean.shape
    qz_scale = inf.qz_var.sqrt()
    noise = torch.randn((n_samples, n, k), generator=generator, device=qz_scale.device, dtype=qz_scale.dtype)
    z = inf.qz_mean + qz_scale * noise
    log_prior_z = model.log_prior_z(z.reshape(n_samples * n, k), generator).view(n_samples, n)
    log_w = log_prior_z - _normal_log_prob(z, inf.qz_mean, qz_scale).sum(-1)
    if inf.ql_mean is None:
        log_library = inf.log_library.expand(n_samples, n)
    else:
        ql_scale = inf.ql_var.sqrt()
        lib_noise = torch.randn((n_samples, n), generator=generator, device=z.device, dtype=z.dtype)
        raw = inf.ql_mean + ql_scale * lib_noise
        prior_mean = model.library_log_mean.index_select(0, batch.batch)
        prior_scale = model.library_log_var.index_select(0, batch.batch).sqrt()
        log_w = log_w + _normal_log_prob(raw, prior_mean, prior_scale) - _normal_log_prob(raw, inf.ql_mean, ql_scale)
        log_library = raw.clamp(max=MAX_LOG_LIBRARY)  # as the model decodes it
    codes = batch.batch.repeat(n_samples)
    gen = model.generative(z.reshape(n_samples * n, k), log_library.reshape(-1), codes, sample_background=False)
    back_noise = torch.randn(gen.back_mean.shape, generator=generator, device=z.device, dtype=z.dtype)
    log_back = gen.back_mean + gen.back_scale * back_noise
    mask = batch.protein_mask.repeat(n_samples, 1)
    prior_mean = model.background_prior_mean.index_select(0, codes)
    prior_scale = model.background_prior_log_scale.index_select(0, codes).exp()
    back_terms = _normal_log_prob(log_back, prior_mean, prior_scale) - _normal_log_prob(log_back, gen.back_mean,
                                                                                      gen.back_scale)
    rna_ll = nb_log_likelihood_from_logits(batch.rna.repeat(n_samples, 1), gen.rna_logits, gen.log_library,
                                           gen.rna_log_theta,
                                           mask=None if batch.rna_mask is None else batch.rna_mask.repeat(n_samples, 1))
    protein = torch.where(batch.protein_mask, batch.protein, 0.0).repeat(n_samples, 1)
    protein_ll = log_nb_mixture_from_log_means(protein, log_back, log_back + gen.fore_scale.log(),
                                               gen.protein_theta.log(), gen.mix_logits)
    per_draw = rna_ll + torch.where(mask, protein_ll + back_terms, 0.0).sum(-1)
    return log_w + per_draw.reshape(n_samples, n)


@torch.no_grad()
def marginal_log_likelihood(
    model: TotalVAE, batch: CiteBatch, n_mc_samples: int = 100, *, chunk_size: int = 25,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``[B]`` float64 importance-sampling estimate of log p(x, y | s) with ``n_mc_samples`` draws.

    Raises:
        ConfigError: ``n_mc_samples`` or ``chunk_size`` < 1.
    """
    _positive("n_mc_samples", n_mc_samples)
    _positive("chunk_size", chunk_size)
    total = None
    for start in range(0, n_mc_samples, chunk_size):
        k = min(chunk_size, n_mc_samples - start)
        part = torch.logsumexp(log_importance_weights(model, batch, k, generator=generator).double(), dim=0)
        total = part if total is None else torch.logaddexp(total, part)
    return total - math.log(n_mc_samples)


def _positive(name: str, value) -> None:
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ConfigError(f"{name} must be an integer >= 1; got {value!r}")


# ---------------------------------------------------------------------------------------------- over a store


def _blocks(post, ids: np.ndarray, desc: str):
    """``(block, batch, rows)`` of ``ids``, one batch per block of ``post.batch_size`` store rows."""
    return stream_blocks(post.collection, ids, block_rows=post.batch_size, device=post.device, desc=desc,
                         progress=post.progress)


def predictive_block(post, block: int, batch: CiteBatch, n_samples: int, seed: int, genes: torch.Tensor | None,
                     proteins: torch.Tensor | None) -> tuple[np.ndarray, np.ndarray]:
    """Posterior predictive counts of one block's batch, with that block's random sources."""
    return sample_counts(post.model, batch, n_samples, generator=block_generator(seed, block, post.device),
                         rng=block_rng(seed, block), genes=genes, proteins=proteins)


def elbo_block(post, block: int, batch: CiteBatch, seed: int) -> dict[str, np.ndarray]:
    """Per-cell ``{"elbo", "reconstruction", *ELBO_TERMS}`` (float64) of one block's batch."""
    loss = elbo_terms(post.model, batch, generator=block_generator(seed, block, post.device))
    out = {term: getattr(loss, term).double().cpu().numpy() for term in ELBO_TERMS}
    out["elbo"] = -out["neg_elbo"]
    out["reconstruction"] = out["rna_nll"] + out["protein_nll"]
    return out


def marginal_ll_block(post, block: int, batch: CiteBatch, n_mc_samples: int, chunk_size: int,
                      seed: int) -> np.ndarray:
    """Per-cell importance-sampled log p(x, y | s) (float64) of one block's batch."""
    return marginal_log_likelihood(post.model, batch, n_mc_samples, chunk_size=chunk_size,
                                   generator=block_generator(seed, block, post.device)).cpu().numpy()


def posterior_predictive_sample(
    post, cell_ids: Sequence[int] | np.ndarray | None = None, n_samples: int = 1, *,
    genes: Sequence[str] | None = None, proteins: Sequence[str] | None = None, seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Posterior predictive counts of the given cells (dense, in memory: size it).

    Args:
        post: a ``StorePosterior`` (model, store, batch size, device).
        cell_ids: global cell ids (results follow this order); None = every cell.
        n_samples: draws per cell.
        genes: gene names to return (None = all).
        proteins: protein names to return (None = all).
        seed: seed of every draw.

    Returns:
        ``(rna, protein)`` float32: ``[cells, F]`` for ``n_samples=1``, else ``[n_samples, cells, F]``.

    Raises:
        ConfigError: ``n_samples`` < 1.
        SelectionError: unknown cells, genes or proteins.
    """
    _positive("n_samples", n_samples)
    ids = check_cell_ids(cell_ids, post.n_obs)
    gidx = feature_indices(genes, post.registry.gene_names, "gene")
    pidx = feature_indices(proteins, post.registry.protein_names, "protein")
    n_g = post.registry.n_genes if gidx is None else gidx.size
    n_p = post.registry.n_proteins if pidx is None else pidx.size
    rna = np.zeros((n_samples, ids.size, n_g), dtype=np.float32)
    protein = np.zeros((n_samples, ids.size, n_p), dtype=np.float32)
    gt = None if gidx is None else torch.as_tensor(gidx, device=post.device)
    pt = None if pidx is None else torch.as_tensor(pidx, device=post.device)
    for block, batch, rows in _blocks(post, ids, "predictive"):
        r, p = predictive_block(post, block, batch, n_samples, seed, gt, pt)
        rna[:, rows], protein[:, rows] = r, p
    return (rna[0], protein[0]) if n_samples == 1 else (rna, protein)


def elbo(
    post, cell_ids: Sequence[int] | np.ndarray | None = None, *, per_cell: bool = False, seed: int = 0,
) -> dict[str, float | np.ndarray]:
    """The ELBO terms of the given cells at one posterior draw per cell (KL weight 1).

    Returns:
        ``{"elbo", "reconstruction", *ELBO_TERMS}``: means over cells, or ``[cells]`` float64 arrays with
        ``per_cell``. ``elbo = -neg_elbo``; ``reconstruction = rna_nll + protein_nll``.

    Raises:
        SelectionError: unknown cells.
    """
    ids = check_cell_ids(cell_ids, post.n_obs)
    out = {term: np.zeros(ids.size, dtype=np.float64) for term in (*ELBO_TERMS, "elbo", "reconstruction")}
    for block, batch, rows in _blocks(post, ids, "elbo"):
        for term, values in elbo_block(post, block, batch, seed).items():
            out[term][rows] = values
    return out if per_cell else {k: float(v.mean()) for k, v in out.items()}


def reconstruction_error(
    post, cell_ids: Sequence[int] | np.ndarray | None = None, *, per_cell: bool = False, seed: int = 0,
) -> float | np.ndarray:
    """``rna_nll + protein_nll`` at one posterior draw per cell: the mean, or ``[cells]`` with ``per_cell``."""
    return elbo(post, cell_ids, per_cell=per_cell, seed=seed)["reconstruction"]


def marginal_ll(
    post, cell_ids: Sequence[int] | np.ndarray | None = None, *, n_mc_samples: int = 100, chunk_size: int = 25,
    per_cell: bool = False, seed: int = 0,
) -> float | np.ndarray:
    """Importance-sampled log p(x, y | s) of the given cells.

    Args:
        post: a ``StorePosterior``.
        cell_ids: global cell ids; None = every cell.
        n_mc_samples: importance samples per cell (more: tighter, approaching log p from below on average).
        chunk_size: samples evaluated at once (memory bound).
        per_cell: return ``[cells]`` float64 values instead of their mean.
        seed: seed of the draws.

    Returns:
        The mean log-likelihood per cell (higher is better), or one value per cell.

    Raises:
        ConfigError: ``n_mc_samples`` or ``chunk_size`` < 1.
        SelectionError: unknown cells.
    """
    _positive("n_mc_samples", n_mc_samples)
    _positive("chunk_size", chunk_size)
    ids = check_cell_ids(cell_ids, post.n_obs)
    out = np.zeros(ids.size, dtype=np.float64)
    for block, batch, rows in _blocks(post, ids, "marginal ll"):
        out[rows] = marginal_ll_block(post, block, batch, n_mc_samples, chunk_size, seed)
    return out if per_cell else float(out.mean())
