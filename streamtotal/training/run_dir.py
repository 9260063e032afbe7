"""The layout of a run directory, and loading a trained model back from one.

    RUN_DIR/
      config.toml      the resolved run config (data, model, train)
      registry.json    genes, proteins, batches, labels and panels the model was trained with
      metrics.jsonl    training and validation metrics, one JSON object per line
      ckpt-*.pt        resumable checkpoints (newest kept)
      model.pt         the final model (weights + config + registry), written when training ends
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from loaders.registry import Registry
from streamtotal.config import RunConfig
from streamtotal.errors import RunDirError
from streamtotal.model.totalvi import TotalVAE
from streamtotal.training.checkpoint import atomic_write_bytes, latest_checkpoint, list_checkpoints, load_checkpoint


class RunDir:
    """Paths and writers of one run directory (created on first use)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
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


def load_trained(run_dir: str | Path) -> TrainedModel:
    """Loads the final model of a run, or its newest checkpoint when training has not finished.

    Raises:
        RunDirError: the directory has neither ``model.pt`` nor a checkpoint.
    """
    run_dir = Path(run_dir)
    final = run_dir / "model.pt"
    if final.is_file():
        state, source = torch.load(final, map_location="cpu", weights_only=False), final
    else:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise RunDirError(
                f"{run_dir} holds no model.pt and no checkpoint; train first: streamtotal train STORE --out {run_dir}"
            )
        state, source = load_checkpoint(ckpt), ckpt
    config = RunConfig.from_dict(state["config"], where=f"{source} config")
    registry = Registry.from_dict(state["registry"])
    model = TotalVAE(config.model, registry.n_genes, registry.n_proteins, registry.n_batch, n_labels=registry.n_labels)
    model.load_state_dict(state["model"])
    model.eval()
    return TrainedModel(model=model, config=config, registry=registry, source=source)
