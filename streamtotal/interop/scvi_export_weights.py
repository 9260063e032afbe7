"""Converting streamtotal's TotalVAE state dict into a scvi-tools TOTALVAE state dict (the inverse of
scvi_weights.py, whose module docstring describes the two layouts).

* our ``CovariateLinear`` (``weight [n_out, n_in]`` plus ``cov_weight [n_cov, n_out]``) becomes scvi-tools'
  ``nn.Linear`` on the concatenated one-hot: ``W = [weight, cov_weight.T]``; a layer of ours without a covariate
  inside a stack that has one (``deeply_inject_covariates = False``) gets zero batch columns, which is the same
  function;
* the decoder's ``FCStack(n_parallel=4)`` is split back into ``px_decoder``, ``py_back_decoder``,
  ``py_fore_decoder`` and ``sigmoid_decoder``;
* networks scvi-tools always builds but our model does not need are written so that they cannot change what
  scvi-tools computes: the zero-inflation head (unused by an NB likelihood) and, for an observed library, the
  library encoder (its output is replaced by the observed total count) are zeros with identity batch norms, and
  the per-batch protein efficiency is ``log 1 = 0``.
"""

from __future__ import annotations

import torch

from streamtotal.interop.scvi_weights import DECODER_NETS
from streamtotal.model.totalvi import TotalVAE


def _linear_weight(weight: torch.Tensor, cov: torch.Tensor | None, n_cov: int) -> torch.Tensor:
    """scvi-tools' ``[n_out, n_in + n_cov]`` weight from ours and our ``[n_cov, n_out]`` covariate rows."""
    if n_cov == 0:
        return weight.clone()
    if cov is None:  # a layer ours leaves without the covariate: zero columns add nothing
        cov = weight.new_zeros(n_cov, weight.shape[0])
    return torch.cat([weight, cov.t()], dim=1)


def _stack_layers(state: dict, prefix: str, n_layers: int, n_cov: int) -> list[dict[str, torch.Tensor]]:
    """Every layer of one of our ``FCStack`` (``n_parallel=1``) as scvi-tools ``FCLayers`` entries."""
    layers = []
    for i in range(n_layers):
        linear, norm = f"{prefix}.linears.{i}", f"{prefix}.norms.{i}"
        layer = {"0.weight": _linear_weight(state[f"{linear}.weight"], state.get(f"{linear}.cov_weight"), n_cov),
                 "0.bias": state[f"{linear}.bias"].clone()}
        for key in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            if f"{norm}.{key}" in state:
                layer[f"1.{key}"] = state[f"{norm}.{key}"].clone()
        layers.append(layer)
    return layers


def _parallel_layers(state: dict, prefix: str, n_layers: int, n_cov: int, n_hidden: int) -> list[list[dict]]:
    """Our decoder ``FCStack(n_parallel=4)`` as four scvi-tools ``FCLayers`` (in ``DECODER_NETS`` order)."""
    nets: list[list[dict]] = [[] for _ in DECODER_NETS]
    for i in range(n_layers):
        linear, norm = f"{prefix}.linears.{i}", f"{prefix}.norms.{i}"
        weight, bias, cov = state[f"{linear}.weight"], state[f"{linear}.bias"], state.get(f"{linear}.cov_weight")
        for p, net in enumerate(nets):
            block = slice(p * n_hidden, (p + 1) * n_hidden)
            # layer 0 stacks the four maps along the output; later layers hold [4, n_in, n_out] blocks for bmm
            w = weight[block] if i == 0 else weight[p].t()
            layer = {"0.weight": _linear_weight(w, None if cov is None else cov[:, block], n_cov),
                     "0.bias": bias[block].clone()}
            for key in ("weight", "bias", "running_mean", "running_var"):
                if f"{norm}.{key}" in state:
                    layer[f"1.{key}"] = state[f"{norm}.{key}"][block].clone()
            if f"{norm}.num_batches_tracked" in state:
                layer["1.num_batches_tracked"] = state[f"{norm}.num_batches_tracked"].clone()
            net.append(layer)
    return nets


def _put_layers(out: dict, prefix: str, layers: list[dict]) -> None:
    for i, layer in enumerate(layers):
        for key, value in layer.items():
            out[f"{prefix}.fc_layers.Layer {i}.{key}"] = value


def _head(state: dict, name: str, rows: slice, n_cov: int) -> dict[str, torch.Tensor]:
    """Rows ``rows`` of our ``CovariateLinear`` ``name`` as a one-layer linear ``FCLayers``."""
    cov = state.get(f"{name}.cov_weight")
    return {"0.weight": _linear_weight(state[f"{name}.weight"][rows], None if cov is None else cov[:, rows], n_cov),
            "0.bias": state[f"{name}.bias"][rows].clone()}


def _neutral_layer(n_out: int, n_in: int, batch_norm: bool) -> dict[str, torch.Tensor]:
    """A layer that outputs zeros; its batch norm (if any) is the identity."""
    layer = {"0.weight": torch.zeros(n_out, n_in), "0.bias": torch.zeros(n_out)}
    if batch_norm:
        layer.update({"1.weight": torch.ones(n_out), "1.bias": torch.zeros(n_out),
                      "1.running_mean": torch.zeros(n_out), "1.running_var": torch.ones(n_out),
                      "1.num_batches_tracked": torch.zeros((), dtype=torch.long)})
    return layer


def _per_batch(value: torch.Tensor) -> torch.Tensor:
    """Our ``[n_batch, F]`` as scvi-tools' ``[F, n_batch]``; a shared ``[F]`` stays as it is."""
    return value.clone() if value.dim() == 1 else value.t().contiguous()


def export_state(model: TotalVAE) -> dict[str, torch.Tensor]:
    """scvi-tools TOTALVAE's state dict for our ``model`` (see the module docstring).

    Args:
        model: a totalVI module (no label classifier: the caller refuses totalANVI).

    Returns:
        The state dict that ``scvi.module.TOTALVAE`` built with the matching arguments loads strictly.
    """
    c = model.config
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    G, T, n_batch, H, L = model.n_genes, model.n_proteins, model.n_batch, c.n_hidden, c.n_latent
    n_cov = n_batch if n_batch > 1 else 0  # both drop a one-category covariate
    enc_cov = n_cov if c.encode_covariates else 0
    enc_bn = c.norms("encoder")[0]
    out: dict[str, torch.Tensor] = {
        "background_pro_alpha": _per_batch(state["background_prior_mean"]),
        "background_pro_log_beta": _per_batch(state["background_prior_log_scale"]),
        "log_per_batch_efficiency": torch.zeros(T, n_batch),
        "px_r": _per_batch(state["rna_log_theta"]),
        "py_r": _per_batch(state["protein_log_theta"]),
    }

    _put_layers(out, "encoder.encoder", _stack_layers(state, "encoder", c.n_layers_encoder, enc_cov))
    z_w, z_b = state["z_head.weight"], state["z_head.bias"]
    out.update({"encoder.z_mean_encoder.weight": z_w[:L].clone(), "encoder.z_mean_encoder.bias": z_b[:L].clone(),
                "encoder.z_var_encoder.weight": z_w[L:].clone(), "encoder.z_var_encoder.bias": z_b[L:].clone()})
    if c.latent_library:
        _put_layers(out, "encoder.l_gene_encoder", _stack_layers(state, "library_encoder", 1, enc_cov))
        l_w, l_b = state["library_head.weight"], state["library_head.bias"]
        out.update({"encoder.l_gene_mean_encoder.weight": l_w[:1].clone(),
                    "encoder.l_gene_mean_encoder.bias": l_b[:1].clone(),
                    "encoder.l_gene_var_encoder.weight": l_w[1:].clone(),
                    "encoder.l_gene_var_encoder.bias": l_b[1:].clone(),
                    "library_log_means": state["library_log_mean"].reshape(1, -1).clone(),
                    "library_log_vars": state["library_log_var"].reshape(1, -1).clone()})
    else:  # scvi-tools builds the library encoder anyway and then uses the observed total count
        _put_layers(out, "encoder.l_gene_encoder", [_neutral_layer(H, G + T + enc_cov, enc_bn)])
        out.update({"encoder.l_gene_mean_encoder.weight": torch.zeros(1, H),
                    "encoder.l_gene_mean_encoder.bias": torch.zeros(1),
                    "encoder.l_gene_var_encoder.weight": torch.zeros(1, H),
                    "encoder.l_gene_var_encoder.bias": torch.zeros(1)})

    nets = _parallel_layers(state, "decoder_hidden", c.n_layers_decoder, n_cov, H)
    for name, layers in zip(DECODER_NETS, nets):
        _put_layers(out, f"decoder.{name}", layers)
    everything = slice(None)
    _put_layers(out, "decoder.px_scale_decoder", [_head(state, "rna_head", everything, n_cov)])
    _put_layers(out, "decoder.py_back_mean_log_alpha", [_head(state, "background_head", slice(0, T), n_cov)])
    _put_layers(out, "decoder.py_back_mean_log_beta", [_head(state, "background_head", slice(T, 2 * T), n_cov)])
    _put_layers(out, "decoder.py_fore_scale_decoder", [_head(state, "foreground_head", everything, n_cov)])
    _put_layers(out, "decoder.py_background_decoder", [_head(state, "mixing_head", everything, n_cov)])
    # the zero-inflation head: read only by a ZINB likelihood, which an exported model never has
    _put_layers(out, "decoder.px_dropout_decoder_gene", [_neutral_layer(G, H + L + n_cov, batch_norm=False)])
    return out
