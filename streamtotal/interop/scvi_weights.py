"""Converting a scvi-tools TOTALVAE / TOTALANVAE state dict into streamtotal's TotalVAE state dict.

The two networks compute the same functions with different layouts (layers.py):

* scvi-tools' ``FCLayers`` concatenates the one-hot batch to a layer's input, so its ``nn.Linear`` weight is
  ``[n_out, n_in + n_batch]``; our ``CovariateLinear`` keeps ``weight = W[:, :n_in]`` and adds the row
  ``cov_weight[s] = W[:, n_in + s]`` (a one-batch model has no covariate columns in either);
* the decoder's four hidden networks (``px_decoder``, ``py_back_decoder``, ``py_fore_decoder``,
  ``sigmoid_decoder``) are one ``FCStack(n_parallel=4)``: their first layers are stacked along the output, later
  layers as ``[4, n_in, n_out]`` blocks, their batch norms concatenated;
* mean and log-variance heads of the encoders are one ``Linear`` each (mean rows first), and the background
  head holds the log-mean rows then the pre-softplus scale rows;
* per-batch tensors (dispersions, background prior) are ``[n_batch, F]`` here, ``[F, n_batch]`` there.

scvi-tools >= 1.2 also multiplies both protein rates by a learned per-batch efficiency ``exp(e[t, s])``, which
streamtotal's model lacks. ``log(e * rate_back) = log rate_back + e`` is a per-batch shift of the background's
log mean, which is exactly what the background head's covariate row adds, so ``e`` is folded into it (into its
bias for a one-batch model). The background prior's mean is shifted by the same ``e``, which leaves the KL
divergence between posterior and prior of the background unchanged, so the likelihood and the KL terms of the
ELBO are scvi-tools' exactly; only scvi-tools' extra penalties (a LogNormal(0, 1) prior on the efficiency and a
1e-3 background preference) are not part of streamtotal's ELBO. The background beta then includes the
efficiency, so denoised protein is on the scale of the batch's measurements.
"""

from __future__ import annotations

import torch

from streamtotal.errors import InteropError
from streamtotal.interop.scvi_model_file import ScviModel

DECODER_NETS = ("px_decoder", "py_back_decoder", "py_fore_decoder", "sigmoid_decoder")
"""scvi-tools' decoder hidden networks, in the order of streamtotal's four parallel stacks (RNA, background,
foreground, mixing)."""


def count_layers(m: ScviModel, prefix: str) -> int:
    """Number of ``FCLayers`` layers under ``prefix`` (``prefix.fc_layers.Layer i``)."""
    n = 0
    while f"{prefix}.fc_layers.Layer {n}.0.weight" in m.state:
        n += 1
    return n


def has_batch_norm(m: ScviModel, prefix: str) -> bool:
    """Whether the first layer of the ``FCLayers`` under ``prefix`` has a batch norm."""
    return f"{prefix}.fc_layers.Layer 0.1.weight" in m.state


def _split(weight: torch.Tensor, n_in: int, n_cov: int, where: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``[n_out, n_in + n_cov]`` into ``(weight [n_out, n_in], cov_weight [n_cov, n_out] or None)``."""
    if weight.shape[1] != n_in + n_cov:
        raise InteropError(f"scvi-tools weight {where} has {weight.shape[1]} input columns; expected {n_in} features "
                           f"+ {n_cov} batch columns")
    return weight[:, :n_in], (weight[:, n_in:].t() if n_cov else None)


def _fc_layers(m: ScviModel, prefix: str, n_in: int, n_cov: int, n_hidden: int) -> list[dict[str, torch.Tensor]]:
    """Every layer of one ``FCLayers`` as ``{"weight", "bias", "cov_weight"?, "norm.*"?}``."""
    layers = []
    for i in range(count_layers(m, prefix)):
        name = f"{prefix}.fc_layers.Layer {i}"
        weight, cov = _split(m.tensor(f"{name}.0.weight"), n_in if i == 0 else n_hidden, n_cov, f"{name}.0.weight")
        layer = {"weight": weight, "bias": m.tensor(f"{name}.0.bias")}
        if cov is not None:
            layer["cov_weight"] = cov
        for key in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            if f"{name}.1.{key}" in m.state:
                layer[f"norm.{key}"] = m.tensor(f"{name}.1.{key}")
        layers.append(layer)
    return layers


def _put_stack(out: dict, target: str, layers: list[dict]) -> None:
    """One ``FCLayers`` into our ``FCStack`` named ``target``."""
    for i, layer in enumerate(layers):
        for key, value in layer.items():
            if key.startswith("norm."):
                out[f"{target}.norms.{i}.{key[5:]}"] = value
            else:
                out[f"{target}.linears.{i}.{key}"] = value


def _put_parallel_stack(out: dict, target: str, nets: list[list[dict]]) -> None:
    """Four ``FCLayers`` side by side into our ``FCStack(n_parallel=4)`` named ``target``."""
    for i in range(len(nets[0])):
        parts = [net[i] for net in nets]
        linear, norm = f"{target}.linears.{i}", f"{target}.norms.{i}"
        if i == 0:  # all four read the same z: one [4 * n_hidden, n_latent] map
            out[f"{linear}.weight"] = torch.cat([p["weight"] for p in parts], dim=0)
        else:  # block diagonal: block p maps its own hidden units, stored [n_in, n_out] for bmm
            out[f"{linear}.weight"] = torch.stack([p["weight"].t() for p in parts])
        out[f"{linear}.bias"] = torch.cat([p["bias"] for p in parts])
        if "cov_weight" in parts[0]:
            out[f"{linear}.cov_weight"] = torch.cat([p["cov_weight"] for p in parts], dim=1)
        for key in ("weight", "bias", "running_mean", "running_var"):
            if f"norm.{key}" in parts[0]:
                out[f"{norm}.{key}"] = torch.cat([p[f"norm.{key}"] for p in parts])
        if "norm.num_batches_tracked" in parts[0]:
            out[f"{norm}.num_batches_tracked"] = max(p["norm.num_batches_tracked"] for p in parts).clone()


def _head(m: ScviModel, prefix: str, n_in: int, n_cov: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A one-layer linear ``FCLayers`` head: ``(weight, bias, cov_weight or None)``."""
    name = f"{prefix}.fc_layers.Layer 0.0"
    weight, cov = _split(m.tensor(f"{name}.weight"), n_in, n_cov, f"{name}.weight")
    return weight, m.tensor(f"{name}.bias"), cov


def _put_head(out: dict, target: str, parts: list[tuple]) -> None:
    """One or more heads stacked along the output into our ``CovariateLinear`` named ``target``."""
    out[f"{target}.weight"] = torch.cat([p[0] for p in parts], dim=0)
    out[f"{target}.bias"] = torch.cat([p[1] for p in parts])
    if parts[0][2] is not None:
        out[f"{target}.cov_weight"] = torch.cat([p[2] for p in parts], dim=1)


def _per_batch(value: torch.Tensor, n_batch: int, n_features: int, where: str) -> torch.Tensor:
    """scvi-tools' ``[F, n_batch]`` (or ``[F]``, shared by every batch) as our ``[n_batch, F]``."""
    if value.dim() == 1 and value.shape[0] == n_features:
        return value.unsqueeze(0).expand(n_batch, n_features).clone()
    if value.dim() == 2 and value.shape == (n_features, n_batch):
        return value.t().contiguous()
    raise InteropError(f"scvi-tools {where} has shape {list(value.shape)}; expected [{n_features}, {n_batch}]")


def convert_state(m: ScviModel, *, latent_library: bool, encode_covariates: bool, n_hidden: int,
                  n_latent: int) -> dict[str, torch.Tensor]:
    """streamtotal's TotalVAE state dict for the scvi-tools model ``m`` (see the module docstring).

    Args:
        m: the read model.
        latent_library: whether the model has a library encoder (scvi-tools' ``use_observed_lib_size=False``).
        encode_covariates: whether the encoder reads the batch.
        n_hidden: hidden units.
        n_latent: latent dimensions.

    Returns:
        The state dict (load it with ``strict=True`` into ``TotalVAE(config, G, T, n_batch, n_labels=...)``).

    Raises:
        InteropError: a weight is missing or has a shape that does not fit.
    """
    G, T, n_batch = len(m.gene_names), len(m.protein_names), m.n_batch
    n_cov = n_batch if n_batch > 1 else 0  # scvi-tools and streamtotal both drop a one-category covariate
    enc_cov = n_cov if encode_covariates else 0
    out: dict[str, torch.Tensor] = {}

    _put_stack(out, "encoder", _fc_layers(m, "encoder.encoder", G + T, enc_cov, n_hidden))
    out["z_head.weight"] = torch.cat([m.tensor("encoder.z_mean_encoder.weight"),
                                      m.tensor("encoder.z_var_encoder.weight")])
    out["z_head.bias"] = torch.cat([m.tensor("encoder.z_mean_encoder.bias"), m.tensor("encoder.z_var_encoder.bias")])
    if latent_library:
        _put_stack(out, "library_encoder", _fc_layers(m, "encoder.l_gene_encoder", G + T, enc_cov, n_hidden))
        out["library_head.weight"] = torch.cat([m.tensor("encoder.l_gene_mean_encoder.weight"),
                                                m.tensor("encoder.l_gene_var_encoder.weight")])
        out["library_head.bias"] = torch.cat([m.tensor("encoder.l_gene_mean_encoder.bias"),
                                              m.tensor("encoder.l_gene_var_encoder.bias")])
        out["library_log_mean"] = m.tensor("library_log_means").reshape(-1).clone()
        out["library_log_var"] = m.tensor("library_log_vars").reshape(-1).clone()

    nets = [_fc_layers(m, f"decoder.{net}", n_latent, n_cov, n_hidden) for net in DECODER_NETS]
    if len({len(net) for net in nets}) != 1:
        raise InteropError(f"scvi-tools decoder networks have different depths {[len(n) for n in nets]}")
    _put_parallel_stack(out, "decoder_hidden", nets)
    head_in = n_hidden + n_latent
    _put_head(out, "rna_head", [_head(m, "decoder.px_scale_decoder", head_in, n_cov)])
    _put_head(out, "background_head", [_head(m, "decoder.py_back_mean_log_alpha", head_in, n_cov),
                                       _head(m, "decoder.py_back_mean_log_beta", head_in, n_cov)])
    _put_head(out, "foreground_head", [_head(m, "decoder.py_fore_scale_decoder", head_in, n_cov)])
    _put_head(out, "mixing_head", [_head(m, "decoder.py_background_decoder", head_in, n_cov)])

    px_r, py_r = m.tensor("px_r"), m.tensor("py_r")
    out["rna_log_theta"] = px_r.clone() if px_r.dim() == 1 else _per_batch(px_r, n_batch, G, "px_r")
    out["protein_log_theta"] = py_r.clone() if py_r.dim() == 1 else _per_batch(py_r, n_batch, T, "py_r")
    prior_mean = _per_batch(m.tensor("background_pro_alpha"), n_batch, T, "background_pro_alpha")
    out["background_prior_log_scale"] = _per_batch(m.tensor("background_pro_log_beta"), n_batch, T,
                                                   "background_pro_log_beta")

    efficiency = (_per_batch(m.tensor("log_per_batch_efficiency"), n_batch, T, "log_per_batch_efficiency")
                  if "log_per_batch_efficiency" in m.state else torch.zeros(n_batch, T))
    out["background_prior_mean"] = prior_mean + efficiency
    if n_cov:
        cov = out["background_head.cov_weight"].clone()
        cov[:, :T] += efficiency  # the log-mean rows come first
        out["background_head.cov_weight"] = cov
    else:
        bias = out["background_head.bias"].clone()
        bias[:T] += efficiency[0]
        out["background_head.bias"] = bias

    if m.model_name == "TOTALANVI":
        out.update(convert_classifier(m, n_hidden=classifier_shape(m)[0]))
    return out


def classifier_shape(m: ScviModel) -> tuple[int, int]:
    """``(n_hidden, n_layers)`` of TOTALANVI's label classifier (n_layers 0 = linear)."""
    n_layers = count_layers(m, "classifier.classifier.0")
    if n_layers == 0:
        return int(m.tensor("classifier.classifier.0.weight").shape[1]), 0
    return int(m.tensor("classifier.classifier.0.fc_layers.Layer 0.0.weight").shape[0]), n_layers


def convert_classifier(m: ScviModel, *, n_hidden: int) -> dict[str, torch.Tensor]:
    """TOTALANVI's ``classifier`` (FCLayers without covariates, then a Linear to logits) as our LabelClassifier."""
    out: dict[str, torch.Tensor] = {}
    n_layers = classifier_shape(m)[1]
    if n_layers == 0:
        out["label_classifier.head.weight"] = m.tensor("classifier.classifier.0.weight")
        out["label_classifier.head.bias"] = m.tensor("classifier.classifier.0.bias")
        return out
    n_latent = int(m.tensor("classifier.classifier.0.fc_layers.Layer 0.0.weight").shape[1])
    _put_stack(out, "label_classifier.hidden", _fc_layers(m, "classifier.classifier.0", n_latent, 0, n_hidden))
    out["label_classifier.head.weight"] = m.tensor("classifier.classifier.1.weight")
    out["label_classifier.head.bias"] = m.tensor("classifier.classifier.1.bias")
    return out
