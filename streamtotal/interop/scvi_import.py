"""``streamtotal import-scvi``: a saved scvi-tools TOTALVI / TOTALANVI model as a streamtotal run directory.

    scvi-tools DIR/model.pt ──► read + refuse what cannot be reproduced (scvi_model_file.py)
        ──► ModelConfig with scvi-tools' architecture and function (relu foreground, scvi-tools' encoder input)
        ──► converted weights (scvi_weights.py), loaded strictly into TotalVAE
        ──► RUN_DIR/config.toml, registry.json, model.pt, metrics.jsonl (empty), written into a temp directory
            renamed into place when complete

The run directory is what ``streamtotal train`` writes, so ``embed``, ``denoise``, ``predict``, ``de``,
``evaluate`` and ``map`` (a query mapped onto the imported reference) work on it. The registry records where
the model came from in ``extra["scvi_import"]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loaders.atomic_files import write_directory_atomically
from loaders.object_store import refuse_url
from loaders.registry import Registry
from streamtotal.config import DataConfig, RunConfig, TrainConfig
from streamtotal.errors import InteropError, RunDirError
from streamtotal.interop.scvi_model_file import ScviModel, read_scvi_model
from streamtotal.interop.scvi_weights import classifier_shape, convert_state, count_layers, has_batch_norm
from streamtotal.model.config import ModelConfig
from streamtotal.model.totalvi import TotalVAE
from streamtotal.training.run_dir import RunDir


@dataclass
class ScviImportResult:
    """What ``import_scvi_model`` wrote.

    Attributes:
        run_dir: the run directory.
        model_name: "TOTALVI" or "TOTALANVI".
        scvi_version: the scvi-tools version that saved the model.
        config: the run config written (its ``model`` reproduces scvi-tools' architecture and function).
        registry: the registry written.
    """

    run_dir: Path
    model_name: str
    scvi_version: str
    config: RunConfig
    registry: Registry


def import_scvi_model(model_dir: str | Path, out_run_dir: str | Path, *, overwrite: bool = False,
                      batch_name: str | None = None) -> ScviImportResult:
    """Imports a saved scvi-tools TOTALVI or TOTALANVI model as a streamtotal run directory.

    The imported model computes scvi-tools' function: on the same cells it gives the same latent means, RNA
    scales, protein mixing and foreground multipliers, ELBO likelihood and KL terms and (TOTALANVI) label
    probabilities. Differences that remain: scvi-tools' per-batch protein efficiency is folded into the
    background (so denoised protein includes it), and TOTALANVI's second latent (z2 | z1, y) is dropped — it
    is not used for the latent, nor for label prediction.

    Args:
        model_dir: the directory scvi-tools' ``model.save(DIR)`` wrote (holding ``model.pt``).
        out_run_dir: the run directory to create.
        overwrite: replace an existing ``out_run_dir`` (only once the new one is complete).
        batch_name: for a model set up without ``batch_key`` (one batch): the batch's name, i.e. the study name
            of the store it will read (the store's file name without ``.zarr``/``.h5ad``), since streamtotal
            makes each study one batch when there is no batch key. Required for such models, ignored otherwise.

    Returns:
        What was written.

    Raises:
        InteropError: the model cannot be imported faithfully (option and value named), or its file is not a
            scvi-tools model.
        RunDirError: ``out_run_dir`` exists and ``overwrite`` is off.
    """
    refuse_url(out_run_dir, "an imported run directory", "import into a local directory, then upload it")
    out = Path(out_run_dir)
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise RunDirError(f"{out} already exists; pass overwrite=True (--overwrite) to replace it, or choose another")
    m = read_scvi_model(model_dir)
    batches = _batch_categories(m, batch_name)
    config = RunConfig(data=_data_config(m), model=model_config(m), train=TrainConfig())
    registry = _registry(m, batches)
    model = TotalVAE(config.model, registry.n_genes, registry.n_proteins, registry.n_batch, n_labels=registry.n_labels)
    state = convert_state(m, latent_library=config.model.latent_library,
                          encode_covariates=config.model.encode_covariates, n_hidden=config.model.n_hidden,
                          n_latent=config.model.n_latent)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise InteropError(f"{m.path}: the converted weights do not fit the model built from its options ({e})") from e
    model.eval()
    _write_run_dir(out, model, config, registry, overwrite)
    return ScviImportResult(run_dir=out, model_name=m.model_name, scvi_version=m.scvi_version, config=config,
                            registry=registry)


def model_config(m: ScviModel) -> ModelConfig:
    """The ModelConfig whose TotalVAE computes the function of scvi-tools model ``m``.

    Sizes come from the weights (they are what was trained), norms and dropout from the constructor
    arguments (scvi-tools' defaults when absent).

    Raises:
        InteropError: the weights and the arguments disagree (a layout this importer does not know).
    """
    kw = m.kwargs
    n_hidden = int(m.tensor("encoder.encoder.fc_layers.Layer 0.0.weight").shape[0])
    n_latent = int(m.tensor("encoder.z_mean_encoder.weight").shape[0])
    enc_bn, dec_bn = has_batch_norm(m, "encoder.encoder"), has_batch_norm(m, "decoder.px_decoder")
    norm = {(True, True): "both", (True, False): "encoder", (False, True): "decoder", (False, False): "none"}
    if norm[(enc_bn, dec_bn)] != kw.get("use_batch_norm", "both"):
        raise InteropError(f"{m.path}: use_batch_norm = {kw.get('use_batch_norm', 'both')!r} but the weights have "
                           f"batch norm in encoder={enc_bn}, decoder={dec_bn}")
    n_in = len(m.gene_names) + len(m.protein_names)
    first = m.tensor("encoder.encoder.fc_layers.Layer 0.0.weight").shape[1]
    encode_covariates = bool(kw.get("encode_covariates", True))
    if encode_covariates and m.n_batch > 1 and first != n_in + m.n_batch:
        raise InteropError(f"{m.path}: encode_covariates is on but the encoder's first layer reads {first} columns, "
                           f"not {n_in} features + {m.n_batch} batches")
    fields = dict(
        n_latent=n_latent,
        n_hidden=n_hidden,
        n_layers_encoder=count_layers(m, "encoder.encoder"),
        n_layers_decoder=count_layers(m, "decoder.px_decoder"),
        dropout_rate_encoder=float(kw.get("dropout_rate_encoder", 0.2)),
        dropout_rate_decoder=float(kw.get("dropout_rate_decoder", 0.2)),
        use_batch_norm=norm[(enc_bn, dec_bn)],
        use_layer_norm=kw.get("use_layer_norm", "none"),
        gene_dispersion=kw.get("gene_dispersion", "gene"),
        protein_dispersion=kw.get("protein_dispersion", "protein"),
        log_variational=bool(kw.get("log_variational", True)),
        scale_encoder_input=True,  # scvi-tools divides by 1 + mean before the log
        protein_input_mean="all",
        latent_library=not bool(kw.get("use_observed_lib_size", True)),
        empirical_protein_background_prior=bool(
            kw.get("empirical_protein_background_prior") if kw.get("empirical_protein_background_prior") is not None
            else len(m.protein_names) > 10),
        foreground_activation="relu",
        encode_covariates=encode_covariates,
        deeply_inject_covariates=True,  # scvi-tools' FCLayers inject the batch into every layer
    )
    if m.model_name == "TOTALANVI":
        n_hidden_cls, n_layers_cls = classifier_shape(m)
        fields.update(label_classifier=True, label_classifier_n_hidden=n_hidden_cls if n_layers_cls else None,
                      label_classifier_n_layers=n_layers_cls,
                      label_classifier_dropout=float((kw.get("classifier_parameters") or {}).get(
                          "dropout_rate", fields["dropout_rate_encoder"])))
    return ModelConfig(**fields)


def _batch_categories(m: ScviModel, batch_name: str | None) -> list[str]:
    if m.batch_key is not None:
        return list(m.batch_categories)
    if not batch_name:
        raise InteropError(
            f"{m.path} was set up without batch_key (one batch). streamtotal makes each store without a batch key "
            "its own batch, named after the store: pass batch_name (--batch-name) = the name of the store the "
            "model will read (its file name without .zarr/.h5ad)"
        )
    return [str(batch_name)]


def _data_config(m: ScviModel) -> DataConfig:
    kwargs = dict(batch_key=m.batch_key, protein_key=m.protein_key)
    if m.model_name == "TOTALANVI":
        kwargs.update(labels_key=m.labels_key, unlabeled_category=m.unlabeled_category)
    return DataConfig(**kwargs)


def _registry(m: ScviModel, batches: list[str]) -> Registry:
    study = f"scvi:{m.path.resolve().name}"
    return Registry(
        gene_names=m.gene_names,
        protein_names=m.protein_names,
        batch_categories=batches,
        label_categories=m.label_categories,
        unlabeled_category=m.unlabeled_category,
        study_names=[study],
        study_protein_masks=m.protein_batch_mask.any(axis=0, keepdims=True),
        batch_key=m.batch_key,
        labels_key=m.labels_key,
        batch_prefixed=False,
        extra={"scvi_import": {
            "source": str(m.path.resolve()), "model_name": m.model_name, "scvi_version": m.scvi_version,
            "batch_protein_masks": {b: row.tolist() for b, row in zip(batches, np.asarray(m.protein_batch_mask))},
        }},
    )


def _write_run_dir(out: Path, model: TotalVAE, config: RunConfig, registry: Registry, overwrite: bool) -> None:
    """Writes the run directory under a temporary name beside ``out``, then renames it into place."""
    def write(tmp: Path) -> None:
        run = RunDir(tmp)
        run.write_config(config, registry)
        run.write_final_model(model, config, registry)
        run.metrics_path.touch()  # no training happened here; readers find an empty log rather than none
        if (out.exists() or out.is_symlink()) and not overwrite:
            raise RunDirError(f"{out} appeared while importing; pass overwrite=True to replace it")

    write_directory_atomically(out, write)
