"""The layout of a run directory, and loading a trained model back from one.

    RUN_DIR/
      config.toml      the resolved run config (data, model, train)
      registry.json    genes, proteins, batches, labels and panels the model was trained with
      metrics.jsonl    training and validation metrics, one JSON object per line
      ckpt-*.pt        resumable checkpoints (newest kept)
      model.pt         the final model (weights + config + registry), written when training ends

RUN_DIR may be an ``s3://`` prefix (``loaders.object_store.ObjectPath``): every file is then written in one PUT
of its finished bytes (never visible partly written), metrics.jsonl is rewritten whole at each checkpoint (object
storage cannot append; see MetricsLog) and a checkpoint is found by listing the prefix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from loaders.object_store import as_path, readable
from loaders.registry import Registry
from streamtotal.config import RunConfig
from streamtotal.errors import RunDirError
from streamtotal.model.totalvi import TotalVAE
from streamtotal.safe_load import UnreadableFileError, UnsafeFileError, load_weights_only
from streamtotal.training.checkpoint import atomic_write_bytes, list_checkpoints, load_latest_checkpoint


class RunDir:
    """Paths and writers of one run directory (created on first use)."""

    def __init__(self, path: str | Path) -> None:
        self.path = as_path(path)  # an ObjectPath for s3:// (see the module docstring)
        self.path.mkdir(parents=True, exist_ok=True)

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def model_path(self) -> Path:
        return self.path / "model.pt"

    def has_checkpoints(self) -> bool:
        """True when the directory holds at least one checkpoint."""
        return bool(list_checkpoints(self.path))

    def write_config(self, config: RunConfig, registry: Registry) -> None:
        """Writes ``config.toml`` and ``registry.json`` atomically."""
        atomic_write_bytes(self.path / "config.toml", lambda f: f.write(config.to_toml().encode()))
        text = json.dumps(registry.to_dict(), indent=1)
        atomic_write_bytes(self.path / "registry.json", lambda f: f.write(text.encode()))

    def write_final_model(self, model: TotalVAE, config: RunConfig, registry: Registry) -> None:
        """Writes ``model.pt`` (weights, config, registry) atomically."""
        state = {"format": "streamtotal-model", "version": 1, "model": model.state_dict(),
                 "config": config.to_dict(), "registry": registry.to_dict()}
        atomic_write_bytes(self.model_path, lambda f: torch.save(state, f))


@dataclass
class TrainedModel:
    """A model loaded from a run directory, ready for inference.

    Attributes:
        model: the TotalVAE module, in eval mode, on the CPU.
        config: the run's config.
        registry: what the model was trained with (the query side is aligned onto it).
        source: the file it was loaded from.
    """

    model: TotalVAE
    config: RunConfig
    registry: Registry
    source: Path


def load_model_file(path: str | Path) -> dict:
    """Loads a run's ``model.pt``, running no code it may hold (``weights_only=True``, see safe_load).

    Args:
        path: the ``model.pt`` file.

    Returns:
        Its state: ``model`` (weights), ``config`` and ``registry`` (plain dicts).

    Raises:
        RunDirError: the file is truncated or damaged, is not a streamtotal model, or holds objects whose loading
            would run code (then nothing was loaded).
    """
    path = as_path(path)
    try:
        state = load_weights_only(readable(path))
    except UnsafeFileError as e:
        raise RunDirError(
            f"{path} holds objects that would run code when loaded ({', '.join(e.names)}); it is not loaded. "
            "streamtotal writes only tensors, numbers and strings: this file was replaced or tampered with"
        ) from e
    except UnreadableFileError as e:
        raise RunDirError(f"{path} cannot be read, it is truncated or damaged ({e.reason}); train again, or "
                          "delete it to use the run's newest checkpoint") from e
    if not isinstance(state, dict) or state.get("format") != "streamtotal-model" or not {
            "model", "config", "registry"} <= state.keys():
        raise RunDirError(f"{path} is not a streamtotal model file (no format 'streamtotal-model' with model, config "
                          "and registry)")
    return state


def load_trained(run_dir: str | Path) -> TrainedModel:
    """Loads the final model of a run, or its newest readable checkpoint when training has not finished.

    Raises:
        RunDirError: the directory has neither ``model.pt`` nor a checkpoint, or ``model.pt`` cannot be loaded or
            does not fit its own config.
        CheckpointError: no checkpoint can be read (without ``model.pt``).
    """
    run_dir = as_path(run_dir)
    final = run_dir / "model.pt"
    if final.is_file():
        state, source = load_model_file(final), final
    else:
        found = load_latest_checkpoint(run_dir)
        if found is None:
            raise RunDirError(
                f"{run_dir} holds no model.pt and no checkpoint; train first: streamtotal train STORE --out {run_dir}"
            )
        source, state = found
    config = RunConfig.from_dict(state["config"], where=f"{source} config")
    registry = Registry.from_dict(state["registry"])
    model = TotalVAE(config.model, registry.n_genes, registry.n_proteins, registry.n_batch, n_labels=registry.n_labels)
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, TypeError, AttributeError) as e:  # missing/unexpected keys, shape mismatches
        raise RunDirError(f"the weights in {source} do not fit the model its config describes: {e}") from e
    model.eval()
    return TrainedModel(model=model, config=config, registry=registry, source=source)
