"""Train-step speed of streamtotal's TotalVAE module against scvi-tools' TOTALVAE on the same minibatch.

One step = forward + loss + backward + Adam step (lr 4e-3, eps 0.01, weight decay 1e-6, as both trainers use)
on one [batch, genes] RNA + [batch, proteins] protein minibatch of simulated counts (NB RNA around a 2,500-count
library, ~40% non-zero; NB-mixture proteins). Both modules use their defaults (totalVI architecture: 2-layer
encoder, 1-layer decoders, 256 hidden, 20 latent, dropout 0.2, batch norm).

Every configuration runs in its own child process, because glibc's allocator state is per process and
changes step times by ~1.5x (see ``streamtotal/model/cpu_allocator.py``); configurations are run in
alternating rounds so machine noise hits them alike. Configurations:

* ``scvi_tools``: TOTALVAE, glibc defaults, torch's default (for-loop) Adam - what a scvi-tools user gets;
* ``scvi_tools_retain``: the same with ``retain_freed_memory()`` (a like-for-like peer for ours);
* ``streamtotal``: TotalVAE, glibc defaults, default Adam;
* ``streamtotal_retain``: TotalVAE with ``retain_freed_memory()``, default Adam;
* ``streamtotal_retain_fused``: the same with ``Adam(fused=True)`` - what the trainer should run on CPU.

Reported per configuration: the fastest block's median ms/step (best estimate on a shared machine), the
median over all steps, and cells/s from the former.

Usage:
    python benchmarks/model_step_speed.py [--threads 2] [--rounds 2] [--blocks 4] [--steps 15]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def simulated_batch(n_cells: int, n_genes: int, n_proteins: int, n_batch: int, seed: int = 0):
    """Counts shaped like a CITE-seq minibatch: ~40% non-zero RNA, protein background + foreground."""
    g = torch.Generator().manual_seed(seed)
    profile = torch.distributions.LogNormal(0.0, 1.2).sample((n_genes,))
    profile = profile / profile.sum()
    library = torch.distributions.LogNormal(np.log(2500.0), 0.3).sample((n_cells, 1))
    rate = torch.distributions.Gamma(2.0, 2.0 / (library * profile)).sample()
    rna = torch.poisson(rate, generator=g)
    background = torch.distributions.LogNormal(3.0, 0.4).sample((n_cells, n_proteins))
    positive = torch.rand(n_cells, n_proteins, generator=g) < 0.3
    protein = torch.poisson(background * torch.where(positive, 8.0, 1.0), generator=g)
    batch = torch.randint(0, n_batch, (n_cells,), generator=g)
    return rna, protein, batch


def _adam(params, fused: bool = False):
    return torch.optim.Adam(params, lr=4e-3, eps=0.01, weight_decay=1e-6, **({"fused": True} if fused else {}))


def ours_step_fn(rna, protein, batch, n_batch, fused_adam: bool):
    from loaders.citebatch import CiteBatch
    from streamtotal.model import ModelConfig, TotalVAE

    n_cells, n_proteins = protein.shape
    prior = (torch.full((n_proteins, n_batch), 3.0), torch.full((n_proteins, n_batch), 0.4))
    model = TotalVAE(ModelConfig(), rna.shape[1], n_proteins, n_batch, protein_prior=prior).train()
    data = CiteBatch(rna, protein, torch.ones_like(protein, dtype=torch.bool), batch,
                     torch.full((n_cells,), -1), torch.arange(n_cells))
    opt = _adam(model.parameters(), fused_adam)

    def step() -> float:
        out = model(data, kl_weight=0.5)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        return out.loss.item()

    return step, sum(p.numel() for p in model.parameters())


def scvi_step_fn(rna, protein, batch, n_batch, fused_adam: bool):
    from scvi import REGISTRY_KEYS
    from scvi.module import TOTALVAE

    n_proteins = protein.shape[1]
    module = TOTALVAE(
        n_input_genes=rna.shape[1], n_input_proteins=n_proteins, n_batch=n_batch, n_panel=n_batch,
        protein_background_prior_mean=np.full((n_proteins, n_batch), 3.0, dtype=np.float32),
        protein_background_prior_scale=np.full((n_proteins, n_batch), 0.4, dtype=np.float32),
    ).train()
    tensors = {
        REGISTRY_KEYS.X_KEY: rna,
        REGISTRY_KEYS.PROTEIN_EXP_KEY: protein,
        REGISTRY_KEYS.BATCH_KEY: batch.unsqueeze(1),
        REGISTRY_KEYS.LABELS_KEY: torch.zeros(len(batch), 1),
    }
    opt = _adam(module.parameters(), fused_adam)

    def step() -> float:
        _, _, losses = module(tensors, loss_kwargs={"kl_weight": 0.5})
        opt.zero_grad(set_to_none=True)
        losses.loss.backward()
        opt.step()
        return losses.loss.item()

    return step, sum(p.numel() for p in module.parameters())


CONFIGS = {
    # name: (framework, retain freed memory, fused Adam)
    "scvi_tools": ("scvi", False, False),
    "scvi_tools_retain": ("scvi", True, False),
    "streamtotal": ("ours", False, False),
    "streamtotal_retain": ("ours", True, False),
    "streamtotal_retain_fused": ("ours", True, True),
}


def child(args) -> dict:
    """Runs in a child process: times one configuration, returns per-block step times in ms."""
    framework, retain, fused = CONFIGS[args.config]
    if retain:
        from streamtotal.model.cpu_allocator import retain_freed_memory

        retain_freed_memory()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rna, protein, batch = simulated_batch(args.batch_size, args.genes, args.proteins, args.n_batch)
    make = ours_step_fn if framework == "ours" else scvi_step_fn
    step, n_params = make(rna, protein, batch, args.n_batch, fused)
    for _ in range(args.warmup):
        step()
    blocks = []
    for _ in range(args.blocks):
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            step()
            times.append((time.perf_counter() - start) * 1000)
        blocks.append(times)
    return {"blocks_ms": blocks, "n_params": n_params}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--proteins", type=int, default=50)
    parser.add_argument("--n-batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds over all configurations")
    parser.add_argument("--blocks", type=int, default=4, help="timed blocks per configuration and round")
    parser.add_argument("--steps", type=int, default=15, help="steps per timed block")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"subset of {list(CONFIGS)}")
    parser.add_argument("--config", default=None, help=argparse.SUPPRESS)  # set in child processes
    args = parser.parse_args()
    if args.config is not None:
        print(json.dumps(child(args)))
        return
    configs = args.configs.split(",")
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown:
        parser.error(f"unknown configs {unknown}")
    try:
        import scvi

        scvi_version = scvi.__version__
    except ImportError:
        scvi_version = None
        configs = [c for c in configs if CONFIGS[c][0] != "scvi"]
    forwarded = ["--batch-size", str(args.batch_size), "--genes", str(args.genes), "--proteins", str(args.proteins),
                 "--n-batch", str(args.n_batch), "--threads", str(args.threads), "--blocks", str(args.blocks),
                 "--steps", str(args.steps), "--warmup", str(args.warmup)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    blocks = {c: [] for c in configs}
    n_params = {}
    for _ in range(args.rounds):
        for config in configs:
            out = subprocess.run([sys.executable, os.path.abspath(__file__), *forwarded, "--config", config],
                                 env=env, capture_output=True, text=True, check=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            blocks[config] += result["blocks_ms"]
            n_params[config] = result["n_params"]
    report = {
        "benchmark": "model_step_speed",
        "batch_size": args.batch_size, "genes": args.genes, "proteins": args.proteins, "n_batch": args.n_batch,
        "threads": args.threads, "rounds": args.rounds, "blocks_per_round": args.blocks, "steps_per_block": args.steps,
        "torch": torch.__version__, "scvi_tools_version": scvi_version,
    }
    for config in configs:
        times = np.array(blocks[config])
        best = float(np.median(times, axis=1).min())
        report[config] = {
            "ms_per_step_best_block": round(best, 2),
            "ms_per_step_median": round(float(np.median(times)), 2),
            "cells_per_s_best_block": round(args.batch_size * 1000 / best, 1),
            "n_params": n_params[config],
        }
    pairs = {"speedup_default_vs_default": ("scvi_tools", "streamtotal"),
             "speedup_retain_vs_retain": ("scvi_tools_retain", "streamtotal_retain"),
             "speedup_recommended_vs_scvi_default": ("scvi_tools", "streamtotal_retain_fused")}
    for name, (theirs, ours) in pairs.items():
        if theirs in report and ours in report:
            report[name] = round(report[theirs]["ms_per_step_best_block"] / report[ours]["ms_per_step_best_block"], 2)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
