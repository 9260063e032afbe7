"""The inference layer's ``StorePosterior`` over data the API holds: a store path, or an aligned Collection
(in-memory AnnData / MuData, several stores), so every downstream method runs the CLI's own code."""

from __future__ import annotations

from streamtotal.inference.expression import StorePosterior
from streamtotal.training.run_dir import TrainedModel
from streamtotal.device import resolve_device

IN_MEMORY = "<in-memory data>"
"""What ``CollectionPosterior.store`` says for data that has no store (shown in error messages)."""


class CollectionPosterior(StorePosterior):
    """A ``StorePosterior`` over an already aligned Collection instead of one store it opens itself.

    Every method of ``StorePosterior`` (and the functions of ``predictive.py`` / ``differential.py`` that take
    one) works unchanged; writing back into a store needs a real store (``store``), so in-memory data return
    their results instead.

    Args:
        trained: the model.
        collection: data aligned onto ``trained.registry``.
        store: the store path when the collection is one local store (enables write-back), else None.
        batch_size: cells per forward pass.
        device: "auto", "cpu" or "cuda[:N]".
        progress: show tqdm progress bars.
    """

    def __init__(self, trained: TrainedModel, collection, *, store: str | None = None, batch_size: int = 1024,
                 device: str = "auto", progress: bool = True) -> None:
        # StorePosterior.__init__ opens its store; the rest of its state is the same.
        self.trained = trained
        self.device = resolve_device(device)
        self.model = trained.model.to(self.device).eval()
        self.store = str(store) if store is not None else IN_MEMORY
        self.collection = collection
        self.registry = trained.registry
        self.batch_size, self.progress = int(batch_size), progress
