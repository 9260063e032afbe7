"""``StreamLoader``: a torch DataLoader over a Stream, with exact mid-epoch resume."""

from __future__ import annotations

import zlib
from typing import Any, Iterator

import numpy as np
import torch.utils.data

from loaders.citebatch import CiteBatch
from loaders.collection import Collection
from loaders.errors import ResumeError
from loaders.stream import Stream, StreamConfig

_FINGERPRINT_FIELDS = (
    "n_ids", "ids_crc32", "seed", "batch_size", "chunk_size", "io_chunks", "shuffle", "world_size", "num_workers",
)


class StreamLoader:
    """Iterates CiteBatches of one rank, counting what was consumed so a restart resumes exactly.

    Every rank yields the same number of batches per epoch (``len(loader)``) and consumes them in lockstep,
    so the state of rank 0 is valid for every rank: a checkpoint holds one loader state and every rank loads it.
    """

    def __init__(
        self,
        collection: Collection,
        ids: np.ndarray,
        config: StreamConfig | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        """Args:
            collection: the aligned data.
            ids: global ids to stream (e.g. training ids).
            config: stream configuration (defaults to ``StreamConfig()``).
            rank: this process's rank.
            world_size: number of ranks.

        Raises:
            InvalidIdsError, ConfigError, PlanError: as ``Stream``.
        """
        self.stream = Stream(collection, ids, config if config is not None else StreamConfig(), rank=rank,
                             world_size=world_size)
        self.config = cfg = self.stream.config  # chunk_size and io_chunks resolved against the data
        self._loader = torch.utils.data.DataLoader(
            self.stream,
            batch_size=None,  # the Stream yields ready CiteBatches
            num_workers=cfg.num_workers,
            pin_memory=cfg.pin_memory,
            persistent_workers=False,  # each iteration forks workers that see the current epoch and resume point
            multiprocessing_context=cfg.multiprocessing_context if cfg.num_workers else None,
            # Its own generator: otherwise each new iterator draws worker seeds from torch's global RNG, and a
            # resumed run (which creates its iterator at another step) would see different dropout noise.
            generator=torch.Generator().manual_seed(cfg.seed),
        )
        self._fingerprint = {
            "n_ids": int(self.stream.ids.size),
            # A different train/val split of the same size would silently resume onto other cells.
            "ids_crc32": zlib.crc32(self.stream.ids.tobytes()),
            "seed": cfg.seed,
            "batch_size": cfg.batch_size,
            "chunk_size": cfg.chunk_size,
            "io_chunks": cfg.io_chunks,
            "shuffle": cfg.shuffle,
            "world_size": world_size,
            "num_workers": cfg.num_workers,
        }
        self.epoch = 0
        self.batches_consumed = 0
        self._resumed = False

    def __len__(self) -> int:
        """Batches per epoch on this rank (equal on every rank)."""
        return self.stream.n_batches_per_slot * self.config.slots_per_rank

    @property
    def batches_remaining(self) -> int:
        """Batches of the current epoch not yet yielded."""
        return len(self) - self.batches_consumed

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch to iterate (call with the same value on every rank).

        A different epoch starts at its first batch; the current epoch keeps its resume point, so a training
        loop that calls ``set_epoch(start_epoch)`` after ``load_state_dict`` still resumes mid-epoch.
        """
        if int(epoch) != self.epoch:
            self.epoch = int(epoch)
            self.batches_consumed = 0
            self._resumed = False

    def set_read_ahead(self, epoch: int | None) -> None:
        """Lets the reader start on ``epoch``'s first I/O group while the current epoch ends (None: off); a training
        loop calls it when it knows which epoch follows. See ``Stream.set_read_ahead``; no effect with workers."""
        self.stream.set_read_ahead(epoch)

    def __iter__(self) -> Iterator[CiteBatch]:
        """Yields the batches of the current epoch not consumed yet.

        After a complete pass, iterating again replays the same epoch from its start (like a DataLoader),
        unless the state was just loaded: a state saved at the end of an epoch resumes to nothing.
        Leaving the loop early keeps the position: the next iteration continues after the last batch yielded.
        """
        if self.batches_consumed >= len(self) and not self._resumed:
            self.batches_consumed = 0
        self._resumed = False
        if self.batches_consumed >= len(self):
            return
        self.stream.set_epoch(self.epoch)
        self.stream.set_start_batch(self.batches_consumed)
        for batch in self._loader:
            self.batches_consumed += 1  # counted when handed out: a checkpoint after this step includes it
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """Returns ``{"epoch", "batches_consumed", "fingerprint"}`` (JSON-safe)."""
        return {"epoch": self.epoch, "batches_consumed": self.batches_consumed, "fingerprint": dict(self._fingerprint)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores a position so the next iteration yields exactly the batches not consumed in that epoch.

        Args:
            state: a dict from ``state_dict``.

        Raises:
            ResumeError: keys missing, the fingerprint differs (names the fields, saved vs now), or the
                consumed count is out of range.
        """
        missing = [k for k in ("epoch", "batches_consumed", "fingerprint") if k not in state]
        if missing:
            raise ResumeError(f"loader state is missing {missing}; was it written by StreamLoader.state_dict()?")
        saved = state["fingerprint"]
        diffs = [
            f"{k}: saved {saved.get(k)!r}, now {self._fingerprint[k]!r}"
            for k in _FINGERPRINT_FIELDS if saved.get(k) != self._fingerprint[k]
        ]
        if diffs:
            raise ResumeError(
                "cannot resume: the loader differs from the one that saved this state (" + "; ".join(diffs) + "). "
                "Resume with the same cells, seed, batch/chunk sizes, ranks and workers, or start a fresh epoch "
                "without loading the loader state."
            )
        consumed = int(state["batches_consumed"])
        if not 0 <= consumed <= len(self):
            raise ResumeError(f"loader state has batches_consumed={consumed}, outside [0, {len(self)}]")
        self.epoch = int(state["epoch"])
        self.batches_consumed = consumed
        self._resumed = True
