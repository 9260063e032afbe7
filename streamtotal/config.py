"""The run configuration: what data, which model, how to train. Written into every run directory."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from streamtotal.config_io import dumps_toml, from_dict, read_toml, to_dict
from streamtotal.device import check_device_name
from streamtotal.errors import ConfigError
from streamtotal.model.config import ModelConfig
from streamtotal.model.kl_schedule import TOTALANVI_WARMUP_FRACTION, TOTALVI_WARMUP_FRACTION


@dataclass(frozen=True)
class DataConfig:
    """Which stores to stream and how to read them."""

    stores: tuple[str, ...] = ()
    """Store paths or URLs (Zarr stores, ``.h5ad`` files, ``lamin://INSTANCE/COLLECTION_KEY``); several stores are
    several studies."""
    batch_key: str | None = None
    """obs column with the batch covariate; None = one batch per study."""
    labels_key: str | None = None
    """obs column with cell-type labels (used by totalANVI and reports); None = no labels."""
    unlabeled_category: str = "unlabeled"
    """Label value that means "no label"."""
    protein_key: str = "protein_expression"
    """obsm key holding the protein counts (AnnData-layout stores)."""
    gene_join: Literal["inner", "outer"] = "inner"
    """How genes of several studies are combined: intersection, or union with zero-fill."""
    min_gene_overlap: float = 0.5
    """A study sharing less than this fraction of the reference genes is refused. Inner join: the fraction of the
    first study's genes kept; outer join: the fraction of the union a study measures, and the genes it shares with
    the other studies over the smaller of the two lists (so a study sharing no gene is refused)."""
    absent_genes: Literal["mask", "zero"] = "mask"
    """Reference genes a study did not measure (outer join, or a mapped query lacking reference genes): "mask"
    treats them as unmeasured, left out of the RNA likelihood and, in the encoder input, replaced by the model's
    own expectation from the measured genes; "zero" reads them as measured zeros (the behaviour before masking,
    and scvi-tools')."""
    soma_rna_measurement: str = "RNA"
    """TileDB-SOMA stores: name of the RNA measurement."""
    soma_protein_measurement: str = "prot"
    """TileDB-SOMA stores: name of the protein measurement."""
    soma_x_layer: str = "data"
    """TileDB-SOMA stores: X layer holding raw counts (in both measurements)."""
    soma_value_filter: str | None = None
    """TileDB-SOMA stores: obs filter selecting the cells to use, e.g. ``"tissue == 'blood'"``; None = all."""


def default_batch_and_lr(model: ModelConfig) -> tuple[int, float]:
    """The reference implementation's minibatch size and Adam learning rate for a model: scvi-tools TOTALVI's
    256 and 4e-3, or, for totalANVI (a label classifier), its semi-supervised training's 128 and 1e-3 (what
    TOTALANVI trains with; on PBMC label transfer they are what make the classifier match TOTALANVI)."""
    return (128, 1e-3) if model.label_classifier else (256, 4e-3)


def default_kl_warmup_fraction(model: ModelConfig) -> float:
    """The KL warm-up, as a fraction of the planned steps, a model trains with unless told otherwise: totalVI
    0.15, totalANVI 0.75. On PBMC 10k (benchmarks/README.md) totalVI with 0.15 reaches scvi-tools' final
    validation -ELBO at about a quarter of the epochs 0.75 needs, with higher bio conservation, while totalANVI's
    label transfer lost accuracy and macro-F1 with the short warm-up, so it keeps the long one."""
    return TOTALANVI_WARMUP_FRACTION if model.label_classifier else TOTALVI_WARMUP_FRACTION


@dataclass(frozen=True)
class TrainConfig:
    """How to train. Defaults follow scvi-tools TOTALVI so that results are comparable."""

    max_epochs: int | None = None
    """Epochs to train; None = scvi-tools' rule: min(400, round(400 * 20000 / n_cells)), at least 1."""
    batch_size: int | None = None
    """Cells per minibatch per process; under DDP the global batch is ``batch_size`` x processes. None = the
    reference implementation's default for the model: 256 for totalVI (scvi-tools TOTALVI), 128 for totalANVI
    (scvi-tools' semi-supervised training, which TOTALANVI uses)."""
    lr: float | None = None
    """Adam learning rate at the model's default global batch (see ``lr_scaling``). None = the reference
    implementation's default: 4e-3 for totalVI, 1e-3 for totalANVI."""
    lr_scaling: Literal["none", "sqrt", "linear"] = "none"
    """How the learning rate follows the global batch (``batch_size`` x processes) when it differs from the
    model's default batch (256 totalVI, 128 totalANVI): "none" keeps ``lr``; "sqrt" multiplies it by
    sqrt(global / default) (the usual rule for Adam); "linear" by global / default. The effective rate is
    logged as ``lr`` in metrics.jsonl."""
    eps: float = 0.01
    """Adam epsilon (scvi-tools TOTALVI uses 0.01)."""
    weight_decay: float = 1e-6
    """Adam weight decay."""
    kl_warmup_fraction: float | None = None
    """KL warm-up length as a fraction of the planned total steps, so it always finishes (0 = no warm-up). None =
    the model's default: 0.15 for totalVI (it reaches a converged ELBO several times sooner than a long warm-up,
    with bio conservation no lower: benchmarks/time_to_quality.py), 0.75 for totalANVI (its label transfer is best
    with the long one: benchmarks/label_transfer.py)."""
    validation_fraction: float = 0.1
    """Fraction of cells held out (chosen deterministically from the seed) for validation."""
    validation_cache_mb: int = 512
    """Keep the validation minibatches in memory after the first pass (they are evaluated every epoch) when
    they fit in this many MiB as dense float32; larger validation sets are re-read every epoch. 0 = never."""
    reduce_lr_on_plateau: bool = True
    """Multiply the learning rate by ``lr_factor`` when the validation loss has not improved for
    ``lr_patience`` epochs (as scvi-tools TOTALVI)."""
    lr_factor: float = 0.6
    """Learning-rate decay factor on plateau."""
    lr_patience: int = 30
    """Epochs without improvement before the learning rate decays."""
    early_stopping_patience: int = 45
    """Stop after this many epochs without validation improvement; 0 = never."""
    adversarial_lr: float = 1e-3
    """Learning rate of the adversarial batch classifier (when the model has one)."""
    checkpoint_every_steps: int = 500
    """Write a checkpoint every this many optimiser steps (and always at the end of an epoch)."""
    keep_checkpoints: int = 2
    """How many checkpoints to keep in the run directory (older ones are deleted after a new one lands)."""
    log_every_steps: int = 20
    """Write training metrics to ``metrics.jsonl`` every this many steps."""
    seed: int = 0
    """Seed of the model initialisation, the data order and the validation split."""
    chunk_size: int | None = None
    """Cells per contiguous chunk: the unit of the global shuffle. Unset = 64, or on object storage the stores'
    cells per stored chunk (2,048 for stores ingested for S3), since each stored chunk costs one request."""
    io_chunks: int | None = None
    """Chunks read per I/O batch; rows are shuffled in memory within it. Unset = at least 4,096 cells, and 32 chunks
    where that stays within 32,768 cells (64 of 64 cells; on object storage 16 of 2,048, 32 of 1,024). Memory:
    (prefetch_batches + 1) x io_chunks x chunk_size cells per reader."""
    num_workers: int = 0
    """DataLoader worker processes (0 = read in a background thread of the main process)."""
    prefetch_batches: int | None = None
    """I/O batches read ahead of the one being consumed, on background threads; 0 = read when needed, in the
    training thread. Unset = 2, except when training on a CPU whose every core runs torch's threads: there the
    readers could only take cycles from the training step, so 0."""
    read_threads: int = 2
    """I/O batches read concurrently (at most ``prefetch_batches``): overlaps TileDB queries and object-store
    requests; the memory bound does not change."""
    threads: int = 0
    """torch CPU threads; 0 = torch's default."""
    device: str = "auto"
    """"auto" (CUDA if available, else CPU), "cpu", "cuda[:N]" or "mps"."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Precision of the training forward pass. "bf16" runs the linear layers under bfloat16 autocast (densities,
    KL terms and the loss stay float32, as do weights and optimiser state); "fp32" runs everything in float32;
    "auto" = "bf16" on a CUDA GPU that supports it and on a CPU with bf16 instructions (avx512_bf16 or amx_bf16),
    "fp32" otherwise. Validation is always evaluated in float32, so its figures compare across precisions."""
    compile: bool = False
    """Compile the model with ``torch.compile`` (inductor) before training: a one-off compile of tens of seconds
    for faster steps on long runs (mostly on GPU). Needs a C++ compiler on CPU."""
    progress: bool = True
    """Show a progress bar."""
    init_from: str | None = None
    """Start from the weights of this trained run directory (``--from``; e.g. a totalVI run turned into
    totalANVI): every weight the two models share is copied, new ones (the label classifier) start random. The
    runs' genes, proteins and batches must be the same. None = random initialisation."""

    def __post_init__(self) -> None:
        if self.max_epochs is not None and self.max_epochs < 1:
            raise ConfigError(f"train.max_epochs must be >= 1, got {self.max_epochs}")
        if self.batch_size is not None and self.batch_size < 2:
            raise ConfigError(f"train.batch_size must be >= 2 (batch norm needs two cells), got {self.batch_size}")
        if self.kl_warmup_fraction is not None and not 0.0 <= self.kl_warmup_fraction <= 1.0:
            raise ConfigError(f"train.kl_warmup_fraction must be in [0, 1], got {self.kl_warmup_fraction}")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ConfigError(f"train.validation_fraction must be in [0, 1), got {self.validation_fraction}")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
        for name in ("eps", "chunk_size", "io_chunks", "checkpoint_every_steps", "log_every_steps",
                     "keep_checkpoints"):
            if name in ("chunk_size", "io_chunks") and getattr(self, name) is None:
                continue
            if getattr(self, name) <= 0:
                raise ConfigError(f"train.{name} must be > 0, got {getattr(self, name)}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"train.precision must be 'auto', 'fp32' or 'bf16', got {self.precision!r}")
        # Only the form: whether the GPU exists is asked when the run starts (streamtotal.device.resolve_device).
        check_device_name(self.device, "train.device (--device)")
        if self.read_threads < 1:
            raise ConfigError(f"train.read_threads must be >= 1, got {self.read_threads!r}")
        if (self.num_workers < 0 or (self.prefetch_batches or 0) < 0 or self.threads < 0
                or self.early_stopping_patience < 0 or self.validation_cache_mb < 0):
            raise ConfigError("train.num_workers, prefetch_batches, threads, early_stopping_patience and "
                              "validation_cache_mb must be >= 0")

    def resolved_for(self, model: "ModelConfig") -> "TrainConfig":
        """A copy with ``batch_size``, ``lr`` and ``kl_warmup_fraction`` filled in from the model's defaults where
        they are None."""
        batch_size, lr = default_batch_and_lr(model)
        warmup = self.kl_warmup_fraction if self.kl_warmup_fraction is not None else default_kl_warmup_fraction(model)
        return replace(self, batch_size=self.batch_size if self.batch_size is not None else batch_size,
                       lr=self.lr if self.lr is not None else lr, kl_warmup_fraction=warmup)

    def effective_lr(self, world_size: int, model: "ModelConfig") -> float:
        """The learning rate for a job of ``world_size`` processes of this model, per ``lr_scaling``."""
        tc = self.resolved_for(model)
        ratio = tc.batch_size * world_size / default_batch_and_lr(model)[0]
        return tc.lr * {"none": 1.0, "sqrt": ratio**0.5, "linear": ratio}[self.lr_scaling]

    def epochs_for(self, n_cells: int) -> int:
        """The number of epochs to train on ``n_cells`` training cells."""
        if self.max_epochs is not None:
            return self.max_epochs
        return max(1, min(400, round(400 * 20000 / max(n_cells, 1))))


@dataclass(frozen=True)
class RunConfig:
    """Everything a training run needs; saved as ``config.toml`` in the run directory."""

    data: DataConfig = field(default_factory=DataConfig)
    """The stores and how to read them."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The model's architecture and likelihood options."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The optimisation and data-order options."""

    def __post_init__(self) -> None:
        if self.model.label_classifier and self.data.labels_key is None:
            raise ConfigError("model.label_classifier (totalANVI) needs labels: set data.labels_key (--labels-key) "
                              "to the obs column of cell types")

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """The config as ``{"data": {...}, "model": {...}, "train": {...}}``."""
        return {"data": to_dict(self.data), "model": to_dict(self.model), "train": to_dict(self.train)}

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, where: str = "config") -> "RunConfig":
        """Builds a RunConfig from nested dicts, refusing unknown sections and keys.

        Raises:
            ConfigError: unknown section or key, or an invalid value.
        """
        unknown = sorted(set(values) - {"data", "model", "train"})
        if unknown:
            raise ConfigError(f"{where}: unknown section(s) {unknown}; valid sections are data, model, train")
        return cls(
            data=from_dict(DataConfig, values.get("data", {}), where=f"{where} [data]"),
            model=from_dict(ModelConfig, values.get("model", {}), where=f"{where} [model]"),
            train=from_dict(TrainConfig, values.get("train", {}), where=f"{where} [train]"),
        )

    @classmethod
    def from_toml(cls, path: str | Path) -> "RunConfig":
        """Reads a run config from a TOML file with ``[data]``, ``[model]`` and ``[train]`` tables."""
        return cls.from_dict(read_toml(path), where=str(path))

    def to_toml(self) -> str:
        """The config as TOML text."""
        return dumps_toml(self.to_dict())

    def with_overrides(self, overrides: dict[str, dict[str, Any]]) -> "RunConfig":
        """Returns a copy with ``{section: {key: value}}`` applied on top (None values are ignored)."""
        merged = self.to_dict()
        for section, values in overrides.items():
            merged.setdefault(section, {}).update({k: v for k, v in values.items() if v is not None})
        return RunConfig.from_dict(merged, where="command line")
