"""Posterior quantities of one minibatch: latent, normalised RNA, denoised protein, foreground probability, imputation.

Pure tensor functions (no I/O): a model in eval mode, a ``CiteBatch``, options -> tensors. The streaming driver
(``expression.py``) calls them batch by batch. Semantics follow the totalVI user guide (scvi-tools'
``get_normalized_expression`` / ``get_protein_foreground_probability`` options), with these choices:

* ``n_samples=1`` is the plug-in estimate at the posterior means (z = E[z], log l = E[log l], log beta = E[log
  beta]), so it is deterministic; scvi-tools draws one random sample there. ``n_samples > 1`` draws z (and a
  latent library, and log beta) from the posterior and averages (``return_mean``) or stacks the estimates.
* ``transform_batch`` (a list of batch codes) decodes the same posterior draws once per batch, with the
  decoder's batch covariate replaced, and averages: a counterfactual with common random numbers, so the list
  result is exactly the mean of the single-batch results at the same seed.
* ``library_size`` multiplies the batch-averaged rho exactly once (scvi-tools multiplies inside its batch loop,
  so a list of k batches is scaled k times). Our model has no protein "efficiency" parameter (see totalvi.py),
  so protein rates are the decoder's beta and beta * alpha as the likelihood uses them.
* Random draws come from an explicit ``torch.Generator`` in a fixed order (z noise, latent-library noise,
  log-beta noise, then mixing uniforms), never from the global RNG.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch

from loaders.citebatch import CiteBatch
from streamtotal.errors import ConfigError, ModelInputError
from streamtotal.model.outputs import GenerativeOutputs
from streamtotal.model.totalvi import MAX_LOG_LIBRARY, TotalVAE


@dataclass
class PosteriorDraws:
    """Posterior draws of a minibatch (S = number of draws; S = 1 for the plug-in estimate at the means).

    Attributes:
        z: ``[S, B, n_latent]`` latents.
        log_library: ``[S, B]`` log library sizes (observed, or drawn from q(log l) when latent).
        back_noise: ``[S, B, T]`` standard normal noise of log beta (log beta = mean + scale * noise), or
            None to use the mean of q(log beta | z, s).
    """

    z: torch.Tensor
    log_library: torch.Tensor
    back_noise: torch.Tensor | None

    @property
    def n_samples(self) -> int:
        return int(self.z.shape[0])


def _randn(shape, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=like.device, dtype=like.dtype)


def _check(model: TotalVAE, n_samples: int) -> None:
    if model.training:
        raise ModelInputError("posterior quantities need the model in eval mode (dropout off): call model.eval()")
    if isinstance(n_samples, bool) or int(n_samples) != n_samples or n_samples < 1:
        raise ConfigError(f"n_samples must be an integer >= 1; got {n_samples!r}")


@torch.no_grad()
def draw_posterior(
    model: TotalVAE, batch: CiteBatch, n_samples: int = 1, *, sample: bool | None = None,
    generator: torch.Generator | None = None,
) -> PosteriorDraws:
    """Draws z, log l and log-beta noise from the posterior of ``batch``.

    Args:
        model: the model, in eval mode.
        batch: the minibatch (on the model's device).
        n_samples: number of draws.
        sample: draw at random; False = the posterior means (only with ``n_samples=1``). Default:
            ``n_samples > 1``.
        generator: the random source (on the batch's device).

    Returns:
        The draws.

    Raises:
        ConfigError: ``n_samples`` < 1, or means asked for with ``n_samples > 1``.
        ModelInputError: the model is in training mode or the batch does not fit it.
    """
    _check(model, n_samples)
    sample = n_samples > 1 if sample is None else bool(sample)
    if not sample and n_samples != 1:
        raise ConfigError(f"posterior means are one value per cell; n_samples={n_samples} needs sample=True")
    model._check_shapes(batch.rna, batch.protein, batch.protein_mask, batch.batch)
    inf = model.inference(batch.rna, batch.protein, batch.protein_mask, batch.batch, sample=False,
                          rna_mask=batch.rna_mask)
    if not sample:
        return PosteriorDraws(inf.qz_mean.unsqueeze(0), inf.log_library.unsqueeze(0), None)
    n_cells = inf.qz_mean.shape[0]
    z = inf.qz_mean + inf.qz_var.sqrt() * _randn((n_samples, *inf.qz_mean.shape), inf.qz_mean, generator)
    if inf.ql_mean is None:  # observed library: the same for every draw
        log_library = inf.log_library.expand(n_samples, n_cells)
    else:
        noise = _randn((n_samples, n_cells), inf.ql_mean, generator)
        log_library = (inf.ql_mean + inf.ql_var.sqrt() * noise).clamp(max=MAX_LOG_LIBRARY)
    back_noise = _randn((n_samples, n_cells, model.n_proteins), inf.qz_mean, generator)
    return PosteriorDraws(z, log_library, back_noise)


def decode(model: TotalVAE, draws: PosteriorDraws, batch_codes: torch.Tensor) -> GenerativeOutputs:
    """Decodes every draw with the given decoder batch codes; outputs are flattened to ``[S * B, ...]``.

    Args:
        model: the model, in eval mode.
        draws: from ``draw_posterior``.
        batch_codes: ``[B]`` batch codes for the decoder (the cells' own, or a counterfactual batch), the same
            for every draw; or ``[S, B]``, one per draw and cell (differential expression with batch correction
            spreads a group's draws over several counterfactual batches).

    Returns:
        Generative outputs whose ``log_back`` is the drawn (or mean) log beta.
    """
    s, b, k = draws.z.shape
    codes = batch_codes.reshape(s * b) if batch_codes.dim() == 2 else batch_codes.repeat(s)
    gen = model.generative(draws.z.reshape(s * b, k), draws.log_library.reshape(s * b), codes,
                           sample_background=False)
    if draws.back_noise is not None:
        gen = replace(gen, log_back=gen.back_mean + gen.back_scale * draws.back_noise.reshape(s * b, -1))
    return gen


def _decoder_batches(
    model: TotalVAE, batch: CiteBatch, transform_batch: Sequence[int] | int | None
) -> list[torch.Tensor]:
    if transform_batch is None:
        return [batch.batch]
    codes = [transform_batch] if isinstance(transform_batch, int) else list(transform_batch)
    if not codes:
        raise ConfigError("transform_batch is an empty list; pass None to decode with each cell's own batch")
    bad = [c for c in codes if not 0 <= int(c) < model.n_batch]
    if bad:
        raise ConfigError(f"transform_batch codes {bad} are outside the model's {model.n_batch} batches")
    return [torch.full_like(batch.batch, int(c)) for c in codes]


def _finish(values: torch.Tensor, n_samples: int, n_cells: int, return_mean: bool) -> torch.Tensor:
    """``[S * B, F]`` -> ``[B, F]`` (mean over draws, or the only draw) or ``[S, B, F]``."""
    values = values.reshape(n_samples, n_cells, -1)
    if n_samples == 1:
        return values[0]
    return values.mean(dim=0) if return_mean else values


def _select(values: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    return values if index is None else values.index_select(-1, index)


@torch.no_grad()
def latent(
    model: TotalVAE, batch: CiteBatch, *, give_mean: bool = True, n_samples: int = 1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The latent representation: posterior mean of z, or draws from q(z | x, y, s).

    Args:
        model: the model, in eval mode.
        batch: the minibatch.
        give_mean: the posterior mean (exact: q(z) is Normal); False = ``n_samples`` draws.
        n_samples: draws when ``give_mean`` is False.
        generator: random source of the draws.

    Returns:
        ``[B, n_latent]``; ``[n_samples, B, n_latent]`` when ``give_mean`` is False and ``n_samples > 1``.

    Raises:
        ConfigError, ModelInputError: as ``draw_posterior``.
    """
    if give_mean:
        return draw_posterior(model, batch, 1, sample=False).z[0]
    z = draw_posterior(model, batch, n_samples, sample=True, generator=generator).z
    return z[0] if n_samples == 1 else z


@torch.no_grad()
def normalized_rna(
    model: TotalVAE, batch: CiteBatch, *, library_size: float | str = 1.0,
    transform_batch: Sequence[int] | int | None = None, n_samples: int = 1, return_mean: bool = True,
    genes: torch.Tensor | None = None, generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Normalised (denoised) RNA expression: ``library_size * rho``, or ``l * rho`` with the cell's own library.

    Args:
        model: the model, in eval mode.
        batch: the minibatch.
        library_size: a number (rows of rho sum to 1, so rows sum to it; 1 = rho), or ``"latent"`` for the
            cell's own library l (observed total count, or its posterior when the library is latent).
        transform_batch: decoder batch code(s); a list is averaged; None = each cell's own batch.
        n_samples: 1 = plug-in at the posterior means; more = Monte Carlo draws.
        return_mean: average the draws; False keeps them on a leading axis.
        genes: column indexes to keep (registry order indexes), or None for all genes.
        generator: random source of the draws.

    Returns:
        ``[B, G']``, or ``[n_samples, B, G']`` when draws are kept.

    Raises:
        ConfigError: a bad ``library_size`` or ``n_samples``.
        ModelInputError: as ``draw_posterior``.
    """
    latent_library = library_size == "latent"
    if not latent_library and (isinstance(library_size, (str, bool)) or not float(library_size) > 0):
        raise ConfigError(f"library_size must be a positive number or 'latent'; got {library_size!r}")
    draws = draw_posterior(model, batch, n_samples, generator=generator)
    codes = _decoder_batches(model, batch, transform_batch)
    total = None
    for code in codes:
        gen = decode(model, draws, code)
        value = _select(gen.rna_rate if latent_library else gen.rna_scale, genes)
        total = value if total is None else total + value
    mean = total / len(codes)
    if not latent_library:
        mean = mean * float(library_size)  # once, after averaging over batches
    return _finish(mean, draws.n_samples, len(batch), return_mean)


def _protein_values(
    gen: GenerativeOutputs, uniforms: torch.Tensor | None, include_background: bool, scale: bool
) -> torch.Tensor:
    pi = torch.sigmoid(gen.mix_logits)
    if uniforms is not None:  # Bernoulli(pi) draws
        pi = (uniforms < pi).to(pi.dtype)
    back = gen.protein_rate_back
    value = (1.0 - pi) * back * gen.fore_scale
    if include_background:
        value = value + pi * back
    if scale:
        value = value / value.sum(dim=-1, keepdim=True)
    return value


@torch.no_grad()
def denoised_protein(
    model: TotalVAE, batch: CiteBatch, *, transform_batch: Sequence[int] | int | None = None, n_samples: int = 1,
    return_mean: bool = True, include_protein_background: bool = False, sample_protein_mixing: bool = False,
    scale_protein: bool = False, proteins: torch.Tensor | None = None, generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Denoised protein: expected foreground ``(1 - pi) * beta * alpha`` (plus ``pi * beta`` with background).

    Args:
        model: the model, in eval mode.
        batch: the minibatch.
        transform_batch: decoder batch code(s); a list is averaged; None = each cell's own batch.
        n_samples: 1 = plug-in at the posterior means; more = Monte Carlo draws (z and log beta).
        return_mean: average the draws; False keeps them on a leading axis.
        include_protein_background: add the background part ``pi * beta``.
        sample_protein_mixing: replace pi by a Bernoulli(pi) draw per entry.
        scale_protein: divide each cell's vector (over all proteins, before subsetting) by its sum.
        proteins: column indexes to keep, or None for all.
        generator: random source of the draws.

    Returns:
        ``[B, T']``, or ``[n_samples, B, T']`` when draws are kept.

    Raises:
        ConfigError, ModelInputError: as ``draw_posterior``.
    """
    draws = draw_posterior(model, batch, n_samples, generator=generator)
    uniforms = None
    if sample_protein_mixing:
        uniforms = torch.rand((draws.n_samples * len(batch), model.n_proteins), generator=generator,
                              device=draws.z.device, dtype=draws.z.dtype)
    codes = _decoder_batches(model, batch, transform_batch)
    total = None
    for code in codes:
        value = _protein_values(decode(model, draws, code), uniforms, include_protein_background, scale_protein)
        value = _select(value, proteins)
        total = value if total is None else total + value
    return _finish(total / len(codes), draws.n_samples, len(batch), return_mean)


@torch.no_grad()
def protein_foreground_probability(
    model: TotalVAE, batch: CiteBatch, *, transform_batch: Sequence[int] | int | None = None, n_samples: int = 1,
    return_mean: bool = True, proteins: torch.Tensor | None = None, generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Probability that a protein count is foreground, ``1 - pi`` (pi = sigmoid of the mixing logit).

    Args: as ``denoised_protein``.

    Returns:
        ``[B, T']``, or ``[n_samples, B, T']`` when draws are kept.
    """
    draws = draw_posterior(model, batch, n_samples, generator=generator)
    codes = _decoder_batches(model, batch, transform_batch)
    total = None
    for code in codes:
        value = _select(decode(model, draws, code).protein_foreground_prob, proteins)
        total = value if total is None else total + value
    return _finish(total / len(codes), draws.n_samples, len(batch), return_mean)


@torch.no_grad()
def impute_proteins(
    model: TotalVAE, batch: CiteBatch, *, proteins: torch.Tensor | None = None, **options,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Observed protein counts where measured, the model's denoised protein where not.

    Args:
        model: the model, in eval mode.
        batch: the minibatch.
        proteins: column indexes to keep, or None for all.
        **options: passed to ``denoised_protein`` (``transform_batch``, ``n_samples``, ``return_mean``,
            ``include_protein_background``, ``sample_protein_mixing``, ``scale_protein``, ``generator``).

    Returns:
        ``(values, measured)``: values ``[B, T']`` (or ``[n_samples, B, T']``), and the ``[B, T']`` bool mask,
        True where ``values`` are observed counts, False where they are the model's.

    Raises:
        ConfigError: ``scale_protein`` (proportions cannot stand in for counts), or as ``denoised_protein``.
    """
    if options.get("scale_protein"):
        raise ConfigError("impute_proteins fills counts; scale_protein would mix proportions with observed counts")
    model_values = denoised_protein(model, batch, proteins=proteins, **options)
    observed = _select(batch.protein, proteins)
    measured = _select(batch.protein_mask, proteins)
    return torch.where(measured, observed.to(model_values.dtype), model_values), measured
