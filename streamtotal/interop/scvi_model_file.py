"""Reading a saved scvi-tools TOTALVI / TOTALANVI model directory (``model.pt``) into a plain description.

scvi-tools' ``model.save(DIR)`` writes ``DIR/model.pt``: a dict with ``model_state_dict`` (the module's
weights), ``var_names`` (the genes) and ``attr_dict`` (``init_params_`` with the constructor's arguments, and
``registry_``: the AnnData setup, i.e. the batch, label and protein fields with their categories and names).
This module only reads and checks that file; no torch module of scvi-tools is built, so scvi-tools itself need
not be installed. Such directories are downloaded from the internet: the file is loaded with ``weights_only=True``
(``streamtotal.safe_load``), so one holding objects that would run code is refused without running them. What cannot be imported faithfully is refused here, with the field and the value found.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from streamtotal.errors import InteropError
from streamtotal.safe_load import UnreadableFileError, UnsafeFileError, is_inert, load_weights_only

SUPPORTED_MODELS = ("TOTALVI", "TOTALANVI")
"""scvi-tools model classes this importer understands."""


@dataclass(frozen=True)
class ScviModel:
    """What a saved scvi-tools TOTALVI/TOTALANVI model holds, checked and normalised.

    Attributes:
        path: the model directory.
        model_name: "TOTALVI" or "TOTALANVI".
        scvi_version: the scvi-tools version that saved it.
        state: the module's state dict (tensors only).
        kwargs: the module's constructor arguments as scvi-tools resolved them (``init_params_``: explicit
            arguments merged with ``model_kwargs``).
        gene_names: genes in model order.
        protein_names: proteins in model order.
        protein_key: obsm key the proteins were read from.
        batch_key: obs column of the batch (None: scvi-tools' single placeholder batch).
        batch_categories: batch values in code order.
        labels_key: obs column of the labels (TOTALANVI), else None.
        label_categories: label values in classifier order, without the unlabeled category.
        unlabeled_category: TOTALANVI's unlabeled category, else None.
        protein_batch_mask: ``[n_batch, T]`` bool, which proteins each batch measured (all True when scvi-tools
            recorded no missing proteins).
    """

    path: Path
    model_name: str
    scvi_version: str
    state: dict[str, torch.Tensor]
    kwargs: dict[str, Any]
    gene_names: list[str]
    protein_names: list[str]
    protein_key: str
    batch_key: str | None
    batch_categories: list[str]
    labels_key: str | None
    label_categories: list[str]
    unlabeled_category: str | None
    protein_batch_mask: np.ndarray = field(repr=False)

    @property
    def n_batch(self) -> int:
        """Batch categories (>= 1)."""
        return len(self.batch_categories)

    def tensor(self, name: str) -> torch.Tensor:
        """A weight of the saved module, as float32.

        Raises:
            InteropError: the model has no such weight (not a TOTALVI of a layout this importer knows).
        """
        if name not in self.state:
            raise InteropError(f"{self.path}: model_state_dict has no {name!r}; is this a scvi-tools "
                               f"{self.model_name} saved by a version this importer knows (scvi-tools >= 1.2)?")
        value = self.state[name]
        return value.float() if value.is_floating_point() else value


def _refuse(path: Path, what: str, value: Any, why: str) -> InteropError:
    return InteropError(f"{path}: cannot import faithfully: {what} = {value!r} ({why})")


def read_scvi_model(model_dir: str | Path) -> ScviModel:
    """Reads and checks ``model_dir/model.pt`` saved by scvi-tools' ``TOTALVI.save`` / ``TOTALANVI.save``.

    Args:
        model_dir: the directory given to ``model.save`` (or the ``model.pt`` file itself).

    Returns:
        The model's description.

    Raises:
        InteropError: the file is missing or unreadable, is another model class, or uses an option that
            streamtotal cannot reproduce exactly (the message names the option and its value).
    """
    path = Path(model_dir)
    file = path if path.is_file() else path / "model.pt"
    if not file.is_file():
        raise InteropError(f"{path} holds no model.pt; pass the directory written by scvi-tools' model.save(DIR)")
    try:
        # pandas objects (the training history_, which is not read) load as inert stand-ins: no pandas code runs.
        saved = load_weights_only(file, inert_modules=("pandas",))
    except UnsafeFileError as e:
        raise InteropError(
            f"{file} holds objects that would run code when loaded ({', '.join(e.names)}); it is not loaded. A "
            "scvi-tools model file holds tensors, numpy arrays, pandas tables and plain values only: do not use "
            "this file"
        ) from e
    except UnreadableFileError as e:
        raise InteropError(f"{file} cannot be read as a scvi-tools model, it is truncated or damaged "
                           f"({e.reason})") from e
    if not isinstance(saved, dict) or "model_state_dict" not in saved or "attr_dict" not in saved:
        raise InteropError(f"{file} is not a scvi-tools model file (no model_state_dict / attr_dict)")
    attrs = saved["attr_dict"]
    if not isinstance(attrs, dict):
        raise InteropError(f"{file}: attr_dict is a {type(attrs).__name__}, not a dict")
    for name, value in (("var_names", saved.get("var_names")), ("attr_dict.registry_", attrs.get("registry_")),
                        ("attr_dict.init_params_", attrs.get("init_params_"))):
        _refuse_inert(file, name, value)
    registry = attrs.get("registry_", {})
    model_name = registry.get("model_name")
    if model_name not in SUPPORTED_MODELS:
        raise _refuse(file, "model_name", model_name, f"only {list(SUPPORTED_MODELS)} can be imported")
    kwargs = _init_kwargs(attrs)
    fields = registry.get("field_registries", {})
    setup = registry.get("setup_args", {})
    _check_options(file, kwargs, fields, setup, registry)

    if not isinstance(saved["model_state_dict"], dict):
        raise InteropError(f"{file}: model_state_dict is a {type(saved['model_state_dict']).__name__}, not a dict")
    state = {k: v for k, v in saved["model_state_dict"].items() if isinstance(v, torch.Tensor)}
    genes = [str(g) for g in _state(fields, "X").get("column_names", saved.get("var_names", []))]
    proteins_state = _state(fields, "proteins")
    proteins = [str(p) for p in proteins_state.get("column_names", [])]
    if not genes or not proteins:
        raise InteropError(f"{file}: the registry lists {len(genes)} genes and {len(proteins)} proteins; "
                           "both are needed")
    batch_state = _state(fields, "batch")
    batch_key = setup.get("batch_key")
    batches = [str(b) for b in batch_state.get("categorical_mapping", ["0"])]
    labels_key = label_categories = unlabeled = None
    if model_name == "TOTALANVI":
        labels_state = _state(fields, "labels")
        labels_key = setup.get("labels_key", labels_state.get("original_key"))
        unlabeled = str(labels_state.get("unlabeled_category"))
        # scvi-tools puts the unlabeled category last; the classifier's outputs are the others, in mapping order.
        label_categories = [str(c) for c in labels_state.get("categorical_mapping", []) if str(c) != unlabeled]
    mask = np.ones((len(batches), len(proteins)), dtype=bool)
    batch_mask = proteins_state.get("protein_batch_mask")
    if batch_mask is not None and not kwargs.get("override_missing_proteins", False):
        for code in range(len(batches)):
            row = batch_mask.get(str(code), batch_mask.get(code))
            if row is not None:
                mask[code] = np.asarray(row, dtype=bool)
    return ScviModel(
        path=path, model_name=model_name, scvi_version=str(registry.get("scvi_version", "unknown")), state=state,
        kwargs=kwargs, gene_names=genes, protein_names=proteins,
        protein_key=str(setup.get("protein_expression_obsm_key") or "protein_expression"),
        batch_key=batch_key, batch_categories=batches, labels_key=labels_key,
        label_categories=label_categories or [], unlabeled_category=unlabeled, protein_batch_mask=mask,
    )


def _refuse_inert(file: Path, where: str, value: Any) -> None:
    """Refuses a field the import reads that holds a pandas object (loaded as an inert stand-in, see safe_load)."""
    if is_inert(value):
        raise InteropError(f"{file}: {where} holds a pandas object, which is not loaded (unpickling it would run "
                           "pandas code); this importer reads plain values and numpy arrays there")
    if isinstance(value, dict):
        for key, item in value.items():
            _refuse_inert(file, f"{where}.{key}", item)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _refuse_inert(file, f"{where}[{i}]", item)
    elif isinstance(value, np.ndarray) and value.dtype == object:
        for i, item in enumerate(value.ravel()):
            _refuse_inert(file, f"{where}[{i}]", item)


def _init_kwargs(attrs: dict) -> dict[str, Any]:
    """The model's constructor arguments: ``non_kwargs`` merged with ``kwargs["model_kwargs"]``."""
    init = attrs.get("init_params_", {})
    if "non_kwargs" in init:  # scvi-tools >= 0.15 layout
        merged = dict(init.get("non_kwargs", {}))
        extra = dict(init.get("kwargs", {}))
    else:
        merged, extra = {}, dict(init)
    merged.update(extra.pop("model_kwargs", {}) or {})
    merged.update(extra)
    return merged


def _state(fields: dict, name: str) -> dict:
    return dict(fields.get(name, {}).get("state_registry", {}) or {})


def _check_options(file: Path, kwargs: dict, fields: dict, setup: dict, registry: dict) -> None:
    """Refuses every option whose function streamtotal's TotalVAE cannot reproduce."""
    checks = [
        ("latent_distribution", kwargs.get("latent_distribution", "normal"), ("normal",),
         "the logistic-normal latent is not implemented in streamtotal"),
        ("gene_likelihood", kwargs.get("gene_likelihood", "nb"), ("nb",),
         "streamtotal has no zero-inflated RNA likelihood"),
        ("gene_dispersion", kwargs.get("gene_dispersion", "gene"), ("gene", "gene-batch"),
         "streamtotal has per-gene and per-gene-and-batch dispersion only"),
        ("protein_dispersion", kwargs.get("protein_dispersion", "protein"), ("protein", "protein-batch"),
         "streamtotal has per-protein and per-protein-and-batch dispersion only"),
        ("use_labels_groups", kwargs.get("use_labels_groups", False), (False,),
         "grouped label classifiers are not implemented in streamtotal"),
    ]
    for what, value, allowed, why in checks:
        if value not in allowed:
            raise _refuse(file, what, value, why)
    for key, why in (("categorical_covariate_keys", "streamtotal's only covariate is the batch"),
                     ("continuous_covariate_keys", "streamtotal has no continuous covariates"),
                     ("size_factor_key", "streamtotal uses the observed or latent library size"),
                     ("panel_key", "streamtotal's protein panels follow the batch")):
        if setup.get(key):
            raise _refuse(file, f"setup_anndata {key}", setup[key], why)
    n_cat = fields.get("extra_categorical_covs", {}).get("summary_stats", {}).get("n_extra_categorical_covs", 0)
    n_cont = fields.get("extra_continuous_covs", {}).get("summary_stats", {}).get("n_extra_continuous_covs", 0)
    if n_cat or n_cont:
        raise _refuse(file, "extra covariates (categorical, continuous)", (n_cat, n_cont),
                      "streamtotal's only covariate is the batch")
    decoder_kwargs = kwargs.get("extra_decoder_kwargs") or {}
    activation = decoder_kwargs.get("activation_function_bg", "softplus")
    version = str(registry.get("scvi_version", "0.0"))
    if activation == "softplus" and "activation_function_bg" not in decoder_kwargs and _older_than(version, (1, 2)):
        activation = "exp"  # scvi-tools' on_load keeps exp for models saved before 1.2
    if activation != "softplus":
        raise _refuse(file, "extra_decoder_kwargs.activation_function_bg", activation,
                      "streamtotal's background scale is softplus(.) + 1e-8, as scvi-tools >= 1.2")
    if decoder_kwargs.get("scale_activation", "softmax") != "softmax":
        raise _refuse(file, "extra_decoder_kwargs.scale_activation", decoder_kwargs["scale_activation"],
                      "streamtotal's RNA scale is a softmax")
    if kwargs.get("extra_encoder_kwargs"):
        raise _refuse(file, "extra_encoder_kwargs", sorted(kwargs["extra_encoder_kwargs"]),
                      "not understood by this importer")
    classifier = dict(kwargs.get("classifier_parameters") or {})
    unknown_classifier = set(classifier) - {"n_layers", "n_hidden", "dropout_rate", "logits"}
    if unknown_classifier or not classifier.get("logits", True):
        raise _refuse(file, "classifier_parameters", classifier,
                      "streamtotal's label classifier is FCLayers (ReLU) then a linear map to logits")


def _older_than(version: str, minimum: tuple[int, int]) -> bool:
    parts = []
    for piece in version.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts + [0] * (2 - len(parts))) < minimum
