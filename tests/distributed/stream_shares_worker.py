"""Run under torchrun by tests/distributed/test_torchrun.py: each rank streams its share of two epochs of a store
and saves the cell ids it saw (and, after a simulated restart, the ids it saw once resumed)."""

import sys

import numpy as np
import torch.distributed as dist

from loaders import Collection, StreamConfig, StreamLoader, ZarrSource

store, out = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
collection = Collection([ZarrSource(store)], batch_key="batch")
ids = np.arange(collection.n_obs)
config = StreamConfig(batch_size=32, chunk_size=8, io_chunks=4, seed=11, num_workers=1)
seen = {}
for epoch in (0, 1):
    loader = StreamLoader(collection, ids, config, rank=rank, world_size=world)
    loader.set_epoch(epoch)
    seen[f"epoch{epoch}"] = np.concatenate([b.cell_id.numpy() for b in loader])
    seen[f"n_batches{epoch}"] = np.array([len(loader)])

# A restart mid-epoch: consume 3 batches, save the state, and resume in a fresh loader.
loader = StreamLoader(collection, ids, config, rank=rank, world_size=world)
loader.set_epoch(2)
first = []
for i, batch in enumerate(loader):
    first.append(batch.cell_id.numpy())
    if i == 2:
        break
state = loader.state_dict()
resumed = StreamLoader(collection, ids, config, rank=rank, world_size=world)
resumed.load_state_dict(state)
seen["before_kill"] = np.concatenate(first)
seen["after_resume"] = np.concatenate([b.cell_id.numpy() for b in resumed])
np.savez(f"{out}/rank{rank}.npz", **seen)
dist.barrier()
dist.destroy_process_group()
