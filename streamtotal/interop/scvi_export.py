"""``streamtotal export-scvi``: a trained streamtotal totalVI model as a model directory scvi-tools opens.

    RUN_DIR (config + registry + TotalVAE weights)
        ──► refuse what scvi-tools' TOTALVI cannot compute (option and value named)
        ──► converted weights (scvi_export_weights.py) + the ``attr_dict`` scvi-tools' ``save`` writes:
            ``init_params_`` (constructor arguments) and ``registry_`` (the ``setup_anndata`` fields: genes,
            proteins, batch categories)
        ──► OUT_DIR/model.pt, written under a temporary name and renamed into place

``scvi.model.TOTALVI.load(OUT_DIR, adata=adata)`` then rebuilds the model on an AnnData holding the same genes
(``adata.var_names``), the proteins in ``adata.obsm[protein_key]`` and the batch in ``adata.obs[batch_key]``,
and gives streamtotal's latent means, RNA scales, protein background, foreground and mixing on the same cells.
This is the inverse of ``import_scvi_model``: importing the exported directory gives back the same function.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from loaders.alignment import PREFIX_SEP
from loaders.registry import Registry
from streamtotal.errors import InteropError
from streamtotal.interop.scvi_export_weights import export_state
from streamtotal.model.config import ModelConfig
from streamtotal.training.checkpoint import atomic_write_bytes
from streamtotal.training.run_dir import TrainedModel

logger = logging.getLogger(__name__)

SCVI_FORMAT_VERSION = "1.4.2"
"""The scvi-tools version whose ``model.save`` layout this writes (the version the tests load it with). It is
recorded as the registry's ``scvi_version``; scvi-tools >= 1.2 reads it as a model with a softplus background
scale, which is streamtotal's."""
SCVI_MODEL_FILE = "model.pt"
"""The file scvi-tools' ``save`` writes and ``load`` reads inside the model directory."""


@dataclass
class ScviExportResult:
    """What ``export_scvi_model`` wrote.

    Attributes:
        model_dir: the scvi-tools model directory.
        batch_key: the ``adata.obs`` column scvi-tools will read the batch from (None: one batch, no column).
        protein_key: the ``adata.obsm`` key scvi-tools will read the proteins from.
        not_exported: streamtotal options that only shape training and have no scvi-tools counterpart (they do
            not change the exported function), e.g. ``"adversarial_classifier"``.
    """

    model_dir: Path
    batch_key: str | None
    protein_key: str
    not_exported: list[str]


def export_scvi_model(trained: TrainedModel, out_dir: str | Path, *, overwrite: bool = False,
                      batch_key: str | None = None, approximate_foreground: bool = False) -> ScviExportResult:
    """Writes ``trained`` as a scvi-tools TOTALVI model directory (what ``TOTALVI.save(DIR)`` writes).

    Args:
        trained: the model (``load_trained(RUN_DIR)``).
        out_dir: the directory to write ``model.pt`` into. As scvi-tools' ``save``: created when absent; when it
            exists, refused unless ``overwrite``, then its ``model.pt`` is replaced and other files are kept.
        overwrite: replace ``out_dir/model.pt`` of an existing directory.
        batch_key: the ``adata.obs`` column that holds the batch for scvi-tools. Default: the run's
            ``data.batch_key``. Required for a run of several stores trained without a batch key (each store
            was its own batch): the column must then hold the store names (the registry's batch categories).
        approximate_foreground: export a model trained with ``foreground_activation = "softplus"`` (the
            default) anyway. scvi-tools computes the protein foreground multiplier as ``1 + relu(u)`` where
            streamtotal computed ``1 + softplus(u)``: the latent, RNA, protein background and mixing are
            unchanged, the foreground multiplier differs by at most log 2 (at ``u = 0``). Off: refused.

    Returns:
        What was written.

    Raises:
        InteropError: the model uses an option scvi-tools' TOTALVI cannot compute (option and value named),
            several batches have no obs column to come from, or ``out_dir`` exists and ``overwrite`` is off
            (or it is a file).
    """
    config, registry = trained.config, trained.registry
    not_exported = _check_exportable(config.model, registry, approximate_foreground)
    scvi_batch_key = _batch_key(registry, batch_key)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InteropError(f"{out} is a file; scvi-tools' model directory must be a directory")
    if out.exists() and not overwrite:
        raise InteropError(f"{out} already exists; pass overwrite=True (--overwrite) to replace its model.pt, "
                           "or choose another directory")
    saved = {
        "model_state_dict": export_state(trained.model),
        "var_names": np.asarray(registry.gene_names, dtype=object),
        "attr_dict": {
            "init_params_": _init_params(config.model),
            "registry_": _scvi_registry(registry, scvi_batch_key, config.data.protein_key),
            "is_trained_": True,
            "history_": None,
            "train_indices_": None,
            "validation_indices_": None,
            "test_indices_": None,
        },
    }
    _write(out, saved)
    if not_exported:
        logger.info("exported to scvi-tools without %s (training-only options with no scvi-tools counterpart; "
                    "the exported model computes the same function)", ", ".join(not_exported))
    return ScviExportResult(model_dir=out, batch_key=scvi_batch_key, protein_key=config.data.protein_key,
                            not_exported=not_exported)


def _refuse(what: str, value, why: str) -> InteropError:
    return InteropError(f"cannot export to scvi-tools: model.{what} = {value!r} ({why})")


def _check_exportable(c: ModelConfig, registry: Registry, approximate_foreground: bool) -> list[str]:
    """Refuses options scvi-tools' TOTALVI cannot compute; returns the training-only ones left behind."""
    if c.label_classifier or c.label_prior != "none":
        raise _refuse("label_classifier", c.label_classifier,
                      "totalANVI export is not supported: scvi-tools' TOTALVI has no label classifier, and its "
                      "TOTALANVI has another latent structure; train a totalVI model to export it")
    if c.foreground_activation != "relu":
        if not approximate_foreground:
            raise _refuse("foreground_activation", c.foreground_activation,
                          "scvi-tools' protein foreground multiplier is 1 + relu(.); train with "
                          "foreground_activation = \"relu\" to export exactly, or pass approximate_foreground=True "
                          "(--approximate-foreground) to accept relu in place of softplus")
        logger.warning("exporting a model trained with foreground_activation = %r: scvi-tools computes the protein "
                       "foreground multiplier as 1 + relu(.), so its foreground (and denoised protein) differs by up "
                       "to log 2 from streamtotal's; the latent, RNA, background and mixing are exact",
                       c.foreground_activation)
    if not c.scale_encoder_input:
        raise _refuse("scale_encoder_input", c.scale_encoder_input,
                      "scvi-tools always divides each cell's counts by 1 + their mean before the log")
    missing = [name for name, row in zip(registry.study_names, registry.study_protein_masks) if not row.all()]
    if c.protein_input_mean == "measured" and missing:
        raise _refuse("protein_input_mean", c.protein_input_mean,
                      f"studies {missing[:5]} lack some proteins, and scvi-tools' encoder divides by the mean over "
                      "every protein, unmeasured ones counted as 0 (protein_input_mean = \"all\")")
    left = []
    if c.adversarial_classifier:
        left.append("adversarial_classifier")  # scvi-tools keeps its own in the training plan, not the module
    if c.protein_reconstruction_weight != 1.0:
        left.append("protein_reconstruction_weight")
    return left


def _batch_key(registry: Registry, batch_key: str | None) -> str | None:
    key = batch_key if batch_key is not None else registry.batch_key
    if key is None and registry.n_batch > 1:
        raise InteropError(
            f"cannot export to scvi-tools: the run has {registry.n_batch} batches (one per store: "
            f"{list(registry.batch_categories)[:5]}) but no batch_key; scvi-tools reads the batch from an obs column: "
            "pass batch_key (--batch-key) = the adata.obs column that will hold those names"
        )
    if key is not None and registry.batch_prefixed:
        logger.info("batch categories are prefixed with their store (%r ...): adata.obs[%r] must hold them so",
                    registry.batch_categories[0], key)
    return key


def _init_params(c: ModelConfig) -> dict:
    """TOTALVI's constructor arguments as ``save`` records them (explicit ones, then ``model_kwargs``)."""
    return {
        "non_kwargs": {
            "n_latent": c.n_latent,
            "gene_dispersion": c.gene_dispersion,
            "protein_dispersion": c.protein_dispersion,
            "gene_likelihood": "nb",
            "latent_distribution": "normal",
            "empirical_protein_background_prior": bool(c.empirical_protein_background_prior),
            "override_missing_proteins": False,
        },
        "kwargs": {"model_kwargs": {
            "n_hidden": c.n_hidden,
            "n_layers_encoder": c.n_layers_encoder,
            "n_layers_decoder": c.n_layers_decoder,
            "dropout_rate_encoder": c.dropout_rate_encoder,
            "dropout_rate_decoder": c.dropout_rate_decoder,
            "use_batch_norm": c.use_batch_norm,
            "use_layer_norm": c.use_layer_norm,
            "log_variational": c.log_variational,
            "encode_covariates": c.encode_covariates,
            "use_observed_lib_size": not c.latent_library,
            # explicit, so that no version check of scvi-tools' on_load swaps in the pre-1.2 exp activation
            "extra_decoder_kwargs": {"activation_function_bg": "softplus"},
        }},
    }


def batch_protein_masks(registry: Registry) -> np.ndarray:
    """``[n_batch, T]`` bool: which proteins each batch measured (the registry keeps them per study).

    A batch's study is the batch itself (no batch key), its prefix (``"study/value"``) or the only study; a
    batch of a model imported from scvi-tools keeps the mask scvi-tools recorded. A batch whose study cannot be
    told gets the proteins every study measured.
    """
    imported = (registry.extra.get("scvi_import") or {}).get("batch_protein_masks") or {}
    studies = dict(zip(registry.study_names, registry.study_protein_masks))
    everywhere = registry.study_protein_masks.all(axis=0)
    rows = []
    for b in registry.batch_categories:
        if b in imported:
            rows.append(np.asarray(imported[b], dtype=bool))
        elif registry.batch_key is None and b in studies:
            rows.append(studies[b])
        elif registry.batch_prefixed and b.split(PREFIX_SEP, 1)[0] in studies:
            owners = [s for s in studies if b.startswith(f"{s}{PREFIX_SEP}")]
            rows.append(studies[max(owners, key=len)])
        elif len(studies) == 1:
            rows.append(registry.study_protein_masks[0])
        else:
            rows.append(everywhere)
    return np.stack(rows) if rows else np.zeros((0, registry.n_proteins), dtype=bool)


def _scvi_registry(registry: Registry, batch_key: str | None, protein_key: str) -> dict:
    """The ``registry_`` that scvi-tools' ``TOTALVI.setup_anndata`` records (scvi-tools 1.x layout)."""
    genes = np.asarray(registry.gene_names, dtype=object)
    if batch_key is None:  # scvi-tools' placeholder batch: one category, code 0
        batch_mapping, original_batch_key = np.asarray([0]), "_scvi_batch"
    else:
        batch_mapping, original_batch_key = np.asarray(registry.batch_categories, dtype=object), batch_key
    proteins_state: dict = {"column_names": list(registry.protein_names)}
    masks = batch_protein_masks(registry)
    if not masks.all():  # scvi-tools records a mask only when some batch lacks a protein
        proteins_state["protein_batch_mask"] = {str(code): row.copy() for code, row in enumerate(masks)}
    return {
        "scvi_version": SCVI_FORMAT_VERSION,
        "model_name": "TOTALVI",
        "setup_args": {
            "protein_expression_obsm_key": protein_key, "protein_names_uns_key": None, "batch_key": batch_key,
            "panel_key": None, "layer": None, "size_factor_key": None, "categorical_covariate_keys": None,
            "continuous_covariate_keys": None,
        },
        "field_registries": {
            "X": {"data_registry": {"attr_name": "X", "attr_key": None},
                  # n_obs: the cells of the AnnData it was set up with; a streamed run has none of its own
                  "state_registry": {"n_obs": 0, "n_vars": len(genes), "column_names": genes},
                  "summary_stats": {"n_vars": len(genes), "n_cells": 0}},
            "labels": {"data_registry": {"attr_name": "obs", "attr_key": "_scvi_labels"},
                       "state_registry": {"categorical_mapping": np.asarray([0]), "original_key": "_scvi_labels"},
                       "summary_stats": {"n_labels": 1}},
            "batch": {"data_registry": {"attr_name": "obs", "attr_key": "_scvi_batch"},
                      "state_registry": {"categorical_mapping": batch_mapping, "original_key": original_batch_key},
                      "summary_stats": {"n_batch": registry.n_batch}},
            "size_factor": _unused_field({}),
            "extra_categorical_covs": _unused_field({"n_extra_categorical_covs": 0}),
            "extra_continuous_covs": _unused_field({"n_extra_continuous_covs": 0}),
            "proteins": {"data_registry": {"attr_name": "obsm", "attr_key": protein_key},
                         "state_registry": proteins_state,
                         "summary_stats": {"n_proteins": registry.n_proteins}},
        },
        "setup_method_name": "setup_anndata",
        "_scvi_uuid": str(uuid.uuid4()),
    }


def _unused_field(summary_stats: dict) -> dict:
    """A field scvi-tools registers even when its key is not set (no size factor, no extra covariates)."""
    return {"data_registry": {}, "state_registry": {}, "summary_stats": summary_stats}


def _write(out: Path, saved: dict) -> None:
    """``out/model.pt``, complete or not at all: a new directory is built under a temporary name and renamed;
    in an existing one (``overwrite``) the file is replaced atomically and the other files are kept."""
    if out.is_dir():
        atomic_write_bytes(out / SCVI_MODEL_FILE, lambda f: torch.save(saved, f))
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        atomic_write_bytes(tmp / SCVI_MODEL_FILE, lambda f: torch.save(saved, f))  # fsynced before the rename
        try:
            os.rename(tmp, out)  # refuses a directory with files that appeared meanwhile (it never merges)
        except OSError as e:
            raise InteropError(f"{out} appeared while exporting; nothing was written into it ({e})") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
