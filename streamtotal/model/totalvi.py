"""totalVI: a joint VAE of RNA and protein counts (Gayoso, Steier et al. 2021), written for speed.

Generative model (DESIGN.md section 2): z ~ N(0, I); x_g ~ NB(l * rho_g(z, s), theta_g); log beta_t ~
N(c_st, d_st^2) with a learned per-batch prior; y_t ~ pi_t NB(beta_t, phi_t) + (1 - pi_t) NB(beta_t alpha_t,
phi_t) with alpha_t >= 1. Inference: q(z | x, y, s), q(log beta | z, s), and q(log l | x, y, s) when the
library is latent. Unmeasured proteins (``protein_mask`` False) enter neither the likelihood nor the
background KL, and are zeroed in the encoder input. Unmeasured genes (``rna_mask`` False: a study or query that
lacks reference genes) are left out of the RNA likelihood (softmax renormalised over the measured genes, whose
total is the library), and in the encoder input they are replaced by the model's own expected counts given the
measured genes (``_fill_absent_genes``), so the encoder never reads them as zeros and its output does not depend
on the values stored there.

Same architecture as scvi-tools' TOTALVAE (so results are comparable), with these differences:

* only what is used is computed: no zero-inflation head for an NB likelihood, no library encoder for an
  observed library (scvi-tools runs both on every step);
* the decoder's four hidden networks share one matmul (``FCStack(n_parallel=4)``) and covariates are added as
  gathered rows instead of concatenated one-hots (same functions, see layers.py);
* the RNA likelihood is fused (rna_likelihood.py);
* foreground multiplier alpha = 1 + softplus(.) instead of 1 + relu(.), so it never has a dead gradient
  (``foreground_activation = "relu"`` gives scvi-tools' function, for imported models);
* the encoder's protein input is divided by 1 + the mean over the cell's *measured* proteins, so a smaller panel
  does not look shallower (``protein_input_mean = "all"`` gives scvi-tools' mean over all proteins);
* no per-batch protein "efficiency" parameter and no 1e-3 background-preference penalty (scvi-tools 1.4
  additions outside the totalVI model), so ``neg_elbo`` is exactly the negative ELBO;
* the KL warm-up does not scale the protein likelihood (see ``loss``).

Safe under mixed-precision autocast: the heads' outputs are cast to float32 and every density is computed in
float32, so only the matmuls run in reduced precision.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from loaders.citebatch import CiteBatch
from streamtotal.errors import ConfigError, ModelInputError
from streamtotal.model import native
from streamtotal.model.adversarial import BatchClassifier
from streamtotal.model.config import ModelConfig
from streamtotal.model.label_classifier import LabelClassifier, add_classification_loss
from streamtotal.model.label_prior import LabelConditionalPrior
from streamtotal.model.layers import CovariateLinear, FCStack
from streamtotal.model.outputs import GenerativeOutputs, InferenceOutputs, LossOutput
from streamtotal.model.protein_prior import FIXED_BACKGROUND_MEAN, FIXED_BACKGROUND_SCALE
from streamtotal.model.protein_terms import protein_terms
from streamtotal.model.rna_likelihood import nb_log_likelihood_from_logits

VAR_EPS = 1e-4
"""Added to posterior variances of z and log l (as scvi-tools) so they never reach 0."""
LABEL_MODULES = ("label_classifier.", "label_prior.")
"""Name prefixes of totalANVI's label networks. They are not batch-specific (their covariate, if any, is the
label), so query surgery keeps them frozen, and a run started ``--from`` a totalVI run initialises them afresh."""
MAX_LOG_LIBRARY = 15.0
"""Sampled log library sizes are clamped here (as scvi-tools): exp(15) = 3.3M counts."""
ABSENT_GENE_PASSES = 2
"""Encode-decode passes that estimate absent genes' counts before the final encoding: the first encodes with
them at 0, each further one with the previous estimate (one pass already removes most of the zero-fill's
shift; the second corrects the first's z)."""


class TotalVAE(nn.Module):
    """The totalVI module: encoder, decoder, priors, loss.

    Args:
        config: the architecture.
        n_genes: G, genes in the registry.
        n_proteins: T, proteins in the registry's panel.
        n_batch: batch categories (>= 1).
        protein_prior: ``(c, d)`` each ``[T, n_batch]`` (or ``[T, 1]``, broadcast): initial mean and
            standard deviation of the log background prior, as ``ProteinBackgroundPrior.finalize()`` returns.
            Ignored when ``config.empirical_protein_background_prior`` is off. None (or off) = the fixed
            initial values (mean 3, scale 1, as scvi-tools), also the right thing when a state dict is loaded
            next.
        library_prior: ``(mean, var)`` each with ``n_batch`` elements: the per-batch prior of log library
            size, as ``LibraryPrior.finalize()`` returns. Only used when ``config.latent_library``; None =
            placeholder (0, 1) to be overwritten by a state dict.
        n_labels: label categories (``Registry.n_labels``); used only with ``config.label_classifier``
            (totalANVI, label_classifier.py), which needs >= 2.

    Raises:
        ConfigError: sizes < 1, an adversarial classifier with fewer than two batches, or a label classifier
            with fewer than two labels.
        ModelInputError: a prior of the wrong shape or with non-positive scales.
    """

    def __init__(
        self,
        config: ModelConfig,
        n_genes: int,
        n_proteins: int,
        n_batch: int,
        protein_prior: tuple[torch.Tensor, torch.Tensor] | None = None,
        library_prior: tuple[torch.Tensor, torch.Tensor] | None = None,
        n_labels: int = 0,
    ) -> None:
        super().__init__()
        if min(n_genes, n_proteins, n_batch) < 1:
            raise ConfigError(
                f"TotalVAE needs n_genes, n_proteins, n_batch >= 1; got {n_genes}, {n_proteins}, {n_batch}"
            )
        if config.adversarial_classifier and n_batch < 2:
            raise ConfigError("model.adversarial_classifier needs at least two batches; this data has one")
        self.config = config
        self.n_genes, self.n_proteins, self.n_batch = n_genes, n_proteins, n_batch
        c = config
        enc_bn, enc_ln = c.norms("encoder")
        dec_bn, dec_ln = c.norms("decoder")
        enc_cov = n_batch if c.encode_covariates else 0
        n_input = n_genes + n_proteins

        self.encoder = FCStack(n_input, c.n_hidden, c.n_layers_encoder, enc_cov, c.dropout_rate_encoder,
                               enc_bn, enc_ln, c.deeply_inject_covariates)
        self.z_head = nn.Linear(c.n_hidden, 2 * c.n_latent)  # mean, log variance
        if c.latent_library:
            self.library_encoder = FCStack(n_input, c.n_hidden, 1, enc_cov, c.dropout_rate_encoder, enc_bn, enc_ln)
            self.library_head = nn.Linear(c.n_hidden, 2)
            mean, var = self._library_prior(library_prior)
            self.register_buffer("library_log_mean", mean)
            self.register_buffer("library_log_var", var)

        # Four decoder networks side by side: RNA, protein background, protein foreground, mixing.
        self.decoder_hidden = FCStack(c.n_latent, c.n_hidden, c.n_layers_decoder, n_batch, c.dropout_rate_decoder,
                                      dec_bn, dec_ln, c.deeply_inject_covariates, n_parallel=4)
        head_in = c.n_hidden + c.n_latent  # every head also reads z, as in scvi-tools
        self.rna_head = CovariateLinear(head_in, n_genes, n_batch)
        self.background_head = CovariateLinear(head_in, 2 * n_proteins, n_batch)  # mean, pre-softplus scale
        self.foreground_head = CovariateLinear(head_in, n_proteins, n_batch)
        self.mixing_head = CovariateLinear(head_in, n_proteins, n_batch)

        gene_shape = (n_genes,) if c.gene_dispersion == "gene" else (n_batch, n_genes)
        protein_shape = (n_proteins,) if c.protein_dispersion == "protein" else (n_batch, n_proteins)
        self.rna_log_theta = nn.Parameter(torch.randn(gene_shape))  # scvi-tools' initialisation
        self.protein_log_theta = nn.Parameter(2.0 * torch.rand(protein_shape))
        prior_mean, prior_scale = self._protein_prior(protein_prior if c.empirical_protein_background_prior else None)
        self.background_prior_mean = nn.Parameter(prior_mean)
        self.background_prior_log_scale = nn.Parameter(prior_scale.log())

        self.batch_classifier = (
            BatchClassifier(c.n_latent, n_batch, c.adversarial_n_hidden, c.adversarial_n_layers)
            if c.adversarial_classifier else None
        )
        self.label_classifier = LabelClassifier(c, n_labels) if c.label_classifier else None
        self.label_prior = LabelConditionalPrior(c, n_labels) if c.label_prior == "m2" else None

    def _protein_prior(self, prior) -> tuple[torch.Tensor, torch.Tensor]:
        """``[n_batch, T]`` mean and scale from ``[T, n_batch]`` inputs (row gathers by batch are cheaper)."""
        shape = (self.n_batch, self.n_proteins)
        if prior is None:
            return torch.full(shape, FIXED_BACKGROUND_MEAN), torch.full(shape, FIXED_BACKGROUND_SCALE)
        out = []
        for name, value in zip(("mean", "scale"), prior):
            value = torch.as_tensor(value, dtype=torch.float32).detach().cpu()
            if value.dim() != 2 or value.shape[0] != self.n_proteins or value.shape[1] not in (1, self.n_batch):
                raise ModelInputError(
                    f"protein_prior {name} must be [n_proteins={self.n_proteins}, n_batch={self.n_batch}] "
                    f"(or [n_proteins, 1]); got {list(value.shape)}"
                )
            # contiguous: a transposed clone keeps column-major strides, which optimisers and DDP buckets mishandle
            out.append(value.t().expand(shape).contiguous())
        if not torch.isfinite(out[0]).all() or not (out[1] > 0).all():
            raise ModelInputError("protein_prior must have finite means and positive scales")
        return out[0], out[1]

    def _library_prior(self, prior) -> tuple[torch.Tensor, torch.Tensor]:
        if prior is None:
            return torch.zeros(self.n_batch), torch.ones(self.n_batch)
        mean, var = (torch.as_tensor(v, dtype=torch.float32).detach().cpu().reshape(-1) for v in prior)
        if mean.numel() != self.n_batch or var.numel() != self.n_batch:
            raise ModelInputError(
                f"library_prior must hold n_batch={self.n_batch} means and variances; "
                f"got {mean.numel()} and {var.numel()}"
            )
        if not torch.isfinite(mean).all() or not (var > 0).all():
            raise ModelInputError("library_prior must have finite means and positive variances")
        return mean.clone(), var.clone()

    # ------------------------------------------------------------------ inference

    def _fill_absent_genes(self, rna: torch.Tensor, protein: torch.Tensor, protein_mask: torch.Tensor,
                           batch: torch.Tensor, rna_mask: torch.Tensor) -> torch.Tensor:
        """``rna`` with every absent gene (``rna_mask`` False) replaced by its expected count given the measured
        genes: ``l_measured * rho_g / sum_{measured} rho`` with ``rho`` decoded at the posterior mean of z in the
        cell's own batch (``ABSENT_GENE_PASSES`` encode-decode rounds from 0). Measured values are kept as they
        are and absent values are never read, so the result, and the encoder's output on it, does not depend
        on what ``rna`` holds at absent genes. No gradient flows through the estimate (it stands in for data)."""
        cov = batch if self.config.encode_covariates else None
        measured_rna = torch.where(rna_mask, rna, 0.0)
        log_library = measured_rna.sum(dim=1, keepdim=True).clamp(min=1.0).log()
        filled = measured_rna
        with torch.no_grad():
            for _ in range(ABSENT_GENE_PASSES):
                qz_mean, _ = self._z_posterior(self._encoder_input(filled, protein, protein_mask), cov)
                hidden = self.decoder_hidden(qz_mean, batch).split(self.config.n_hidden, dim=1)
                logits = self.rna_head(torch.cat([hidden[0], qz_mean.to(hidden[0].dtype)], dim=1), batch).float()
                log_norm = torch.logsumexp(logits.masked_fill(~rna_mask, float("-inf")), dim=1, keepdim=True)
                expected = (logits - log_norm + log_library).exp().to(rna.dtype)
                filled = torch.where(rna_mask, measured_rna, expected)
        return filled

    def _encoder_input(self, rna: torch.Tensor, protein: torch.Tensor, protein_mask: torch.Tensor) -> torch.Tensor:
        c = self.config
        protein = torch.where(protein_mask, protein, 0.0)
        if c.protein_input_mean == "all":  # scvi-tools: unmeasured proteins count as zeros
            measured = torch.full((protein.shape[0], 1), float(protein.shape[1]), dtype=protein.dtype,
                                  device=protein.device)
        else:
            measured = protein_mask.sum(dim=1, keepdim=True).clamp(min=1).to(protein.dtype)
        if native.float32_cpu(rna, protein):  # one pass over the counts instead of five (native/layer_kernel.c)
            return native.encoder_input(rna, protein, measured.view(-1), c.scale_encoder_input, c.log_variational)
        if c.scale_encoder_input:
            rna = rna / (1.0 + rna.mean(dim=1, keepdim=True))
            protein = protein / (1.0 + protein.sum(dim=1, keepdim=True) / measured)
        x = torch.cat([rna, protein], dim=1)
        return x.log1p_() if c.log_variational else x

    def _z_posterior(self, x_in: torch.Tensor, cov: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        # .float(): under mixed-precision autocast the heads return bf16/fp16; every density is computed in
        # float32 (a no-op without autocast).
        mean, log_var = self.z_head(self.encoder(x_in, cov)).float().chunk(2, dim=-1)
        return mean, log_var.exp() + VAR_EPS

    def inference(
        self,
        rna: torch.Tensor,
        protein: torch.Tensor,
        protein_mask: torch.Tensor,
        batch: torch.Tensor,
        sample: bool = True,
        rna_mask: torch.Tensor | None = None,
    ) -> InferenceOutputs:
        """q(z | x, y, s) (and q(log l | x, y, s) when the library is latent).

        Args:
            rna: ``[B, G]`` raw counts.
            protein: ``[B, T]`` raw counts.
            protein_mask: ``[B, T]`` bool, True where measured.
            batch: ``[B]`` int64 batch codes.
            sample: draw z (and log l) by reparameterisation; False = use the posterior means.
            rna_mask: ``[B, G]`` bool, True where the gene was measured (``CiteBatch.rna_mask``); None = all.
                Absent genes are filled by ``_fill_absent_genes`` before encoding, and the observed library
                is the total of the measured genes.

        Returns:
            The inference outputs.
        """
        if rna_mask is not None:
            rna = self._fill_absent_genes(rna, protein, protein_mask, batch, rna_mask)
        x_in = self._encoder_input(rna, protein, protein_mask)
        cov = batch if self.config.encode_covariates else None
        qz_mean, qz_var = self._z_posterior(x_in, cov)
        z = qz_mean + qz_var.sqrt() * torch.randn_like(qz_mean) if sample else qz_mean
        if not self.config.latent_library:
            # A cell without RNA counts gets l = 1; its all-zero row then has likelihood ~1 whatever rho is.
            total = rna.sum(dim=1) if rna_mask is None else torch.where(rna_mask, rna, 0.0).sum(dim=1)
            log_library = total.clamp(min=1.0).log()
            return InferenceOutputs(qz_mean, qz_var, z, log_library)
        ql_mean, ql_log_var = self.library_head(self.library_encoder(x_in, cov)).float().unbind(dim=-1)
        ql_var = ql_log_var.exp() + VAR_EPS
        log_library = ql_mean + ql_var.sqrt() * torch.randn_like(ql_mean) if sample else ql_mean
        return InferenceOutputs(qz_mean, qz_var, z, log_library.clamp(max=MAX_LOG_LIBRARY), ql_mean, ql_var)

    def encode(
        self,
        rna: torch.Tensor,
        protein: torch.Tensor,
        protein_mask: torch.Tensor,
        batch: torch.Tensor,
        give_mean: bool = True,
        rna_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The latent representation of cells (for embedding). Call ``eval()`` first for deterministic output.

        Args:
            rna: ``[B, G]`` raw counts.
            protein: ``[B, T]`` raw counts.
            protein_mask: ``[B, T]`` bool, True where measured.
            batch: ``[B]`` int64 batch codes.
            give_mean: return the posterior mean (default); False = one sample.
            rna_mask: ``[B, G]`` bool, True where the gene was measured; None = all (see ``inference``).

        Returns:
            ``[B, n_latent]`` latents.
        """
        self._check_shapes(rna, protein, protein_mask, batch, rna_mask)
        if rna_mask is not None:
            rna = self._fill_absent_genes(rna, protein, protein_mask, batch, rna_mask)
        x_in = self._encoder_input(rna, protein, protein_mask)
        mean, var = self._z_posterior(x_in, batch if self.config.encode_covariates else None)
        return mean if give_mean else mean + var.sqrt() * torch.randn_like(mean)

    def predict_proba(
        self, rna: torch.Tensor, protein: torch.Tensor, protein_mask: torch.Tensor, batch: torch.Tensor,
        rna_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """totalANVI: ``[B, n_labels]`` label probabilities from the posterior mean of z (call ``eval()`` first).
        ``rna_mask``: as in ``encode``.

        Raises:
            ConfigError: the model has no label classifier.
        """
        if self.label_classifier is None:
            raise ConfigError("this model has no label classifier (model.label_classifier = false): train with "
                              "--totalanvi --labels-key KEY")
        return torch.softmax(self.label_classifier(self.encode(rna, protein, protein_mask, batch, rna_mask=rna_mask)),
                             dim=-1)

    # ------------------------------------------------------------------ generative

    def generative(
        self, z: torch.Tensor, log_library: torch.Tensor, batch: torch.Tensor, sample_background: bool = True
    ) -> GenerativeOutputs:
        """Decodes p(x, y | z, l, s) parameters and q(log beta | z, s).

        Args:
            z: ``[B, n_latent]`` latents.
            log_library: ``[B]`` log library sizes.
            batch: ``[B]`` int64 batch codes (pass another batch's codes to transform to that batch).
            sample_background: draw log beta from q(log beta | z, s) (training, ELBO); False = its mean.

        Returns:
            The generative outputs.
        """
        hidden = self.decoder_hidden(z, batch).split(self.config.n_hidden, dim=1)
        z_in = z.to(hidden[0].dtype)  # autocast: hidden layers may be bf16 while z is float32
        rna_logits = self.rna_head(torch.cat([hidden[0], z_in], dim=1), batch).float()
        back_mean, back_raw = self.background_head(torch.cat([hidden[1], z_in], dim=1), batch).float().chunk(2, dim=1)
        back_scale = F.softplus(back_raw) + 1e-8
        log_back = back_mean + back_scale * torch.randn_like(back_mean) if sample_background else back_mean
        fore_raw = self.foreground_head(torch.cat([hidden[2], z_in], dim=1), batch).float()
        # relu only for models imported from scvi-tools (config.foreground_activation), to keep their function.
        fore_scale = 1.0 + (F.relu(fore_raw) if self.config.foreground_activation == "relu" else F.softplus(fore_raw))
        mix_logits = self.mixing_head(torch.cat([hidden[3], z_in], dim=1), batch).float()
        rna_log_theta = self._per_cell(self.rna_log_theta, batch)
        protein_log_theta = self._per_cell(self.protein_log_theta, batch)
        return GenerativeOutputs(rna_logits, log_library, rna_log_theta, back_mean, back_scale, log_back,
                                 fore_scale, mix_logits, protein_log_theta.exp())

    @staticmethod
    def _per_cell(param: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        """A per-feature ``[F]`` parameter as is; a per-batch ``[n_batch, F]`` one gathered to ``[B, F]``."""
        return param if param.dim() == 1 else param.index_select(0, batch)

    # ------------------------------------------------------------------ loss

    def loss(self, batch: CiteBatch, inference: InferenceOutputs, generative: GenerativeOutputs,
             kl_weight: float = 1.0) -> LossOutput:
        """The per-cell ELBO terms and the training loss.

        ``loss = mean(rna_nll + w_p * protein_nll + kl_weight * (kl_z + kl_background) + kl_library)``.
        The warm-up scales the KL terms of the two latents that can collapse onto the prior early in
        training (z, and the background log beta that is decoded from z); it does not scale the
        likelihoods, so unlike scvi-tools the protein data counts fully from step 0 (DESIGN.md section 3),
        and it does not scale the library KL, whose posterior is pinned by the observed total count (as
        scvi-tools). At ``kl_weight = 1`` and ``w_p = 1`` the loss is the mean negative ELBO.

        Args:
            batch: the minibatch the outputs were computed from.
            inference: ``inference(...)`` of the batch.
            generative: ``generative(...)`` of the batch.
            kl_weight: KL warm-up weight (``kl_schedule.kl_weight``).

        Returns:
            The loss output.
        """
        # Genes the cell's study did not measure (rna_mask False) are not in the RNA likelihood.
        rna_nll = -nb_log_likelihood_from_logits(batch.rna, generative.rna_logits, generative.log_library,
                                                 generative.rna_log_theta, mask=batch.rna_mask)
        inf = inference
        kl_z = 0.5 * (inf.qz_var + inf.qz_mean.square() - 1.0 - inf.qz_var.log()).sum(dim=1)
        # Unmeasured proteins (protein_mask False) enter neither the likelihood nor the background KL.
        protein_nll, kl_background = protein_terms(
            batch.protein, batch.protein_mask, generative.log_back, generative.back_scale, generative.back_mean,
            generative.fore_scale, generative.mix_logits, generative.protein_theta,
            self.background_prior_mean.index_select(0, batch.batch),
            self.background_prior_log_scale.index_select(0, batch.batch),
        )

        if self.config.latent_library:
            lib_mean = self.library_log_mean.index_select(0, batch.batch)
            lib_var = self.library_log_var.index_select(0, batch.batch)
            kl_library = 0.5 * (
                (lib_var / inf.ql_var).log() + (inf.ql_var + (inf.ql_mean - lib_mean).square()) / lib_var - 1.0
            )
        else:
            kl_library = torch.zeros_like(kl_z)

        neg_elbo = rna_nll + protein_nll + kl_z + kl_background + kl_library
        w_p = self.config.protein_reconstruction_weight
        loss = (rna_nll + w_p * protein_nll + kl_weight * (kl_z + kl_background) + kl_library).mean()
        return LossOutput(loss, neg_elbo, rna_nll, protein_nll, kl_z, kl_background, kl_library, float(kl_weight),
                          inference.z, inference, generative)

    def forward(self, batch: CiteBatch, kl_weight: float = 1.0) -> LossOutput:
        """Inference, generative step and loss of one minibatch.

        Args:
            batch: the minibatch (on the module's device).
            kl_weight: KL warm-up weight.

        Returns:
            The loss output.

        Raises:
            ModelInputError: the batch's shapes do not fit the model.
        """
        self._check_shapes(batch.rna, batch.protein, batch.protein_mask, batch.batch, batch.rna_mask)
        inference = self.inference(batch.rna, batch.protein, batch.protein_mask, batch.batch,
                                   rna_mask=batch.rna_mask)
        generative = self.generative(inference.z, inference.log_library, batch.batch)
        out = self.loss(batch, inference, generative, kl_weight)
        if self.label_classifier is not None:  # totalANVI
            out = add_classification_loss(out, self.label_classifier, batch.label, self.config.classification_ratio)
            out = self.with_z_prior(out, batch.label, kl_weight)
        return out

    def with_z_prior(self, out: LossOutput, labels: torch.Tensor, kl_weight: float,
                     generator: torch.Generator | None = None) -> LossOutput:
        """``out`` (from ``loss``, in place) with the z term of the model's own prior of z.

        ``loss`` takes KL(q(z) || N(0, I)); with ``config.label_prior = "m2"`` this replaces it, in the ELBO and the
        loss, by the label-conditional prior's z term (label_prior.py), unlabelled cells weighted by the
        classifier's p(y | z) on the sampled z (as scvi-tools). Training (``forward``) and the ELBO of
        inference/predictive.py both go through here, so they are the same function. Without a label prior ``out``
        is returned unchanged.

        Args:
            out: ``loss(...)``'s output; its ``inference.z`` is the z sample the term is taken at.
            labels: ``[B]`` int64 label codes; < 0 = unlabelled.
            kl_weight: the KL warm-up weight the loss was computed with.
            generator: random source of the prior's z2 draws (None: torch's global one).

        Returns:
            ``out``.
        """
        if self.label_prior is None:
            return out
        inf = out.inference
        probs = torch.softmax(self.label_classifier(inf.z), dim=-1)
        kl_z = self.label_prior.kl_z(inf.z, inf.qz_mean, inf.qz_var, probs, labels, generator=generator)
        change = kl_z - out.kl_z
        out.loss = out.loss + kl_weight * change.mean()
        out.neg_elbo = out.neg_elbo + change
        out.kl_z = kl_z
        return out

    def log_prior_z(self, z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """log p(z) under the model's prior: N(0, I), or with ``config.label_prior = "m2"`` the log of an unbiased
        importance-sampled estimate of the label-conditional prior's density (``LabelConditionalPrior.log_prior``).
        The marginal likelihood (inference/predictive.py) takes it.

        Args:
            z: ``[N, n_latent]`` latents.
            generator: random source of the m2 prior's z2 draws (None: torch's global one).

        Returns:
            ``[N]`` float32.
        """
        if self.label_prior is not None:
            return self.label_prior.log_prior(z, generator)
        return -0.5 * (z.float().square() + math.log(2.0 * math.pi)).sum(-1)

    def _check_shapes(self, rna, protein, protein_mask, batch, rna_mask=None) -> None:
        n = rna.shape[0]
        if (rna.dim() != 2 or rna.shape[1] != self.n_genes or tuple(protein.shape) != (n, self.n_proteins)
                or tuple(protein_mask.shape) != (n, self.n_proteins) or tuple(batch.shape) != (n,)):
            raise ModelInputError(
                f"batch does not fit the model (G={self.n_genes}, T={self.n_proteins}): rna {list(rna.shape)}, "
                f"protein {list(protein.shape)}, protein_mask {list(protein_mask.shape)}, batch {list(batch.shape)}"
            )
        if protein_mask.dtype != torch.bool:
            raise ModelInputError(f"protein_mask must be bool, got {protein_mask.dtype}")
        if rna_mask is not None and (tuple(rna_mask.shape) != tuple(rna.shape) or rna_mask.dtype != torch.bool):
            raise ModelInputError(f"rna_mask must be bool {list(rna.shape)} like rna; got {rna_mask.dtype} "
                                  f"{list(rna_mask.shape)}")

    # ------------------------------------------------------------------ adversarial classifier

    def vae_parameters(self) -> list[nn.Parameter]:
        """Every parameter except the adversarial classifier's (the main optimiser's parameters)."""
        return [p for name, p in self.named_parameters() if not name.startswith("batch_classifier.")]

    def classifier_parameters(self) -> list[nn.Parameter]:
        """The adversarial classifier's parameters (empty without one)."""
        return [] if self.batch_classifier is None else list(self.batch_classifier.parameters())

    def adversarial_fool_loss(self, z: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        """Loss the encoder minimises to make z uninformative of the batch (add it to the VAE loss).

        Raises:
            ConfigError: the model has no adversarial classifier.
        """
        return self._classifier().fool_loss(z, batch)

    def adversarial_classifier_loss(self, z: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        """Loss the classifier minimises (pass a detached z).

        Raises:
            ConfigError: the model has no adversarial classifier.
        """
        return self._classifier().classifier_loss(z, batch)

    def _classifier(self) -> BatchClassifier:
        if self.batch_classifier is None:
            raise ConfigError("this model has no adversarial classifier (model.adversarial_classifier = false)")
        return self.batch_classifier
